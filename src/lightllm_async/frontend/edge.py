"""Browser safety at the HTTP edge: which Host names and Origins are answered, and JSON-only POSTs.

A web page the user visits can send requests to a server on the user's machine. Three rules keep
it from using one:

- **Host** (DNS rebinding): a page on attacker.example can point that name at 127.0.0.1 and then
  talk to a loopback server as "same origin"; its requests still say `Host: attacker.example`.
  So a server bound to a loopback address answers only loopback Host names (`localhost`,
  127.0.0.0/8, `[::1]`, any port) unless `--allowed-hosts` widens the set.
- **CORS**: no `Access-Control-*` header is sent unless `--allowed-origins` names the page's
  origin, so other origins cannot read responses.
- **JSON only**: a browser sends a cross-origin POST without asking first (no preflight) only when
  its Content-Type is a form type, text/plain, or absent; a POST that is not `application/json`
  is refused with 415 before its body is read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .asgi import Scope, body_too_large
from .limits import MAX_BODY_BYTES
from .protocol import ApiError

_JSON = b"application/json"
_UTF8 = (b"utf-8", b"utf8", b'"utf-8"', b'"utf8"')
_PREFLIGHT_MAX_AGE = b"600"


def host_name(host: str) -> str:
    """The name in a Host value or a host argument: no port, no IPv6 brackets, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a name as `host_name` returns it)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class EdgePolicy:
    """Which requests the edge answers. The default is that of a server bound to 127.0.0.1."""

    check_host: bool = True  # answer only loopback names and `allowed_hosts`
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()  # "*" allows any origin

    @classmethod
    def for_bind(cls, bind_host: str, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]):
        """The policy for a server bound to `bind_host`: the Host check is on when it is a loopback
        address, or when hosts are named; "*" among them turns it off."""
        hosts = frozenset(host_name(h) for h in allowed_hosts if h.strip())
        origins = frozenset(o.strip().lower().rstrip("/") for o in allowed_origins if o.strip())
        check = "*" not in hosts and (bool(hosts) or is_loopback(host_name(bind_host)))
        return cls(check_host=check, allowed_hosts=hosts, allowed_origins=origins)


class Edge:
    """Applies an `EdgePolicy` to one request's headers before it is routed."""

    def __init__(self, policy: EdgePolicy):
        self.policy = policy

    def check(self, scope: Scope) -> tuple[tuple[bytes, bytes], ...]:
        """The CORS headers every response to this request carries; raises ApiError (421) for a
        Host name that is not allowed."""
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        p = self.policy
        if host is not None and p.check_host:
            name = host_name(host.decode("latin-1"))
            if not (is_loopback(name) or name in p.allowed_hosts):
                raise ApiError(
                    421,
                    f"Host {name!r} is not served here: a server bound to a loopback address answers "
                    "only loopback names. Start it with --allowed-hosts to allow others.",
                )
        if origin is None or not p.allowed_origins:
            return ()
        if "*" in p.allowed_origins:
            return ((b"access-control-allow-origin", b"*"),)
        if origin.decode("latin-1").lower().rstrip("/") in p.allowed_origins:
            return ((b"access-control-allow-origin", origin), (b"vary", b"origin"))
        return ()

    def preflight(self, scope: Scope, cors: tuple[tuple[bytes, bytes], ...]):
        """The headers of a 204 answering a CORS preflight, or None when `scope` is not one;
        ApiError (403) for a preflight from an origin that is not allowed."""
        if scope["method"] != "OPTIONS" or not self.policy.allowed_origins:
            return None
        headers = dict(scope["headers"])
        if b"origin" not in headers or b"access-control-request-method" not in headers:
            return None
        if not cors:
            raise ApiError(403, "This origin is not allowed (see --allowed-origins).")
        return (  # the Responder adds `cors`
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", headers.get(b"access-control-request-headers", b"")),
            (b"access-control-max-age", _PREFLIGHT_MAX_AGE),
        )


def check_json_body(scope: Scope) -> None:
    """415 unless the body is declared as JSON in UTF-8; 413 when its declared length is too large."""
    ctype = length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            ctype = value
        elif name == b"content-length":
            length = value
    media, *params = (ctype or b"").split(b";")
    pairs = (p.partition(b"=") for p in params)
    charsets = [v.strip().lower() for k, _, v in pairs if k.strip().lower() == b"charset"]
    if media.strip().lower() != _JSON or any(c not in _UTF8 for c in charsets):
        got = "none" if ctype is None else repr(ctype.decode("latin-1"))
        raise ApiError(415, f"Content-Type must be application/json (UTF-8), got {got}.")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise body_too_large()
