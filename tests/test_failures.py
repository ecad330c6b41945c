"""Notebook 08_when_clients_fail: fault injection (crash, kill, slow, NaN), the checks on
client updates, the deadline and min_clients rules, and checkpoint/resume of `run_resilient`.

The runs use the "simple" model, the first 800 synthetic training samples split into 8
equal clients (6 sampled per round) and 2-5 rounds. Most runs are in process
(`use_ray=False`); the Ray ones use the session's 2-CPU Ray, and the killed process runs in a
subprocess (the two-node cluster and a fresh Ray are in test_cluster.py). Seeds of the Ray runs are chosen (see the
comments) so that each fault happens, but only as often as needed: a "kill" costs two
worker starts.
"""

from __future__ import annotations

import gc
import io
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import ray
import torch

import fed_helpers as fh

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 8
NUM_SAMPLES = 800
from test_strategies import STRAT_KNOBS  # noqa: E402  (a non-trivial knob per strategy)

# 6 of 8 clients per round, so some clients skip rounds (SCAFFOLD's store must keep their state).
KW = dict(rounds=3, client_fraction=0.75, local_epochs=1, batch_size=25, lr=0.05, seed=5, progress=False)
# The checkpoint/resume runs: 5 rounds with crashes and NaN updates.
RESUME = dict(KW, rounds=5, faults={"crash": 0.3, "nan": 0.1})
RESUME_NAMES = ["fedavg", "fedadam", "scaffold"]
# Ray runs, 2 rounds each. seed 4: one kill (round 1), two crashes, two NaN updates.
RAY_FAULTS = {"crash": 0.2, "nan": 0.2, "kill": 0.1}
RAY_KW = dict(KW, rounds=2, seed=4)
# seed 0: in each of the 2 rounds one slow client, crashes and a NaN update.
MIX = {"crash": 0.3, "slow": 0.2, "nan": 0.1}
MIX_KW = dict(KW, rounds=2, seed=0)
DEADLINE, MARGIN = 3.0, 10.0  # the machine may be loaded: a round may overrun the deadline by MARGIN


class Stop(Exception):
    """Raised by a test to stop a run at a chosen point."""


class Payload:
    """A custom class: a checkpoint holding one must not be loaded (weights_only)."""

    def __init__(self):
        self.x = 1


class RunsCode:
    """Unpickling this opens (creates) a file: what an unsafe torch.load would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def fresh(name: str, **knobs) -> fh.FedAvg:
    """A new strategy object (they hold state: never reuse one across runs)."""
    return fh.make_strategy(name, NUM_CLIENTS, **{**STRAT_KNOBS[name], **knobs})


@pytest.fixture(scope="module")
def data(synthetic_train, synthetic_test):
    """The first 800 training samples in 8 label-skewed clients of 100 (2 shards each)."""
    train = (synthetic_train[0][:NUM_SAMPLES], synthetic_train[1][:NUM_SAMPLES])
    parts = fh.make_partition("shards", train[1].numpy(), NUM_CLIENTS, seed=0, shards_per_client=2)
    assert sorted(len(p) for p in parts) == [100] * NUM_CLIENTS
    return SimpleNamespace(train=train, test=synthetic_test, parts=parts)


def run(data, strategy: str | fh.FedAvg = "fedavg", **kw):
    """run_resilient on `data` with KW, in process unless kw says otherwise. A straggler takes
    600 s unless kw says otherwise: more than any deadline used here, so it is late at once."""
    s = fresh(strategy) if isinstance(strategy, str) else strategy
    return fh.run_resilient(s, "simple", data.train, data.test, data.parts,
                            **{**KW, "use_ray": False, "slow_s": 600, **kw})


def flat(model) -> torch.Tensor:
    return fh.flat_weights(model)


def finite(model) -> bool:
    return bool(torch.isfinite(flat(model)).all())


def outcome(hist: list[dict]) -> list[tuple]:
    """What happened to each client, per round (everything but timings and metrics)."""
    return [(r["round"], r["sampled"], r["accepted"], r["failed"], r["late"], r["rejected"], r["faults"],
             r["aggregated"]) for r in hist]


def without_seconds(hist: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def check_history(hist: list[dict], faults: dict, rounds: int, seed: int, engine: str = "process",
                  fraction: float = 0.75, min_clients: int = 1, norm_rejects: frozenset = frozenset()) -> None:
    """Every round ran; every sampled client is in exactly one of accepted / failed / late /
    rejected; the faults are assign_faults'; each fault ends where it must, and a client
    without a fault is accepted (unless in `norm_rejects`: rejected for its update's norm).

    engine: "process" (in process), "ray" (Ray, no deadline) or "deadline" (a deadline that
    any client may miss: on a loaded machine even a healthy Ray client can be late).
    """
    assert [r["round"] for r in hist] == list(range(1, rounds + 1))
    for r in hist:
        rnd, sampled = r["round"], r["sampled"]
        assert sampled == [int(k) for k in fh.sample_clients(NUM_CLIENTS, fraction, seed, rnd)]
        fault_of = fh.assign_faults(sampled, seed, rnd, **faults)
        assert r["faults"] == {str(k): v for k, v in fault_of.items()}
        accepted, late = set(r["accepted"]), set(r["late"])
        failed, rejected = {int(k) for k in r["failed"]}, {int(k) for k in r["rejected"]}
        assert accepted | failed | late | rejected == set(sampled), outcome([r])
        assert len(accepted) + len(failed) + len(late) + len(rejected) == len(sampled), r  # pairwise disjoint
        assert r["accepted"] == sorted(accepted) and r["late"] == sorted(late)
        assert r["clients"] == len(accepted)
        assert r["aggregated"] == (len(accepted) >= min_clients)
        assert (r["train_loss"] is None) == (r["drift"] is None) == (not r["aggregated"])
        assert math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1
        for k in sampled:
            fault = fault_of.get(k)
            if engine == "deadline" and k in late:
                continue
            if fault == "slow":
                assert k in late, (k, outcome([r]))
            elif fault == "nan":
                assert r["rejected"].get(str(k)) == "NaN or Inf in the weights", (k, outcome([r]))
            elif fault == "crash" or (fault == "kill" and engine == "process"):
                assert r["failed"].get(str(k)) == "RuntimeError: injected fault: the client crashed", (k, outcome([r]))
            elif fault == "kill":
                assert "WorkerCrashedError" in r["failed"].get(str(k), ""), (k, outcome([r]))
            elif k in norm_rejects:
                assert r["rejected"].get(str(k), "").startswith("update norm"), (k, outcome([r]))
            else:
                assert k in accepted, (k, outcome([r]))


# ----------------------------------------------------------------------------
# the pieces: assign_faults, faulty_client, describe_error, check_update, norm_outliers
# ----------------------------------------------------------------------------


def test_assign_faults_is_per_client_reproducible_and_follows_the_rates():
    rates = {"crash": 0.1, "kill": 0.2, "slow": 0.3, "nan": 0.15}
    clients = list(range(20000))
    out = fh.assign_faults(clients, 7, 3, **rates)
    assert out == fh.assign_faults(clients, 7, 3, **rates)
    assert set(out.values()) <= set(fh.FAULTS) and set(out) <= set(clients)
    for name, rate in rates.items():
        assert abs(sum(v == name for v in out.values()) / len(clients) - rate) < 0.015, name
    # a client's draw depends on (seed, round, client) only: not on who else is sampled
    some = [5, 17, 123, 9999]
    assert fh.assign_faults(some, 7, 3, **rates) == {k: out[k] for k in some if k in out}
    assert fh.assign_faults(clients[:500], 7, 4, **rates) != {k: v for k, v in out.items() if k < 500}
    assert fh.assign_faults(clients[:500], 8, 3, **rates) != {k: v for k, v in out.items() if k < 500}
    assert fh.assign_faults(clients, 7, 3) == {}
    assert fh.assign_faults(clients[:50], 7, 3, crash=1.0) == {k: "crash" for k in range(50)}
    assert fh.assign_faults([], 7, 3, nan=1.0) == {}


def test_faulty_client_acts_out_each_fault(data):
    x, y = data.train[0].numpy(), data.train[1].numpy()
    w = flat(fh.make_model("simple", 1)).numpy()
    args = ("simple", w, x, y, data.parts[2], 1, 25, 0.05, 11)
    n, loss, w_ok = fh.faulty_client(*args)
    ref = fh.train_client_flat(fh.make_model("simple"), w, x, y, data.parts[2], 1, 25, 0.05, 11)
    assert (n, loss) == ref[:2] and np.array_equal(w_ok, ref[2]) and w_ok.dtype == np.float32
    with pytest.raises(RuntimeError, match="injected fault: the client crashed"):
        fh.faulty_client(*args, fault="crash")
    n, loss, w_nan = fh.faulty_client(*args, fault="nan")
    assert n == 100 and math.isfinite(loss) and w_nan.shape == w.shape and w_nan.dtype == np.float32
    assert np.isnan(w_nan).all()
    start = time.perf_counter()
    n, loss, w_slow = fh.faulty_client(*args, fault="slow", slow_s=0.3)
    assert time.perf_counter() - start >= 0.3
    assert np.array_equal(w_slow, w_ok)  # late, but right
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="the straggler gave up"):  # told the deadline, it stops napping there
        fh.faulty_client(*args, fault="slow", slow_s=600, give_up_at=time.time() + 0.3)
    assert 0.3 <= time.perf_counter() - start < 5


def test_describe_error_gives_one_line_of_the_cause():
    assert fh.describe_error(RuntimeError("first line\nsecond line")) == "RuntimeError: first line"
    assert fh.describe_error(ValueError()) == "ValueError: "
    wrapped = RuntimeError("wrapper")
    wrapped.cause = KeyError("inner")
    assert fh.describe_error(wrapped) == "KeyError: 'inner'"
    assert len(fh.describe_error(RuntimeError("x" * 1000))) == 200


def test_check_update_accepts_a_good_vector_and_rejects_bad_ones():
    g = torch.zeros(5)
    assert fh.check_update(np.arange(5, dtype=np.float32), g) is None
    for bad in ([0, np.nan, 0, 0, 0], [0, 0, np.inf, 0, 0], [-np.inf, 0, 0, 0, 0], [np.nan] * 5):
        assert fh.check_update(np.array(bad, np.float32), g) == "NaN or Inf in the weights", bad
    for bad, got in [
        (np.zeros(4, np.float32), "float32 (4,)"),
        (np.zeros(6, np.float32), "float32 (6,)"),
        (np.zeros((5, 1), np.float32), "float32 (5, 1)"),
        (np.zeros(5, np.float64), "float64 (5,)"),
        (np.zeros(5, np.float16), "float16 (5,)"),
        (np.zeros(5, np.int32), "int32 (5,)"),
        ([0.0] * 5, "list"),
        (torch.zeros(5), "Tensor"),
        (None, "NoneType"),
        ("weights", "str"),
    ]:
        assert fh.check_update(bad, g) == f"wrong shape or type: expected float32 (5,), got {got}", got


def test_norm_outliers_flags_a_100x_update_and_needs_three():
    flagged = fh.norm_outliers({0: 1.0, 1: 1.2, 2: 0.8, 3: 100.0}, 20)
    assert set(flagged) == {3} and flagged[3].startswith("update norm 100 is over 20 x the median 1.1")
    assert set(fh.norm_outliers({4: 1.0, 7: 1.0, 9: 100.0}, 20)) == {9}
    assert fh.norm_outliers({0: 1.0, 1: 1.0, 2: 20.0}, 20) == {}  # at the limit: kept
    assert fh.norm_outliers({0: 1.0, 1: 100.0}, 20) == {}  # fewer than 3: no median to trust
    assert fh.norm_outliers({0: 1e9}, 20) == {}
    assert fh.norm_outliers({}, 20) == {}
    assert set(fh.norm_outliers({0: 1.0, 1: 2.0, 2: 3.0}, 1)) == {2}


def test_round_store_writes_wait_for_commit_and_recover_drops_later_rounds(tmp_path):
    store = fh.RoundStore(tmp_path)
    zero = np.zeros(2, np.float32)
    with pytest.raises(RuntimeError, match="begin"):
        store.put(1, zero)
    store.begin(1)
    store.put(1, np.ones(2, np.float32))
    assert np.array_equal(store.get(1, zero), zero) and len(store) == 0  # not in place before commit
    store.commit()
    assert np.array_equal(store.get(1, zero), [1, 1]) and len(store) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_1.npy"]
    store.begin(2)
    store.put(1, np.full(2, 2, np.float32))
    store.put(3, np.full(2, 3, np.float32))  # a stop here: round 2 was checkpointed, not committed
    store.begin(3)
    store.put(3, np.full(2, 9, np.float32))  # and round 3 was cut short
    again = fh.RoundStore(tmp_path)
    again.recover(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_1.npy", "client_3.npy"]
    assert np.array_equal(again.get(1, zero), [2, 2]) and np.array_equal(again.get(3, zero), [3, 3])


def test_save_checkpoint_replaces_the_file_whole(tmp_path):
    path = tmp_path / "checkpoint.pt"
    fh.save_checkpoint(path, {"round": 1, "w": torch.arange(3.0)})
    fh.save_checkpoint(path, {"round": 2, "w": torch.arange(4.0)})
    state = torch.load(path, weights_only=True)
    assert state["round"] == 2 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------
# faults in the round loop: every client is accounted for, the model stays finite
# ----------------------------------------------------------------------------

IN_PROCESS_FAULTS = [{kind: rate} for kind in fh.FAULTS for rate in (0.1, 0.3, 0.6)] + [
    MIX, {"crash": 0.2, "kill": 0.1, "slow": 0.1, "nan": 0.2}, {"crash": 1.0}, {"nan": 1.0}]


@pytest.mark.parametrize("faults", IN_PROCESS_FAULTS, ids=lambda f: "+".join(f"{k}{v}" for k, v in f.items()))
def test_faults_in_process_every_round_completes_and_every_client_is_accounted(data, faults):
    model, hist = run(data, faults=faults)
    check_history(hist, faults, KW["rounds"], KW["seed"])
    assert finite(model)
    injected = [v for r in hist for v in r["faults"].values()]
    if sum(faults.values()) >= 0.3:  # 18 draws: the faults do happen (the draw is fixed by the seed)
        assert set(injected) == set(faults), injected


def test_nan_clients_never_reach_the_global_model(data, monkeypatch):
    seen = []
    real = fh.evaluate
    monkeypatch.setattr(fh, "evaluate", lambda model, *a, **k: (seen.append(flat(model)), real(model, *a, **k))[1])
    model, hist = run(data, "fedadam", faults={"nan": 0.6}, rounds=4)
    assert sum(len(r["rejected"]) for r in hist) >= 4
    assert len(seen) == 4 and all(torch.isfinite(w).all() for w in seen)


def test_in_process_deadline_makes_later_clients_late(data):
    model, hist = run(data, deadline_s=1e-3)
    check_history(hist, {}, KW["rounds"], KW["seed"], engine="deadline")  # any client may be late
    assert all(len(r["late"]) >= len(r["sampled"]) - 1 for r in hist)  # all but maybe the first one
    assert finite(model)


# ----------------------------------------------------------------------------
# without faults: run_strategy's bits; the same seed: the same run
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strategy_floor(data):
    """run_strategy(use_ray=False) for each strategy (2 rounds), cached by (name, rounds)."""
    cache: dict = {}

    def get(name: str, rounds: int = 2):
        if (name, rounds) not in cache:
            kw = {**KW, "rounds": rounds}
            cache[name, rounds] = fh.run_strategy(fresh(name), "simple", data.train, data.test, data.parts,
                                                  use_ray=False, **kw)
        return cache[name, rounds]

    return get


def assert_like_run_strategy(model, hist, ref_model, ref_hist):
    assert torch.equal(flat(model), flat(ref_model))
    assert len(hist) == len(ref_hist)
    for r, s in zip(hist, ref_hist):
        for key in ("round", "accuracy", "loss", "train_loss", "drift", "clients"):
            assert r[key] == s[key], key
        assert r["accepted"] == r["sampled"] and r["aggregated"]
        assert r["failed"] == r["rejected"] == r["faults"] == {} and r["late"] == []


@pytest.mark.parametrize("name", sorted(STRAT_KNOBS))
def test_without_faults_in_process_equals_run_strategy(data, strategy_floor, name):
    assert set(fh.STRATEGIES) == set(STRAT_KNOBS)  # a new strategy must be added here
    model, hist = run(data, name, rounds=2)  # the defaults: a 300 s deadline, max_norm_ratio 20
    assert_like_run_strategy(model, hist, *strategy_floor(name))


def test_zero_fault_rates_are_no_faults(data, strategy_floor):
    model, hist = run(data, "fedavgm", faults={k: 0.0 for k in fh.FAULTS}, deadline_s=None, rounds=2)
    assert_like_run_strategy(model, hist, *strategy_floor("fedavgm"))


def test_in_process_a_straggler_that_makes_the_deadline_is_waited_for(data, strategy_floor):
    """slow_s < deadline: the straggler is run (it sleeps slow_s) and counted, as if it were on time."""
    faults = {"slow": 0.3}
    model, hist = run(data, faults=faults, slow_s=0.25, deadline_s=None, rounds=2)
    for row in hist:
        slow = [k for k, v in row["faults"].items() if v == "slow"]
        assert row["seconds"] >= 0.25 * len(slow)  # each straggler waited slow_s, one after another
    assert sum(v == "slow" for r in hist for v in r["faults"].values()) >= 1
    assert all(r["late"] == [] and r["accepted"] == r["sampled"] for r in hist)
    assert torch.equal(flat(model), flat(strategy_floor("fedavg")[0]))


def test_on_ray_a_straggler_that_makes_the_deadline_is_waited_for(ray_cluster, data, strategy_floor):
    faults = {"slow": 0.3}
    start = time.perf_counter()
    model, hist = run(data, faults=faults, slow_s=0.5, deadline_s=60, rounds=2, use_ray=True)
    assert any(v == "slow" for r in hist for v in r["faults"].values())
    assert all(r["late"] == [] and r["accepted"] == r["sampled"] for r in hist)
    assert torch.equal(flat(model), flat(strategy_floor("fedavg")[0]))
    assert time.perf_counter() - start >= 0.5 * sum("slow" in r["faults"].values() for r in hist)


@pytest.mark.parametrize("name", ["scaffold", "fedadam"])
def test_without_faults_on_ray_equals_run_strategy(ray_cluster, data, strategy_floor, name):
    model, hist = run(data, name, use_ray=True, rounds=2)
    assert_like_run_strategy(model, hist, *strategy_floor(name, 2))


def test_same_seed_same_faults_same_run_in_process(data):
    faults = {"crash": 0.2, "nan": 0.2, "kill": 0.2}
    a, hist_a = run(data, "scaffold", faults=faults, deadline_s=None, rounds=2)
    b, hist_b = run(data, "scaffold", faults=faults, deadline_s=None, rounds=2)
    assert torch.equal(flat(a), flat(b)) and outcome(hist_a) == outcome(hist_b)
    assert without_seconds(hist_a) == without_seconds(hist_b)
    c, hist_c = run(data, "scaffold", faults=faults, deadline_s=None, seed=KW["seed"] + 1, rounds=2)
    assert outcome(hist_c) != outcome(hist_a)  # the seed does matter


# ----------------------------------------------------------------------------
# faults on Ray (after the fault-free Ray runs above: a deadline's cancelled tasks may
# leave Ray's workers in a state that later runs see, see test_cancelled_clients_do_not_break_later_runs)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_faulty(ray_cluster, data):
    """One Ray run with crash, NaN and kill faults and no deadline (shared by two tests)."""
    model, hist = run(data, faults=RAY_FAULTS, deadline_s=None, **{**RAY_KW, "use_ray": True})
    return model, hist


def test_faults_on_ray_kill_crash_nan(ray_faulty):
    model, hist = ray_faulty
    check_history(hist, RAY_FAULTS, RAY_KW["rounds"], RAY_KW["seed"], engine="ray")
    assert finite(model)
    injected = sorted(v for r in hist for v in r["faults"].values())
    assert injected == ["crash", "crash", "kill", "nan", "nan"]  # what seed 4 draws
    assert all(r["late"] == [] for r in hist)  # no deadline: nobody is late, a dead worker is an error


def test_same_seed_same_faults_ray_equals_in_process(ray_faulty, data):
    """A kill is a crash in process: same clients fail (with another message), same bits."""
    ray_model, ray_hist = ray_faulty
    model, hist = run(data, faults=RAY_FAULTS, deadline_s=None, **RAY_KW)
    assert torch.equal(flat(ray_model), flat(model))
    for r, s in zip(ray_hist, hist, strict=True):
        for key in ("sampled", "accepted", "late", "rejected", "faults", "aggregated", "accuracy", "loss",
                    "train_loss", "drift"):
            assert r[key] == s[key], key
        assert r["failed"].keys() == s["failed"].keys()
        for k, fault in r["faults"].items():
            if fault == "crash":
                assert r["failed"][k] == s["failed"][k]


def test_faults_on_ray_mix_with_slow_clients_cost_at_most_the_deadline(ray_cluster, data):
    start = time.perf_counter()
    model, hist = run(data, faults=MIX, deadline_s=DEADLINE, slow_s=600, **{**MIX_KW, "use_ray": True})
    elapsed = time.perf_counter() - start
    check_history(hist, MIX, MIX_KW["rounds"], MIX_KW["seed"], engine="deadline")
    assert finite(model)
    for r in hist:
        slow = {int(k) for k, v in r["faults"].items() if v == "slow"}
        assert slow and slow <= set(r["late"]), r  # seed 0: a slow client in every round
        assert r["seconds"] < DEADLINE + MARGIN, r
    assert elapsed < MIX_KW["rounds"] * (DEADLINE + MARGIN)  # nobody waited for the 600 s sleepers


# ----------------------------------------------------------------------------
# bad updates, min_clients, bad knobs
# ----------------------------------------------------------------------------


def test_max_norm_ratio_rejects_a_100x_update_and_none_disables_only_that_rule(data, monkeypatch):
    faults, seed = {"nan": 0.2}, KW["seed"]
    big = min(set(range(NUM_CLIENTS)) - set(fh.assign_faults(range(NUM_CLIENTS), seed, 1, **faults)))
    real = fh.faulty_client

    def boosted(model_name, weights, x_all, y_all, indices, *rest):
        n, loss, w = real(model_name, weights, x_all, y_all, indices, *rest)
        if indices is data.parts[big]:
            w = (weights + 100 * (w - weights)).astype(np.float32)  # a 100x longer update
        return n, loss, w

    monkeypatch.setattr(fh, "faulty_client", boosted)
    kw = dict(faults=faults, client_fraction=1.0, rounds=2)
    guarded, hist = run(data, **kw)
    check_history(hist, faults, 2, seed, fraction=1.0, norm_rejects=frozenset({big}))
    nan_rejects = 0
    for r in hist:
        for k, reason in r["rejected"].items():
            assert reason.startswith("update norm") == (int(k) == big), r
            nan_rejects += reason == "NaN or Inf in the weights"
        assert str(big) in r["rejected"] or r["faults"].get(str(big)) == "nan"
    assert str(big) in hist[0]["rejected"] and nan_rejects >= 1
    unguarded, hist_none = run(data, max_norm_ratio=None, **kw)
    for r, s in zip(hist_none, hist):
        assert {k: v for k, v in s["rejected"].items() if int(k) != big} == r["rejected"]  # NaN: still out
        assert all(v == "NaN or Inf in the weights" for v in r["rejected"].values())
        assert big in r["accepted"] or r["faults"].get(str(big)) == "nan"
    assert finite(guarded) and finite(unguarded) and not torch.equal(flat(guarded), flat(unguarded))


def record_weights(monkeypatch) -> list[torch.Tensor]:
    """The global weights at each round's evaluation (run_resilient evaluates once per round)."""
    seen: list[torch.Tensor] = []
    real = fh.evaluate
    monkeypatch.setattr(fh, "evaluate", lambda model, *a, **k: (seen.append(flat(model)), real(model, *a, **k))[1])
    return seen


def test_min_clients_no_usable_update_keeps_the_model_exactly(data, monkeypatch):
    seen = record_weights(monkeypatch)
    s = fresh("fedadam")
    model, hist = run(data, s, faults={"crash": 1.0}, rounds=3)
    check_history(hist, {"crash": 1.0}, 3, KW["seed"])
    initial = flat(fh.make_model("simple", KW["seed"]))
    assert all(torch.equal(w, initial) for w in seen) and torch.equal(flat(model), initial)
    assert [r["aggregated"] for r in hist] == [False] * 3 and all(r["accepted"] == [] for r in hist)
    assert s.m is None and s.v is None  # the server step never ran


def test_min_clients_too_few_updates_keeps_the_previous_round(data, monkeypatch):
    seen = record_weights(monkeypatch)
    faults, min_clients = {"crash": 0.4}, 4
    model, hist = run(data, "fedavgm", faults=faults, min_clients=min_clients, rounds=5)
    check_history(hist, faults, 5, KW["seed"], min_clients=min_clients)
    aggregated = [r["aggregated"] for r in hist]
    assert True in aggregated and False in aggregated, [len(r["accepted"]) for r in hist]
    before = [flat(fh.make_model("simple", KW["seed"]))] + seen[:-1]
    for r, prev, now in zip(hist, before, seen):
        assert torch.equal(prev, now) == (not r["aggregated"]), r
        assert r["aggregated"] == (len(r["accepted"]) >= min_clients)
    assert torch.equal(seen[-1], flat(model))


BAD_KNOBS = [
    ({"faults": {"oom": 0.1}}, r"faults may only name \['crash', 'kill', 'slow', 'nan'\], got \['oom'\]"),
    ({"faults": {"crash": 0.1, "Slow": 0.1}}, r"faults may only name .*got \['Slow'\]"),
    ({"faults": {"crash": -0.1}}, r"crash must be a number in \[0, 1\], got -0.1"),
    ({"faults": {"kill": 1.5}}, r"kill must be a number in \[0, 1\], got 1.5"),
    ({"faults": {"slow": -1}}, r"slow must be a number in \[0, 1\]"),
    ({"faults": {"nan": 2}}, r"nan must be a number in \[0, 1\]"),
    ({"faults": {"nan": "0.1"}}, r"nan must be a number in \[0, 1\]"),
    ({"faults": {"crash": 0.6, "nan": 0.5}}, r"crash \+ kill \+ slow \+ nan must add up to at most 1, got 1.1"),
    ({"faults": {"crash": 0.3, "kill": 0.3, "slow": 0.3, "nan": 0.3}}, r"must add up to at most 1, got 1.2"),
    ({"deadline_s": 0}, r"deadline_s must be a number in \[0.001, inf\], got 0"),
    ({"deadline_s": -5.0}, r"deadline_s must be a number"),
    ({"deadline_s": float("nan")}, r"deadline_s must be a number"),
    ({"min_clients": 0}, r"min_clients must be an integer in \[1, 8\] \(the number of clients\), got 0"),
    ({"min_clients": 9}, r"min_clients must be an integer in \[1, 8\].*got 9"),
    ({"min_clients": 2.0}, r"min_clients must be an integer"),
    ({"max_norm_ratio": 0.5}, r"max_norm_ratio must be a number in \[1, inf\], got 0.5"),
    ({"max_norm_ratio": 0}, r"max_norm_ratio must be a number in \[1, inf\], got 0"),
    ({"max_norm_ratio": -20}, r"max_norm_ratio must be a number"),
    ({"slow_s": -1}, r"slow_s must be a number in \[0, inf\], got -1"),
    ({"slow_s": float("nan")}, r"slow_s must be a number"),
    ({"faults": {"slow": 0.2}, "deadline_s": None, "slow_s": float("inf")},
     r"faults\['slow'\] > 0 with slow_s=inf \(stragglers that never answer\) needs a deadline_s"),
]


@pytest.mark.parametrize(("knobs", "match"), BAD_KNOBS, ids=[json.dumps(k) for k, _ in BAD_KNOBS])
def test_bad_knobs_raise_value_error_naming_the_knob_before_any_work(data, tmp_path, monkeypatch, knobs, match):
    ray_was_running = ray.is_initialized()
    for fn in ("init_ray", "make_model", "faulty_client", "evaluate", "load_checkpoint"):
        monkeypatch.setattr(fh, fn, lambda *a, _fn=fn, **k: pytest.fail(f"{_fn} called before the knobs were checked"))
    with pytest.raises(ValueError, match=match):
        run(data, use_ray=True, run_dir=tmp_path / "run", **knobs)
    assert not (tmp_path / "run").exists()
    assert ray.is_initialized() == ray_was_running


def test_assign_faults_checks_its_rates():
    with pytest.raises(ValueError, match=r"slow must be a number in \[0, 1\], got 1.01"):
        fh.assign_faults([1], 0, 1, slow=1.01)
    with pytest.raises(ValueError, match="add up to at most 1"):
        fh.assign_faults([1], 0, 1, crash=0.5, kill=0.5, nan=0.01)
    assert fh.assign_faults([1, 2], 0, 1, crash=0.25, kill=0.25, slow=0.25, nan=0.25).keys() == {1, 2}


# ----------------------------------------------------------------------------
# checkpoint and resume
# ----------------------------------------------------------------------------


def state_files(run_dir: Path) -> dict[str, bytes]:
    """Every file under run_dir/client_state (SCAFFOLD's per-client state), with its bytes."""
    folder = Path(run_dir) / "client_state"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def all_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def checkpoint_round(run_dir: Path) -> int:
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["round"]


def same_server_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k] is None and b[k] is None) or (a[k] is not None and b[k] is not None and torch.equal(a[k], b[k]))
        for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """Uninterrupted RESUME runs with a run_dir, cached by (strategy, rounds)."""
    cache: dict = {}

    def get(name: str, rounds: int = RESUME["rounds"]):
        if (name, rounds) not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference_{name}_{rounds}")
            s = fresh(name)
            model, hist = run(data, s, run_dir=run_dir, **{**RESUME, "rounds": rounds})
            assert any(r["failed"] for r in hist) and any(r["rejected"] for r in hist)  # the faults do happen
            files = state_files(run_dir)
            assert (len(files) > 0) == (name == "scaffold")
            cache[name, rounds] = SimpleNamespace(weights=flat(model), history=hist, server=fh.server_state(s),
                                                  files=files, run_dir=run_dir)
        return cache[name, rounds]

    return get


def assert_resumed_equals(model, hist, strategy, run_dir: Path, ref) -> None:
    """Bit for bit the uninterrupted run: weights, history, server state, client state files."""
    assert torch.equal(flat(model), ref.weights), "the weights differ from the uninterrupted run's"
    assert without_seconds(hist) == without_seconds(ref.history)
    assert same_server_state(fh.server_state(strategy), ref.server), "the server state differs"
    files = state_files(run_dir)  # also: no file left in a pending_* folder
    assert files.keys() == ref.files.keys() and all(files[k] == ref.files[k] for k in files), "client states differ"
    assert not list(Path(run_dir).glob("client_state/pending_*"))
    assert checkpoint_round(run_dir) == len(ref.history)
    assert not (Path(run_dir) / "checkpoint.pt.tmp").exists()


def test_checkpointing_does_not_change_the_result(data, reference):
    name = "scaffold"  # the one whose client state lives in another store with a run_dir
    ref = reference(name)
    model, hist = run(data, name, **RESUME)  # no run_dir
    assert torch.equal(flat(model), ref.weights) and without_seconds(hist) == without_seconds(ref.history)


@pytest.mark.parametrize("stop_after", [1, 2, 4])
@pytest.mark.parametrize("name", RESUME_NAMES)
def test_resume_after_a_stop_between_rounds(tmp_path, data, reference, name, stop_after):
    def stop(history):
        if len(history) == stop_after:
            raise Stop

    with pytest.raises(Stop):
        run(data, name, run_dir=tmp_path, on_round=stop, **RESUME)
    assert checkpoint_round(tmp_path) == stop_after
    trained = []
    s = fresh(name)  # a fresh object: everything comes from run_dir
    model, hist = run(data, s, run_dir=tmp_path, on_round=lambda h: trained.append(len(h)), **RESUME)
    assert trained == list(range(stop_after + 1, RESUME["rounds"] + 1))  # only the missing rounds ran
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


@pytest.mark.parametrize("name", ["scaffold", "fedadam"])
def test_resume_after_a_stop_in_the_middle_of_a_round(tmp_path, data, reference, name):
    ref = reference(name)
    stop_round = next(r["round"] for r in ref.history if r["round"] >= 2 and len(r["accepted"]) >= 2)
    s = fresh(name)
    real_receive, done, calls = s.receive, [], []

    def receive(cid, *args):
        real_receive(cid, *args)
        if len(done) == stop_round - 1:
            calls.append(cid)
            if len(calls) == 2:  # two of this round's clients are in: stop before the rest
                raise Stop

    s.receive = receive
    with pytest.raises(Stop):
        run(data, s, run_dir=tmp_path, on_round=lambda h: done.append(len(h)), **RESUME)
    assert checkpoint_round(tmp_path) == stop_round - 1
    if name == "scaffold":  # the cut round's client states wait in pending_<round>
        pending = tmp_path / "client_state" / f"pending_{stop_round}"
        assert len(list(pending.glob("client_*.npy"))) == 2
    s = fresh(name)
    model, hist = run(data, s, run_dir=tmp_path, **RESUME)
    assert_resumed_equals(model, hist, s, tmp_path, ref)


@pytest.mark.parametrize("name", RESUME_NAMES)
def test_resume_after_a_stop_while_writing_the_checkpoint(tmp_path, data, reference, monkeypatch, name):
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("round") == 3:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError("no space left on device (injected)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="injected"):
        run(data, name, run_dir=tmp_path, **RESUME)
    monkeypatch.undo()
    assert checkpoint_round(tmp_path) == 2
    assert (tmp_path / "checkpoint.pt.tmp").stat().st_size > 0  # the half-written one
    if name == "scaffold":
        assert (tmp_path / "client_state" / "pending_3").is_dir()
    s = fresh(name)
    model, hist = run(data, s, run_dir=tmp_path, **RESUME)
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


KILL_SCRIPT = r"""
import json, sys
import fed_helpers as fh
cfg = json.loads(sys.argv[1])
train = fh.load_dataset("synthetic")
train = (train[0][:cfg["samples"]], train[1][:cfg["samples"]])
test = fh.load_dataset("synthetic", train=False)
parts = fh.make_partition("shards", train[1].numpy(), cfg["clients"], seed=0, shards_per_client=2)
strategy = fh.make_strategy(cfg["strategy"], cfg["clients"], **cfg["knobs"])
print("started", flush=True)
fh.run_resilient(strategy, "simple", train, test, parts, use_ray=False, run_dir=cfg["run_dir"], **cfg["kw"])
print("finished", flush=True)
"""


def test_resume_after_the_process_is_killed(tmp_path, data, reference):
    name = "scaffold"
    cfg = {"samples": NUM_SAMPLES, "clients": NUM_CLIENTS, "strategy": name, "knobs": STRAT_KNOBS[name],
           "run_dir": str(tmp_path), "kw": {**RESUME, "rounds": 1000}}  # rounds: not in the fingerprint
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "checkpoint.pt").exists() and checkpoint_round(tmp_path) >= 2:
                break
            time.sleep(0.02)
        alive = proc.poll() is None
        proc.kill()
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=60)
    assert alive, f"the run ended before it was killed:\n{out[-2000:]}\n{err[-3000:]}"
    assert proc.returncode == -9
    stopped = checkpoint_round(tmp_path)
    assert stopped >= 2
    rounds = max(RESUME["rounds"], stopped + 1)
    s = fresh(name)
    model, hist = run(data, s, run_dir=tmp_path, **{**RESUME, "rounds": rounds})
    assert_resumed_equals(model, hist, s, tmp_path, reference(name, rounds))


@pytest.mark.parametrize("name", ["fedadam", "scaffold"])
def test_resume_with_more_rounds_continues(tmp_path, data, reference, name):
    run(data, name, run_dir=tmp_path, **{**RESUME, "rounds": 3})
    assert checkpoint_round(tmp_path) == 3
    s = fresh(name)
    model, hist = run(data, s, run_dir=tmp_path, **RESUME)  # 5 rounds: 2 more
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


def test_rerunning_a_finished_run_returns_it_without_training(tmp_path, data, reference, monkeypatch):
    run(data, "fedadam", run_dir=tmp_path, **RESUME)
    monkeypatch.setattr(fh, "faulty_client", lambda *a, **k: pytest.fail("a finished run trained again"))
    s = fresh("fedadam")
    model, hist = run(data, s, run_dir=tmp_path, **RESUME)
    assert_resumed_equals(model, hist, s, tmp_path, reference("fedadam"))


@pytest.mark.parametrize(
    ("name", "stop"),
    [("fedadam", "after round 2"), ("scaffold", "after round 2"), ("scaffold", "in round 1"),
     ("fedadam", "writing round 1's checkpoint")],
)
def test_rerun_with_the_same_strategy_object_equals_the_uninterrupted_run(tmp_path, data, reference, monkeypatch,
                                                                          name, stop):
    """As when a notebook cell that only calls run_resilient is run again after a Ctrl-C: the
    strategy object is the one the stopped run changed. The checkpoint must win over it; and
    with no checkpoint yet (a stop in round 1) the run must start afresh."""
    s, kw = fresh(name), {}
    if stop == "after round 2":
        def stop_after_2(history):
            if len(history) == 2:
                raise Stop

        kw["on_round"] = stop_after_2
    elif stop == "in round 1":
        real_receive, calls = s.receive, []

        def receive(cid, *args):
            real_receive(cid, *args)
            calls.append(cid)
            if len(calls) == 2:  # two clients are in, the server step has not run
                raise Stop

        s.receive = receive
    else:
        def no_space(path, state):
            raise Stop

        monkeypatch.setattr(fh, "save_checkpoint", no_space)
    with pytest.raises(Stop):
        run(data, s, run_dir=tmp_path, **RESUME, **kw)
    monkeypatch.undo()
    vars(s).pop("receive", None)
    model, hist = run(data, s, run_dir=tmp_path, **RESUME)
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


@pytest.fixture(scope="module")
def scaffold_template(tmp_path_factory, data):
    """A run_dir holding a 2-round SCAFFOLD run (checkpoint and client states), made once."""
    run_dir = tmp_path_factory.mktemp("scaffold_template")
    run(data, "scaffold", run_dir=run_dir, **{**RESUME, "rounds": 2})
    assert len(state_files(run_dir)) > 0
    return run_dir


@pytest.fixture
def scaffold_dir(tmp_path, scaffold_template):
    """A copy of scaffold_template, for one test to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(scaffold_template, run_dir)
    return run_dir


def assert_refused_untouched(data, run_dir: Path, match: str, name: str = "scaffold", knobs: dict | None = None,
                             **kw) -> str:
    """run_resilient refuses the checkpoint with ValueError(match), changing no file and not the
    strategy (never half-loaded); returns the message."""
    before = all_files(run_dir)
    s = fresh(name, **(knobs or {}))
    vars_before = dict(vars(s))
    with pytest.raises(ValueError, match=match) as info:
        run(data, s, run_dir=run_dir, **{**RESUME, **kw})
    assert all_files(run_dir) == before
    changed = sorted(set(vars(s)) ^ set(vars_before) | {k for k, v in vars_before.items() if vars(s).get(k) is not v})
    assert not changed, f"the strategy was changed before the checkpoint was refused: {changed}"
    return str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "empty", "first 10 bytes", "half", "all but 1 byte"])
def test_corrupt_checkpoint_is_refused_and_nothing_changes(data, scaffold_dir, damage):
    path = scaffold_dir / "checkpoint.pt"
    good = path.read_bytes()
    cut = {"garbage": b"\x00not a checkpoint\xff" * 64, "empty": b"", "first 10 bytes": good[:10],
           "half": good[: len(good) // 2], "all but 1 byte": good[:-1]}[damage]
    path.write_bytes(cut)
    msg = assert_refused_untouched(data, scaffold_dir, "corrupt")
    assert "delete it" in msg and str(path) in msg


@pytest.mark.parametrize(
    ("name", "change", "differ"),
    [
        ("scaffold", {"lr": 0.1}, "lr"),
        ("scaffold", {"seed": 6}, "seed"),
        ("scaffold", {"faults": {"crash": 0.3}}, "faults"),
        ("scaffold", {"client_fraction": 1.0}, "client_fraction"),
        ("scaffold", {"max_norm_ratio": None}, "max_norm_ratio"),
        ("scaffold", {"knobs": {"server_lr": 0.5}}, "knobs"),
        ("scaffold", {"lr": 0.1, "local_epochs": 2}, "local_epochs, lr"),
        ("fedavg", {}, "knobs, strategy"),
        ("fedadam", {}, "knobs, strategy"),
    ],
)
def test_checkpoint_of_another_run_is_refused_naming_what_differs(data, scaffold_dir, name, change, differ):
    msg = assert_refused_untouched(data, scaffold_dir, "different run", name=name, **change)
    assert f"different run: {differ} differ;" in msg


@pytest.mark.parametrize("name", ["fedadam", "scaffold"])
def test_fewer_rounds_than_the_checkpoint_holds_are_refused(data, tmp_path, scaffold_dir, name):
    run_dir = scaffold_dir
    if name != "scaffold":
        run_dir = tmp_path / name
        run(data, name, run_dir=run_dir, **{**RESUME, "rounds": 2})
    assert_refused_untouched(data, run_dir, r"already holds 2 rounds, more than rounds=1", name=name, rounds=1)


def test_checkpoint_with_other_partitions_is_refused(data, scaffold_dir):
    before = all_files(scaffold_dir)
    parts = fh.make_partition("iid", data.train[1].numpy(), NUM_CLIENTS, seed=0)
    with pytest.raises(ValueError, match="different run: partitions differ"):
        fh.run_resilient(fresh("scaffold"), "simple", data.train, data.test, parts, use_ray=False,
                         run_dir=scaffold_dir, **RESUME)
    assert all_files(scaffold_dir) == before


@pytest.mark.parametrize("kind", ["custom class", "code"])
def test_checkpoint_holding_pickled_objects_is_refused(data, scaffold_dir, tmp_path, kind):
    path = scaffold_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "code_ran"
    state["extra"] = Payload() if kind == "custom class" else RunsCode(str(marker))
    torch.save(state, path)
    assert_refused_untouched(data, scaffold_dir, "corrupt or unreadable")
    assert not marker.exists()
    if kind == "code":  # what loading without weights_only would have done
        torch.load(path, weights_only=False)["extra"].close()
        assert marker.exists()


DAMAGE = ["not a dict", "no history", "format 2", "weights with a NaN", "weights one short", "weights as a list",
          "server state without c", "server state of the wrong size", "history not JSON", "round beyond the history"]


def damaged(state: dict, label: str) -> object:
    """`state` with damaged content: the file still loads with torch.load."""
    if label == "not a dict":
        return list(state.items())
    if label == "no history":
        return {k: v for k, v in state.items() if k != "history"}
    w, c = state["weights"], state["strategy"]["c"]
    return {**state, **{
        "format 2": {"format": 2},
        "weights with a NaN": {"weights": torch.cat([torch.tensor([float("nan")]), w[1:]])},
        "weights one short": {"weights": w[:-1]},
        "weights as a list": {"weights": w.tolist()},
        "server state without c": {"strategy": {"dc_sum": None}},
        "server state of the wrong size": {"strategy": {**state["strategy"], "c": c[:3]}},
        "history not JSON": {"history": "[{"},
        "round beyond the history": {"round": 7},  # the history holds 2 rounds
    }[label]}


@pytest.mark.parametrize("label", DAMAGE)
def test_damaged_checkpoint_content_is_refused_before_anything_changes(data, scaffold_dir, label):
    """A checkpoint file that loads but whose content is wrong must be refused like a corrupt one:
    ValueError, no file changed, the strategy object untouched (never half-loaded)."""
    path = scaffold_dir / "checkpoint.pt"
    torch.save(damaged(torch.load(path, weights_only=True), label), path)
    assert_refused_untouched(data, scaffold_dir, "checkpoint")


# ----------------------------------------------------------------------------
# Ray: reruns do not leak workers or memory; a node that leaves mid-run
# ----------------------------------------------------------------------------


def ray_workers() -> list[psutil.Process] | None:
    """This process's Ray worker processes (children of the raylet it started), None if it started none."""
    try:
        raylets = [p for p in psutil.Process().children(recursive=True) if p.name() == "raylet"]
    except psutil.Error:
        raylets = []
    if not raylets:
        return None
    out = []
    for raylet in raylets:
        for p in raylet.children():
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            is_worker = "default_worker.py" in cmd or "setup_worker.py" in cmd or cmd.startswith("ray::")
            if is_worker and "Agent" not in cmd:
                out.append(p)
    return out


def busy_workers(workers: list[psutil.Process]) -> list[str]:
    names = []
    for p in workers:
        try:
            names.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return [n for n in names if "faulty_client" in n]


def test_rerunning_on_ray_leaks_no_workers_and_little_memory(ray_cluster, data):
    if ray_workers() is None:
        pytest.skip("Ray was not started by this process: its workers cannot be counted")
    # seed 1: round 1 has a crash and a slow client, round 2 three crashes
    kw = dict(KW, rounds=2, seed=1, use_ray=True, faults={"crash": 0.2, "slow": 0.2}, deadline_s=2.0, slow_s=600)

    def settle(limit: int | None) -> int:
        """The worker count once Ray has reaped its idle workers (at most ~5 s)."""
        end = time.monotonic() + 5
        while True:
            gc.collect()
            count = len(ray_workers())
            if (limit is not None and count <= limit) or time.monotonic() > end:
                return count
            time.sleep(0.25)

    counts, rss, hists = [], [], []
    for i in range(4):
        model, hist = run(data, **kw)
        assert finite(model) and "slow" in hist[0]["faults"].values()
        hists.append(hist)
        counts.append(settle(None if i == 0 else counts[0] + 1))
        rss.append(psutil.Process().memory_info().rss)
    assert counts[0] >= 1 and max(counts[1:]) <= counts[0] + 1, counts
    assert rss[-1] - rss[0] < 150e6, [r / 1e6 for r in rss]
    for hist in hists:  # every run accounts for every client, and a healthy one is accepted or late
        check_history(hist, kw["faults"], 2, 1, engine="deadline")
        assert all(r["seconds"] < kw["deadline_s"] + MARGIN for r in hist), hist
    end = time.monotonic() + 5  # the cancelled stragglers are interrupted, not left sleeping for 600 s
    while busy_workers(ray_workers()) and time.monotonic() < end:
        time.sleep(0.25)
    assert busy_workers(ray_workers()) == []

