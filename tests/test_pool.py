"""The actor-pool executor of 07_scaling_with_ray: the engine's bits on long-lived actors, whatever
the chunking and the order in which chunks finish; and a pool that survives what actors do: fail
to start, die mid-round (fault injection "kill"), or answer after the round's deadline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import flat, same_weights

import fed_helpers as fh

CFG = fh.TrainConfig(batch_size=16, lr=0.05)


@pytest.fixture(scope="module")
def skewed(synthetic_train):
    # very different client sizes, so actors finish chunks in another order than client ids
    return fh.make_partition("quantity", synthetic_train[1].numpy(), 16, seed=2, beta=0.3)


def task(train, test, parts, **kw) -> fh.FedTask:
    return fh.FedTask(train, test, parts, **{"config": CFG, "client_fraction": 0.5, "seed": 5, **kw})


def filed_once(row: dict) -> bool:
    """Every sampled client is filed exactly once: accepted, failed, late or rejected."""
    groups = [row["accepted"], [int(k) for k in row["failed"]], row["late"], [int(k) for k in row["rejected"]]]
    return sorted(sum(groups, [])) == sorted(row["sampled"])


def seed_with(faults: dict, num_clients: int, wanted: list[int]) -> int:
    """The first run seed whose rounds 1, 2, ... draw exactly `wanted[r - 1]` faulty clients."""
    return next(s for s in range(10_000) if [len(fh.assign_faults(range(num_clients), s, r, **faults))
                                             for r in range(1, len(wanted) + 1)] == wanted)


class WatchedPool(fh.ActorPool):
    """An ActorPool that notes, per round, which actors were up at its start and which hold the
    places at its end (actor ids)."""

    def start(self, *args) -> None:
        super().start(*args)
        self.up, self.ids = [], [self.actor_ids()]

    def run(self, jobs, weights, cfg):
        self.up.append(fh.wait_started(self.workers, self.pings, 1, self.start_timeout_s))
        out = super().run(jobs, weights, cfg)
        self.ids.append(self.actor_ids())
        return out

    def actor_ids(self) -> list[str]:
        return [w._actor_id.hex() for w in self.workers]


def test_train_client_on_a_reused_model_equals_a_fresh_one(synthetic_train):
    """Why one model per actor is enough: the client overwrites the weights and makes a new optimizer."""
    x, y = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    w = flat(fh.make_model("2nn", 3)).numpy()
    job = fh.ClientJob(0, 1, np.arange(100, 400), seed=11)
    cfg = fh.TrainConfig(epochs=2, batch_size=16, momentum=0.9)
    used = fh.make_model("2nn", 42)
    fh.train_client(used, w, x, y, fh.ClientJob(1, 1, np.arange(50), seed=1), cfg)  # another client trained it
    a = fh.train_client(used, w, x, y, job, cfg)
    b = fh.train_client(fh.make_model("2nn"), w, x, y, job, cfg)
    assert a.num_samples == b.num_samples == 300 and a.loss == b.loss
    assert np.array_equal(a.weights, b.weights)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_actor_pool_equals_in_process_whatever_the_chunking(ray_cluster, synthetic_train, synthetic_test, skewed,
                                                            chunk_size):
    t = task(synthetic_train, synthetic_test, skewed)
    floor, floor_hist = fh.run_rounds(t, 2, progress=False)
    pool, hist = fh.run_rounds(t, 2, executor=fh.ActorPool(num_workers=2, chunk_size=chunk_size), progress=False)
    assert same_weights(floor, pool)
    for a, b in zip(floor_hist, hist):
        assert a["accuracy"] == b["accuracy"] and a["train_loss"] == b["train_loss"] and a["drift"] == b["drift"]
        assert a["sampled"] == b["sampled"] == b["accepted"] and a["bytes_down"] == b["bytes_down"]
        # an array that comes back from Ray is read-only, and pickle marks that with one more byte
        assert 0 <= b["bytes_up"] - a["bytes_up"] <= len(b["accepted"])
    assert len(hist) == 2 and hist[-1]["clients"] == 8


def test_actor_pool_learns_and_other_seed_differs(ray_cluster, synthetic_train, synthetic_test):
    parts = fh.make_partition("iid", synthetic_train[1].numpy(), 6, seed=0)
    t = task(synthetic_train, synthetic_test, parts, client_fraction=1.0)
    model, hist = fh.run_rounds(t, 3, executor=fh.ActorPool(), progress=False)
    other, _ = fh.run_rounds(task(synthetic_train, synthetic_test, parts, client_fraction=1.0, seed=6), 3,
                             progress=False)  # in process: the bits do not depend on the executor
    assert hist[-1]["accuracy"] > 0.15 and hist[-1]["loss"] < hist[0]["loss"]
    assert not same_weights(model, other)


def test_chunks_that_finish_out_of_order_come_back_in_client_id_order(ray_cluster, synthetic_train):
    sizes = [2000, 5, 5, 5, 1500, 5, 5]  # the big chunks finish last
    jobs = [fh.ClientJob(k, 1, np.arange(n), seed=k) for k, n in enumerate(sizes)]
    pool, cfg = fh.ActorPool(num_workers=2, chunk_size=1), fh.TrainConfig(model="simple")
    pool.start(synthetic_train[0].numpy(), synthetic_train[1].numpy(), cfg, fh.train_client)
    try:
        out = pool.run(jobs, flat(fh.make_model("simple")).numpy(), cfg)
    finally:
        pool.stop()
    assert [r.cid for r in out] == list(range(len(sizes))) and [r.num_samples for r in out] == sizes
    assert all(r.status == "ok" for r in out)


@pytest.mark.parametrize("knob, value", [("num_workers", 0), ("num_workers", 1.5), ("chunk_size", 0),
                                         ("chunk_size", 2.0), ("start_timeout_s", 0), ("start_timeout_s", -1),
                                         ("start_timeout_s", math.nan), ("start_timeout_s", math.inf)])
def test_bad_knobs_are_refused_by_name(knob, value):
    with pytest.raises(ValueError, match=knob):
        fh.ActorPool(**{knob: value})


def test_pool_raises_instead_of_waiting_when_actors_cannot_start(ray_cluster, synthetic_train, synthetic_test):
    """Two actors left over (say, by a notebook cell that failed) hold both CPUs: the pool's
    own actors cannot start, and it says so within start_timeout_s instead of hanging."""
    t = task(synthetic_train, synthetic_test, fh.make_partition("iid", synthetic_train[1].numpy(), 4),
             config=fh.TrainConfig(model="simple"))
    x_ref, y_ref = ray_cluster.put(synthetic_train[0].numpy()), ray_cluster.put(synthetic_train[1].numpy())
    hogs = [fh.ClientTrainer.remote(x_ref, y_ref, "simple", fh.train_client) for _ in range(2)]
    ray_cluster.get([h.node_id.remote() for h in hogs])
    try:
        with pytest.raises(RuntimeError, match="start_timeout_s"):
            fh.run_rounds(t, 1, executor=fh.ActorPool(num_workers=2, start_timeout_s=3), progress=False)
    finally:
        for h in hogs:
            ray_cluster.kill(h)
    # and with the CPUs free again, the pool runs
    _, hist = fh.run_rounds(t, 1, executor=fh.ActorPool(num_workers=2), progress=False)
    assert len(hist) == 1 and hist[0]["accepted"] == hist[0]["sampled"]


def test_a_killed_actor_costs_only_its_chunks(ray_cluster, synthetic_train, synthetic_test, skewed):
    """Fault injection kills the actor that trains one client in round 1: the chunks that actor
    held fail (filed with the reason), the others are accepted, a fresh actor takes its place, and
    once it has started the next rounds use it and lose nobody."""
    faults = {"kill": 0.1}
    seed = seed_with(faults, 16, [1, 0, 0])
    t = task(synthetic_train, synthetic_test, skewed, client_fraction=1.0, seed=seed)
    killed = fh.assign_faults(range(16), seed, 1, **faults)
    pool = WatchedPool(num_workers=2, chunk_size=2)

    def let_the_fresh_actor_start(history):
        if len(history) == 2:
            ray_cluster.get(pool.pings, timeout=120)

    model, hist = fh.run_rounds(t, 3, executor=pool, policy=fh.Resilient(deadline_s=120, faults=faults),
                                callbacks=[let_the_fresh_actor_start], progress=False)
    first = hist[0]
    failed = sorted(int(k) for k in first["failed"])
    assert set(killed) <= set(failed) and filed_once(first), first
    chunks = {k // 2 for k in failed}  # chunks of 2 jobs in client-id order (no stragglers to move last)
    assert failed == sorted(k for k in range(16) if k // 2 in chunks) and len(chunks) <= 2, failed
    assert all("ActorDiedError" in e for e in first["failed"].values()), first["failed"]
    assert first["aggregated"] and first["accepted"] == sorted(set(range(16)) - set(failed))
    # one place has a fresh actor after round 1, and no actor changes after that
    changed = [i for i, (a, b) in enumerate(zip(pool.ids[0], pool.ids[1])) if a != b]
    assert len(changed) == 1 and pool.ids[1] == pool.ids[2] == pool.ids[3], pool.ids
    assert pool.up[0] == [0, 1] and pool.up[2] == [0, 1]  # round 3 hands chunks to the fresh actor too
    for row in hist[1:]:
        assert row["failed"] == {} and row["late"] == [] and row["accepted"] == row["sampled"], row
    assert torch.isfinite(flat(model)).all()


def test_a_late_chunk_is_filed_late_and_the_next_round_runs(ray_cluster, synthetic_train, synthetic_test):
    """A straggler that never answers holds its chunk past the deadline: it is filed late, the
    round ends at the deadline with everyone else, and the next round runs on the same actors."""
    faults, deadline_s = {"slow": 0.2}, 10.0
    seed = seed_with(faults, 8, [1, 0])
    parts = fh.make_partition("iid", synthetic_train[1].numpy()[:400], 8, seed=0)
    t = task(synthetic_train, synthetic_test, parts, client_fraction=1.0, seed=seed,
             config=fh.TrainConfig(model="simple", batch_size=25))
    straggler = fh.assign_faults(range(8), seed, 1, **faults)
    pool = WatchedPool(num_workers=2, chunk_size=1)
    _, hist = fh.run_rounds(t, 2, executor=pool, policy=fh.Resilient(deadline_s=deadline_s, faults=faults),
                            progress=False)
    first, second = hist
    assert set(straggler) <= set(first["late"]) and first["failed"] == {} and filed_once(first), first
    assert first["seconds"] >= deadline_s * 0.99 and first["aggregated"]
    assert len(hist) == 2 and second["failed"] == {} and second["accepted"], second
    assert pool.ids[0] == pool.ids[2]  # nobody died: a late chunk costs time, not an actor


class CountingPool(fh.ActorPool):
    """An ActorPool that counts its starts and stops."""

    starts = stops = 0

    def start(self, *args) -> None:
        self.starts += 1
        super().start(*args)

    def stop(self) -> None:
        self.stops += 1
        super().stop()


def test_kept_running_starts_once_and_restarts_when_the_client_changes(ray_cluster, synthetic_train,
                                                                       synthetic_test, skewed):
    """Two runs with the same pieces share one start; a run with a transform (another client
    function) restarts the pool, so it never trains with the previous run's client. Same bits as
    a fresh pool every time."""
    t = task(synthetic_train, synthetic_test, skewed)
    kept = fh.KeptRunning(CountingPool(num_workers=2))
    try:
        first, _ = fh.run_rounds(t, 2, executor=kept, progress=False)
        again, _ = fh.run_rounds(t, 2, executor=kept, progress=False)
        assert (kept.inner.starts, kept.inner.stops) == (1, 0) and kept.inner.workers  # still up
        clip = fh.ClipUpdate(0.05)
        clipped, _ = fh.run_rounds(t, 2, executor=kept, transform=clip, progress=False)
        assert (kept.inner.starts, kept.inner.stops) == (2, 1)
    finally:
        kept.close()
    assert kept.inner.stops == 2 and not kept.inner.workers
    kept.close()  # a second close does nothing
    assert kept.inner.stops == 2
    reference, _ = fh.run_rounds(t, 2, executor=fh.InProcess(), progress=False)
    reference_clipped, _ = fh.run_rounds(t, 2, executor=fh.InProcess(), transform=clip, progress=False)
    assert same_weights(first, reference) and same_weights(again, reference)
    assert same_weights(clipped, reference_clipped) and not same_weights(clipped, reference)
