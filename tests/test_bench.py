"""Smoke test for benchmarks/bench.py: the quick run works end to end and writes sane JSON.

No assertions on timings: test machines are shared and noisy. The hard property checked is
that the three engines the targets compare (the in-process floor, the minimal Ray-tasks baseline
written in bench.py, and the actor pool) give bit-identical weights, in every repeat.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
W1_ENGINES = ["floor", "minimal", "pool"]  # the quick run's; the full run adds the engine's RayTasks
RUN_KEYS = {"per_round_s", "rounds_s", "start_s", "first_round_s", "total_s", "clients_s", "evaluate_s",
            "server_s", "cpu_per_round_s", "peak_total_mb", "peak_private_mb", "peak_pss_mb", "accuracy", "checksum",
            "ray_init_s", "sampled", "clients", "repeat", "tree_cores", "other_cores"}
POSITIVE = ["per_round_s", "first_round_s", "total_s", "clients_s", "evaluate_s", "peak_total_mb", "peak_private_mb",
            "peak_pss_mb"]
CPU_GROUPS = {"workers", "driver main", "driver other", "ray daemons", "sampler"}


def assert_run(figures: dict, engine: str, rounds: int) -> None:
    """One configuration's figures are complete and sane."""
    assert RUN_KEYS <= figures.keys(), RUN_KEYS - figures.keys()
    assert figures["engine"] == engine
    for key in POSITIVE:
        assert math.isfinite(figures[key]) and figures[key] > 0, (engine, key, figures[key])
    assert figures["start_s"] >= 0 and len(figures["rounds_s"]) == rounds
    assert figures["total_s"] >= sum(figures["rounds_s"])
    assert 0 <= figures["accuracy"] <= 1
    assert len(figures["checksum"]) == 12 and int(figures["checksum"], 16) >= 0
    cpu = figures["cpu_per_round_s"]
    assert set(cpu) == CPU_GROUPS and all(math.isfinite(v) for v in cpu.values())
    if engine == "floor":
        assert figures["ray_init_s"] is None and cpu["workers"] == 0  # no Ray: the driver trains
    else:
        assert cpu["workers"] > 0, (engine, cpu)  # the clients trained in Ray workers


def test_quick_benchmark(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ["W1 classroom", "W2 scale", "Targets", "bit-identical", "ray.init", "machine:", "software:",
                 "other work", "private MB", "PSS", "min-tasks", "pool/min", "pool/floor", "CPU s per round"]:
        assert text in proc.stdout, text

    result = json.loads(out.read_text())
    assert {"machine", "W1", "W2", "targets", "ray_init_s", "wall_s", "repeats", "engines"} <= result.keys()
    assert result["machine"]["cpus"] >= 1 and result["machine"]["ram_gb"] > 0
    assert result["ray_init_s"] and all(s > 0 for s in result["ray_init_s"])

    w1, repeats = result["W1"], result["repeats"]
    assert repeats >= 2 and list(w1["engines"]) == W1_ENGINES
    assert len(w1["runs"]) == repeats * len(W1_ENGINES)
    for run in w1["runs"]:
        assert_run(run, run["engine"], w1["config"]["rounds"])
    assert sorted((r["engine"], r["repeat"]) for r in w1["runs"]) == sorted(
        (e, rep) for e in W1_ENGINES for rep in range(repeats))
    for engine, summary in w1["engines"].items():
        assert summary["repeats"] == repeats and summary["per_round_s"] > 0, engine
    # the three engines the targets compare: the same bits, every repeat
    assert len({r["checksum"] for r in w1["runs"]}) == 1 and w1["bit_identical"] is True
    for pair in ["pool/minimal", "pool/floor"]:
        r = w1["per_round_ratios"][pair]
        assert len(r["values"]) == repeats and all(v > 0 and math.isfinite(v) for v in r["values"]), pair
        assert r["min"] <= r["median"] <= r["max"], pair
        by = {(x["engine"], x["repeat"]): x["per_round_s"] for x in w1["runs"]}
        a, b = pair.split("/")
        assert r["values"] == [by[(a, rep)] / by[(b, rep)] for rep in range(repeats)], pair  # paired

    sizes = result["W2"]["sizes"]
    assert [s["clients"] for s in sizes] == result["W2"]["config"]["sizes"] and len(sizes) >= 2
    for s in sizes:
        for run in s["runs"]:
            assert_run(run, run["engine"], result["W2"]["config"]["rounds"])
        assert {r["engine"] for r in s["runs"]} == {"floor", "pool"}
        assert s["sampled"] == result["W2"]["config"]["sampled"]
        assert math.isfinite(s["overhead_ms_per_client"])  # may be negative when parallelism wins
        assert len({r["checksum"] for r in s["runs"]}) == 1 and s["bit_identical"] is True, s["clients"]

    names = [t["name"] for t in result["targets"]]
    assert any("pool/min-tasks" in n for n in names) and any("pool/floor" in n for n in names)
    assert result["targets"] and all({"name", "target", "measured", "pass"} <= t.keys() for t in result["targets"])
    for t in result["targets"]:
        assert ("PASS" if t["pass"] else "MISS") in proc.stdout
        if "bit-identical" in t["name"]:
            assert t["pass"], t


def run_quick(script: str, out) -> tuple[subprocess.CompletedProcess, dict]:
    """Run benchmarks/`script` --quick into `out`; its exit code must be 0 (the script's own checks passed)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_quick_privacy_benchmark(tmp_path):
    """benchmarks/bench_privacy.py --quick: plain and DP runs, their paired ratio, and the check that
    z = 0, C = inf gives plain FedAvg's bits (the script exits 1 if not). No assertion on timings."""
    proc, result = run_quick("bench_privacy.py", tmp_path / "privacy.json")
    assert result["z0_cinf_bit_identical"] is True
    assert [r["setting"] for r in result["runs"]] == ["plain", "dp"]
    for r in result["runs"]:
        assert len(r["rounds_s"]) == 3 and all(s > 0 for s in r["rounds_s"]) and 0 <= r["accuracy"] <= 1
    assert result["runs"][0]["epsilon"] is None and math.isfinite(result["runs"][1]["epsilon"])
    assert result["runs"][1]["epsilon"] > 0
    ratio = result["dp_over_plain"]
    assert math.isfinite(ratio["median"]) and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert set(result["server_s"]) == {"weighted_mean", "dp_mean"} and all(v > 0 for v in result["server_s"].values())
    assert "DP / plain per round" in proc.stdout


def test_quick_secagg_benchmark(tmp_path):
    """benchmarks/bench_secagg.py --quick: the protocol's bytes and seconds for each client count, graph and
    dropout rate, the engine settings and their paired ratios, and the check that the message sizes match
    the formula behind the Bonawitz et al. comparison (the script exits 1 if not). No assertion on timings."""
    proc, result = run_quick("bench_secagg.py", tmp_path / "secagg.json")
    assert result["protocol_formula_matches"] is True
    assert {(r["n"], r["dropout"]) for r in result["protocol"]} == {(n, f) for n in (10, 20) for f in (0.0, 0.1, 0.3)}
    for r in result["protocol"]:
        assert r["client_up_B"] > 4 * r["d"] and r["expansion_up"] > 1 and r["server_unmask_s"] >= 0
    sparse = {r["n"]: r for r in result["protocol"] if r["degree"] < r["n"] - 1 and r["dropout"] == 0}
    dense = {r["n"]: r for r in result["protocol"] if r["degree"] == r["n"] - 1 and r["dropout"] == 0}
    assert all(sparse[n]["client_up_B"] < dense[n]["client_up_B"] for n in (10, 20))  # SecAgg+ sends less
    assert [r["setting"] for r in result["engine_runs"]] == ["plain", "secagg+", "every pair", "plain, 10% drop",
                                                             "secagg+, 10% drop"]
    plain, secure = result["engine_runs"][0], result["engine_runs"][1]
    assert secure["bytes_up_per_client"] > plain["bytes_up_per_client"]  # the protocol's messages are counted
    assert abs(secure["accuracy"] - plain["accuracy"]) <= 0.01
    assert all(math.isfinite(v["median"]) for v in result["ratios"].values())
    assert result["bonawitz_setting"]["words_16_plus_log2n_bits"] < result["bonawitz_setting"]["words_32_bits"]
    assert "SecAgg+ / plain" in proc.stdout
