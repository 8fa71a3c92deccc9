"""``python -m services.gateway``: settings from the environment, then serve."""

from __future__ import annotations

import sys

from services.gateway.app import SERVICE_NAME, StartupError, create_app
from services.gateway.settings import DESCRIPTION, PREFIX, Settings
from shared.logs import setup_logging
from shared.service import run
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit(Settings, PREFIX, DESCRIPTION)
    setup_logging(SERVICE_NAME, settings.instance, settings.log_level)
    try:
        run(create_app(settings), settings.host, settings.port, settings.shutdown_timeout)
    except StartupError as exc:
        print(f"gateway cannot start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
