"""Benchmark `fed_helpers.run_federated_pool`: the Ray actor pool against the compute floor.

    python benchmarks/bench.py                   # full run, a few minutes on a 2-core machine
    python benchmarks/bench.py --quick           # tiny smoke run (synthetic data, one process)
    python benchmarks/bench.py --out FILE.json   # where the JSON goes (default benchmarks/results.json)

Workloads (all figures come from this one run):

- W1, the classroom run: Fashion-MNIST, 10 IID clients, 2NN, every client every round,
  1 local epoch, batch 32, lr 0.05, 5 rounds, seed 0. Engines: the compute floor
  (`use_ray=False`: the same code, sequentially in this process) and Ray with 2 workers.
- W2, scale: Fashion-MNIST split Dirichlet(0.5, min 2 samples) over K = 100, 1,000 and
  10,000 clients, 100 clients sampled per round, batch 10, 3 rounds; both engines per K.

Each (workload, engine, K) configuration runs in a fresh subprocess of this script
(`--one ...`), so its peak memory is its own and not what earlier runs left behind. Ray
is started before the timed call and its start-up time is reported separately. Peak
memory is the largest sum over the process tree (this process and all its descendants,
which includes Ray's daemons and workers) of RSS ("total", shared pages counted once per
process that maps them) and of USS ("private"); PSS (shared pages split between the
processes that map them) is recorded too, for reference. A background thread samples
RSS every 0.1 s, and USS and PSS, which are expensive to read, when RSS reaches new
highs and at least every 5 s (see TreeMonitor). It also measures how many CPU cores
other processes on the machine used meanwhile: timings are only comparable on a quiet
machine. MB = 2**20 bytes throughout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

import fed_helpers as fh

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"
MB = 2**20
NUM_WORKERS = 2

TARGETS = {  # the numbers the Ray engine is held to
    "w1_per_round_ratio": 0.55,  # Ray per-round seconds / floor per-round seconds
    "w1_total_ratio": 1.5,  # Ray total seconds / floor total seconds
    "w1_first_update_s": 10.0,  # seconds from engine start to the first client update
    "w2_overhead_ms": 2.0,  # (Ray round - floor round) per sampled client
    "w2_memory_flat": 0.10,  # Ray peak memory: relative change between the two largest K
    "w2_memory_mb": 3 * 1024,  # Ray peak memory (total, and private) below 3 GB
}


# ----------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------


def workloads(quick: bool) -> dict:
    """The knobs of W1 and W2; `quick` shrinks everything for a smoke test."""
    if quick:
        w1 = dict(dataset="synthetic", scheme="iid", clients=4, rounds=2)
        w2 = dict(dataset="synthetic", sizes=[20, 200], sampled=10, rounds=2)
    else:
        w1 = dict(dataset="fashion_mnist", scheme="iid", clients=10, rounds=5)
        w2 = dict(dataset="fashion_mnist", sizes=[100, 1_000, 10_000], sampled=100, rounds=3)
    w1.update(model="2nn", client_fraction=1.0, local_epochs=1, batch_size=32, lr=0.05, seed=0)
    w2.update(model="2nn", scheme="dirichlet", alpha=0.5, min_size=2, local_epochs=1, batch_size=10,
              lr=0.05, seed=0)
    return {"W1": w1, "W2": w2}


def configurations(quick: bool) -> list[tuple[str, str, int]]:
    """(workload, engine, clients) for every run, in the order they are reported."""
    spec = workloads(quick)
    runs = [("W1", engine, spec["W1"]["clients"]) for engine in ("floor", "ray")]
    runs += [("W2", engine, k) for k in spec["W2"]["sizes"] for engine in ("floor", "ray")]
    return runs


# ----------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0) - getattr(t, "guest", 0) - getattr(t, "guest_nice", 0)


class TreeMonitor:
    """Background sampler of this process and all its descendants: memory, and CPU time.

    RSS ("total") and CPU times are read every `interval` seconds from /proc/PID/statm
    and /proc/PID/stat, which is cheap (~0.5 ms for Ray's ten processes); the list of
    descendants is refreshed every `refresh` seconds (~8 ms: it scans /proc). USS
    ("private") needs /proc/PID/smaps_rollup, whose kernel page-table walk costs ~100 ms
    for Ray's process tree (~30 ms for the driver, which maps all of torch, ~20 ms per
    torch worker), so it is read when the RSS sum is more than 1% above its highest
    value at any earlier USS reading (at most every `uss_min_gap` seconds), and at least
    every `uss_max_gap` seconds. That keeps the sampler to a few percent of one core;
    its own CPU time is recorded.

    The tree's CPU time, against the whole machine's, tells how much *other* work ran
    during the measurement (`other_cores`): the machine may be shared.
    """

    def __init__(self, interval: float = 0.1, refresh: float = 1.0, uss_min_gap: float = 1.0,
                 uss_max_gap: float = 5.0):
        self.interval, self.refresh = interval, refresh
        self.uss_min_gap, self.uss_max_gap = uss_min_gap, uss_max_gap
        self.root = psutil.Process()
        self.procs = [self.root]
        self.last_rss = self.peak_rss = self.peak_uss = self.peak_pss = 0
        self.peak_procs = self.samples = self.uss_samples = 0
        self.cpu_s = 0.0  # CPU time the sampler used (its cost to the run being measured)
        self.cpu_first: dict[int, float] = {}  # per pid: CPU seconds when first seen (0 if born during the run)
        self.cpu_last: dict[int, float] = {}  # per pid: CPU seconds when last seen
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def sample(self, uss: bool = True, refresh: bool = True) -> None:
        start = time.thread_time()
        if refresh:
            try:
                self.procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                pass  # keep the previous list
        rss = private = proportional = count = 0
        for proc in self.procs:
            try:
                with proc.oneshot():
                    info = proc.memory_full_info() if uss else proc.memory_info()
                    cpu = proc.cpu_times()
            except psutil.Error:
                continue  # a worker that exited between listing and reading
            rss += info.rss
            private += info.uss if uss else 0
            proportional += info.pss if uss else 0
            count += 1
            used = cpu.user + cpu.system
            self.cpu_first.setdefault(proc.pid, used if not self._started else 0.0)
            self.cpu_last[proc.pid] = used
        self.last_rss = rss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, count)
        if uss:
            self.peak_uss = max(self.peak_uss, private)
            self.peak_pss = max(self.peak_pss, proportional)
            self.uss_samples += 1
        self.samples += 1
        self.cpu_s += time.thread_time() - start

    def _run(self) -> None:
        last_refresh = last_uss = time.monotonic()
        rss_at_uss = self.last_rss  # the highest RSS sum seen at a USS reading
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            refresh = now - last_refresh >= self.refresh
            self.sample(uss=False, refresh=refresh)
            last_refresh = now if refresh else last_refresh
            since = now - last_uss
            if since >= self.uss_max_gap or (since >= self.uss_min_gap and self.last_rss > 1.01 * rss_at_uss):
                self.sample(uss=True, refresh=False)
                last_uss, rss_at_uss = time.monotonic(), max(rss_at_uss, self.last_rss)

    def __enter__(self) -> TreeMonitor:
        self.sample()
        self._started = True
        self._wall0, self._busy0 = time.perf_counter(), machine_busy_s()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.wall_s = time.perf_counter() - self._wall0
        machine = machine_busy_s() - self._busy0
        self.tree_cpu_s = sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last)
        self.tree_cores = self.tree_cpu_s / self.wall_s
        self.other_cores = max(0.0, machine - self.tree_cpu_s) / self.wall_s


def checksum(model: torch.nn.Module) -> str:
    """First 12 hex digits of the sha256 of all state-dict tensors as float32 bytes, in order."""
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def load(dataset: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    root = Path(os.environ["FED_DATA_DIR"]) if os.environ.get("FED_DATA_DIR") else ROOT / "data"
    return (fh.load_dataset(dataset, train=True, root=root, download=False),
            fh.load_dataset(dataset, train=False, root=root, download=False))


def start_ray() -> float | None:
    """Start Ray with NUM_WORKERS CPUs unless it is running; return the seconds it took (None if it was up)."""
    if ray.is_initialized():
        return None
    start = time.perf_counter()
    fh.init_ray(NUM_WORKERS)
    return time.perf_counter() - start


def run_one(workload: str, engine: str, clients: int, quick: bool) -> dict:
    """Run one configuration in this process and return its figures."""
    spec = workloads(quick)[workload]
    train, test = load(spec["dataset"])
    labels = train[1].numpy()
    if workload == "W1":
        parts = fh.make_partition(spec["scheme"], labels, clients, seed=spec["seed"])
        fraction = spec["client_fraction"]
    else:
        parts = fh.make_partition(spec["scheme"], labels, clients, seed=spec["seed"], alpha=spec["alpha"],
                                  min_size=spec["min_size"])
        fraction = spec["sampled"] / clients
    ray_init_s = start_ray() if engine == "ray" else None
    knobs = dict(rounds=spec["rounds"], client_fraction=fraction, local_epochs=spec["local_epochs"],
                 batch_size=spec["batch_size"], lr=spec["lr"], seed=spec["seed"], progress=False)
    if engine == "ray":
        knobs.update(use_ray=True, num_workers=NUM_WORKERS)
    else:
        knobs.update(use_ray=False)
    with TreeMonitor() as mon:
        model, history = fh.run_federated_pool(spec["model"], train, test, parts, **knobs)
    rounds_s = [h["seconds"] for h in history]
    return {
        "workload": workload,
        "engine": engine,
        "clients": clients,
        "sampled": history[-1]["clients"],
        "per_round_s": statistics.median(rounds_s[1:] or rounds_s),  # round 1 pays the start-up
        "rounds_s": rounds_s,
        "first_update_s": history[0]["first_result"],
        "total_s": history[-1]["elapsed"],
        "peak_total_mb": mon.peak_rss / MB,
        "peak_private_mb": mon.peak_uss / MB,
        "peak_pss_mb": mon.peak_pss / MB,  # proportional set size: shared pages split between their users
        "peak_processes": mon.peak_procs,
        "samples": mon.samples,
        "private_samples": mon.uss_samples,
        "sampler_cpu_s": mon.cpu_s,
        "tree_cores": mon.tree_cores,  # mean CPU cores used by this run's process tree
        "other_cores": mon.other_cores,  # mean CPU cores used by everything else on the machine
        "accuracy": history[-1]["accuracy"],
        "checksum": checksum(model),
        "ray_init_s": ray_init_s,
    }


def run_isolated(workload: str, engine: str, clients: int, quick: bool) -> dict:
    """Run one configuration in a fresh subprocess of this script and return its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", workload, "--engine", engine,
               "--clients", str(clients), "--json-to", str(out)] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise SystemExit(f"configuration {workload}/{engine}/{clients} failed "
                             f"(exit code {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "ram_gb": psutil.virtual_memory().total / 2**30,
        "load_avg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "psutil": psutil.__version__,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def summarise(runs: dict[tuple[str, str, int], dict], quick: bool) -> dict:
    """Figures, ratios and targets from the per-configuration results."""
    spec = workloads(quick)
    k1 = spec["W1"]["clients"]
    floor, ray_ = runs[("W1", "floor", k1)], runs[("W1", "ray", k1)]
    w1 = {
        "config": spec["W1"],
        "floor": floor,
        "ray": ray_,
        "per_round_ratio": ratio(ray_["per_round_s"], floor["per_round_s"]),
        "total_ratio": ratio(ray_["total_s"], floor["total_s"]),
        "first_update_s": ray_["first_update_s"],
        "bit_identical": floor["checksum"] == ray_["checksum"],
    }
    sizes = []
    for k in spec["W2"]["sizes"]:
        f, r = runs[("W2", "floor", k)], runs[("W2", "ray", k)]
        sizes.append({
            "clients": k,
            "sampled": r["sampled"],
            "floor": f,
            "ray": r,
            "overhead_ms_per_client": (r["per_round_s"] - f["per_round_s"]) / r["sampled"] * 1000,
            "bit_identical": f["checksum"] == r["checksum"],
        })
    w2 = {"config": spec["W2"], "sizes": sizes}

    t = TARGETS
    targets = [
        ("W1 Ray/floor per-round seconds", f"<= {t['w1_per_round_ratio']}", w1["per_round_ratio"],
         w1["per_round_ratio"] <= t["w1_per_round_ratio"], "{:.2f}"),
        ("W1 Ray/floor total seconds", f"<= {t['w1_total_ratio']}", w1["total_ratio"],
         w1["total_ratio"] <= t["w1_total_ratio"], "{:.2f}"),
        ("W1 Ray first client update (s)", f"<= {t['w1_first_update_s']:g}", w1["first_update_s"],
         w1["first_update_s"] <= t["w1_first_update_s"], "{:.2f}"),
        ("W1 weights bit-identical", "yes", "yes" if w1["bit_identical"] else "no", w1["bit_identical"], "{}"),
    ]
    for s in sizes:
        targets.append((f"W2 K={s['clients']:,} overhead ms/sampled client", f"<= {t['w2_overhead_ms']:g}",
                        s["overhead_ms_per_client"], s["overhead_ms_per_client"] <= t["w2_overhead_ms"], "{:.2f}"))
    for s in sizes:
        for key, name in (("peak_total_mb", "total"), ("peak_private_mb", "private")):
            targets.append((f"W2 K={s['clients']:,} Ray peak {name} MB", f"< {t['w2_memory_mb']:,}",
                            s["ray"][key], s["ray"][key] < t["w2_memory_mb"], "{:,.0f}"))
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        for key, name in (("peak_total_mb", "total"), ("peak_private_mb", "private")):
            change = b["ray"][key] / a["ray"][key] - 1
            targets.append((f"W2 Ray peak {name} MB, K={a['clients']:,} -> {b['clients']:,}",
                            f"within +-{t['w2_memory_flat']:.0%}", change, abs(change) <= t["w2_memory_flat"],
                            "{:+.1%}"))
    for s in sizes:
        targets.append((f"W2 K={s['clients']:,} weights bit-identical", "yes",
                        "yes" if s["bit_identical"] else "no", s["bit_identical"], "{}"))
    return {
        "W1": w1,
        "W2": w2,
        "targets": [{"name": n, "target": tg, "measured": m, "text": fmt.format(m), "pass": bool(ok)}
                    for n, tg, m, ok, fmt in targets],
    }


def table(result: dict) -> str:
    """The human-readable report of `result` (the same data as the JSON)."""
    m, w1, w2 = result["machine"], result["W1"], result["W2"]
    c1, c2 = w1["config"], w2["config"]
    f, r = w1["floor"], w1["ray"]
    inits = result["ray_init_s"]
    per_round_label = f"per-round s (median rounds 2..{c1['rounds']})"
    lines = [
        "=" * 96,
        f"Federated-learning benchmark (run_federated_pool)   {m['date']}"
        f"{'   QUICK smoke run: tiny sizes, not representative' if result['quick'] else ''}",
        f"machine: {m['cpus']} CPUs, {m['ram_gb']:.1f} GiB RAM, {m['cpu_model']}; 1-min load average at start "
        f"{m['load_avg_at_start'][0]:.2f}; timings compare only on a quiet machine: see 'other work' per run",
        f"software: Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, numpy {m['numpy']}, "
        f"psutil {m['psutil']}",
        f"mode: {'each configuration in a fresh subprocess' if result['isolated'] else 'all in one process'}"
        f"{'' if result['isolated'] else ' (peak memory NOT isolated between configurations)'}; "
        f"Ray engine = {NUM_WORKERS} ClientTrainer actors; MB = 2**20 bytes",
        f"ray.init: {statistics.median(inits):.1f} s (median of {len(inits)} start(s): "
        f"{', '.join(f'{s:.1f}' for s in inits)}; not part of any engine timing)",
        "",
        f"W1 classroom: {c1['dataset']}, {c1['clients']} clients {c1['scheme'].upper()}, {c1['model']}, fraction "
        f"{c1['client_fraction']}, {c1['local_epochs']} epoch, batch {c1['batch_size']}, lr {c1['lr']}, "
        f"{c1['rounds']} rounds, seed {c1['seed']}",
        f"  {'':<36}{'floor':>14}{'Ray':>14}{'Ray/floor':>12}",
        f"  {per_round_label:<36}{f['per_round_s']:>14.2f}"
        f"{r['per_round_s']:>14.2f}{w1['per_round_ratio']:>12.2f}",
        f"  {'engine start -> first update s':<36}{f['first_update_s']:>14.2f}{r['first_update_s']:>14.2f}",
        f"  {'total s':<36}{f['total_s']:>14.2f}{r['total_s']:>14.2f}{w1['total_ratio']:>12.2f}",
        f"  {'peak memory, process tree total MB':<36}{f['peak_total_mb']:>14,.0f}{r['peak_total_mb']:>14,.0f}",
        f"  {'peak memory, process tree private MB':<36}{f['peak_private_mb']:>14,.0f}{r['peak_private_mb']:>14,.0f}",
        f"  {'  (for reference: PSS MB)':<36}{f['peak_pss_mb']:>14,.0f}{r['peak_pss_mb']:>14,.0f}",
        f"  {'processes in tree (peak)':<36}{f['peak_processes']:>14}{r['peak_processes']:>14}",
        f"  {'CPU cores used, this run (mean)':<36}{f['tree_cores']:>14.2f}{r['tree_cores']:>14.2f}",
        f"  {'CPU cores used, other work (mean)':<36}{f['other_cores']:>14.2f}{r['other_cores']:>14.2f}",
        f"  {'memory sampler CPU s (in this run)':<36}{f['sampler_cpu_s']:>14.2f}{r['sampler_cpu_s']:>14.2f}",
        f"  {'final accuracy':<36}{f['accuracy']:>14.4f}{r['accuracy']:>14.4f}",
        f"  {'weights sha256[:12]':<36}{f['checksum']:>14}{r['checksum']:>14}"
        f"   bit-identical: {'yes' if w1['bit_identical'] else 'NO'}",
        "",
        f"W2 scale: {c2['dataset']}, Dirichlet(alpha={c2['alpha']}, min {c2['min_size']}) over K clients, "
        f"{c2['sampled']} sampled per round, {c2['model']}, {c2['local_epochs']} epoch, batch {c2['batch_size']}, "
        f"lr {c2['lr']}, {c2['rounds']} rounds (per-round = median of rounds 2..{c2['rounds']})",
        f"  {'':>7}{'floor':>9}{'Ray':>9}{'overhead':>10}{'Ray peak MB':>21}{'floor peak MB':>15}"
        f"{'other load':>12}{'':>10}{'bit-':>10}",
        f"  {'K':>7}{'s/round':>9}{'s/round':>9}{'ms/client':>10}{'total/private (PSS)':>21}{'total/private':>15}"
        f"{'floor/Ray':>12}{'accuracy':>10}{'identical':>10}",
    ]
    for s in w2["sizes"]:
        f2, r2 = s["floor"], s["ray"]
        ray_mb = f"{r2['peak_total_mb']:,.0f}/{r2['peak_private_mb']:,.0f} ({r2['peak_pss_mb']:,.0f})"
        floor_mb = f"{f2['peak_total_mb']:,.0f}/{f2['peak_private_mb']:,.0f}"
        other = f"{f2['other_cores']:.1f}/{r2['other_cores']:.1f}"
        lines.append(
            f"  {s['clients']:>7,}{f2['per_round_s']:>9.3f}{r2['per_round_s']:>9.3f}"
            f"{s['overhead_ms_per_client']:>10.2f}{ray_mb:>21}{floor_mb:>15}{other:>12}"
            f"{r2['accuracy']:>10.4f}{'yes' if s['bit_identical'] else 'NO':>10}")
    lines.append("  (other load = mean CPU cores used by other processes on the machine during the run)")
    lines += ["", "Targets", f"  {'':<48}{'target':>14}{'measured':>12}  result"]
    for t in result["targets"]:
        lines.append(f"  {t['name']:<48}{t['target']:>14}{t['text']:>12}  {'PASS' if t['pass'] else 'MISS'}")
    passed = sum(t["pass"] for t in result["targets"])
    lines += [f"  {passed} of {len(result['targets'])} targets met; "
              f"benchmark wall time {result['wall_s']:.0f} s", "=" * 96]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    p.add_argument("--quick", action="store_true", help="tiny sizes on synthetic data (implies --inprocess)")
    p.add_argument("--inprocess", action="store_true",
                   help="run every configuration in this process (one ray.init; memory not isolated)")
    p.add_argument("--isolate", action="store_true", help="subprocess per configuration even with --quick")
    p.add_argument("--one", choices=["W1", "W2"], help=argparse.SUPPRESS)  # child mode: one configuration
    p.add_argument("--engine", choices=["floor", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json-to", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child: run one configuration, write its figures, shut Ray down
        try:
            figures = run_one(args.one, args.engine, args.clients, args.quick)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        args.json_to.write_text(json.dumps(figures))
        return 0

    wall = time.perf_counter()
    isolated = args.isolate or not (args.inprocess or args.quick)
    todo = configurations(args.quick)
    if not isolated:  # every floor run before Ray starts, so the floor's process tree holds no Ray
        todo = sorted(todo, key=lambda c: c[1] == "ray")
    info = machine()
    print(f"benchmark: {len(todo)} configurations, {'subprocess each' if isolated else 'in this process'}"
          f"{', quick' if args.quick else ''}", flush=True)
    runs = {}
    try:
        for i, (workload, engine, clients) in enumerate(todo, start=1):
            label = f"[{i}/{len(todo)}] {workload} {engine:<5} K={clients:<6,}"
            print(f"{label} start", flush=True)
            start = time.perf_counter()
            run = run_isolated if isolated else run_one
            runs[(workload, engine, clients)] = res = run(workload, engine, clients, args.quick)
            init = f", ray.init {res['ray_init_s']:.1f} s" if res["ray_init_s"] is not None else ""
            print(f"{label} done in {time.perf_counter() - start:.1f} s: {res['per_round_s']:.3f} s/round, "
                  f"total {res['total_s']:.1f} s, peak {res['peak_total_mb']:,.0f} MB{init}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    result = {"machine": info, "quick": args.quick, "isolated": isolated, "targets_spec": TARGETS}
    result["ray_init_s"] = [r["ray_init_s"] for r in runs.values() if r["ray_init_s"] is not None]
    result.update(summarise(runs, args.quick))
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - wall
    print(table(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
