"""``make bench``: every benchmark in turn, each in its own process, figures printed and saved.

Each module starts its own private redis-server and service processes and stops by itself
within its own deadline; results land in ``bench/results/<name>.json`` together with the
machine they were measured on. ``BENCH_QUICK=1 make bench`` (or ``python -m bench.run_all
--quick``) is a smoke run (tiny sizes). ``BENCH_ONLY=gateway_throughput`` runs one of them.
``roundtrip`` comes last: it prints the comparison table and issue 12's targets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import ROOT

#: In the order they run: cheapest first, so a broken set-up shows up early.
BENCHMARKS = ("publish_batching", "eviction_pass", "gateway_throughput", "roundtrip")


def main() -> int:
    if "--quick" in sys.argv[1:]:
        os.environ["BENCH_QUICK"] = "1"
    only = {b for b in os.environ.get("BENCH_ONLY", "").split(",") if b}
    failed = []
    for name in BENCHMARKS:
        if only and name not in only:
            continue
        if not (ROOT / "bench" / f"{name}.py").exists():
            print(f"== {name}: not present, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=ROOT)
        print(f"== {name}: exit {code} in {time.monotonic() - started:.1f}s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
