"""The OpenAPI document of ``/v1``: valid OpenAPI 3.1 (openapi-spec-validator), complete
(``required`` on every object schema, ``servers``, ``tags``, the limits the server applies),
and true of the real API: schemathesis generates requests from it against a real API process
and checks that nothing answers 5xx and every answer matches the documented status, content
type and schema.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from services.post_office_api.handlers import MAX_SESSION_TOKEN_LENGTH
from services.post_office_api.openapi import build_openapi
from shared.protocol import DEFAULT_CHANNELS, MAX_CLOSE_REASON_BYTES
from tests.api_util import api_process
from tests.helpers import ServiceProcess, timeout

DOC = build_openapi(DEFAULT_CHANNELS)


def _objects(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema with ``properties`` anywhere in ``node``, with its JSON path."""
    if isinstance(node, dict):
        if "properties" in node:
            yield where, node
        for key, value in node.items():
            yield from _objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{where}/{i}")


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOC)  # raises OpenAPIValidationError, naming the place, when it is not


def test_every_object_schema_says_what_is_required() -> None:
    objects = list(_objects(DOC["components"]["schemas"], "#/components/schemas"))
    assert len(objects) >= 10
    for where, schema in objects:
        required = schema.get("required")
        assert required, f"{where} has no 'required'"
        assert set(required) <= set(schema["properties"]), where


def test_servers_and_tags() -> None:
    assert DOC["servers"] == [
        {"url": "/", "description": "the Post Office API serving this document"}
    ]
    declared = {t["name"] for t in DOC["tags"]}
    used = {tag for ops in DOC["paths"].values() for op in ops.values() for tag in op["tags"]}
    assert used == declared


def _parameter(path: str, method: str, name: str) -> dict[str, Any]:
    op = DOC["paths"][path][method]
    param: dict[str, Any] = next(p for p in op["parameters"] if p["name"] == name)
    return param


def test_limits_are_the_ones_the_server_applies() -> None:
    token = _parameter("/v1/websocket-endpoint", "get", "session_token")
    assert token["schema"]["minLength"] == 1  # an empty token is refused (400)
    assert token["schema"]["maxLength"] == MAX_SESSION_TOKEN_LENGTH
    reason = _parameter("/v1/connections/{connection_id}", "delete", "reason")
    assert reason["schema"]["x-maxBytes"] == MAX_CLOSE_REASON_BYTES == 123
    assert "bytes" in reason["description"] and "characters" in reason["description"]


@pytest.fixture
def api(redis_url: str, traffic_cop: ServiceProcess) -> Iterator[ServiceProcess]:
    # A gateway URL for websocket-endpoint when Consul has none (no socket is opened), and
    # no realm rate limit: schemathesis sends a few hundred requests.
    service = api_process(
        redis_url,
        traffic_cop,
        GATEWAY_URLS="http://127.0.0.1:9",
        POST_OFFICE_RATE_LIMIT_PER_SECOND="0",
    )
    service.start()
    yield service
    service.stop()


def test_the_served_document_is_the_built_one(api: ServiceProcess) -> None:
    with urllib.request.urlopen(api.url + "/v1/openapi.json", timeout=timeout(5)) as resp:
        served = json.loads(resp.read())
    assert served["paths"].keys() == DOC["paths"].keys()
    validate(served)


def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    api: ServiceProcess, tmp_path: Path
) -> None:
    """Bounded: a few examples per operation, a fixed seed, and a time budget, so the run
    takes seconds. The SSE streams (subscribe_to_channel, consume_group) are left out: they
    never end, and tests/test_api.py and tests/test_consumers.py cover them."""
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis is a dev dependency (requirements-dev.lock)"
    result = subprocess.run(
        [
            cli,
            "run",
            api.url + "/v1/openapi.json",
            "--url",
            api.url,
            "--header",
            "Authorization: Bearer dev-smart_city",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance",
            "--exclude-operation-id",
            "subscribe_to_channel",
            "--exclude-operation-id",
            "consume_group",
            "--mode",
            "positive",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "5",
            "--seed",
            "1",
            "--max-time",
            str(int(timeout(5))),
            "--request-timeout",
            str(timeout(5)),
            "--generation-database",
            "none",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout(60),
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "No issues found" in output or "passed" in output, output[-3000:]
