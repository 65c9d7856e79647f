"""A short run of ``make bench`` (bench/): real sessions seen by the source and a bare listener
side by side, the soak through the source's callback, the audit writer and reconnections to a
restarted daemon, with no event lost.
The full benchmark is not part of the tests; this only keeps it working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_run_loses_nothing(tmp_path):
    results = tmp_path / "results.json"
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "burst", "--only", "soak", "--only", "audit", "--only", "reconnect",
         "--bursts", "1", "--sessions", "150", "--burst-hypervisors", "1", "--burst-domains", "2",
         "--soak-events", "30000", "--soak-flow-events", "9000", "--soak-stall-events", "3000",
         "--soak-limit", "5000", "--audit-events", "2000", "--paced-sessions", "60", "--paced-rate", "200",
         "--reconnect-rounds", "7", "--json", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["lost"] == 0
    burst = data["burst"]
    assert burst["source_lost"] == 0 and burst["duplicates"] == 0
    assert burst["rows"][0]["source_unique"] == burst["rows"][0]["expected"] > 0
    assert burst["latency_p50_ms"] is not None
    paced = burst["paced"]
    assert paced["source_unique"] == paced["expected"] == 180 and paced["latency_p99_ms"] is not None
    soak = data["soak"]
    assert soak["lost"] == 0 and soak["stall_cycles"] >= 1
    assert len(soak["traced_kib_after_drain"]) == 3
    assert soak["bound"]["holds"] and soak["bound"]["max_buffered"] <= 5000
    assert data["audit"]["lost"] == 0
    reconnect = data["reconnect"]
    assert reconnect["lost"] == 0 and [s["events"] for s in reconnect["samples"]] == [3] * 7
    # every figure is printed with its goal
    assert "(goal: >= 0.95)" in proc.stdout and "(goal: 0 in every burst)" in proc.stdout
