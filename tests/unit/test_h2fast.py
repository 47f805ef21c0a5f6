"""The copy-light h2 data path (slowpath/hbone/h2fast.py) against stock h2."""
from __future__ import annotations

import asyncio
import random

import h2.exceptions
import pytest
from h2.frame_buffer import FrameBuffer as H2FrameBuffer
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import (ContinuationFrame, DataFrame, ExtensionFrame, HeadersFrame,
                              PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from slowpath.driver import AppSide, HboneLink
from slowpath.hbone import events as ev
from slowpath.hbone.h2fast import FrameBuffer, QuietDataFrame
from slowpath.hbone.memory import CodecPipe

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def sample_frames(rng: random.Random) -> list[bytes]:
    out = []
    for i in range(1, 120, 2):
        kind = rng.randrange(8)
        if kind == 0:
            f = DataFrame(i, data=rng.randbytes(rng.choice([0, 1, 10, 1000, 70000])))
            if rng.random() < 0.3:
                f.flags.add("END_STREAM")
            if rng.random() < 0.3:
                f.flags.add("PADDED")
                f.pad_length = rng.randrange(0, 40)
            out.append(f.serialize())
        elif kind == 1:
            h = HeadersFrame(i, data=b"\x82\x84" * 5)
            c1 = ContinuationFrame(i, data=b"\x86" * 3)
            c2 = ContinuationFrame(i, data=b"\x87")
            c2.flags.add("END_HEADERS")
            out += [h.serialize(), c1.serialize(), c2.serialize()]
        elif kind == 2:
            h = HeadersFrame(i, data=b"\x82")
            h.flags.add("END_HEADERS")
            out.append(h.serialize())
        elif kind == 3:
            out.append(WindowUpdateFrame(rng.choice([0, i]), window_increment=12345).serialize())
        elif kind == 4:
            out.append(PingFrame(0, opaque_data=b"12345678").serialize())
        elif kind == 5:
            out.append(RstStreamFrame(i, error_code=8).serialize())
        elif kind == 6:
            out.append(SettingsFrame(0, settings={4: 65535}).serialize())
        else:
            out.append(b"\x00\x00\x03\xaa\x03" + i.to_bytes(4, "big") + b"ext")  # unknown type
    return out


def describe(f) -> tuple:
    d = (type(f).__name__.replace("QuietDataFrame", "DataFrame"), f.stream_id, sorted(f.flags)
         if not isinstance(f, ExtensionFrame) else f.flag_byte, f.body_len)
    for attr in ("data", "pad_length", "window_increment", "opaque_data", "error_code", "settings",
                 "body", "flow_controlled_length"):
        if hasattr(f, attr):
            d += (attr, bytes(getattr(f, attr)) if attr in ("data", "body", "opaque_data")
                  else getattr(f, attr))
    return d


def run(cls, chunks, server=False):
    fb = cls(server=server)
    fb.max_frame_size = 1 << 20
    got = []
    for c in chunks:
        fb.add_data(c)
        got += [describe(f) for f in fb]
    return got


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("server", [False, True])
def test_same_frames_as_h2_for_any_split(seed, server):
    rng = random.Random(seed)
    blob = (PREFACE if server else b"") + b"".join(sample_frames(rng))
    cuts = sorted(rng.sample(range(1, len(blob)), 30))
    chunks = [blob[a:b] for a, b in zip([0] + cuts, cuts + [len(blob)])]
    assert run(FrameBuffer, chunks, server) == run(H2FrameBuffer, chunks, server)


def errors(cls, data, max_frame=1 << 20, server=False):
    fb = cls(server=server)
    fb.max_frame_size = max_frame
    try:
        fb.add_data(data)
        list(fb)
    except Exception as e:  # noqa: BLE001
        return type(e), getattr(e, "error_code", None)
    return None


@pytest.mark.parametrize("data,max_frame,server", [
    (DataFrame(1, data=b"x" * 100).serialize(), 50, False),            # overlong
    (b"\x00\x00\x05\x00\x08\x00\x00\x00\x01\x05xxxx", 1 << 20, False),  # padding too long
    (b"\x00\x00\x00\x00\x08\x00\x00\x00\x01", 1 << 20, False),          # PADDED, no pad byte
    (b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", 1 << 20, False),          # DATA on stream 0
    (b"PRI * HTTP/1.1\r\n", 1 << 20, True),                               # bad preface
    (HeadersFrame(1, data=b"\x82").serialize() + DataFrame(1, data=b"x").serialize(), 1 << 20, False),
])
def test_same_errors_as_h2(data, max_frame, server):
    mine, theirs = errors(FrameBuffer, data, max_frame, server), errors(H2FrameBuffer, data, max_frame, server)
    assert mine == theirs and mine is not None


def test_overlong_frame_refused_on_its_header():
    fb = FrameBuffer()
    fb.max_frame_size = 16384
    fb.add_data(b"\x00\x40\x01\x00\x00\x00\x00\x00\x01")  # a 16385-byte DATA frame, no body yet
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        list(fb)


def test_quiet_repr_matches_hyperframe():
    for n in (0, 1, 5, 10, 11, 100000):
        for pad in (None, 0, 3, 20):
            a, b = DataFrame(3, data=b"\xab" * n), QuietDataFrame(3, data=b"\xab" * n)
            if pad is not None:
                for f in (a, b):
                    f.flags.add("PADDED")
                    f.pad_length = pad
            assert a._body_repr() == b._body_repr()
    assert InvalidPaddingError  # imported for the parity cases above


def test_pieces_are_the_same_bytes_as_data_to_send():
    for seed in range(5):
        rng = random.Random(seed)
        a, b = CodecPipe(), CodecPipe()
        for p in (a, b):
            p.pump()
        sa = a.client.open_stream("10.0.0.1:80", [])
        sb = b.client.open_stream("10.0.0.1:80", [])
        a.pump(); b.pump()
        a.server.accept(sa); b.server.accept(sb)
        a.pump(); b.pump()
        for _ in range(20):
            payload = rng.randbytes(rng.choice([1, 100, 20000, 70000, 300000]))
            view = memoryview(payload)[rng.randrange(0, 10):]
            a.client.send_data(sa, view)
            b.client.send_data(sb, view)
            joined = a.client.data_to_send()
            pieces = b"".join(bytes(p) for p in b.client.data_to_send_pieces())
            assert joined == pieces
            a.server.receive_data(joined)
            b.server.receive_data(pieces)
            for p in (a, b):
                p.server.ack_data(sa, 1 << 30)
                p.client.receive_data(p.server.data_to_send())


class FakeTransport:
    def __init__(self):
        self.written, self.closed, self.paused = [], False, False

    def write(self, data):
        self.written.append(bytes(data))

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def is_closing(self):
        return self.closed

    def abort(self):
        self.closed = True

    close = abort

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def get_extra_info(self, name):
        return None

    def get_write_buffer_size(self):
        return 0


def test_window_update_and_reset_in_one_batch_do_not_kill_the_link():
    """WINDOW_UPDATE then RST_STREAM for a stream with queued bytes, read together: the
    codec marks the stream dead while translating the batch, so the driver's pump on the
    WindowOpened must not raise (it used to abort the whole HBONE connection)."""
    async def main():
        pipe = CodecPipe()
        pipe.pump()
        sid = pipe.client.open_stream("10.0.0.1:80", [])
        pipe.pump()
        pipe.server.accept(sid)
        pipe.pump()
        link = HboneLink(context=None, server_side=False)
        link.codec = pipe.client
        link.flush = lambda: None  # no TLS here: the test carries the codec's bytes itself
        app = AppSide()
        app.connection_made(FakeTransport())
        t = link.bind(sid, app)
        t._from_app(b"x" * (5 * 1024 * 1024))  # more than the 4 MiB stream window
        assert t.pending
        pipe.server.receive_data(pipe.client.data_to_send())
        pipe.server.ack_data(sid, 1 << 30)
        pipe.server.reset_stream(sid)
        batch = pipe.server.data_to_send()  # WINDOW_UPDATE(s) and RST_STREAM together
        events = pipe.client.receive_data(batch)
        assert [type(e) for e in events] == [ev.WindowOpened, ev.StreamReset]
        for e in events:
            link._dispatch(e)
        assert t.closed and app.transport.closed and not link.dead
    asyncio.run(main())
