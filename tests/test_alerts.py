"""The compose stack's alerts, checked and unit-tested by Prometheus' own ``promtool``.

``promtool check rules`` parses every rule and its PromQL; ``promtool test rules`` feeds the
input series of ``compose/prometheus/alerts.test.yml`` through ``alerts.yml`` and compares the
alerts that fire, with their labels and annotations, at each evaluation time (a process that
stays down fires before Consul deregisters it, fewer gateways than expected, a growing stream
lag, dead letters, eviction lag, a breaker open for long).

promtool comes from Debian's ``prometheus`` package (``make test`` installs it). Without it the
tests skip on a developer's machine, but fail under ``CI=true``: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parent.parent / "compose" / "prometheus"


def _promtool() -> str:
    found = shutil.which(os.environ.get("PO_PROMTOOL", "promtool"))
    if found is not None:
        return found
    message = (
        "promtool is missing: install Debian's 'prometheus' package "
        "(scripts/ensure-os-package.sh promtool prometheus, run by `make test`)"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " -- CI=true, so this check may not be skipped")
    pytest.skip(message)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_alert_rules_are_valid() -> None:
    result = _run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_fire_on_their_input_series() -> None:
    result = _run("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_or_is_listed_as_untested() -> None:
    """New alerts get a unit test; the ones below predate alerts.test.yml."""
    rules = (RULES_DIR / "alerts.yml").read_text()
    tests = (RULES_DIR / "alerts.test.yml").read_text()
    untested = {
        "RedisDown",
        "ClientsRefusedUnavailable",
        "MessagesQueuedNotPublished",
        "EvictionPassErrors",
        "SlowReadersClosed",
        "DeadGatewayCleaned",
        "ApiServerErrors",
    }
    alerts = {line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line}
    tested = {a for a in alerts if f"alertname: {a}\n" in tests}
    assert alerts - tested == untested
