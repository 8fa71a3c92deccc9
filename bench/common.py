"""What every benchmark shares: the machine record, percentiles, process stats, result files.

Benchmarks start their own private redis-server and service processes through the test harness
(:mod:`tests.helpers`), so a figure here is measured on the same real parts the tests use,
over loopback, and nothing outlives the run.
"""

from __future__ import annotations

import math
import os
import platform
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "RESULTS_DIR",
    "CountingSubscriber",
    "ProcSample",
    "ProcWatch",
    "ReadyChild",
    "latency_summary",
    "machine",
    "percentile",
    "quick",
    "services_present",
    "write_result",
]

ROOT = Path(__file__).resolve().parent.parent
#: ``BENCH_RESULTS_DIR`` moves them (the harness test writes to a temporary directory).
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or ROOT / "bench" / "results")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def quick() -> bool:
    """``BENCH_QUICK=1``: tiny sizes, for checking that the benchmarks still run (not figures)."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0", "false", "no")


def services_present(*modules: str) -> bool:
    """True when every ``services.<name>`` package exists with an ``__main__``."""
    return all((ROOT / m.replace(".", "/") / "__main__.py").exists() for m in modules)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _redis_version() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def machine() -> dict[str, Any]:
    """The record every result carries: figures mean little without the machine they came from."""
    import aiohttp
    import redis

    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": _redis_version(),
        "redis_py": redis.__version__,
        "aiohttp": aiohttp.__version__,
    }


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``p`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds, rounded for reading."""
    values = sorted(seconds)
    return {
        f"{name}_ms": round(percentile(values, p) * 1000, 3)
        for name, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
    }


@dataclass(frozen=True)
class ProcSample:
    at: float
    cpu_seconds: float
    rss_mb: float


class ProcWatch:
    """CPU time and RSS of another process, read from /proc (no extra dependency)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def sample(self) -> ProcSample:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
        rss_pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        return ProcSample(time.monotonic(), cpu, rss_pages * _PAGE_SIZE / 1024 / 1024)

    @contextmanager
    def measure(self, into: dict[str, Any], prefix: str) -> Iterator[None]:
        """Average CPU % over the block, and RSS at its end, written into ``into``."""
        before = self.sample()
        yield
        after = self.sample()
        elapsed = max(after.at - before.at, 1e-9)
        into[f"{prefix}_cpu_percent"] = round(
            100 * (after.cpu_seconds - before.cpu_seconds) / elapsed, 1
        )
        into[f"{prefix}_rss_mb"] = round(after.rss_mb, 1)


def write_result(
    name: str,
    params: dict[str, Any],
    results: list[dict[str, Any]],
    summary: list[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """``bench/results/<name>.json``: machine, parameters, rows, ``extra`` and the human
    summary lines."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "params": params,
        "results": results,
        **(extra or {}),
        "summary": summary,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    for line in summary:
        print(line, flush=True)
    return path


class ReadyChild:
    """A bench part in a child process: it prints ``ready`` once it takes work and, on SIGTERM,
    one JSON line of counts (:mod:`bench.subscriber`, :mod:`bench.responder`, ...)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        # A bounded wait, so a child that never gets ready cannot outlast the benchmark's
        # own deadline.
        # selectors, not select.select: a benchmark holding 1,000 sockets has descriptors past
        # select()'s limit of 1024.
        ready = False
        if self.proc.stdout is not None:
            with selectors.DefaultSelector() as selector:
                selector.register(self.proc.stdout, selectors.EVENT_READ)
                ready = bool(selector.select(timeout=30))
        line = self.proc.stdout.readline().strip() if ready and self.proc.stdout else ""
        if line != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{' '.join(self.args[1:3])} did not start (said {line!r})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> dict[str, Any]:
        """Stop it and return its last JSON line (``{}`` when it printed none)."""
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = out.strip().splitlines()
        return dict(orjson.loads(lines[-1])) if lines else {}


class CountingSubscriber(ReadyChild):
    """:mod:`bench.subscriber` as a child process: an agent that only counts."""

    def __init__(self, redis_url: str, *channels: str) -> None:
        super().__init__([sys.executable, "-m", "bench.subscriber", redis_url, *channels])
