"""The chat page in a real Chromium: connect with a session token, ask the guide, see the answer.

Everything is real: redis-server, Traffic Cop, a gateway, the Post Office API and the demo guide
agent as processes, and the Debian Chromium (``make browser`` installs it) driven by
Playwright's async API. Playwright's own browser download is not used: the test launches
``/usr/bin/chromium`` with a fresh profile in a temporary directory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect
from redis.asyncio import Redis

from tests.helpers import (
    TRAFFIC_COP_KEY,
    ServiceProcess,
    create_session,
    live_consumers,
    timeout,
    wait_for,
)

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_PRESENT = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ms(seconds: float) -> float:
    """A Playwright timeout (milliseconds), scaled like every other test timeout."""
    return timeout(seconds) * 1000


@pytest.fixture
def gateway(redis_url: str, traffic_cop: ServiceProcess) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        "services.gateway",
        {
            "REDIS_URL": redis_url,
            "TRAFFIC_COP_URL": traffic_cop.url,
            "TRAFFIC_COP_SERVICE_KEY": TRAFFIC_COP_KEY,
            "GATEWAY_SHUTDOWN_TIMEOUT": "3",
            "GATEWAY_CLOSE_TIMEOUT": "1",
        },
    )
    service.env["GATEWAY_PORT"] = str(service.port)
    service.env["GATEWAY_INSTANCE_ID"] = f"gw-browser-{service.port}"
    service.start()
    yield service
    service.stop()


@pytest.fixture
def guide(redis_url: str, gateway: ServiceProcess) -> Iterator[list[ServiceProcess]]:
    """The Post Office API and the guide agent answering through it."""
    api = ServiceProcess(
        "services.post_office_api",
        {
            "REDIS_URL": redis_url,
            "GATEWAY_URLS": gateway.url,
            "POST_OFFICE_SSE_KEEPALIVE_SECONDS": "1",
        },
    )
    api.env["POST_OFFICE_PORT"] = str(api.port)
    api.start()
    agent = None
    try:
        agent = ServiceProcess("agents.guide", {"POST_OFFICE_URL": api.url}).start(wait_ready=False)
        yield [api, agent]
    finally:
        if agent is not None:
            agent.stop()
        api.stop()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    if not CHROMIUM_PRESENT:
        pytest.skip(f"{CHROMIUM} is not installed (`make browser` installs it)")
    # Expectations without their own timeout wait this long (Playwright's default is 5 s).
    expect.set_options(timeout=ms(5))
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 760},
            timeout=ms(30),
        )
        try:
            yield context
        finally:
            await context.close()


async def open_page(context: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """A page at ``url`` and the list its uncaught script errors are collected into."""
    page = context.pages[0] if context.pages else await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url, timeout=ms(10))
    return page, errors


@asynccontextmanager
async def diagnosed(page: Page, *services: ServiceProcess) -> AsyncIterator[None]:
    """A failed expectation also shows the page's text and each process's log tail."""
    try:
        yield
    except AssertionError as exc:
        parts = [str(exc), f"page text:\n{await page.locator('body').inner_text()}"]
        parts += [f"{s.module} log:\n{s.log()[-3000:]}" for s in services]
        raise AssertionError("\n\n".join(parts)) from None


async def test_chat_with_the_guide_agent_in_chromium(
    browser: BrowserContext,
    gateway: ServiceProcess,
    guide: list[ServiceProcess],
    traffic_cop: ServiceProcess,
    redis: Redis,
    tmp_path: Path,
) -> None:
    # Until the agent's stream is subscribed a message would be queued, not answered.
    await wait_for(lambda: live_consumers(redis), 15, what="guide agent consuming")
    token = create_session(traffic_cop.url, "browser-user")
    page, errors = await open_page(browser, f"{gateway.url}/?session_token={token}")

    async with diagnosed(page, gateway, *guide):
        await expect(page.locator("#status")).to_have_attribute(
            "data-state", "connected", timeout=ms(10)
        )
        await expect(page.locator("#status-text")).to_contain_text("Connected as browser-user")
        # The page takes the token out of the address bar (history, bookmarks, screenshots).
        assert "session_token" not in page.url

        await page.locator("#message").fill("hello from chromium")
        await page.locator("#send").click()

        own = page.locator("li.msg.own")
        await expect(own.locator(".body")).to_have_text("hello from chromium", timeout=ms(5))
        await expect(own.locator(".ack")).to_have_attribute(
            "data-status", "published", timeout=ms(10)
        )
        answer = page.locator("li.msg.agent")
        await expect(answer.locator(".body")).to_have_text(
            "You said: hello from chromium", timeout=ms(10)
        )
        await expect(answer.locator(".who")).to_have_text("guide agent")
        # The answer names the message it answers (in_reply_to is that message's server id).
        await expect(answer.locator(".reply-to")).to_contain_text("hello from chromium")
        await expect(page.locator("#message")).to_be_empty()

    await page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert errors == []


async def test_a_bad_token_shows_the_4401_error_state(
    browser: BrowserContext, gateway: ServiceProcess, tmp_path: Path
) -> None:
    page, errors = await open_page(browser, f"{gateway.url}/?session_token=not-a-real-token")

    async with diagnosed(page, gateway):
        await expect(page.locator("#status")).to_have_attribute(
            "data-state", "closed", timeout=ms(10)
        )
        await expect(page.locator("#status-text")).to_have_text("Closed · code 4401")
        notice = page.locator("#notice")
        await expect(notice).to_be_visible()
        await expect(notice).to_have_attribute("data-kind", "error")
        await expect(notice).to_contain_text("The session is not valid")
        await expect(notice).to_contain_text("Not reconnecting")
        # Refused for good: the composer stays disabled and Connect is offered again.
        await expect(page.locator("#message")).to_be_disabled()
        await expect(page.locator("#connect")).to_be_enabled()

    await page.screenshot(path=str(tmp_path / "bad_token.png"), full_page=True)
    assert errors == []
