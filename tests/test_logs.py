"""shared/logs.py: one JSON object per line, service and instance on each, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from shared.logs import JsonFormatter, setup_logging


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("gateway", "gw-7"))
    logger = logging.getLogger("tests.logs.capture")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line_with_service_and_instance(capture):
    logger, stream = capture
    logger.info("hello %s, %d frames", "world", 3)
    logger.warning("multi\nline message")
    [first, second] = lines(stream)
    assert first["msg"] == "hello world, 3 frames"
    assert (first["service"], first["instance"]) == ("gateway", "gw-7")
    assert first["level"] == "info" and first["logger"] == "tests.logs.capture"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["msg"] == "multi\nline message" and second["level"] == "warning"


def test_extra_fields_are_their_own_keys(capture):
    logger, stream = capture
    logger.info("closed", extra={"connection_id": "ws_a_00000000", "code": 1001, "tags": ["x"]})
    [line] = lines(stream)
    assert line["connection_id"] == "ws_a_00000000"
    assert line["code"] == 1001 and line["tags"] == ["x"]


@pytest.mark.parametrize(
    "field",
    [
        "token",
        "session_token",
        "password",
        "client_secret",
        "Authorization",
        "service_key",
        "api_key",
        "REALM_KEYS",
    ],
)
def test_secret_looking_fields_are_redacted(capture, field):
    logger, stream = capture
    logger.info("x", extra={field: "s3cr3t-value"})
    out = stream.getvalue()
    assert "s3cr3t-value" not in out
    assert lines(stream)[0][field] == "***"


def test_nested_secrets_are_redacted(capture):
    logger, stream = capture
    headers = {
        "Authorization": "Bearer s3cr3t",
        "X-Request-Id": "r1",
        "inner": {"password": "p4ss", "ok": 1},
    }
    logger.info("request", extra={"headers": headers})
    out = stream.getvalue()
    assert "s3cr3t" not in out and "p4ss" not in out
    line = lines(stream)[0]
    assert line["headers"] == {
        "Authorization": "***",
        "X-Request-Id": "r1",
        "inner": {"password": "***", "ok": 1},
    }


def test_exceptions_and_unencodable_values_keep_the_line(capture):
    logger, stream = capture
    try:
        raise ValueError("bad thing")
    except ValueError:
        logger.exception("failed")
    logger.info("big", extra={"n": 2**70, "obj": object()})
    first, second = lines(stream)
    assert first["level"] == "error" and "ValueError: bad thing" in first["exc"]
    assert second["msg"] == "big" and str(2**70) in str(second["n"])


def test_setup_logging_configures_the_root_logger(capsys):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("traffic_cop", "tc-1", "debug")
        assert root.level == logging.DEBUG
        [handler] = root.handlers
        assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
        logging.getLogger("some.module").debug("value %r", "v", extra={"token": "t0k3n"})
        assert logging.getLogger("aiohttp.access").level == logging.WARNING
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    [line] = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert line["service"] == "traffic_cop" and line["instance"] == "tc-1"
    assert line["msg"] == "value 'v'" and line["token"] == "***"
    assert "t0k3n" not in err


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Invalid header: Authorization: Bearer SECRETKEY123\x01", "SECRETKEY123"),
        ("bad request line GET /ws?session_token=abc-DEF_123&x=1 HTTP/1.1", "abc-DEF_123"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("unknown key=dev-smart_city", "dev-smart_city"),
    ],
)
def test_secrets_inside_free_text_are_scrubbed(capture, text, secret):
    # aiohttp's parser errors quote the offending request line or header in their message.
    logger, stream = capture
    try:
        raise ValueError(text)
    except ValueError:
        logger.exception("Error handling request: %s", text)
    raw = stream.getvalue()
    assert secret not in raw
    (line,) = lines(stream)
    assert "***" in line["msg"]
    assert "***" in line["exc"]


TOKEN = "Zq3" + "x" * 40  # the shape of a Traffic Cop session token (43 characters)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"bad request DELETE /v1/sessions/{TOKEN} HTTP/1.1", TOKEN),
        ("Invalid header X-Api-Key: k3y-value-1", "k3y-value-1"),
        ("Invalid header X-Service-Token: s3rvice", "s3rvice"),
        ("Cookie: session=abc123", "session=abc123"),
        ('body {"session_token": "tok-123"}', "tok-123"),
        ('body {"service_key": "svc-456"}', "svc-456"),
        (f"unexpected value {TOKEN}", TOKEN),
        (f"realm key {'ab12' * 16} refused", "ab12" * 16),  # openssl rand -hex 32
        ("service_key=dev-traffic_cop", "dev-traffic_cop"),
    ],
)
def test_tokens_and_keys_are_scrubbed_wherever_they_appear(capture, text, secret):
    logger, stream = capture
    logger.warning("%s", text)
    assert secret not in stream.getvalue()
    assert "***" in lines(stream)[0]["msg"]


@pytest.mark.parametrize(
    "text",
    [
        "POST /v1/sessions/validate 401",
        "trace 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "message msg_0123456789abcdef01234567 to ws_alice_0000abcd",
        "test_production_refuses_a_plain_ws_public_url_but_for_localhost",
    ],
)
def test_ids_and_names_are_not_mistaken_for_secrets(capture, text):
    logger, stream = capture
    logger.warning("%s", text)
    assert lines(stream)[0]["msg"] == text


def test_trace_and_span_ids_of_the_current_span(capture):
    from opentelemetry.sdk.trace import TracerProvider

    logger, stream = capture
    tracer = TracerProvider().get_tracer("tests")
    logger.info("outside")
    with tracer.start_as_current_span("request") as span:
        logger.info("inside")
        context = span.get_span_context()
    outside, inside = lines(stream)
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"


def test_a_messages_traceparent_names_the_ids(capture):
    logger, stream = capture
    traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    logger.info("delivered", extra={"traceparent": traceparent})
    logger.info("bad", extra={"traceparent": "not-a-traceparent"})
    good, bad = lines(stream)
    assert (good["trace_id"], good["span_id"]) == ("ab" * 16, "cd" * 8)
    assert "trace_id" not in bad and bad["traceparent"] == "not-a-traceparent"
