"""What a newcomer copies from the docs works: the session-token recipe of the README and the
chat page, and the chat page tells the two causes of a 4429 apart by the close reason."""

from __future__ import annotations

import json
import re
import urllib.request

from shared.protocol import (
    CLOSE_REASON_RATE_LIMITED,
    CLOSE_REASON_SESSION_LIMIT,
    CloseCode,
    close_reason_fits,
)
from tests.helpers import ROOT, ServiceProcess, timeout

README = ROOT / "README.md"
INDEX = ROOT / "services" / "gateway" / "templates" / "index.html"
APP_JS = ROOT / "services" / "gateway" / "static" / "app.js"


def _recipe(text: str) -> tuple[str, dict[str, str], bytes]:
    """URL, headers and body of the first ``curl ... /v1/sessions`` command in ``text``."""
    command = re.search(r"curl -s -X POST (\S+/v1/sessions).*?-d '([^']*)'", text, re.DOTALL)
    assert command is not None, "no curl recipe for POST /v1/sessions"
    headers = dict(h.split(": ", 1) for h in re.findall(r"-H '([^']*)'", command.group(0)))
    return command.group(1), headers, command.group(2).encode()


def test_the_token_recipes_mint_a_session(traffic_cop: ServiceProcess) -> None:
    for source in (README, INDEX):
        url, headers, body = _recipe(source.read_text())
        assert url == "http://127.0.0.1:8300/v1/sessions"  # make run's Traffic Cop port
        request = urllib.request.Request(
            url.replace("http://127.0.0.1:8300", traffic_cop.url),
            data=body,
            headers=headers,
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout(5)) as resp:
            assert resp.status in (200, 201)
            token = json.loads(resp.read())["session_token"]
        assert isinstance(token, str) and len(token) >= 32, source


def test_the_chat_page_tells_the_session_limit_from_the_rate_limit() -> None:
    js = APP_JS.read_text()
    assert f'"{int(CloseCode.RATE_LIMITED)}:{CLOSE_REASON_SESSION_LIMIT}": {{' in js
    assert "CLOSE_REASONS[`${code}:${event.reason}`] || CLOSE_CODES[code]" in js
    # The rate limit keeps the code's own entry, which speaks of messages, not connections.
    assert re.search(r'4429: \{ text: "Too many messages', js)
    assert CLOSE_REASON_RATE_LIMITED != CLOSE_REASON_SESSION_LIMIT
    assert close_reason_fits(CLOSE_REASON_RATE_LIMITED)
    assert close_reason_fits(CLOSE_REASON_SESSION_LIMIT)
