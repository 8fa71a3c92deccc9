"""``python -m agents.guide``: settings from the environment, answer until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from agents.guide.agent import GuideAgent
from agents.guide.settings import DESCRIPTION, PREFIX, GuideSettings
from post_office_client import PostOfficeClient
from shared.logs import setup_logging
from shared.settings import load_or_exit

log = logging.getLogger("agents.guide")


async def serve(settings: GuideSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with PostOfficeClient(
        settings.post_office_url,
        settings.realm_key,
        timeout=settings.request_timeout_seconds,
        retry_deadline=settings.delivery_deadline_seconds,
        retry_base=settings.retry_base_seconds,
        retry_cap=settings.retry_cap_seconds,
    ) as client:
        agent = GuideAgent(
            client,
            settings.channel,
            settings.channels,
            group=settings.group,
            consumer=settings.consumer or f"guide-{socket.gethostname()}",
            backoff_min=settings.backoff_base_seconds,
            backoff_max=settings.backoff_cap_seconds,
            idle_timeout=settings.idle_timeout_seconds,
            max_in_flight=settings.max_in_flight,
            max_answer_chars=settings.max_answer_chars,
        )
        work = asyncio.create_task(agent.run(), name="guide-agent")
        stopper = asyncio.create_task(stop.wait(), name="guide-agent-stop")
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        work.cancel()
        await asyncio.wait({work, stopper})
        if not work.cancelled() and work.exception() is not None:
            log.error("guide agent stopped", exc_info=work.exception())
            return 1
    log.info("guide agent stopped after %d answer(s), %d dropped", agent.answered, agent.dropped)
    return 0


def main() -> None:
    settings = load_or_exit(GuideSettings, PREFIX, DESCRIPTION)
    setup_logging("guide-agent", f"guide-{socket.gethostname()}-{os.getpid()}", settings.log_level)
    import uvloop

    raise SystemExit(uvloop.run(serve(settings)))


if __name__ == "__main__":
    main()
