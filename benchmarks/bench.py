"""Benchmark the round engine (`fed_helpers.run_rounds`): the actor pool against the compute floor and Ray tasks.

    python benchmarks/bench.py                   # full run, about 10 minutes on a 2-core machine
    python benchmarks/bench.py --quick           # ~1-minute smoke run (synthetic data, one process)
    python benchmarks/bench.py --w1-only --repeats 2   # a short W1-only run while developing
    python benchmarks/bench.py --out FILE.json   # where the JSON goes (default benchmarks/results.json for
                                                 # the full run, build/bench-quick.json for any other)

Engines (every one trains each client with `train_local` on one PyTorch thread, with the seeds of
`client_seed` and the clients of `sample_clients`, and averages in float64 in client-id order, so
all give the same bits):

- floor: the engine with `InProcess()`, every client one after another in this process;
- min-tasks: a minimal Ray-tasks loop written here, NOT the engine: one `@ray.remote` task per
  client per round, the data put once, the weights once per round (`minimal_rounds`);
- pool: the engine with `ActorPool(num_workers=2)`, long-lived `ClientTrainer` actors;
- tasks: the engine with `RayTasks()`, one task per client through the engine (for reference).

Workloads (all figures come from this one run):

- W1, the classroom run: Fashion-MNIST, 10 IID clients, 2NN, every client every round,
  1 local epoch, batch 32, lr 0.05, 5 rounds, seed 0, on every engine. The engines are
  interleaved (floor, min-tasks, pool, tasks, floor, min-tasks, ...; `--repeats` times), and
  the pool is compared with the others by the median of the PAIRED ratios (repeat i against
  repeat i), with their min and max: the machine's noise moves neighbouring runs together.
- W2, scale: Fashion-MNIST split Dirichlet(0.5, min 2 samples) over K = 100, 1,000 and
  10,000 clients, 100 clients sampled per round, batch 10, 3 rounds; floor and pool per K.

Each (workload, engine, K, repeat) configuration runs in a fresh subprocess of this script
(`--one ...`), so its peak memory is its own and not what earlier runs left behind. Ray
is started before the timed call and its start-up time is reported separately. Peak
memory is the largest sum over the process tree (this process and all its descendants,
which includes Ray's daemons and workers) of RSS ("total", shared pages counted once per
process that maps them) and of USS ("private"); PSS (shared pages split between the
processes that map them) is recorded too, for reference. A background thread samples
RSS every 0.1 s, and USS and PSS, which are expensive to read, when RSS reaches new
highs and at least every 5 s (see TreeMonitor). It also measures how many CPU cores
other processes on the machine used meanwhile: timings are only comparable on a quiet
machine. After every round the CPU time of each process of the tree is read, so the
report says where a round's CPU went (workers, the driver's main thread, the driver's
other threads, Ray's daemons, the memory sampler). MB = 2**20 bytes throughout.
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
QUICK_OUT = ROOT / "build" / "bench-quick.json"  # a smoke run never overwrites the committed results
MB = 2**20
NUM_WORKERS = 2
ENGINES = {  # name -> what it is (the order is the interleaving order and the columns' order)
    "floor": "InProcess(): the engine, every client in this process",
    "minimal": "a minimal Ray-tasks loop in bench.py (not the engine): a task per client per round",
    "pool": f"ActorPool(num_workers={NUM_WORKERS}): the engine on long-lived ClientTrainer actors",
    "tasks": "RayTasks(): the engine, a Ray task per client per round",
}
LABEL = {"floor": "floor", "minimal": "min-tasks", "pool": "pool", "tasks": "tasks"}
W2_ENGINES = ("floor", "pool")
RAY_ENGINES = ("minimal", "pool", "tasks")
START_TIMEOUT_S = 600.0  # the pool's actors must start within this (a loaded 2-core machine needs minutes)
QUICK_ENGINES = ("floor", "minimal", "pool")  # the three the targets compare; the smoke run skips RayTasks

TARGETS = {  # the numbers the actor pool is held to (issue 10)
    "w1_pool_vs_minimal": 0.9,  # pool / min-tasks per-round seconds, median of the paired ratios
    "w1_pool_vs_floor": 0.6,  # pool / floor per-round seconds, median of the paired ratios
    "w2_overhead_ms": 2.0,  # (pool round - floor round) per sampled client
    "w2_memory_flat": 0.10,  # pool peak memory: relative change between the two largest K
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


def configurations(quick: bool, engines: list[str], repeats: int, w2_repeats: int,
                   w1_only: bool = False) -> list[tuple[str, str, int, int]]:
    """(workload, engine, clients, repeat) for every run, interleaved: A B C A B C ..."""
    spec = workloads(quick)
    runs = [("W1", e, spec["W1"]["clients"], rep) for rep in range(repeats) for e in engines]
    if not w1_only:
        runs += [("W2", e, k, rep) for k in spec["W2"]["sizes"] for rep in range(w2_repeats) for e in W2_ENGINES]
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
        self._lock = threading.Lock()
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
            with self._lock:
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


CPU_GROUPS = ("workers", "driver main", "driver other", "ray daemons", "sampler")


def process_group(proc: psutil.Process, root_pid: int) -> str:
    """Which part of the run a process of the tree is: the driver, a Ray worker, or a Ray daemon."""
    if proc.pid == root_pid:
        return "driver"
    name = proc.name()
    if name.startswith("ray::") and not name.endswith("Agent"):  # ray::ClientTrainer, ray::IDLE, ray::<task>
        return "workers"
    return "ray daemons"  # gcs_server, raylet, dashboard, log monitor, the agents


class RoundCPU:
    """CPU seconds per part of the process tree, read at the start and after every round
    (on the driver's main thread, outside the round's own timing): `per_round()` is the
    mean CPU a round took, per part, over rounds 2.. (round 1 pays the start-up)."""

    def __init__(self, monitor: TreeMonitor):
        self.monitor, self.root = monitor, psutil.Process()
        self.groups: dict[int, str] = {}
        self.snaps: list[dict[str, float]] = []

    def snap(self, *_ignored) -> None:
        used = dict.fromkeys(CPU_GROUPS, 0.0)
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = [self.root]
        for proc in procs:
            try:
                if proc.pid not in self.groups:
                    self.groups[proc.pid] = process_group(proc, self.root.pid)
                group = self.groups[proc.pid]
                t = proc.cpu_times()
            except psutil.Error:
                continue
            used["driver other" if group == "driver" else group] += t.user + t.system
        main = time.thread_time()  # this (the main) thread's CPU time
        used["driver main"] = main
        used["sampler"] = self.monitor.cpu_s
        used["driver other"] -= main + self.monitor.cpu_s  # the rest of the driver: Ray's threads, torch's pool
        self.snaps.append(used)

    def per_round(self) -> dict[str, float]:
        """Mean CPU seconds per round over rounds 2.. (or over round 1 when there is one round)."""
        first, last = (1, len(self.snaps) - 1) if len(self.snaps) > 2 else (0, len(self.snaps) - 1)
        n = max(1, last - first)
        return {g: (self.snaps[last][g] - self.snaps[first][g]) / n for g in CPU_GROUPS}


class Timed:
    """An executor wrapper that times `start` (the engine's set-up: data put, actors started) and
    each round's `run` (the clients' jobs, from the first sent to the last answer back)."""

    def __init__(self, inner):
        self.inner, self.name, self.start_s, self.run_s = inner, inner.name, 0.0, []

    def start(self, *args) -> None:
        t = time.perf_counter()
        self.inner.start(*args)
        self.start_s = time.perf_counter() - t

    def run(self, *args):
        t = time.perf_counter()
        out = self.inner.run(*args)
        self.run_s.append(time.perf_counter() - t)
        return out

    def stop(self) -> None:
        self.inner.stop()


def timing_evaluate(store: list) -> callable:
    """`fh.evaluate`, timed: each call's seconds are appended to `store` (run_round looks it up by name)."""
    evaluate = fh.evaluate

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = evaluate(*args, **kwargs)
        store.append(time.perf_counter() - t)
        return out

    timed.original = evaluate
    return timed


# ----------------------------------------------------------------------------
# The minimal Ray-tasks baseline (NOT the engine)
# ----------------------------------------------------------------------------


# The baseline's float64 mean runs on one PyTorch thread. On 200k-element vectors, torch's default
# intra-op threads (2 here) cost far more than they save: each op forks and joins OpenMP threads,
# and on a busy machine it waits for a descheduled one (measured: the engine's server-side math,
# 0.03-0.1 s a round on one thread, took 0.3-1.2 s on two, under load). With the default, the
# baseline would be slowed by a thread setting, not by Ray tasks; with one thread it is the
# strongest minimal loop, and the comparison is about the executor.
SERVER_THREADS = 1


@ray.remote(num_cpus=1)
def minimal_client(weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, indices: np.ndarray, seed: int,
                   cfg: fh.TrainConfig) -> tuple[int, float, np.ndarray]:
    """One client's update as the shortest Ray task does it: a fresh model, one thread, train_local."""
    with fh.torch_threads(1):
        model = fh.set_flat_weights(fh.make_model(cfg.model), weights)
        x, y = torch.from_numpy(x_all[indices]), torch.from_numpy(y_all[indices])
        losses = fh.train_local(model, x, y, cfg.epochs, cfg.batch_size, cfg.lr, seed, cfg.momentum,
                                cfg.weight_decay)
        return len(indices), losses[-1], fh.flat_weights(model).numpy()


def minimal_rounds(task: fh.FedTask, rounds: int, callback=None, timer: Timed | None = None
                   ) -> tuple[torch.nn.Module, list[dict]]:
    """FedAvg in about fifteen lines of plain Ray: the data is put once, the weights once per
    round, one task per sampled client, `ray.get` in client-id order, the float64 weighted mean
    folded in that order, then the test set: the engine's math (and its bits), none of its pieces."""
    start, cfg = time.perf_counter(), task.config
    x_ref, y_ref = ray.put(task.train[0].numpy()), ray.put(task.train[1].numpy())
    if timer is not None:
        timer.start_s = time.perf_counter() - start
    model, history = fh.make_model(cfg.model, task.seed), []
    for rnd in range(1, rounds + 1):
        t = time.perf_counter()
        w = fh.flat_weights(model)
        w_ref = ray.put(w.numpy())
        clients = fh.sample_clients(len(task.partitions), task.client_fraction, task.seed, rnd)
        outs = ray.get([minimal_client.remote(w_ref, x_ref, y_ref, task.partitions[k],
                                              fh.client_seed(task.seed, rnd, int(k)), cfg) for k in clients])
        if timer is not None:
            timer.run_s.append(time.perf_counter() - t)
        sizes = np.array([n for n, _, _ in outs], dtype=np.float64)
        with fh.torch_threads(SERVER_THREADS):  # see SERVER_THREADS
            avg = torch.zeros(len(w), dtype=torch.float64)
            for (_, _, weights), c in zip(outs, sizes / sizes.sum()):
                avg += float(c) * torch.tensor(weights, dtype=torch.float64)
            fh.set_flat_weights(model, avg.to(torch.float32))
        loss, acc = fh.evaluate(model, *task.test)
        history.append({"round": rnd, "accuracy": acc, "loss": loss, "clients": len(clients),
                        "seconds": time.perf_counter() - t})
        if callback is not None:
            callback(history)
    return model, history


# ----------------------------------------------------------------------------
# One configuration
# ----------------------------------------------------------------------------


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


def make_task(workload: str, clients: int, quick: bool) -> fh.FedTask:
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
    cfg = fh.TrainConfig(spec["model"], spec["local_epochs"], spec["batch_size"], spec["lr"])
    return fh.FedTask(train, test, parts, cfg, fraction, spec["seed"])


def run_one(workload: str, engine: str, clients: int, quick: bool, repeat: int = 0) -> dict:
    """Run one configuration in this process and return its figures."""
    rounds = workloads(quick)[workload]["rounds"]
    task = make_task(workload, clients, quick)
    ray_init_s = start_ray() if engine in RAY_ENGINES else None
    evals: list[float] = []
    fh.evaluate = timing_evaluate(evals)
    try:
        with TreeMonitor() as mon:
            cpu = RoundCPU(mon)
            cpu.snap()
            start = time.perf_counter()
            if engine == "minimal":
                timer = Timed(fh.InProcess())  # holds start_s and run_s; its executor is never started
                model, history = minimal_rounds(task, rounds, cpu.snap, timer)
            else:
                inner = {"floor": fh.InProcess, "tasks": fh.RayTasks,
                         "pool": lambda: fh.ActorPool(NUM_WORKERS, start_timeout_s=START_TIMEOUT_S)}[engine]()
                timer = Timed(inner)
                model, history = fh.run_rounds(task, rounds, executor=timer, callbacks=[cpu.snap], progress=False)
            total_s = time.perf_counter() - start
    finally:
        fh.evaluate = fh.evaluate.original
    rounds_s = [h["seconds"] for h in history]
    per_cpu = cpu.per_round()
    later = slice(1, None) if len(rounds_s) > 1 else slice(None)  # rounds 2.. (round 1 pays the start-up)
    clients_s = statistics.median(timer.run_s[later])
    evaluate_s = statistics.median(evals[later])
    rest_s = statistics.median(r - c - e for r, c, e in zip(rounds_s[later], timer.run_s[later], evals[later]))
    return {
        "workload": workload,
        "engine": engine,
        "clients": clients,
        "repeat": repeat,
        "sampled": history[-1]["clients"],
        "per_round_s": statistics.median(rounds_s[1:] or rounds_s),  # round 1 pays the start-up
        "rounds_s": rounds_s,
        "start_s": timer.start_s,  # the executor's start: data put, actors started and ready
        "first_round_s": rounds_s[0],
        "total_s": total_s,
        "clients_s": clients_s,  # of a round: the clients' jobs (executor.run: first sent to last answer)
        "evaluate_s": evaluate_s,  # of a round: the driver's test-set pass
        "server_s": rest_s,  # of a round: the rest (sampling, aggregation, strategy, history row)
        "cpu_per_round_s": per_cpu,  # rounds 2..: CPU seconds per part of the tree
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


def run_isolated(workload: str, engine: str, clients: int, quick: bool, repeat: int = 0) -> dict:
    """Run one configuration in a fresh subprocess of this script and return its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", workload, "--engine", engine,
               "--clients", str(clients), "--repeat", str(repeat), "--json-to", str(out)]
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise SystemExit(f"configuration {workload}/{engine}/{clients}/{repeat} failed "
                             f"(exit code {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------
# Summarising
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


def spread(values: list[float]) -> dict:
    """Median, min and max of `values` (and the values)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def engine_summary(runs: list[dict]) -> dict:
    """One engine's figures over its repeats: the median of each number, the max of each peak."""
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("per_round_s", "start_s", "first_round_s", "total_s", "clients_s", "evaluate_s", "server_s",
            "tree_cores", "other_cores", "sampler_cpu_s", "accuracy")}
    peaks = {k: max(r[k] for r in runs) for k in ("peak_total_mb", "peak_private_mb", "peak_pss_mb",
                                                   "peak_processes")}
    cpu = {g: statistics.median(r["cpu_per_round_s"][g] for r in runs) for g in CPU_GROUPS}
    return {**med, **peaks, "cpu_per_round_s": cpu, "sampled": runs[0]["sampled"], "repeats": len(runs),
            "checksums": sorted({r["checksum"] for r in runs}),
            "ray_init_s": [r["ray_init_s"] for r in runs if r["ray_init_s"] is not None]}


PAIRS = (("pool", "minimal"), ("pool", "floor"), ("minimal", "floor"), ("tasks", "minimal"), ("pool", "tasks"))


def summarise(runs: dict[tuple[str, str, int, int], dict], quick: bool, engines: list[str], repeats: int,
              w2_repeats: int, w1_only: bool) -> dict:
    """Figures, paired ratios and targets from the per-configuration results."""
    spec = workloads(quick)
    k1 = spec["W1"]["clients"]
    by_engine = {e: [runs[("W1", e, k1, rep)] for rep in range(repeats)] for e in engines}
    ratios = {}
    for a, b in PAIRS:
        if a in engines and b in engines:
            ratios[f"{a}/{b}"] = spread([ratio(x["per_round_s"], y["per_round_s"])
                                         for x, y in zip(by_engine[a], by_engine[b])])
    checks = {r["checksum"] for rs in by_engine.values() for r in rs}
    w1 = {
        "config": spec["W1"],
        "engines": {e: engine_summary(rs) for e, rs in by_engine.items()},
        "runs": [runs[("W1", e, k1, rep)] for rep in range(repeats) for e in engines],
        "per_round_ratios": ratios,  # paired: repeat i of one engine against repeat i of the other
        "bit_identical": len(checks) == 1,
        "checksum": sorted(checks)[0] if len(checks) == 1 else None,
    }
    sizes = []
    for k in ([] if w1_only else spec["W2"]["sizes"]):
        f = [runs[("W2", "floor", k, rep)] for rep in range(w2_repeats)]
        p = [runs[("W2", "pool", k, rep)] for rep in range(w2_repeats)]
        overhead = spread([(b["per_round_s"] - a["per_round_s"]) / b["sampled"] * 1000 for a, b in zip(f, p)])
        sizes.append({
            "clients": k,
            "sampled": p[0]["sampled"],
            "floor": engine_summary(f),
            "pool": engine_summary(p),
            "runs": [r for pair in zip(f, p) for r in pair],
            "overhead_ms_per_client": overhead["median"],
            "overhead_ms": overhead,
            "bit_identical": len({r["checksum"] for r in f + p}) == 1,
        })
    w2 = {"config": spec["W2"], "repeats": w2_repeats, "sizes": sizes}

    t, targets = TARGETS, []
    n = f"median of {repeats} paired"
    for (a, b), key in ((("pool", "minimal"), "w1_pool_vs_minimal"), (("pool", "floor"), "w1_pool_vs_floor")):
        if f"{a}/{b}" in ratios:
            r = ratios[f"{a}/{b}"]
            targets.append((f"W1 {LABEL[a]}/{LABEL[b]} per-round s ({n})", f"<= {t[key]}", r["median"],
                            r["median"] <= t[key], f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"))
    same = "yes" if w1["bit_identical"] else "no"
    targets.append((f"W1 weights bit-identical ({len(engines)} engines x {repeats})", "yes", same,
                    w1["bit_identical"], same))
    for s in sizes:
        o = s["overhead_ms"]
        text = f"{o['median']:.2f}" + (f" [{o['min']:.2f}-{o['max']:.2f}]" if w2_repeats > 1 else "")
        targets.append((f"W2 K={s['clients']:,} overhead ms/sampled client", f"<= {t['w2_overhead_ms']:g}",
                        o["median"], o["median"] <= t["w2_overhead_ms"], text))
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        for key, name in (("peak_total_mb", "total"), ("peak_private_mb", "private")):
            change = b["pool"][key] / a["pool"][key] - 1
            targets.append((f"W2 pool peak {name} MB, K={a['clients']:,} -> {b['clients']:,}",
                            f"within +-{t['w2_memory_flat']:.0%}", change, abs(change) <= t["w2_memory_flat"],
                            f"{change:+.1%}"))
    for s in sizes:
        ok = s["bit_identical"]
        targets.append((f"W2 K={s['clients']:,} weights bit-identical", "yes", "yes" if ok else "no", ok,
                        "yes" if ok else "no"))
    return {
        "W1": w1,
        "W2": w2,
        "targets": [{"name": nm, "target": tg, "measured": m, "text": tx, "pass": bool(ok)}
                    for nm, tg, m, ok, tx in targets],
    }


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


def table(result: dict) -> str:
    """The human-readable report of `result` (the same data as the JSON)."""
    m, w1, w2 = result["machine"], result["W1"], result["W2"]
    c1, c2 = w1["config"], w2["config"]
    engines = list(w1["engines"])
    e = w1["engines"]
    inits = result["ray_init_s"]
    reps = result["repeats"]
    width = 13

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<40}" + "".join(f"{v:>{width}}" for v in values)

    def fig(key: str, fmt: str) -> list[str]:
        return [format(e[x][key], fmt) for x in engines]

    lines = [
        "=" * 100,
        f"Federated-learning benchmark (the round engine, run_rounds)   {m['date']}"
        f"{'   QUICK smoke run: tiny sizes, not representative' if result['quick'] else ''}",
        f"machine: {m['cpus']} CPUs, {m['ram_gb']:.1f} GiB RAM, {m['cpu_model']}; 1-min load average at start "
        f"{m['load_avg_at_start'][0]:.2f}, at end {m['load_avg_at_end'][0]:.2f}; timings compare only on a quiet "
        "machine: see 'other work' per run",
        f"software: Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, numpy {m['numpy']}, "
        f"psutil {m['psutil']}",
        f"mode: {'each configuration in a fresh subprocess' if result['isolated'] else 'all in one process'}"
        f"{'' if result['isolated'] else ' (peak memory NOT isolated between configurations)'}; "
        f"engines interleaved, {reps} repeat(s) of W1; Ray: {NUM_WORKERS} CPUs; MB = 2**20 bytes",
    ]
    lines += [f"  {LABEL[x]:<10} {ENGINES[x]}" for x in engines]
    if inits:
        lines.append(f"ray.init: {statistics.median(inits):.1f} s (median of {len(inits)} start(s), "
                     f"{min(inits):.1f}-{max(inits):.1f}; not part of any engine timing)")
    rounds = c1["rounds"]
    lines += [
        "",
        f"W1 classroom: {c1['dataset']}, {c1['clients']} clients {c1['scheme'].upper()}, {c1['model']}, fraction "
        f"{c1['client_fraction']}, {c1['local_epochs']} epoch, batch {c1['batch_size']}, lr {c1['lr']}, "
        f"{rounds} rounds, seed {c1['seed']}; each figure: the median over the {reps} repeat(s)",
        row("", [LABEL[x] for x in engines]),
        row(f"per-round s (median of rounds 2..{rounds})", fig("per_round_s", ".3f")),
        row("engine start s (data put, workers ready)", fig("start_s", ".2f")),
        row("round 1 s", fig("first_round_s", ".2f")),
        row("total s (start + all rounds)", fig("total_s", ".2f")),
        f"  of a round (rounds 2..{rounds}), wall s:",
        row("  clients' jobs (executor.run)", fig("clients_s", ".3f")),
        row("  test-set evaluation", fig("evaluate_s", ".3f")),
        row("  the rest (aggregation, history row)", fig("server_s", ".3f")),
        f"  CPU s per round (rounds 2..{rounds}), by part of the process tree:",
    ]
    for g in CPU_GROUPS:
        lines.append(row(f"  {g}", [f"{e[x]['cpu_per_round_s'][g]:.3f}" for x in engines]))
    lines.append(row("  sum", [f"{sum(e[x]['cpu_per_round_s'].values()):.3f}" for x in engines]))
    lines.append(row("  workers' CPU s per client update",
                     [f"{e[x]['cpu_per_round_s']['workers'] / e[x]['sampled']:.3f}" if x != "floor" else "-"
                      for x in engines]))
    lines += [
        row("CPU cores used, this run (mean)", fig("tree_cores", ".2f")),
        row("CPU cores used, other work (mean)", fig("other_cores", ".2f")),
        row("peak memory, process tree total MB", fig("peak_total_mb", ",.0f")),
        row("peak memory, process tree private MB", fig("peak_private_mb", ",.0f")),
        row("  (for reference: PSS MB)", fig("peak_pss_mb", ",.0f")),
        row("processes in tree (peak)", fig("peak_processes", "d")),
        row("final accuracy", fig("accuracy", ".4f")),
        row("weights sha256[:12]", [",".join(e[x]["checksums"]) for x in engines]),
        f"  bit-identical across all engines and repeats: {'yes' if w1['bit_identical'] else 'NO'}",
        "",
        "  per repeat: per-round s, and the paired ratios (repeat i against repeat i)",
    ]
    pairs = list(w1["per_round_ratios"])
    lines.append(f"  {'repeat':>6}" + "".join(f"{LABEL[x]:>11}" for x in engines)
                 + "".join(f"{p.replace('minimal', 'min'):>14}" for p in pairs) + f"{'other load':>12}")
    for rep in range(reps):
        rs = [r for r in w1["runs"] if r["repeat"] == rep]
        by = {r["engine"]: r for r in rs}
        lines.append(f"  {rep + 1:>6}" + "".join(f"{by[x]['per_round_s']:>11.3f}" for x in engines)
                     + "".join(f"{w1['per_round_ratios'][p]['values'][rep]:>14.2f}" for p in pairs)
                     + f"{max(r['other_cores'] for r in rs):>12.2f}")
    lines.append(f"  {'median':>6}{'':>{11 * len(engines)}}"
                 + "".join(f"{w1['per_round_ratios'][p]['median']:>14.2f}" for p in pairs))
    lines.append(f"  {'min-max':>6}{'':>{11 * len(engines)}}"
                 + "".join(f"{w1['per_round_ratios'][p]['min']:>8.2f}-{w1['per_round_ratios'][p]['max']:.2f}"
                           for p in pairs))
    lines.append("  (other load = the largest mean CPU cores used by other processes during a run of that repeat)")
    if w2["sizes"]:
        lines += [
            "",
            f"W2 scale: {c2['dataset']}, Dirichlet(alpha={c2['alpha']}, min {c2['min_size']}) over K clients, "
            f"{c2['sampled']} sampled per round, {c2['model']}, {c2['local_epochs']} epoch, batch {c2['batch_size']}, "
            f"lr {c2['lr']}, {c2['rounds']} rounds (per-round = median of rounds 2..{c2['rounds']}); "
            f"{w2['repeats']} repeat(s), medians",
            f"  {'':>7}{'floor':>9}{'pool':>9}{'overhead':>10}{'pool peak MB':>21}{'floor peak MB':>15}"
            f"{'other load':>12}{'':>10}{'bit-':>10}",
            f"  {'K':>7}{'s/round':>9}{'s/round':>9}{'ms/client':>10}{'total/private (PSS)':>21}{'total/private':>15}"
            f"{'floor/pool':>12}{'accuracy':>10}{'identical':>10}",
        ]
        for s in w2["sizes"]:
            f2, r2 = s["floor"], s["pool"]
            pool_mb = f"{r2['peak_total_mb']:,.0f}/{r2['peak_private_mb']:,.0f} ({r2['peak_pss_mb']:,.0f})"
            floor_mb = f"{f2['peak_total_mb']:,.0f}/{f2['peak_private_mb']:,.0f}"
            other = f"{f2['other_cores']:.1f}/{r2['other_cores']:.1f}"
            lines.append(
                f"  {s['clients']:>7,}{f2['per_round_s']:>9.3f}{r2['per_round_s']:>9.3f}"
                f"{s['overhead_ms_per_client']:>10.2f}{pool_mb:>21}{floor_mb:>15}{other:>12}"
                f"{r2['accuracy']:>10.4f}{'yes' if s['bit_identical'] else 'NO':>10}")
        lines.append("  (other load = mean CPU cores used by other processes on the machine during the run)")
    lines += ["", "Targets (ratios: median of the paired ratios [min-max])",
              f"  {'':<56}{'target':>14}{'measured':>18}  result"]
    for t in result["targets"]:
        lines.append(f"  {t['name']:<56}{t['target']:>14}{t['text']:>18}  {'PASS' if t['pass'] else 'MISS'}")
    passed = sum(t["pass"] for t in result["targets"])
    busy = max(r["other_cores"] for r in w1["runs"])
    lines += [f"  {passed} of {len(result['targets'])} targets met; benchmark wall time {result['wall_s']:.0f} s"]
    if busy > 0.2:
        lines.append(f"  NOTE: other processes used up to {busy:.1f} cores during W1: the timings are not "
                     "representative; run again on a quiet machine")
    lines.append("=" * 100)
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help=f"where to write the JSON results (default "
                   f"{DEFAULT_OUT.relative_to(ROOT)}; with --quick, or a partial run, {QUICK_OUT.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="tiny sizes on synthetic data (implies --inprocess)")
    p.add_argument("--inprocess", action="store_true",
                   help="run every configuration in this process (one ray.init; memory not isolated)")
    p.add_argument("--isolate", action="store_true", help="subprocess per configuration even with --quick")
    p.add_argument("--repeats", type=int, help="W1 repeats of every engine, interleaved (default 3; quick 2)")
    p.add_argument("--w2-repeats", type=int, default=1, help="W2 repeats of floor and pool per K (default 1)")
    p.add_argument("--engines", help=f"W1 engines, comma-separated, from {','.join(ENGINES)} (default: all; "
                   "with --quick: floor,minimal,pool)")
    p.add_argument("--w1-only", action="store_true", help="skip W2 (a short run while developing)")
    p.add_argument("--one", choices=["W1", "W2"], help=argparse.SUPPRESS)  # child mode: one configuration
    p.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json-to", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child: run one configuration, write its figures, shut Ray down
        try:
            figures = run_one(args.one, args.engine, args.clients, args.quick, args.repeat)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        args.json_to.write_text(json.dumps(figures))
        return 0

    engines = [x for x in (args.engines or ",".join(QUICK_ENGINES if args.quick else ENGINES)).split(",") if x]
    if not engines or any(x not in ENGINES for x in engines) or len(set(engines)) != len(engines):
        p.error(f"--engines must name distinct engines from {','.join(ENGINES)}, got {args.engines!r}")
    if not args.w1_only and "floor" not in engines:
        engines.insert(0, "floor")  # W2 compares with the floor
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if repeats < 1 or args.w2_repeats < 1:
        p.error("--repeats and --w2-repeats must be >= 1")
    engines = [x for x in ENGINES if x in engines]  # the interleaving order
    wall = time.perf_counter()
    isolated = args.isolate or not (args.inprocess or args.quick)
    todo = configurations(args.quick, engines, repeats, args.w2_repeats, args.w1_only)
    if not isolated:  # every floor run before Ray starts, so the floor's process tree holds no Ray
        todo = sorted(todo, key=lambda c: c[1] in RAY_ENGINES)
    info = machine()
    print(f"benchmark: {len(todo)} configurations, {'subprocess each' if isolated else 'in this process'}"
          f"{', quick' if args.quick else ''}; W1 engines {', '.join(LABEL[x] for x in engines)} x {repeats}",
          flush=True)
    runs = {}
    try:
        for i, (workload, engine, clients, rep) in enumerate(todo, start=1):
            label = f"[{i}/{len(todo)}] {workload} {LABEL[engine]:<9} K={clients:<6,} #{rep + 1}"
            print(f"{label} start (load {os.getloadavg()[0]:.2f})", flush=True)
            start = time.perf_counter()
            run = run_isolated if isolated else run_one
            runs[(workload, engine, clients, rep)] = res = run(workload, engine, clients, args.quick, rep)
            init = f", ray.init {res['ray_init_s']:.1f} s" if res["ray_init_s"] is not None else ""
            print(f"{label} done in {time.perf_counter() - start:.1f} s: {res['per_round_s']:.3f} s/round, "
                  f"total {res['total_s']:.1f} s, peak {res['peak_total_mb']:,.0f} MB, other load "
                  f"{res['other_cores']:.2f}{init}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    result = {"machine": info, "quick": args.quick, "isolated": isolated, "repeats": repeats,
              "engines": {x: ENGINES[x] for x in engines}, "targets_spec": TARGETS}
    result["ray_init_s"] = [r["ray_init_s"] for r in runs.values() if r["ray_init_s"] is not None]
    result.update(summarise(runs, args.quick, engines, repeats, args.w2_repeats, args.w1_only))
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - wall
    print(table(result), flush=True)
    full = not (args.quick or args.w1_only or args.inprocess) and engines == list(ENGINES)
    out = args.out or (DEFAULT_OUT if full else QUICK_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
