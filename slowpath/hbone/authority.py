"""The HBONE `:authority`: the final destination as `ip:port` or `[v6]:port`.

Owns: parsing and formatting that one string, strictly.  HBONE (DESIGN.md §4) puts the
destination *pod IP* in `:authority`, never a hostname, so anything else is a 400.

Must not: resolve names, look up workloads or decide whether the destination is
allowed; that is inbound's and rbac's job once the address is known.
"""
from __future__ import annotations

import ipaddress
import re

from slowpath.hbone.events import HboneError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# ASCII digits only: int() alone would also take " 80", "+80", "8_0" and Arabic digits.
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_HINT = "HBONE :authority must be the destination IP and port, e.g. 10.0.0.5:8080 or [fd00::5]:8080"


def _bad(value: object, why: str) -> HboneError:
    return HboneError(f"bad HBONE authority {value!r}: {why}", status=400, hint=_HINT)


def _parse_port(value: str, text: str) -> int:
    if not _PORT_RE.match(text):
        raise _bad(value, f"port {text!r} is not a decimal number" if text else "missing port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _bad(value, f"port {port} is out of range 1-65535")
    return port


def parse_authority(value: str) -> tuple[IPAddress, int]:
    """Split an HBONE `:authority` into (ip, port).

    Accepts exactly `a.b.c.d:port` and `[v6]:port` with port 1-65535.  Raises
    `HboneError(status=400)` for hostnames, a missing or zero port, IPv6 without
    brackets, IPv6 zone ids, bracketed IPv4 and any whitespace.
    """
    if not isinstance(value, str):
        raise _bad(value, "not a string")
    if not value:
        raise _bad(value, "empty")
    if any(ch.isspace() for ch in value):
        raise _bad(value, "contains whitespace")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise _bad(value, "'[' without matching ']'")
        host, rest = value[1:close], value[close + 1:]
        if not rest.startswith(":"):
            raise _bad(value, "missing ':port' after ']'")
        if "%" in host:
            # A zone id names an interface of the *sender*; meaningless to the receiver.
            raise _bad(value, "IPv6 zone ids are not allowed")
        try:
            ip: IPAddress = ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(value, f"{host!r} is not an IPv6 address") from None
        return ip, _parse_port(value, rest[1:])
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise _bad(value, "missing port")
    if ":" in host or "]" in host:
        raise _bad(value, "IPv6 addresses must be in brackets: [v6]:port")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise _bad(value, f"{host!r} is not an IP address (hostnames are not allowed)") from None
    return ip, _parse_port(value, port_text)


def format_authority(ip: IPAddress | str, port: int) -> str:
    """The `:authority` for (ip, port): `a.b.c.d:port` or `[v6]:port` (compressed)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise _bad(ip, "not an IP address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _bad(f"{ip}:{port}", f"port {port!r} is out of range 1-65535")
    if addr.version == 6:
        if addr.scope_id:
            raise _bad(str(addr), "IPv6 zone ids are not allowed")
        return f"[{addr.compressed}]:{port}"
    return f"{addr}:{port}"
