"""One logging configuration for every process: JSON lines on stderr.

Every line carries the service and instance; a ``connection_id`` or ``request_id`` passed in
``extra=`` is written as its own field. Tokens are never logged: code logs session ids and the
first characters of a token hash at most, and :class:`JsonFormatter` redacts any field whose
name says it holds a secret.

A line written inside a span (an HTTP request the tracing middleware serves) carries that
span's ``trace_id`` and ``span_id``; a line given a ``traceparent`` in ``extra=`` (a message's)
carries the ids it names, so a log line and the trace of the same message are found with one
id (docs/operations.md, "Logs").
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

from shared.protocol import is_valid_traceparent

__all__ = ["JsonFormatter", "scrub", "setup_logging"]

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_SECRET_WORDS = ("token", "password", "secret", "authorization", "key")
# Secrets that arrive inside free text: aiohttp's HTTP parser puts the offending request line
# or header into its exception message, so a malformed request could carry a realm key
# (``Authorization: Bearer ...``) or a session token (``?session_token=...``, Traffic Cop's
# ``DELETE /v1/sessions/<token>``) into a log line. Each pattern keeps its first group (what
# says a secret follows) and masks the rest.
_SECRET_TEXT = re.compile(
    r"(?i)("
    # credentials schemes, and a bare Authorization header
    r"(?:(?:proxy-)?authorization:\s*)?(?:bearer|basic|token)\s+|(?:proxy-)?authorization:\s*"
    # query parameters and key=value pairs naming a secret
    r"|(?:session_token|token|[a-z_]*key|secret|password|passwd)="
    # headers naming one (X-Api-Key, X-Service-Token, Cookie ...)
    r"|(?:[a-z0-9-]*(?:key|token|secret|password)|cookie|set-cookie):[ \t]*"
    # JSON fields naming one
    r"|\"(?:[a-z_]*token|[a-z_]*key|secret|password)\"\s*:\s*\""
    # a session token in a URL path (Traffic Cop's revoke), but its validate route
    r"|/sessions/(?!validate\b)"
    r")[^\s&'\"\\,;)]+"
)
#: What is left: a long random-looking run (a 43-character session token, a 64-hex-digit key)
#: wherever it stands. Forty characters or more with a digit, not a W3C traceparent.
_LONG_SECRET = re.compile(
    r"(?<![A-Za-z0-9_-])"
    r"(?!00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?![A-Za-z0-9_-]))"
    r"(?=[A-Za-z_-]*[0-9])[A-Za-z0-9_-]{40,}(?![A-Za-z0-9_-])"
)


def scrub(text: str) -> str:
    """``text`` with credentials, token parameters, key headers, session tokens in paths and
    long random-looking runs masked."""
    return _LONG_SECRET.sub("***", _SECRET_TEXT.sub(r"\1***", text))


def _redact(value: Any, depth: int = 0) -> Any:
    """``value`` with every secret-looking key of nested mappings masked (headers, bodies)."""
    if isinstance(value, dict) and depth < 8:
        return {k: "***" if _is_secret(k) else _redact(v, depth + 1) for k, v in value.items()}
    return value


def _is_secret(name: object) -> bool:
    lowered = str(name).lower()
    return any(w in lowered for w in _SECRET_WORDS)


def _trace_fields(record: logging.LogRecord) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the record's message (its ``traceparent`` extra), else
    of the span current where it was logged; nothing outside any trace.

    The current span is a context variable read (no span is created): outside a traced request
    it is the invalid span, and the line gets no ids."""
    traceparent = record.__dict__.get("traceparent")
    if isinstance(traceparent, str) and is_valid_traceparent(traceparent):
        return {"trace_id": traceparent[3:35], "span_id": traceparent[36:52]}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)

    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service = service
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "instance": self.instance,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_"):
                continue
            out[key] = "***" if _is_secret(key) else _redact(value)
        out.update(_trace_fields(record))
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = scrub(self.formatStack(record.stack_info))
        try:
            return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            # A value orjson cannot encode (an int past 64 bits, say) must not lose the line.
            safe = {k: v if isinstance(v, str) else repr(v) for k, v in out.items()}
            return orjson.dumps(safe).decode()


def setup_logging(service: str, instance: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service, instance))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request; keep it at WARNING unless asked for.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
