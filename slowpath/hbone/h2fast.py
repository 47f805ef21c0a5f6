"""h2's `H2Connection` with a data path that costs one copy per payload byte each way.

Owns: `H2Connection`, a drop-in subclass of h2's, used by the HBONE codec.  It changes
how bytes move, never what h2 decides: frames, flow control, stream states, settings
and errors are h2's own code paths.

Why (profiled on the netns lab, iperf3 through two ztunnels): with stock h2 4.x the
receiving ztunnel spent about a third of its time formatting `repr(frame)` for a trace
log that is off (h2 builds the string eagerly, and hyperframe hex-dumps the *whole*
DATA payload before cutting it to 20 characters), and both sides copied every payload
byte four to six times (frame buffer slices, `tobytes()`, header + body concatenation,
joins into the outbound bytearray, `bytes()` of it), each copy into fresh memory that
the kernel first has to fault in and zero.

- Receiving: `FrameBuffer` parses DATA frames itself (one copy of the payload out of the
  buffer, as `bytes`), and hands every other frame to hyperframe exactly as h2 does.
  DATA frames are `QuietDataFrame`s, whose repr looks at the first bytes only; h2
  dispatches them like DataFrame (same handler).  Errors map to the same h2 exceptions
  as h2's own FrameBuffer (a frame longer than MAX_FRAME_SIZE is refused as soon as its
  header is in, instead of after its body).
- Sending: frames are queued as a list of pieces; an unpadded DATA frame becomes its
  9-byte header plus a reference to the payload (which may be a memoryview over
  immutable bytes).  `data_to_send()` joins the pieces once; `pieces_to_send()` hands
  large payloads out by reference, for the driver to encrypt straight from them.

Must not: change h2's protocol behaviour or its public API.  Relies on h2 internals
that are the same from h2 4.1 to 4.4: the `incoming_buffer` attribute (any object with
`add_data()`, `max_frame_size` and iteration), `_frame_dispatch_table`, and the
`_prepare_for_sending` / `_data_to_send` pair on the way out.
"""
from __future__ import annotations

import struct

import h2.connection
from h2.exceptions import FrameDataMissingError, FrameTooLargeError, ProtocolError
from hyperframe.exceptions import (
    InvalidDataError,
    InvalidFrameError,
    InvalidPaddingError,
)
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PushPromiseFrame,
)

_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16+8), type, flags, stream id
_FLAG_END_STREAM = 0x01
_FLAG_PADDED = 0x08
_CONTINUATION_BACKLOG = 64  # as h2: more CONTINUATION frames than this is an attack
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TLS_RECORD = 16384  # TLS max record payload: SSL_write cuts writes into these
_BIG = 4 * _TLS_RECORD  # payloads from here on are written by reference, not joined


class QuietDataFrame(DataFrame):
    """A received DATA frame.  Same fields and wire meaning as hyperframe's DataFrame;
    only its repr is cheap (h2 formats every received frame for a trace log)."""

    def _body_repr(self) -> str:
        # hyperframe shows the serialized body, hex-dumped and cut to 20 digits: only
        # its first 11 bytes matter.
        padded = "PADDED" in self.flags
        head = (bytes([self.pad_length]) if padded else b"") + bytes(self.data[:11])
        if padded:
            head += b"\0" * min(self.pad_length, 11)
        if not head:
            return "None"
        r = head[:11].hex()
        return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


class FrameBuffer:
    """Incoming bytes -> frames, like `h2.frame_buffer.FrameBuffer`."""

    def __init__(self, server: bool = False) -> None:
        self._data = bytearray()
        self.max_frame_size = 0
        self._preamble = _PREFACE if server else b""
        self._headers_buffer: list[Frame] = []

    def add_data(self, data) -> None:
        view = memoryview(data)
        if self._preamble:
            n = min(len(self._preamble), len(view))
            if self._preamble[:n] != view[:n]:
                raise ProtocolError("Invalid HTTP/2 preamble.")
            view = view[n:]
            self._preamble = self._preamble[n:]
        self._data += view

    def __iter__(self) -> FrameBuffer:
        return self

    def __next__(self) -> Frame:
        while True:
            f = self._next_frame()
            if f is not None:
                return f

    def _next_frame(self) -> Frame | None:
        buf = self._data
        if len(buf) < 9:
            raise StopIteration
        hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf)
        length = (hi << 8) + lo
        try:
            if ftype == DataFrame.type:
                f: Frame = QuietDataFrame(sid & 0x7FFFFFFF)
                f.parse_flags(flags)
            else:
                f, _ = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
        except (InvalidDataError, InvalidFrameError) as err:
            raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
        # h2 checks the length only once the whole body is in; refusing an overlong
        # frame as soon as its header is here saves buffering up to 16 MiB for nothing.
        if length > self.max_frame_size:
            raise FrameTooLargeError(
                f"Received overlong frame: length {length}, max {self.max_frame_size}")
        if len(buf) < 9 + length:
            raise StopIteration
        if ftype == DataFrame.type:
            self._data_body(f, buf, length, flags)
        else:
            try:
                f.parse_body(memoryview(buf[9:9 + length]))
            except InvalidDataError as err:
                raise ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise FrameDataMissingError("Frame data missing or invalid") from err
        del buf[:9 + length]  # amortized O(1): bytearray keeps an offset at its front
        return self._update_header_buffer(f)

    @staticmethod
    def _data_body(f: QuietDataFrame, buf: bytearray, length: int, flags: int) -> None:
        """DataFrame.parse_body, copying the payload once (straight into bytes)."""
        start, end = 9, 9 + length
        if flags & _FLAG_PADDED:
            if length < 1:
                raise FrameDataMissingError("Frame data missing or invalid")
            f.pad_length = buf[9]
            start, end = 10, end - f.pad_length
        with memoryview(buf) as view:
            f.data = view[start:max(start, end)].tobytes()
        f.body_len = length
        if f.pad_length and f.pad_length >= length:
            raise InvalidPaddingError("Padding is too long.")

    def _update_header_buffer(self, f: Frame) -> Frame | None:
        # h2's rules for HEADERS/PUSH_PROMISE + CONTINUATION, unchanged.
        if self._headers_buffer:
            first = self._headers_buffer[0]
            if not (isinstance(f, ContinuationFrame) and f.stream_id == first.stream_id):
                raise ProtocolError("Invalid frame during header block.")
            self._headers_buffer.append(f)
            if len(self._headers_buffer) > _CONTINUATION_BACKLOG:
                raise ProtocolError("Too many continuation frames received.")
            if "END_HEADERS" in f.flags:
                first.flags.add("END_HEADERS")
                first.data = b"".join(x.data for x in self._headers_buffer)
                self._headers_buffer = []
                return first
            return None
        if isinstance(f, (HeadersFrame, PushPromiseFrame)) and "END_HEADERS" not in f.flags:
            self._headers_buffer.append(f)
            return None
        return f


class H2Connection(h2.connection.H2Connection):
    """h2's connection with the copy-light data path described in the module docstring."""

    def __init__(self, config=None) -> None:
        super().__init__(config=config)
        self.incoming_buffer = FrameBuffer(server=not self.config.client_side)
        self._frame_dispatch_table[QuietDataFrame] = self._frame_dispatch_table[DataFrame]
        self._pieces: list = []  # queued output, in order, before `_data_to_send`

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        if not frames:
            return
        pieces = self._pieces
        if self._data_to_send:  # h2 wrote there directly (the preface): keep the order
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        for f in frames:
            if f.__class__ is DataFrame and not f.pad_length and "PADDED" not in f.flags:
                body = f.data
                n = f.body_len = len(body)
                pieces.append(_HEADER.pack(n >> 8, n & 0xFF, DataFrame.type,
                                           _FLAG_END_STREAM if "END_STREAM" in f.flags else 0,
                                           f.stream_id & 0x7FFFFFFF))
                if n:
                    pieces.append(body)
            else:
                pieces.append(f.serialize())
            assert f.body_len <= self.max_outbound_frame_size

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._pieces:
            if self._data_to_send:
                self._pieces.append(bytes(self._data_to_send))
            data = b"".join(self._pieces)
            self._pieces.clear()
            self._data_to_send = bytearray()
            if amount is None or amount >= len(data):
                return data
            self._data_to_send = bytearray(data[amount:])
            return data[:amount]
        return super().data_to_send(amount)

    def pieces_to_send(self) -> list:
        """Like `data_to_send()`, as a list of buffers to write in order, without
        copying large payloads: small pieces are joined, and a large payload
        (>= `_BIG`) is split so that its head completes the TLS record the small ones
        started and the rest is whole records (as many records as one joined write)."""
        pieces = self._pieces
        if self._data_to_send:
            pieces.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        if not pieces:
            return []
        self._pieces = []
        out: list = []
        small = bytearray()
        for p in pieces:
            n = len(p)
            if n < _BIG:
                small += p
                continue
            k = -len(small) % _TLS_RECORD
            if small:
                small += p[:k]
                out.append(small)
                small = bytearray()
                p = memoryview(p)[k:]
            out.append(p)
        if small:
            out.append(small)
        return out

    def clear_outbound_data_buffer(self) -> None:
        self._pieces.clear()
        super().clear_outbound_data_buffer()
