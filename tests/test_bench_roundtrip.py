"""The round-trip benchmark's harness works end to end (``python -m bench.roundtrip --quick``).

Timings are not checked here (speed is measured in benchmarks, never in tests): this checks
that one short run of every system starts, answers every message, and writes a JSON with every
figure and every issue-12 target, and a Markdown table. The pure parts (the responder's
answers, RESP encoding, the target arithmetic) are checked without processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.resp import encode
from bench.responder import reply_frame, socketio_emit
from bench.roundtrip import SYSTEMS, TARGETS, expected_figures, main, plan, targets
from tests.helpers import ROOT, timeout


def test_responder_answers_with_the_clients_id_and_the_message_id() -> None:
    agent_message = orjson.dumps(
        {
            "message_id": "msg_1",
            "connection_id": "ws_bench_0000abcd",
            "message": {"channel": "guide", "payload": {"message": "hi"}, "id": 7},
        }
    )
    target, frame = reply_frame(agent_message)
    assert target == "ws_bench_0000abcd"
    assert orjson.loads(frame) == {
        "type": "response",
        "agent_type": "bench",
        "in_reply_to": "msg_1",
        "id": 7,
        "message": "hi",
    }
    emit = orjson.loads(socketio_emit("sid1", frame))
    # What python-socketio 5.x's AsyncPubSubManager._handle_emit reads.
    assert emit["method"] == "emit" and emit["event"] == "reply" and emit["room"] == "sid1"
    assert emit["data"] == [orjson.loads(frame)] and emit["namespace"] == "/"


def test_resp_encoding() -> None:
    assert (
        encode("PUBLISH", "ch", b"x\r\ny") == b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$4\r\nx\r\ny\r\n"
    )


def test_targets_ratio_and_overload() -> None:
    figures = {
        "closed.po": {"median": 8000.0, "runs": [8000.0]},
        "closed.floor": {"median": 10000.0, "runs": [10000.0]},
        # Every run overloaded: no latency, and the target is missed.
        "open5000.po.p99": {"median": None, "runs": [None, None]},
        "open5000.floor.p99": {"median": 6.0, "runs": [6.0]},
        "idle.po.rss_kb_per_socket": {"median": 17.0, "runs": [17.0]},
    }
    by_figure = {g["figure"]: g for g in targets(figures)}
    assert by_figure["closed.po"]["ratio"] == 0.8 and by_figure["closed.po"]["met"] is True
    assert by_figure["open5000.po.p99"]["met"] is False
    assert by_figure["open5000.po.p99"]["overloaded"] is True
    assert by_figure["idle.po.rss_kb_per_socket"]["met"] is False
    assert by_figure["connect.po.per_second"]["met"] is None  # not measured


def test_quick_run_writes_every_figure_and_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.roundtrip", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(110),
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = orjson.loads((tmp_path / "roundtrip.json").read_bytes())
    assert doc["quick"] is True and doc["failures"] == []

    expected = expected_figures(plan(True, None), SYSTEMS)
    assert set(doc["figures"]) == set(expected)
    for key, fig in doc["figures"].items():
        assert fig["runs"], key
        # A median, or every run flagged overloaded (an open loop the system could not keep up
        # with, which is a figure too).
        assert fig["median"] is not None or any("overloaded" in f for f in fig["flags"]), key

    assert [t["target"] for t in doc["targets"]] == [t.name for t in TARGETS]
    assert all(t["met"] in (True, False) for t in doc["targets"]), doc["targets"]

    for run in doc["results"]:
        assert run["problems"] == [], run
        assert "client_bottleneck" in run and run["connect"]["sockets"] > 0
        if run["kind"] != "idle":
            assert run["client_cpu_percent"] >= 0 and run["cpu"]["client"] >= 0, run
    kinds = {(r["system"], r["kind"]) for r in doc["results"]}
    assert ("po_agent", "closed") in kinds and ("sio", "open5000") in kinds
    assert ("po_api", "http") in kinds and ("po", "idle") in kinds
    assert doc["params"]["gateway_settings"]["GATEWAY_RATE_LIMIT_PER_SECOND"] == "1000000"

    table = (tmp_path / "roundtrip.md").read_text()
    for t in TARGETS:
        assert t.name in table
    assert "GATEWAY_RATE_LIMIT_PER_SECOND=1000000" in proc.stdout

    # The tables can be printed again from the saved JSON, the same as the run wrote them.
    assert main(["--table-from", str(tmp_path / "roundtrip.json")]) == 0
    assert capsys.readouterr().out.strip() in table


@pytest.mark.parametrize("system", ["nope"])
def test_unknown_system_is_refused(system: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.roundtrip", "--systems", system],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout(30),
        check=False,
    )
    assert proc.returncode == 2 and "unknown systems" in proc.stderr
