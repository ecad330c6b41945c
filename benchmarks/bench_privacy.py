"""Benchmark what differential privacy costs a round (notebook 09): DP-FedAvg against plain FedAvg.

    python benchmarks/bench_privacy.py            # full run, about 2 minutes on a 2-core machine
    python benchmarks/bench_privacy.py --quick    # ~20-second smoke run (synthetic data, in process)

The workload: Fashion-MNIST split IID over 1,000 clients (60 images each), 100 sampled per round
(q = 0.1), 2NN, 1 local epoch, batch 20, lr 0.1, on the engine's actor pool (2 workers). Two
settings, interleaved `--repeats` times (plain, dp, plain, dp, ...), each a fresh run of `--rounds`:

- plain: `run_rounds` with its defaults (no transform, `weighted_mean`);
- dp: the same with `ClipUpdate(C)` on the clients and `dp_mean(task, C, z)` on the server
  (re-clip, capped weights, fixed denominator, seeded Gaussian noise), C = 0.3, z = 1.0, and the
  `PrivacyLedger` callback.

A round's time is the median of its rounds 2.. (round 1 warms up); the DP/plain ratio is the median
of the PAIRED ratios (repeat i against repeat i), with min and max, since the machine's noise moves
neighbouring runs together. Also measured: the server's aggregation alone (`weighted_mean` against
`DPMean` on the same 100 updates, best of 20), and that z = 0, C = inf gives plain FedAvg's bits.
The figures go to benchmarks/privacy.json (a --quick run to build/bench-privacy-quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fed_helpers as fh  # noqa: E402

TARGET = 1.1  # issue 11: a DP-FedAvg round takes at most 1.1 x a plain round (100 sampled clients, actor pool)
CLIP, NOISE, DELTA = 0.3, 1.0, 1e-5


def make_task(quick: bool) -> fh.FedTask:
    root = Path(os.environ.get("FED_DATA_DIR") or ROOT / "data")
    name = "synthetic" if quick else "fashion_mnist"
    train, test = (fh.load_dataset(name, train=t, root=root, download=False) for t in (True, False))
    clients = 100 if quick else 1000
    parts = fh.make_partition("iid", train[1].numpy(), clients, seed=0)
    return fh.FedTask(train, test, parts, fh.TrainConfig("2nn", 1, 20, 0.1), 0.1, 0)


def pieces(task: fh.FedTask, setting: str) -> dict:
    """run_rounds' keyword arguments for a setting."""
    if setting == "plain":
        return {}
    clip, z = (math.inf, 0.0) if setting == "dp-off" else (CLIP, NOISE)
    return {"transform": fh.ClipUpdate(clip), "aggregate": fh.dp_mean(task, clip, z),
            "callbacks": [fh.PrivacyLedger.for_task(task, z, DELTA)]}


def one_run(task: fh.FedTask, setting: str, rounds: int, quick: bool) -> dict:
    executor = fh.InProcess() if quick else fh.ActorPool(num_workers=2)
    start = time.perf_counter()
    model, history = fh.run_rounds(task, rounds, executor=executor, progress=False, **pieces(task, setting))
    per_round = [h["seconds"] for h in history]
    return {"setting": setting, "rounds_s": per_round, "per_round_s": statistics.median(per_round[1:]),
            "total_s": time.perf_counter() - start, "accuracy": history[-1]["accuracy"],
            "epsilon": history[-1].get("epsilon"), "weights": fh.flat_weights(model)}


def server_only(task: fh.FedTask, quick: bool) -> dict:
    """Seconds to aggregate 100 updates (best of 20): weighted_mean against DPMean (clip + noise)."""
    n = fh.flat_weights(fh.make_model("2nn")).numel()
    rng = np.random.default_rng(0)
    g = torch.zeros(n)
    results = [fh.ClientResult(k, num_samples=60, weights=(0.1 * rng.standard_normal(n)).astype(np.float32))
               for k in range(100)]
    jobs = [fh.ClientJob(k, 1, np.arange(60), 0) for k in range(100)]
    rule = fh.dp_mean(task, CLIP, NOISE)
    out = {}
    with fh.torch_threads(1):  # as run_round aggregates
        for name, call in (("weighted_mean", lambda: fh.weighted_mean(results, g, jobs)),
                           ("dp_mean", lambda: rule(results, g, jobs))):
            times = []
            for _ in range(5 if quick else 20):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            out[name] = min(times)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="synthetic data, 100 clients, in process: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="pairs of (plain, dp) runs (default 3; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run, >= 2 (default 6; quick 3)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/privacy.json; "
                   "quick: build/bench-privacy-quick.json)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    rounds = args.rounds or (3 if args.quick else 6)
    if repeats < 1 or rounds < 2:
        p.error(f"--repeats must be >= 1 and --rounds >= 2, got {repeats} and {rounds}")
    out = args.out or (ROOT / "build" / "bench-privacy-quick.json" if args.quick else
                       Path(__file__).resolve().parent / "privacy.json")
    load_start = os.getloadavg()
    task = make_task(args.quick)
    if not args.quick:
        fh.init_ray(2)
    runs = []
    for rep in range(repeats):
        for setting in ("plain", "dp"):
            runs.append({**one_run(task, setting, rounds, args.quick), "repeat": rep})
            print(f"[{rep + 1}/{repeats}] {setting:<5} {runs[-1]['per_round_s']:.3f} s/round, accuracy "
                  f"{runs[-1]['accuracy']:.4f}", flush=True)
    off = one_run(task, "dp-off", rounds, args.quick)
    identical = bool(torch.equal(off["weights"], runs[0]["weights"]))
    paired = [d["per_round_s"] / pl["per_round_s"] for pl, d in zip(runs[0::2], runs[1::2])]
    server = server_only(task, args.quick)
    ratio = statistics.median(paired)
    result = {
        "workload": {"dataset": "synthetic" if args.quick else "fashion_mnist", "clients": len(task.partitions),
                     "sampled": round(task.client_fraction * len(task.partitions)), "model": "2nn",
                     "executor": "in-process" if args.quick else "actor-pool (2 workers)", "rounds": rounds,
                     "repeats": repeats, "clip": CLIP, "noise_multiplier": NOISE, "delta": DELTA},
        "runs": [{k: v for k, v in r.items() if k != "weights"} for r in runs],
        "dp_over_plain": {"median": ratio, "min": min(paired), "max": max(paired), "values": paired},
        "server_s": server, "z0_cinf_bit_identical": identical,
        "load_avg_at_start": list(load_start), "load_avg_at_end": list(os.getloadavg()),
        "target": {"name": "DP-FedAvg / FedAvg per-round s", "target": f"<= {TARGET}", "measured": ratio,
                   "pass": ratio <= TARGET},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plain_s = statistics.median(r["per_round_s"] for r in runs[0::2])
    dp_s = statistics.median(r["per_round_s"] for r in runs[1::2])
    print(f"\n{result['workload']['clients']:,} clients, {result['workload']['sampled']} per round, "
          f"{result['workload']['executor']}: plain {plain_s:.3f} s/round, DP {dp_s:.3f} s/round")
    print(f"DP / plain per round (median of {repeats} paired): {ratio:.3f} [{min(paired):.3f}-{max(paired):.3f}]"
          f"  target <= {TARGET}: {'PASS' if ratio <= TARGET else 'MISS'}")
    print(f"server aggregation of 100 updates: weighted_mean {1000 * server['weighted_mean']:.1f} ms, "
          f"DPMean {1000 * server['dp_mean']:.1f} ms")
    print(f"epsilon after {rounds} rounds at delta {DELTA:g}: {runs[1]['epsilon']:.3f}; "
          f"z = 0, C = inf gives plain FedAvg's bits: {'yes' if identical else 'NO'}")
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; results in {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
