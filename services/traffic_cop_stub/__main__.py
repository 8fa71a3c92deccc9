"""``python -m services.traffic_cop_stub``: settings from the environment, then serve."""

from __future__ import annotations

from services.traffic_cop_stub.app import SERVICE_NAME, create_app
from services.traffic_cop_stub.settings import DESCRIPTION, PREFIX, TrafficCopSettings
from shared.logs import setup_logging
from shared.service import run_service
from shared.settings import load_or_exit


def main() -> None:
    settings = load_or_exit(TrafficCopSettings, PREFIX, DESCRIPTION)
    setup_logging(SERVICE_NAME, settings.instance, settings.log_level)
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
