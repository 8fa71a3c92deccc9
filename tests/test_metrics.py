"""The metrics catalogue: docs/metrics.md lists every metric each service defines, and no more;
latency histograms are in seconds with the shared buckets."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from prometheus_client import Histogram
from prometheus_client.metrics import MetricWrapperBase

from shared.metrics import LATENCY_BUCKETS

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
SERVICES = ("gateway", "post_office_api", "traffic_cop_stub", "eviction_worker")
#: Shared modules that define metrics every service exports.
SHARED = ("shared.pubsub", "shared.http_server", "shared.address_budget")


def _defined() -> dict[str, MetricWrapperBase]:
    out: dict[str, MetricWrapperBase] = {}
    for service in SERVICES:
        module = importlib.import_module(f"services.{service}.metrics")
        for attr in module.__all__:
            metric = getattr(module, attr)
            suffix = "_total" if metric._type == "counter" else ""
            out[metric._name + suffix] = metric
    return out


def _shared() -> dict[str, list[str]]:
    """Metrics defined in shared/ modules: name -> label names."""
    out: dict[str, list[str]] = {}
    for name in SHARED:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                suffix = "_total" if value._type == "counter" else ""
                out[value._name + suffix] = list(value._labelnames)
    return out


def _collected() -> dict[str, list[str]]:
    """Metrics read at scrape time by a service's collectors: name -> label names."""
    out: dict[str, list[str]] = {}
    for service in SERVICES:
        module = importlib.import_module(f"services.{service}.metrics")
        for collector in getattr(module, "COLLECTORS", ()):
            for family in collector.collect():
                suffix = "_total" if family.type == "counter" else ""
                labels = sorted({k for sample in family.samples for k in sample.labels})
                out[family.name + suffix] = labels
    return out


def _documented() -> dict[str, str]:
    """Metric name -> its table row, for every ``| `postoffice_...` |`` row."""
    rows = re.findall(r"^\| `(postoffice_[a-z_]+)` \|(.*)$", DOC.read_text(), re.MULTILINE)
    return dict(rows)


def test_every_metric_is_documented_with_its_labels() -> None:
    defined, collected, documented = _defined(), {**_collected(), **_shared()}, _documented()
    assert sorted([*defined, *collected]) == sorted(documented)
    for name, metric in defined.items():
        for label in metric._labelnames:
            assert f"`{label}`" in documented[name], (name, label)
    for name, labels in collected.items():
        for label in labels:
            assert f"`{label}`" in documented[name], (name, label)


@pytest.mark.parametrize(
    "name",
    [
        "postoffice_api_request_seconds",
        "postoffice_gateway_frame_to_redis_seconds",
        "postoffice_gateway_delivery_write_seconds",
        "postoffice_gateway_agent_answer_seconds",
    ],
)
def test_latency_histograms_resolve_sub_millisecond_to_seconds(name: str) -> None:
    metric = _defined()[name]
    assert isinstance(metric, Histogram)
    assert tuple(metric._upper_bounds[:-1]) == LATENCY_BUCKETS
    assert LATENCY_BUCKETS[0] < 0.001 and LATENCY_BUCKETS[-1] >= 5.0
