"""``python -m services.eviction_worker`` (``--help`` lists the settings)."""

from __future__ import annotations

import sys

import orjson
from redis.exceptions import RedisError

from services.eviction_worker.app import SERVICE_NAME, create_app, run_once
from services.eviction_worker.settings import DESCRIPTION, PREFIX, EvictionSettings
from shared.logs import setup_logging
from shared.service import run_service
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit(EvictionSettings, PREFIX, DESCRIPTION)
    setup_logging(SERVICE_NAME, settings.instance, settings.log_level)
    if settings.run_once:
        import uvloop

        try:
            summary = uvloop.run(run_once(settings))
        except (RedisError, OSError) as exc:
            print(f"eviction pass failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
