"""Smoke test for benchmarks/bench.py: the quick run works end to end and writes sane JSON.

No assertions on timings: test machines are shared and noisy. The one hard property
checked is that the Ray engine and the compute floor give bit-identical weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
ENGINE_KEYS = {"per_round_s", "rounds_s", "first_update_s", "total_s", "peak_total_mb", "peak_private_mb",
               "accuracy", "checksum", "ray_init_s", "sampled", "clients", "tree_cores", "other_cores"}
POSITIVE = ["per_round_s", "first_update_s", "total_s", "peak_total_mb", "peak_private_mb", "peak_pss_mb"]


def assert_engine(figures: dict, engine: str) -> None:
    assert ENGINE_KEYS <= figures.keys(), ENGINE_KEYS - figures.keys()
    assert figures["engine"] == engine
    for key in POSITIVE:
        assert math.isfinite(figures[key]) and figures[key] > 0, (engine, key, figures[key])
    assert figures["total_s"] >= figures["first_update_s"]
    assert 0 <= figures["accuracy"] <= 1
    assert len(figures["checksum"]) == 12 and int(figures["checksum"], 16) >= 0


def test_quick_benchmark(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ["W1 classroom", "W2 scale", "Targets", "bit-identical", "ray.init", "machine:", "Ray/floor"]:
        assert text in proc.stdout, text

    result = json.loads(out.read_text())
    assert {"machine", "W1", "W2", "targets", "ray_init_s", "wall_s"} <= result.keys()
    assert result["machine"]["cpus"] >= 1 and result["machine"]["ram_gb"] > 0
    assert result["ray_init_s"] and all(s > 0 for s in result["ray_init_s"])

    w1 = result["W1"]
    assert_engine(w1["floor"], "floor")
    assert_engine(w1["ray"], "ray")
    assert w1["per_round_ratio"] > 0 and w1["total_ratio"] > 0 and w1["first_update_s"] > 0
    assert len(w1["ray"]["rounds_s"]) == w1["config"]["rounds"]
    assert w1["floor"]["checksum"] == w1["ray"]["checksum"] and w1["bit_identical"] is True

    sizes = result["W2"]["sizes"]
    assert [s["clients"] for s in sizes] == result["W2"]["config"]["sizes"] and len(sizes) >= 2
    for s in sizes:
        assert_engine(s["floor"], "floor")
        assert_engine(s["ray"], "ray")
        assert s["sampled"] == result["W2"]["config"]["sampled"]
        assert math.isfinite(s["overhead_ms_per_client"])  # may be negative when parallelism wins
        assert s["floor"]["checksum"] == s["ray"]["checksum"] and s["bit_identical"] is True, s["clients"]

    assert result["targets"] and all({"name", "target", "measured", "pass"} <= t.keys() for t in result["targets"])
    for t in result["targets"]:
        assert ("PASS" if t["pass"] else "MISS") in proc.stdout
