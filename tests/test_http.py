"""shared/http.py's pure pieces: the one bearer-token parser and the one JSON error shape."""

from __future__ import annotations

import orjson
import pytest

from shared.http import bearer_token, error_body, json_error, json_error_exception
from shared.protocol import ErrorCode


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc  ", "abc"),
        ("  Bearer abc", "abc"),
        ("Bearer", None),
        ("Bearer    ", None),
        ("Basic abc", None),
        ("Bearerabc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_one_error_shape_for_responses_and_exceptions() -> None:
    expected = {"error": {"code": "not_found", "message": "no such thing"}}
    assert orjson.loads(error_body(ErrorCode.NOT_FOUND, "no such thing")) == expected
    response = json_error(404, ErrorCode.NOT_FOUND, "no such thing", {"X-A": "1"})
    assert (response.status, response.content_type) == (404, "application/json")
    assert response.body is not None and orjson.loads(bytes(response.body)) == expected
    exc = json_error_exception(404, ErrorCode.NOT_FOUND, "no such thing", {"X-A": "1"})
    assert (exc.status, exc.content_type, exc.headers["X-A"]) == (404, "application/json", "1")
    assert exc.text is not None and orjson.loads(exc.text) == expected
    with pytest.raises(ValueError, match="status 418"):
        json_error_exception(418, "teapot", "a status no handler raises")
