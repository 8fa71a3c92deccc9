"""Which browser origins may open ``/ws`` (a pure policy: no I/O, tested without sockets).

A cross-site page could otherwise open a socket with its visitor's cookies or a token it got
hold of (cross-site WebSocket hijacking). Allowed, in order:

* a request with no ``Origin`` header: not a browser, so token validation is the whole check;
* the gateway's own origin (``Origin`` host equals the request's ``Host``) and the origin of
  ``PUBLIC_WS_URL`` (the public edge, ``wss://`` becoming ``https://``);
* with ``ALLOWED_ORIGINS`` set: exactly those origins (``*`` allows any);
* with it unset: ``http(s)://localhost``, ``127.0.0.1`` and ``[::1]`` on any port.

An ``Origin`` is only ever ``scheme://host[:port]`` from a browser (RFC 6454): one with user
information (``http://evil.com@localhost``), a path, a query or a fragment is no browser's
and is refused, as is one whose host does not decode (IDNA, ``http://xn--ocalhost-5o0d``) —
refused with 403, never a 500.
"""

from __future__ import annotations

import re

from yarl import URL

__all__ = ["OriginPolicy"]

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_WS_TO_HTTP = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
#: What a browser sends: a scheme, ``://`` and an authority without user information; nothing
#: after it (no path, not even ``/``, no query, no fragment).
_BROWSER_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s\\]+\Z")


def _normalise(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None when unusable."""
    try:
        url = URL(origin.strip())
        scheme = _WS_TO_HTTP.get(url.scheme.lower())
        # yarl decodes IDNA lazily: ``.host`` can raise UnicodeError (a ValueError) here too.
        raw_host = url.host
        port = url.explicit_port
    except (ValueError, TypeError):
        return None
    if scheme is None or not raw_host:
        return None
    host = raw_host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if port is not None and port != (443 if scheme == "https" else 80):
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def _browser_origin(origin: str) -> str | None:
    """A request's ``Origin`` normalised, or None unless it has a browser's shape."""
    if not _BROWSER_ORIGIN.match(origin):
        return None
    return _normalise(origin)


class OriginPolicy:
    def __init__(self, allowed: tuple[str, ...], public_ws_url: str = "") -> None:
        self.any = "*" in allowed
        self.allowed = {n for n in (_normalise(a) for a in allowed if a != "*") if n}
        public = _normalise(public_ws_url) if public_ws_url else None
        if public:
            self.allowed.add(public)
        self.local_default = not allowed

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return True
        normalised = _browser_origin(origin)
        if normalised is None:
            # "null" (sandboxed frames, file://) and garbage: refused even with "*", since any
            # page can make itself a null origin.
            return False
        if self.any:
            return True
        if host and normalised.split("://", 1)[1] == _authority(host):
            return True
        if normalised in self.allowed:
            return True
        if self.local_default:
            authority = normalised.split("://", 1)[1]
            host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
            return host in _LOCAL_HOSTS
        return False


def _authority(host: str) -> str:
    """The request's ``Host`` in the same form as a normalised origin's authority."""
    host = host.strip().lower()
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host
