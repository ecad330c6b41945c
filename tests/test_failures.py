"""Notebook 08_when_clients_fail: fault injection (crash, kill, slow, NaN), the checks on client
updates, the `Resilient` round policy (deadline, min_clients, norm rule), and the `Checkpointer`
(atomic checkpoints, checked resume) of the round engine.

The runs use the "simple" model, the first 800 synthetic training samples split into 8
label-skewed clients of 100 (6 sampled per round) and 2-5 rounds, in process (`InProcess`) unless
Ray is the point: a dead worker, a deadline that cancels, a resume on another executor. Those use
the session's 2-CPU Ray; the killed process runs in a subprocess (the two-node cluster is in
test_cluster.py, the actor pool's own failures in test_pool.py). Seeds of the Ray runs are chosen
(see the comments) so that each fault happens, but only as often as needed: a "kill" costs two
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
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from conftest import STRAT_KNOBS, flat, fresh, same_weights

import fed_helpers as fh

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS, NUM_SAMPLES = 8, 800
CFG = fh.TrainConfig(model="simple", epochs=1, batch_size=25, lr=0.05)
FRACTION, SEED, ROUNDS = 0.75, 5, 3  # 6 of 8 clients per round: some skip rounds (SCAFFOLD's store keeps their state)
# The checkpoint/resume runs: 5 rounds with crashes and NaN updates.
RESUME_FAULTS, RESUME_ROUNDS = {"crash": 0.3, "nan": 0.1}, 5
# Ray, 2 rounds. seed 4: one kill (round 1), two crashes, two NaN updates.
RAY_FAULTS, RAY_SEED = {"crash": 0.2, "nan": 0.2, "kill": 0.1}, 4
# seed 0: in each of 2 rounds one slow client, crashes and a NaN update.
MIX, MIX_SEED = {"crash": 0.3, "slow": 0.2, "nan": 0.1}, 0
DEADLINE, MARGIN = 3.0, 10.0  # the machine may be loaded: a round may overrun the deadline by MARGIN
CRASHED = "RuntimeError: injected fault: the client crashed"


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


@pytest.fixture(scope="module")
def data(synthetic_train, synthetic_test):
    """The first 800 training samples in 8 label-skewed clients of 100 (2 shards each)."""
    train = (synthetic_train[0][:NUM_SAMPLES], synthetic_train[1][:NUM_SAMPLES])
    parts = fh.make_partition("shards", train[1].numpy(), NUM_CLIENTS, seed=0, shards_per_client=2)
    assert sorted(len(p) for p in parts) == [100] * NUM_CLIENTS
    return SimpleNamespace(train=train, test=synthetic_test, parts=parts)


def make_task(data, **kw) -> fh.FedTask:
    return fh.FedTask(data.train, data.test, kw.pop("parts", data.parts),
                      **{"config": CFG, "client_fraction": FRACTION, "seed": SEED, **kw})


def run(data, strategy: str | fh.FedAvg = "fedavg", rounds: int = ROUNDS, policy: fh.RoundPolicy | None = None,
        run_dir: Path | None = None, task: fh.FedTask | None = None, **kw):
    """run_rounds on `data` in process (unless kw gives an executor), with the Resilient policy's
    defaults (a 300 s deadline: a straggler that never answers is late at once) unless `policy`."""
    s = fresh(strategy, NUM_CLIENTS) if isinstance(strategy, str) else strategy
    return fh.run_rounds(task or make_task(data), rounds, strategy=s, policy=policy or fh.Resilient(),
                         checkpoint=None if run_dir is None else fh.Checkpointer(run_dir), progress=False, **kw)


def resilient(faults: dict | None = None, **kw) -> fh.Resilient:
    return fh.Resilient(faults=dict(faults or {}), **kw)


def finite(model) -> bool:
    return bool(torch.isfinite(flat(model)).all())


def faults_of(row: dict, faults: dict, seed: int = SEED) -> dict[int, str]:
    """The faults injected in a history row's round (the history does not record them: replay them)."""
    return fh.assign_faults(row["sampled"], seed, row["round"], **faults)


def outcome(hist: list[dict]) -> list[tuple]:
    """What happened to each client, per round (everything but timings, metrics and byte counts)."""
    return [(r["round"], r["sampled"], r["accepted"], r["failed"], r["late"], r["rejected"], r["aggregated"])
            for r in hist]


def without_seconds(hist: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def check_history(hist: list[dict], faults: dict, rounds: int, seed: int = SEED, engine: str = "process",
                  fraction: float = FRACTION, min_clients: int = 1, norm_rejects: frozenset = frozenset()) -> None:
    """Every round ran; every sampled client is in exactly one of accepted / failed / late /
    rejected; each injected fault (replayed with assign_faults) ends where it must, and a client
    without a fault is accepted (unless in `norm_rejects`: rejected for its update's norm).

    engine: "process" (in process), "ray" (Ray, no deadline) or "deadline" (a deadline that
    any client may miss: on a loaded machine even a healthy Ray client can be late).
    """
    assert [r["round"] for r in hist] == list(range(1, rounds + 1))
    for r in hist:
        rnd, sampled = r["round"], sorted(r["sampled"])  # (listed in the order they were handed out)
        assert sampled == [int(k) for k in fh.sample_clients(NUM_CLIENTS, fraction, seed, rnd)]
        fault_of = faults_of(r, faults, seed)
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
                assert r["failed"].get(str(k)) == f"{CRASHED} ({fault})", (k, outcome([r]))
            elif fault == "kill":
                assert "WorkerCrashedError" in r["failed"].get(str(k), ""), (k, outcome([r]))
            elif k in norm_rejects:
                assert r["rejected"].get(str(k), "").startswith("update norm"), (k, outcome([r]))
            else:
                assert k in accepted, (k, outcome([r]))


# ----------------------------------------------------------------------------
# the pieces: assign_faults, straggle, faulty_client, run_client, describe_error, the checks
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


@pytest.mark.parametrize(("rates", "match"), [
    ({"slow": 1.01}, r"slow must be a finite number in \[0, 1\], got 1.01"),
    ({"crash": -0.1}, r"crash must be a finite number in \[0, 1\], got -0.1"),
    ({"nan": float("nan")}, r"nan must be a finite number in \[0, 1\], got nan"),
    ({"kill": float("inf")}, r"kill must be a finite number in \[0, 1\], got inf"),
    ({"nan": "0.1"}, r"nan must be a finite number in \[0, 1\]"),
    ({"crash": 0.5, "kill": 0.5, "nan": 0.01}, r"crash \+ kill \+ slow \+ nan must add up to at most 1, got 1.01"),
])
def test_assign_faults_checks_its_rates_by_name(rates, match):
    with pytest.raises(ValueError, match=match):
        fh.assign_faults([1], 0, 1, **rates)
    assert fh.assign_faults([1, 2], 0, 1, crash=0.25, kill=0.25, slow=0.25, nan=0.25).keys() == {1, 2}


def test_straggle_naps_and_gives_up_at_the_deadline(monkeypatch):
    start = time.perf_counter()
    fh.straggle(0.2, None)  # no deadline: it only naps
    assert time.perf_counter() - start >= 0.2
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="cannot answer before the round's deadline"):
        fh.straggle(600, time.time() + 30)  # in this process: it cannot make it, so it gives up at once
    assert time.perf_counter() - start < 0.1
    fh.straggle(0.1, time.time() + 30)  # one that makes it naps, here too
    monkeypatch.setattr(fh, "in_ray_worker", lambda: True)  # in a Ray worker it naps until the deadline
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="the straggler gave up"):
        fh.straggle(600, time.time() + 0.3)
    assert 0.3 <= time.perf_counter() - start < 5


def test_faulty_client_acts_out_each_fault(data):
    x, y = data.train[0].numpy(), data.train[1].numpy()
    w = flat(fh.make_model("simple", 1)).numpy()
    job = fh.ClientJob(2, 1, data.parts[2], 11)
    call = lambda fault, **kw: fh.faulty_client(fh.make_model("simple"), w, x, y, replace(job, fault=fault), CFG, **kw)
    ok, ref = call(None), fh.train_client(fh.make_model("simple"), w, x, y, job, CFG)
    assert (ok.cid, ok.num_samples, ok.loss, ok.status) == (ref.cid, ref.num_samples, ref.loss, "ok")
    assert np.array_equal(ok.weights, ref.weights) and ok.weights.dtype == np.float32
    for fault in ("crash", "kill"):  # in this process a kill is a crash: os._exit would end the test run
        with pytest.raises(RuntimeError, match=rf"injected fault: the client crashed \({fault}\)"):
            call(fault)
    nan = call("nan")
    assert nan.num_samples == 100 and math.isfinite(nan.loss) and nan.weights.shape == w.shape
    assert nan.weights.dtype == np.float32 and np.isnan(nan.weights).all()
    start = time.perf_counter()
    slow = call("slow", slow_s=0.3)
    assert time.perf_counter() - start >= 0.3 and np.array_equal(slow.weights, ok.weights)  # late, but right
    boosted = fh.faulty_client(fh.make_model("simple"), w, x, y, job, CFG,
                               inner=fh.TransformedClient(fh.train_client, lambda new, old, j: old + 2 * (new - old)))
    assert np.allclose(boosted.weights - w, 2 * (ok.weights - w), atol=1e-6)  # it wraps any client function


def test_run_client_files_errors_and_deadlines_instead_of_raising(data):
    x, y = data.train[0].numpy(), data.train[1].numpy()
    w, model = flat(fh.make_model("simple", 1)).numpy(), fh.make_model("simple")
    job = fh.ClientJob(3, 1, data.parts[3], 0)

    def raises(err):
        def client(*args):
            raise err
        return client

    failed = fh.run_client(raises(ValueError("bad\nmore")), model, w, x, y, job, CFG)
    assert (failed.cid, failed.status, failed.error, failed.weights) == (3, "failed", "ValueError: bad", None)
    late = fh.run_client(raises(TimeoutError("gave up")), model, w, x, y, job, CFG)
    assert (late.status, late.error) == ("late", "TimeoutError: gave up")
    past = fh.run_client(raises(AssertionError("never called")), model, w, x, y,
                         replace(job, give_up_at=time.time() - 1), CFG)
    assert past.status == "late" and "deadline passed before it started" in past.error


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


def test_screen_updates_screens_answers_only_and_none_turns_off_the_norm_rule():
    g = torch.zeros(4)
    step = lambda k, scale: fh.ClientResult(k, 10, 0.1, np.full(4, scale, np.float32))
    results = [step(0, 1.0), step(1, 1.1), step(2, 0.9), step(3, 100.0),
               fh.ClientResult(4, 10, 0.1, np.array([np.nan, 0, 0, 0], np.float32)),
               fh.ClientResult(5, 10, 0.1, np.zeros(3, np.float32)),
               fh.ClientResult(6, status="failed", error="boom"), fh.ClientResult(7, status="late", error="late")]
    rejected = fh.screen_updates(results, g, 20.0)
    assert sorted(rejected) == [3, 4, 5]  # failed and late clients sent nothing to screen
    assert rejected[3].startswith("update norm 200 is over 20 x the median")  # the median of the 4 finite ones
    assert rejected[4] == "NaN or Inf in the weights" and rejected[5].startswith("wrong shape")
    assert sorted(fh.screen_updates(results, g, None)) == [4, 5]
    assert fh.screen_updates(results[:2], g, 20.0) == {}  # two answers: no norm rule


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
    again.begin(4)
    again.put(5, zero)
    fh.RoundStore(tmp_path).recover(0)  # no checkpoint at all: no client state either
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    fh.save_checkpoint(path, {"round": 1, "w": torch.arange(3.0)})
    fh.save_checkpoint(path, {"round": 2, "w": torch.arange(4.0)})
    state = torch.load(path, weights_only=True)
    assert state["round"] == 2 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("no space left on device (injected)")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="injected"):
        fh.save_checkpoint(path, {"round": 3, "w": torch.arange(5.0)})
    assert torch.load(path, weights_only=True)["round"] == 2  # the old checkpoint, whole


@pytest.mark.parametrize("name", sorted(STRAT_KNOBS))
def test_server_state_is_the_strategy_tensors_not_its_knobs(name):
    s = fresh(name, NUM_CLIENTS)
    state = fh.server_state(s)
    assert state == {"fedavg": {}, "fedprox": {}, "fedavgm": {"m": None}, "fedadam": {"m": None, "v": None},
                     "fedyogi": {"m": None, "v": None}, "scaffold": {"c": None, "dc_sum": None}}[name]
    w = torch.zeros(6)
    if name == "scaffold":
        s.payload(0, w)
    s.server_step(w, w.double() + 0.5)
    assert all(v is None or v.numel() == 6 for v in fh.server_state(s).values())
    assert any(v is not None for v in fh.server_state(s).values()) == bool(state)


def test_the_fingerprint_holds_what_decides_the_bits(data):
    task, s = make_task(data), fresh("fedavg", NUM_CLIENTS)
    fp = fh.run_fingerprint(task, s, resilient(), None, fh.weighted_mean)
    assert json.loads(json.dumps(fp)) == fp  # plain values, as saved
    assert fp["policy"]["name"] == "Resilient" and fp["policy"]["deadline_s"] == 300.0
    assert fp["policy"]["slow_s"] == math.inf and fp["policy"]["faults"] == {}
    for policy in (resilient(deadline_s=60), resilient(slow_s=5.0), resilient(min_clients=2),
                   resilient(max_norm_ratio=None), resilient({"crash": 0.1}), fh.RoundPolicy()):
        other = fh.run_fingerprint(task, s, policy, None, fh.weighted_mean)
        assert [k for k in fp if fp[k] != other[k]] == ["policy"], policy
    assert fh.run_fingerprint(task, s, resilient(), lambda n, g, j: n, fh.weighted_mean)["transform"].endswith(
        "<lambda>")
    assert fh.run_fingerprint(make_task(data, seed=6), s, resilient(), None, fh.weighted_mean)["seed"] == 6
    assert fh.run_fingerprint(task, fresh("fedavgm", NUM_CLIENTS), resilient(), None, fh.weighted_mean)["knobs"] == {
        "server_lr": 1.0, "momentum": 0.9}


# ----------------------------------------------------------------------------
# the Resilient policy's knobs, refused by name before any work
# ----------------------------------------------------------------------------

BAD_KNOBS = [
    ({"faults": {"oom": 0.1}}, r"faults may only name \['crash', 'kill', 'slow', 'nan'\], got \['oom'\]"),
    ({"faults": {"crash": 0.1, "Slow": 0.1}}, r"faults may only name .*got \['Slow'\]"),
    ({"faults": {"kill": 1.5}}, r"kill must be a finite number in \[0, 1\], got 1.5"),
    ({"faults": {"crash": float("nan")}}, r"crash must be a finite number in \[0, 1\], got nan"),
    ({"faults": {"crash": 0.6, "nan": 0.5}}, r"crash \+ kill \+ slow \+ nan must add up to at most 1, got 1.1"),
    ({"deadline_s": 0}, r"deadline_s must be a finite number in \(0, inf\), got 0"),
    ({"deadline_s": -5.0}, r"deadline_s must be a finite number"),
    ({"deadline_s": float("nan")}, r"deadline_s must be a finite number.*got nan"),
    ({"deadline_s": float("inf")}, r"deadline_s must be a finite number.*got inf"),
    ({"min_clients": 0}, r"min_clients must be an integer >= 1, got 0"),
    ({"min_clients": 2.0}, r"min_clients must be an integer"),
    ({"max_norm_ratio": 0.5}, r"max_norm_ratio must be a finite number in \[1, inf\), got 0.5"),
    ({"max_norm_ratio": float("inf")}, r"max_norm_ratio must be a finite number in \[1, inf\), got inf"),
    ({"max_norm_ratio": float("nan")}, r"max_norm_ratio must be a finite number.*got nan"),
    ({"slow_s": -1}, r"slow_s must be a number in \[0, inf\], got -1"),
    ({"slow_s": float("nan")}, r"slow_s must be a number.*got nan"),
    ({"faults": {"slow": 0.2}, "deadline_s": None, "slow_s": float("inf")},
     r"faults\['slow'\] > 0 with slow_s=inf \(stragglers that never answer\) needs a deadline_s"),
]


@pytest.mark.parametrize(("knobs", "match"), BAD_KNOBS, ids=[str(k) for k, _ in BAD_KNOBS])
def test_resilient_refuses_bad_knobs_by_name(knobs, match):
    with pytest.raises(ValueError, match=match):
        fh.Resilient(**knobs)


def test_min_clients_above_the_federation_is_refused_before_any_work(data, tmp_path, monkeypatch):
    for fn in ("make_model", "evaluate", "load_checkpoint"):
        monkeypatch.setattr(fh, fn, lambda *a, _fn=fn, **k: pytest.fail(f"{_fn} called before the knobs were checked"))
    with pytest.raises(ValueError, match=rf"min_clients must be in \[1, {NUM_CLIENTS}\].*got 9"):
        run(data, policy=resilient(min_clients=9), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert fh.Resilient(slow_s=float("inf"), faults={"slow": 0.1}).deadline_s == 300.0  # the default deadline


# ----------------------------------------------------------------------------
# faults in the round loop: every client is accounted for, the model stays finite
# ----------------------------------------------------------------------------

IN_PROCESS_FAULTS = [{kind: 0.3} for kind in fh.FAULTS] + [
    MIX, {"crash": 0.2, "kill": 0.1, "slow": 0.1, "nan": 0.2}, {"crash": 1.0}, {"nan": 1.0}]


@pytest.mark.parametrize("faults", IN_PROCESS_FAULTS, ids=lambda f: "+".join(f"{k}{v}" for k, v in f.items()))
def test_faults_in_process_every_round_completes_and_every_client_is_accounted(data, faults):
    model, hist = run(data, policy=resilient(faults))
    check_history(hist, faults, ROUNDS)
    assert finite(model)
    injected = [f for r in hist for f in faults_of(r, faults).values()]
    assert set(injected) == set(faults), injected  # 18 draws at >= 30%: every fault does happen (seed 5)


def record_weights(monkeypatch) -> list[torch.Tensor]:
    """The global weights at each round's evaluation (the engine evaluates once per round)."""
    seen: list[torch.Tensor] = []
    real = fh.evaluate
    monkeypatch.setattr(fh, "evaluate", lambda model, *a, **k: (seen.append(flat(model)), real(model, *a, **k))[1])
    return seen


def test_nan_clients_never_reach_the_global_model(data, monkeypatch):
    seen = record_weights(monkeypatch)
    model, hist = run(data, "fedadam", rounds=4, policy=resilient({"nan": 0.6}))
    assert sum(len(r["rejected"]) for r in hist) >= 4
    assert len(seen) == 4 and all(torch.isfinite(w).all() for w in seen)


def test_in_process_deadline_makes_later_clients_late(data):
    model, hist = run(data, policy=resilient(deadline_s=1e-3))
    check_history(hist, {}, ROUNDS, engine="deadline")  # any client may be late
    assert all(len(r["late"]) >= len(r["sampled"]) - 1 for r in hist)  # all but maybe the first one
    assert finite(model)


# ----------------------------------------------------------------------------
# without faults: the strict engine's bits; the same seed: the same run
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(data):
    """The strict engine (notebook 05's RoundPolicy, in process) for each strategy, cached by (name, rounds)."""
    cache: dict = {}

    def get(name: str, rounds: int = 2):
        if (name, rounds) not in cache:
            cache[name, rounds] = run(data, name, rounds=rounds, policy=fh.RoundPolicy())
        return cache[name, rounds]

    return get


def assert_like_strict(model, hist, ref_model, ref_hist, keys=("round", "accuracy", "loss", "train_loss", "drift",
                                                               "clients", "bytes_down")):
    assert torch.equal(flat(model), flat(ref_model))
    assert len(hist) == len(ref_hist)
    for r, s in zip(hist, ref_hist):
        assert all(r[k] == s[k] for k in keys), [k for k in keys if r[k] != s[k]]
        assert r["accepted"] == sorted(r["sampled"]) and r["aggregated"]
        assert r["failed"] == r["rejected"] == {} and r["late"] == []


@pytest.mark.parametrize("name", sorted(STRAT_KNOBS))
def test_without_faults_resilient_gives_the_strict_engines_bits(data, strict, name):
    assert set(fh.STRATEGIES) == set(STRAT_KNOBS)  # a new strategy must be added to STRAT_KNOBS
    model, hist = run(data, name, rounds=2)  # the defaults: a 300 s deadline, max_norm_ratio 20
    assert_like_strict(model, hist, *strict(name))
    assert without_seconds(hist) == without_seconds(strict(name)[1])


def test_zero_fault_rates_are_no_faults(data, strict):
    model, hist = run(data, "fedavgm", rounds=2, policy=resilient({k: 0.0 for k in fh.FAULTS}, deadline_s=None))
    assert_like_strict(model, hist, *strict("fedavgm"))


def test_in_process_a_straggler_that_makes_the_deadline_is_waited_for(data, strict):
    """slow_s < deadline: the straggler sleeps slow_s, then trains, and is counted as if on time."""
    faults = {"slow": 0.3}
    model, hist = run(data, rounds=2, policy=resilient(faults, slow_s=0.25, deadline_s=None))
    for row in hist:
        assert row["seconds"] >= 0.25 * list(faults_of(row, faults).values()).count("slow")  # one after another
    assert sum(list(faults_of(r, faults).values()).count("slow") for r in hist) >= 1
    assert_like_strict(model, hist, *strict("fedavg"))


def test_same_seed_same_faults_same_run_in_process(data):
    policy = resilient({"crash": 0.2, "nan": 0.2, "kill": 0.2}, deadline_s=None)
    a, hist_a = run(data, "scaffold", rounds=2, policy=policy)
    b, hist_b = run(data, "scaffold", rounds=2, policy=policy)
    assert same_weights(a, b) and without_seconds(hist_a) == without_seconds(hist_b)
    _, hist_c = run(data, "scaffold", rounds=2, policy=policy, task=make_task(data, seed=SEED + 1))
    assert outcome(hist_c) != outcome(hist_a)  # the seed does matter


# ----------------------------------------------------------------------------
# bad updates and min_clients
# ----------------------------------------------------------------------------


def test_max_norm_ratio_rejects_a_100x_update_and_none_disables_only_that_rule(data):
    faults = {"nan": 0.2}
    big = min(set(range(NUM_CLIENTS)) - set(fh.assign_faults(range(NUM_CLIENTS), SEED, 1, **faults)))

    def boost(new_w, global_w, job):  # the client-side transform: client `big` sends a 100x longer update
        return global_w + 100 * (new_w - global_w) if job.cid == big else new_w

    task = make_task(data, client_fraction=1.0)
    guarded, hist = run(data, rounds=2, task=task, transform=boost, policy=resilient(faults))
    check_history(hist, faults, 2, fraction=1.0, norm_rejects=frozenset({big}))
    nan_rejects = 0
    for r in hist:
        for k, reason in r["rejected"].items():
            assert reason.startswith("update norm") == (int(k) == big), r
            nan_rejects += reason == "NaN or Inf in the weights"
    assert str(big) in hist[0]["rejected"] and nan_rejects >= 1
    unguarded, hist_none = run(data, rounds=2, task=task, transform=boost,
                               policy=resilient(faults, max_norm_ratio=None))
    for r, s in zip(hist_none, hist):
        assert {k: v for k, v in s["rejected"].items() if int(k) != big} == r["rejected"]  # NaN: still out
        assert all(v == "NaN or Inf in the weights" for v in r["rejected"].values())
        assert big in r["accepted"] or faults_of(r, faults).get(big) == "nan"
    assert finite(guarded) and finite(unguarded) and not torch.equal(flat(guarded), flat(unguarded))


def test_min_clients_no_usable_update_keeps_the_model_exactly(data, monkeypatch):
    seen = record_weights(monkeypatch)
    s = fresh("fedadam", NUM_CLIENTS)
    model, hist = run(data, s, policy=resilient({"crash": 1.0}))
    check_history(hist, {"crash": 1.0}, ROUNDS)
    initial = flat(fh.make_model("simple", SEED))
    assert all(torch.equal(w, initial) for w in seen) and torch.equal(flat(model), initial)
    assert [r["aggregated"] for r in hist] == [False] * ROUNDS and all(r["accepted"] == [] for r in hist)
    assert s.m is None and s.v is None  # the server step never ran


def test_min_clients_too_few_updates_keeps_the_previous_round(data, monkeypatch):
    seen = record_weights(monkeypatch)
    faults, min_clients = {"crash": 0.4}, 4
    model, hist = run(data, "fedavgm", rounds=5, policy=resilient(faults, min_clients=min_clients))
    check_history(hist, faults, 5, min_clients=min_clients)
    aggregated = [r["aggregated"] for r in hist]
    assert True in aggregated and False in aggregated, [len(r["accepted"]) for r in hist]
    before = [flat(fh.make_model("simple", SEED))] + seen[:-1]
    for r, prev, now in zip(hist, before, seen):
        assert torch.equal(prev, now) == (not r["aggregated"]), r
    assert torch.equal(seen[-1], flat(model))


# ----------------------------------------------------------------------------
# faults on Ray tasks (the actor pool's own failures: test_pool.py)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_faulty(ray_cluster, data):
    """One Ray run with crash, NaN and kill faults and no deadline (shared by two tests)."""
    task = make_task(data, seed=RAY_SEED)
    return run(data, rounds=2, task=task, executor=fh.RayTasks(), policy=resilient(RAY_FAULTS, deadline_s=None))


def test_faults_on_ray_kill_crash_nan(ray_faulty):
    model, hist = ray_faulty
    check_history(hist, RAY_FAULTS, 2, RAY_SEED, engine="ray")
    assert finite(model)
    injected = sorted(f for r in hist for f in faults_of(r, RAY_FAULTS, RAY_SEED).values())
    assert injected == ["crash", "crash", "kill", "nan", "nan"]  # what seed 4 draws
    assert all(r["late"] == [] for r in hist)  # no deadline: nobody is late, a dead worker is an error


def test_same_seed_same_faults_ray_equals_in_process(ray_faulty, data):
    """A kill is a crash in process: same clients fail (with another message), same bits."""
    ray_model, ray_hist = ray_faulty
    model, hist = run(data, rounds=2, task=make_task(data, seed=RAY_SEED),
                      policy=resilient(RAY_FAULTS, deadline_s=None))
    assert torch.equal(flat(ray_model), flat(model))
    for r, s in zip(ray_hist, hist, strict=True):
        for key in ("sampled", "accepted", "late", "rejected", "aggregated", "accuracy", "loss", "train_loss", "drift"):
            assert r[key] == s[key], key
        assert r["failed"].keys() == s["failed"].keys()
        for k, fault in faults_of(r, RAY_FAULTS, RAY_SEED).items():
            if fault == "crash":
                assert r["failed"][str(k)] == s["failed"][str(k)]


def test_faults_on_ray_mix_with_slow_clients_cost_at_most_the_deadline(ray_cluster, data):
    start = time.perf_counter()
    model, hist = run(data, rounds=2, task=make_task(data, seed=MIX_SEED), executor=fh.RayTasks(),
                      policy=resilient(MIX, deadline_s=DEADLINE))
    elapsed = time.perf_counter() - start
    check_history(hist, MIX, 2, MIX_SEED, engine="deadline")
    assert finite(model)
    for r in hist:
        slow = {k for k, v in faults_of(r, MIX, MIX_SEED).items() if v == "slow"}
        assert slow and slow <= set(r["late"]), r  # seed 0: a slow client in every round
        assert r["seconds"] < DEADLINE + MARGIN, r
    assert elapsed < 2 * (DEADLINE + MARGIN)  # nobody waited for the stragglers that never answer


def test_on_ray_a_straggler_that_makes_the_deadline_is_waited_for(ray_cluster, data, strict):
    faults = {"slow": 0.3}
    start = time.perf_counter()
    model, hist = run(data, rounds=2, executor=fh.RayTasks(), policy=resilient(faults, slow_s=0.5, deadline_s=60))
    slow_rounds = sum("slow" in faults_of(r, faults).values() for r in hist)
    assert slow_rounds >= 1 and all(r["late"] == [] and r["accepted"] == sorted(r["sampled"]) for r in hist)
    assert torch.equal(flat(model), flat(strict("fedavg")[0]))
    assert time.perf_counter() - start >= 0.5 * slow_rounds


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
    return [n for n in names if "ray_client" in n]


def test_rerunning_on_ray_leaks_no_workers_and_little_memory(ray_cluster, data):
    if ray_workers() is None:
        pytest.skip("Ray was not started by this process: its workers cannot be counted")
    # seed 1: round 1 has a crash and a slow client, round 2 three crashes
    faults, task = {"crash": 0.2, "slow": 0.2}, make_task(data, seed=1)
    policy = resilient(faults, deadline_s=2.0)

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
    for i in range(3):
        model, hist = run(data, rounds=2, task=task, executor=fh.RayTasks(), policy=policy)
        assert finite(model) and "slow" in faults_of(hist[0], faults, 1).values()
        hists.append(hist)
        counts.append(settle(None if i == 0 else counts[0] + 1))
        rss.append(psutil.Process().memory_info().rss)
    assert counts[0] >= 1 and max(counts[1:]) <= counts[0] + 1, counts
    assert rss[-1] - rss[0] < 150e6, [r / 1e6 for r in rss]
    for hist in hists:  # every run accounts for every client, and a healthy one is accepted or late
        check_history(hist, faults, 2, 1, engine="deadline")
        assert all(r["seconds"] < policy.deadline_s + MARGIN for r in hist), hist
    end = time.monotonic() + 5  # the cancelled stragglers are interrupted, not left sleeping
    while busy_workers(ray_workers()) and time.monotonic() < end:
        time.sleep(0.25)
    assert busy_workers(ray_workers()) == []


# ----------------------------------------------------------------------------
# checkpoint and resume
# ----------------------------------------------------------------------------


def resume_policy() -> fh.Resilient:
    return resilient(RESUME_FAULTS)


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


def resumable(data, strategy, rounds: int = RESUME_ROUNDS, run_dir: Path | None = None, **kw):
    """The checkpoint/resume run: RESUME_ROUNDS rounds with crashes and NaN updates."""
    return run(data, strategy, rounds=rounds, policy=resume_policy(), run_dir=run_dir, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """Uninterrupted resumable runs with a run_dir, cached by (strategy, rounds)."""
    cache: dict = {}

    def get(name: str, rounds: int = RESUME_ROUNDS):
        if (name, rounds) not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference_{name}_{rounds}")
            s = fresh(name, NUM_CLIENTS)
            model, hist = resumable(data, s, rounds, run_dir)
            assert any(r["failed"] for r in hist) and any(r["rejected"] for r in hist)  # the faults do happen
            files = state_files(run_dir)
            assert (len(files) > 0) == (name == "scaffold")
            cache[name, rounds] = SimpleNamespace(weights=flat(model), history=hist, server=fh.server_state(s),
                                                  files=files, run_dir=run_dir)
        return cache[name, rounds]

    return get


def close_rows(a: list[dict], b: list[dict]) -> bool:
    """The same rows, timing aside, with float metrics to 1e-9 (another process may sum them in another order)."""
    close = lambda u, v: math.isclose(u, v, rel_tol=1e-9) if isinstance(u, float) and isinstance(v, float) else u == v
    return len(a) == len(b) and all(r.keys() == s.keys() and all(close(r[k], s[k]) for k in r if k != "seconds")
                                    for r, s in zip(a, b))


def assert_resumed_equals(model, hist, strategy, run_dir: Path, ref, same_process: bool = True) -> None:
    """Bit for bit the uninterrupted run: weights, history, server state, client state files."""
    assert torch.equal(flat(model), ref.weights), "the weights differ from the uninterrupted run's"
    assert without_seconds(hist) == without_seconds(ref.history) if same_process else close_rows(hist, ref.history)
    assert same_server_state(fh.server_state(strategy), ref.server), "the server state differs"
    files = state_files(run_dir)  # also: no file left in a pending_* folder
    assert files.keys() == ref.files.keys() and all(files[k] == ref.files[k] for k in files), "client states differ"
    assert not list(Path(run_dir).glob("client_state/pending_*"))
    assert checkpoint_round(run_dir) == len(ref.history)
    assert not (Path(run_dir) / "checkpoint.pt.tmp").exists()


def test_checkpointing_does_not_change_the_result(data, reference):
    ref = reference("scaffold")  # the one whose client state lives in another store with a run_dir
    model, hist = resumable(data, "scaffold")  # no run_dir
    assert torch.equal(flat(model), ref.weights) and without_seconds(hist) == without_seconds(ref.history)


def stop_after(rounds_done: int):
    def callback(history):
        if len(history) == rounds_done:
            raise Stop
    return callback


@pytest.mark.parametrize(("name", "stop_after_round"), [(name, 2) for name in sorted(STRAT_KNOBS)]
                         + [("scaffold", 1), ("scaffold", 4)])
def test_resume_after_a_stop_between_rounds(tmp_path, data, reference, name, stop_after_round):
    with pytest.raises(Stop):
        resumable(data, name, run_dir=tmp_path, callbacks=[stop_after(stop_after_round)])
    assert checkpoint_round(tmp_path) == stop_after_round
    trained = []
    s = fresh(name, NUM_CLIENTS)  # a fresh object: everything comes from run_dir
    model, hist = resumable(data, s, run_dir=tmp_path, callbacks=[lambda h: trained.append(len(h))])
    assert trained == list(range(stop_after_round + 1, RESUME_ROUNDS + 1))  # only the missing rounds ran
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


@pytest.mark.parametrize("name", ["scaffold", "fedadam"])
def test_resume_after_a_stop_in_the_middle_of_a_round(tmp_path, data, reference, name):
    ref = reference(name)
    stop_round = next(r["round"] for r in ref.history if r["round"] >= 2 and len(r["accepted"]) >= 2)
    s = fresh(name, NUM_CLIENTS)
    real_receive, done, calls = s.receive, [], []

    def receive(cid, *args):
        real_receive(cid, *args)
        if len(done) == stop_round - 1:
            calls.append(cid)
            if len(calls) == 2:  # two of this round's clients are in: stop before the rest
                raise Stop

    s.receive = receive
    with pytest.raises(Stop):
        resumable(data, s, run_dir=tmp_path, callbacks=[lambda h: done.append(len(h))])
    assert checkpoint_round(tmp_path) == stop_round - 1
    if name == "scaffold":  # the cut round's client states wait in pending_<round>
        assert len(list((tmp_path / "client_state" / f"pending_{stop_round}").glob("client_*.npy"))) == 2
    s = fresh(name, NUM_CLIENTS)
    model, hist = resumable(data, s, run_dir=tmp_path)
    assert_resumed_equals(model, hist, s, tmp_path, ref)


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
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
        resumable(data, name, run_dir=tmp_path)
    monkeypatch.undo()
    assert checkpoint_round(tmp_path) == 2
    assert (tmp_path / "checkpoint.pt.tmp").stat().st_size > 0  # the half-written one
    if name == "scaffold":
        assert (tmp_path / "client_state" / "pending_3").is_dir()
    s = fresh(name, NUM_CLIENTS)
    model, hist = resumable(data, s, run_dir=tmp_path)
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


KILL_SCRIPT = r"""
import json, sys
import fed_helpers as fh
cfg = json.loads(sys.argv[1])
train = fh.load_dataset("synthetic")
train = (train[0][:cfg["samples"]], train[1][:cfg["samples"]])
test = fh.load_dataset("synthetic", train=False)
parts = fh.make_partition("shards", train[1].numpy(), cfg["clients"], seed=0, shards_per_client=2)
task = fh.FedTask(train, test, parts, fh.TrainConfig(**cfg["config"]), cfg["fraction"], cfg["seed"])
strategy = fh.make_strategy(cfg["strategy"], cfg["clients"], **cfg["knobs"])
print("started", flush=True)
fh.run_rounds(task, cfg["rounds"], strategy=strategy, policy=fh.Resilient(faults=cfg["faults"]),
              checkpoint=fh.Checkpointer(cfg["run_dir"]), progress=False)
print("finished", flush=True)
"""


def test_resume_after_the_process_is_killed(tmp_path, data, reference):
    name = "scaffold"
    cfg = {"samples": NUM_SAMPLES, "clients": NUM_CLIENTS, "strategy": name, "knobs": STRAT_KNOBS[name],
           "config": {"model": CFG.model, "epochs": CFG.epochs, "batch_size": CFG.batch_size, "lr": CFG.lr},
           "fraction": FRACTION, "seed": SEED, "faults": RESUME_FAULTS, "run_dir": str(tmp_path),
           "rounds": 1000}  # rounds: not in the fingerprint
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
    rounds = max(RESUME_ROUNDS, stopped + 1)
    s = fresh(name, NUM_CLIENTS)
    model, hist = resumable(data, s, rounds, tmp_path)
    assert_resumed_equals(model, hist, s, tmp_path, reference(name, rounds), same_process=False)


@pytest.mark.parametrize("name", ["fedadam", "scaffold"])
def test_resume_with_more_rounds_continues(tmp_path, data, reference, name):
    resumable(data, name, 3, tmp_path)
    assert checkpoint_round(tmp_path) == 3
    s = fresh(name, NUM_CLIENTS)
    model, hist = resumable(data, s, run_dir=tmp_path)  # 5 rounds: 2 more
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


def test_rerunning_a_finished_run_returns_it_without_training(tmp_path, data, reference, monkeypatch):
    resumable(data, "fedadam", run_dir=tmp_path)
    monkeypatch.setattr(fh, "train_client", lambda *a, **k: pytest.fail("a finished run trained again"))
    s = fresh("fedadam", NUM_CLIENTS)
    model, hist = resumable(data, s, run_dir=tmp_path)
    assert_resumed_equals(model, hist, s, tmp_path, reference("fedadam"))


@pytest.mark.parametrize(("name", "stop"), [("fedadam", "after round 2"), ("scaffold", "in round 1"),
                                            ("fedadam", "writing round 1's checkpoint")])
def test_rerun_with_the_same_strategy_object_equals_the_uninterrupted_run(tmp_path, data, reference, monkeypatch,
                                                                          name, stop):
    """As when a notebook cell that only calls run_rounds is run again after a Ctrl-C: the
    strategy object is the one the stopped run changed. The checkpoint must win over it; and
    with no checkpoint yet (a stop in round 1) the run must start afresh."""
    s, kw = fresh(name, NUM_CLIENTS), {}
    if stop == "after round 2":
        kw["callbacks"] = [stop_after(2)]
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
        resumable(data, s, run_dir=tmp_path, **kw)
    monkeypatch.undo()
    vars(s).pop("receive", None)
    model, hist = resumable(data, s, run_dir=tmp_path)
    assert_resumed_equals(model, hist, s, tmp_path, reference(name))


@pytest.mark.parametrize("executor", ["ray-tasks", "actor-pool"])
def test_a_run_checkpointed_on_ray_resumes_in_process_bit_for_bit(ray_cluster, tmp_path, data, reference, executor):
    """The checkpointer does not know the executor: 2 rounds on Ray, the rest in process."""
    on_ray = fh.RayTasks() if executor == "ray-tasks" else fh.ActorPool(num_workers=2, chunk_size=2)
    with pytest.raises(Stop):
        resumable(data, "scaffold", run_dir=tmp_path, executor=on_ray, callbacks=[stop_after(2)])
    assert checkpoint_round(tmp_path) == 2
    s = fresh("scaffold", NUM_CLIENTS)
    model, hist = resumable(data, s, run_dir=tmp_path)
    ref = reference("scaffold")
    assert torch.equal(flat(model), ref.weights) and outcome(hist) == outcome(ref.history)
    assert same_server_state(fh.server_state(s), ref.server) and state_files(tmp_path) == ref.files


# ----------------------------------------------------------------------------
# checkpoints that must be refused, before anything changes
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaffold_template(tmp_path_factory, data):
    """A run_dir holding a 2-round SCAFFOLD run (checkpoint and client states), made once."""
    run_dir = tmp_path_factory.mktemp("scaffold_template")
    resumable(data, "scaffold", 2, run_dir)
    assert len(state_files(run_dir)) > 0
    return run_dir


@pytest.fixture
def scaffold_dir(tmp_path, scaffold_template):
    """A copy of scaffold_template, for one test to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(scaffold_template, run_dir)
    return run_dir


def assert_refused_untouched(data, run_dir: Path, match: str, name: str = "scaffold", knobs: dict | None = None,
                             policy: fh.RoundPolicy | None = None, rounds: int = RESUME_ROUNDS, **kw) -> str:
    """The run refuses the checkpoint with ValueError(match), changing no file, and nothing of the
    checkpoint reaches the strategy (never half-loaded); returns the message."""
    before = all_files(run_dir)
    s = fresh(name, NUM_CLIENTS, **(knobs or {}))
    with pytest.raises(ValueError, match=match) as info:
        run(data, s, rounds=rounds, policy=policy or resume_policy(), run_dir=run_dir, **kw)
    assert all_files(run_dir) == before
    assert all(v is None for v in fh.server_state(s).values()), "checkpoint state reached the strategy"
    return str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "empty", "half"])
def test_corrupt_checkpoint_is_refused_and_nothing_changes(data, scaffold_dir, damage):
    path = scaffold_dir / "checkpoint.pt"
    good = path.read_bytes()
    bad = {"garbage": b"\x00not a checkpoint\xff" * 64, "empty": b"", "half": good[: len(good) // 2]}[damage]
    path.write_bytes(bad)
    msg = assert_refused_untouched(data, scaffold_dir, "corrupt")
    assert "delete it" in msg and str(path) in msg


def other_mean(results, global_w, jobs):
    return fh.weighted_mean(results, global_w, jobs)


@pytest.mark.parametrize(
    ("name", "change", "differ"),
    [
        ("scaffold", {"task": {"config": replace(CFG, lr=0.1)}}, "config"),
        ("scaffold", {"task": {"seed": 6}}, "seed"),
        ("scaffold", {"task": {"client_fraction": 1.0}}, "client_fraction"),
        ("scaffold", {"task": {"parts": "iid"}}, "partitions"),
        ("scaffold", {"policy": resilient({"crash": 0.3})}, "policy"),
        ("scaffold", {"policy": resilient(RESUME_FAULTS, max_norm_ratio=None)}, "policy"),
        ("scaffold", {"policy": resilient(RESUME_FAULTS, deadline_s=60)}, "policy"),  # it decides who is late
        ("scaffold", {"policy": resilient(RESUME_FAULTS, slow_s=5.0)}, "policy"),
        ("scaffold", {"policy": fh.RoundPolicy()}, "policy"),
        ("scaffold", {"knobs": {"server_lr": 0.5}}, "knobs"),
        ("scaffold", {"aggregate": other_mean}, "aggregate"),
        ("scaffold", {"transform": lambda new_w, global_w, job: new_w}, "transform"),
        ("fedavg", {}, "knobs, strategy"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_checkpoint_of_another_run_is_refused_naming_what_differs(data, scaffold_dir, name, change, differ):
    change = dict(change)
    if "task" in change:
        task_kw = dict(change.pop("task"))
        if task_kw.get("parts") == "iid":
            task_kw["parts"] = fh.make_partition("iid", data.train[1].numpy(), NUM_CLIENTS, seed=0)
        change["task"] = make_task(data, **task_kw)
    msg = assert_refused_untouched(data, scaffold_dir, "different run", name=name, **change)
    assert f"different run: {differ} differ;" in msg


@pytest.mark.parametrize("name", ["fedadam", "scaffold"])
def test_fewer_rounds_than_the_checkpoint_holds_are_refused(data, tmp_path, scaffold_dir, name):
    run_dir = scaffold_dir
    if name != "scaffold":
        run_dir = tmp_path / name
        resumable(data, name, 2, run_dir)
    msg = assert_refused_untouched(data, run_dir, r"already holds 2 rounds, more than rounds=1", name=name, rounds=1)
    assert "ask for more rounds, or use another run_dir" in msg


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


DAMAGE = ["not a dict", "no history", "format 1", "weights with a NaN", "weights one short", "weights as a list",
          "server state without c", "server state of the wrong size", "history not JSON", "round beyond the history"]


def damaged(state: dict, label: str) -> object:
    """`state` with damaged content: the file still loads with torch.load."""
    if label == "not a dict":
        return list(state.items())
    if label == "no history":
        return {k: v for k, v in state.items() if k != "history"}
    w, c = state["weights"], state["strategy"]["c"]
    return {**state, **{
        "format 1": {"format": 1},  # run_resilient's, before the engine
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
    ValueError, no file changed, nothing of it applied to the strategy."""
    path = scaffold_dir / "checkpoint.pt"
    torch.save(damaged(torch.load(path, weights_only=True), label), path)
    assert_refused_untouched(data, scaffold_dir, "checkpoint")


def test_without_a_checkpoint_old_client_state_is_not_used(data, scaffold_dir, reference):
    """A run_dir whose checkpoint was deleted (as a refusal message suggests) starts afresh: the
    client state files left beside it must not leak into the new run."""
    (scaffold_dir / "checkpoint.pt").unlink()
    assert len(state_files(scaffold_dir)) > 0
    s = fresh("scaffold", NUM_CLIENTS)
    model, hist = resumable(data, s, run_dir=scaffold_dir)
    assert_resumed_equals(model, hist, s, scaffold_dir, reference("scaffold"))
