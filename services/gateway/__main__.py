"""``python -m services.gateway``: settings from the environment, then serve.

A gateway whose dependencies never answer at start exits 1 through ``shared.service.fail``
(the same drain as SIGTERM), so there is nothing to catch here.
"""

from __future__ import annotations

from services.gateway.app import SERVICE_NAME, create_app
from services.gateway.settings import DESCRIPTION, PREFIX, GatewaySettings
from shared.logs import setup_logging
from shared.service import run_service
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit(GatewaySettings, PREFIX, DESCRIPTION)
    setup_logging(SERVICE_NAME, settings.instance, settings.log_level)
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
