"""``python -m services.post_office_api``: settings from the environment, then serve."""

from __future__ import annotations

from services.post_office_api.app import SERVICE_NAME, create_app
from services.post_office_api.settings import DESCRIPTION, PREFIX, ApiSettings
from shared.logs import setup_logging
from shared.service import run_service
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit(ApiSettings, PREFIX, DESCRIPTION)
    setup_logging(SERVICE_NAME, settings.instance, settings.log_level)
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
