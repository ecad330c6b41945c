"""The round engine (`run_rounds`, notebook 05, extended by 06-08): the determinism promise as one
parametrized test over executors x strategies, then each replaceable piece on its own: the task and
config checks, the strict round policy, the client-side transform, the aggregation rule, callbacks,
the history row and its byte counts, `min_clients`, and the loop's own checks.

Expected values come from first principles or from the pieces run by hand, never from a stored run.
Tiny synthetic data and the "simple" model keep every run well under a second of compute; only the
tests that need Ray ask for the session's `ray_cluster`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from conftest import STRAT_KNOBS, flat, fresh, same_weights

import fed_helpers as fh

NUM_CLIENTS, FRACTION, SEED = 8, 0.5, 3
HISTORY_KEYS = {"round", "accuracy", "loss", "train_loss", "drift", "clients", "sampled", "accepted", "failed",
                "late", "rejected", "aggregated", "seconds", "bytes_down", "bytes_up", "bytes_sent"}
EXECUTORS = {  # the actor pool with chunks of one client, so that chunks finish out of order
    "in-process": fh.InProcess, "ray-tasks": fh.RayTasks,
    "actor-pool": lambda: fh.ActorPool(num_workers=2, chunk_size=1),
}


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def data(synthetic_train, synthetic_test):
    """2,000 training samples, split over 8 clients of very different sizes (so that clients on Ray
    finish out of client-id order)."""
    train = (synthetic_train[0][:2000], synthetic_train[1][:2000])
    parts = fh.partition_quantity_skew(train[1].numpy(), NUM_CLIENTS, beta=0.3, min_size=20, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) > 10 * min(sizes)
    return train, synthetic_test, parts


def make_task(data, fraction: float = FRACTION, seed: int = SEED, **cfg) -> fh.FedTask:
    train, test, parts = data
    return fh.FedTask(train, test, parts, fh.TrainConfig(**{"model": "simple", "lr": 0.1, **cfg}), fraction, seed)


@pytest.fixture(scope="module")
def task(data) -> fh.FedTask:
    return make_task(data)


def run(task: fh.FedTask, rounds: int = 2, **kw) -> tuple[torch.nn.Module, list[dict]]:
    return fh.run_rounds(task, rounds, progress=False, **kw)


def untrained(task: fh.FedTask) -> torch.Tensor:
    return flat(fh.make_model(task.config.model, task.seed))


# ----------------------------------------------------------------------------
# The determinism promise
# ----------------------------------------------------------------------------


def wait_for_free_cpus(ray, timeout_s: float = 300.0) -> None:
    """Ray gives a finished run's CPUs back asynchronously (killed actors, leased task workers): on a
    busy machine the next actor pool could otherwise time out waiting for them."""
    end = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0) and time.monotonic() < end:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def in_process_reference(task):
    """{strategy: (final weights, history)} of 2-round runs on InProcess, each computed once."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple[torch.Tensor, list[dict]]:
        if name not in cache:
            model, history = run(task, strategy=fresh(name, NUM_CLIENTS), executor=fh.InProcess())
            cache[name] = (flat(model), history)
        return cache[name]

    return get


@pytest.mark.parametrize("executor", list(EXECUTORS))
@pytest.mark.parametrize("name", list(STRAT_KNOBS))
def test_every_executor_gives_the_in_process_bits(request, task, in_process_reference, executor, name):
    """Same task and seed, faults off: every executor and every strategy gives bit-identical weights and
    the same history rows (timing aside) as a separate in-process run, whatever order clients finish in."""
    if executor != "in-process":
        wait_for_free_cpus(request.getfixturevalue("ray_cluster"))
    model, history = run(task, strategy=fresh(name, NUM_CLIENTS), executor=EXECUTORS[executor]())
    ref_w, ref_history = in_process_reference(name)
    assert torch.equal(flat(model), ref_w)
    assert without_timing(history) == without_timing(ref_history)
    assert not torch.equal(ref_w, untrained(task))  # it did train
    assert all(len(h["sampled"]) == round(FRACTION * NUM_CLIENTS) for h in history)


# ----------------------------------------------------------------------------
# The task and the training config: checked on creation, before any work
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[3, 2000], [-1, 5], [0.0, 1.0], [2**40]], ids=["past-the-end", "negative",
                                                                                "floats", "huge"])
def test_fed_task_refuses_a_partition_outside_the_dataset_by_name(data, monkeypatch, bad):
    train, test, parts = data
    monkeypatch.setattr(fh, "make_model", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(ValueError, match=r"partitions\[1\] must hold integer sample indices in \[0, 1999\] "
                                         r"\(the training set has 2000 samples\)"):
        fh.FedTask(train, test, [parts[0], np.array(bad), *parts[2:]])


@pytest.mark.parametrize(("knobs", "match"), [
    ({"partitions": []}, "partitions must hold at least 1 client"),
    ({"partitions": [np.arange(5), np.arange(0)]}, "partitions must hold at least 1 client, each with at least 1"),
    ({"client_fraction": 0}, r"client_fraction must be a finite number in \(0, 1\]"),
    ({"client_fraction": 1.5}, "client_fraction"),
    ({"client_fraction": float("nan")}, "client_fraction"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": 1.5}, "seed must be an integer >= 0"),
])
def test_fed_task_refuses_bad_knobs_by_name(data, knobs, match):
    train, test, parts = data
    with pytest.raises(ValueError, match=match):
        fh.FedTask(train, test, **{"partitions": parts, **knobs})


@pytest.mark.parametrize(("knob", "value", "match"), [
    ("lr", float("nan"), r"lr must be a finite number in \(0, inf\), got nan"),
    ("lr", float("inf"), r"lr must be a finite number in \(0, inf\), got inf"),
    ("lr", -math.inf, r"lr must be a finite number in \(0, inf\), got -inf"),
    ("lr", 0, r"lr must be a finite number in \(0, inf\), got 0"),
    ("momentum", float("nan"), r"momentum must be a finite number in \[0, 1\), got nan"),
    ("momentum", float("inf"), r"momentum must be a finite number in \[0, 1\)"),
    ("momentum", 1.0, r"momentum must be a finite number in \[0, 1\), got 1.0"),
    ("weight_decay", float("nan"), r"weight_decay must be a finite number in \[0, inf\), got nan"),
    ("weight_decay", float("inf"), r"weight_decay must be a finite number in \[0, inf\), got inf"),
    ("weight_decay", -1, r"weight_decay must be a finite number in \[0, inf\), got -1"),
    ("epochs", 0, "epochs must be an integer >= 1"),
    ("epochs", 1.5, "epochs must be an integer >= 1"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("model", "resnet", "model must be one of"),
])
def test_train_config_refuses_bad_knobs_by_name(knob, value, match):
    with pytest.raises(ValueError, match=match):
        fh.TrainConfig(**{"model": "simple", knob: value})


def test_train_config_is_frozen():
    cfg = fh.TrainConfig("simple", lr=0.1)
    with pytest.raises(AttributeError):
        cfg.lr = 10.0


# ----------------------------------------------------------------------------
# The loop: what it returns, one round by hand
# ----------------------------------------------------------------------------


def test_history_and_learning(data, synthetic_test):
    task = make_task(data, fraction=1.0)
    model, history = run(task, 3)
    assert isinstance(model, fh.SimpleNN) and [h["round"] for h in history] == [1, 2, 3]
    for h in history:
        assert set(h) == HISTORY_KEYS
        assert h["sampled"] == h["accepted"] == list(range(NUM_CLIENTS)) and h["clients"] == NUM_CLIENTS
        assert h["failed"] == {} and h["late"] == [] and h["rejected"] == {} and h["aggregated"]
        assert 0 <= h["accuracy"] <= 1 and h["seconds"] >= 0 and h["drift"] > 0
        assert math.isfinite(h["loss"]) and math.isfinite(h["train_loss"])
    assert (history[-1]["loss"], history[-1]["accuracy"]) == fh.evaluate(model, *synthetic_test)  # the model returned
    assert history[-1]["loss"] < history[0]["loss"] < fh.evaluate(fh.make_model("simple", SEED), *synthetic_test)[0]
    assert history[-1]["accuracy"] > 0.2  # chance is 0.1


def test_one_round_is_the_weighted_mean_of_the_clients_by_hand(task, data):
    """One round: each sampled client's `train_client` from the global weights, then the sample-weighted
    mean, in client-id order; the same bits as notebook 04's `client_update` and `fedavg`."""
    model, history = run(task, 1)
    train, _, parts = data
    x_all, y_all = train[0].numpy(), train[1].numpy()
    w0 = untrained(task)
    clients = fh.sample_clients(NUM_CLIENTS, FRACTION, SEED, 1)
    jobs = [fh.ClientJob(int(k), 1, parts[k], fh.client_seed(SEED, 1, int(k))) for k in clients]
    results = [fh.train_client(fh.make_model("simple"), w0.numpy(), x_all, y_all, j, task.config) for j in jobs]
    assert torch.equal(flat(model), fh.weighted_mean(results, w0).float())
    start = fh.make_model("simple", SEED).state_dict()
    updates = [fh.client_update(start, x_all, y_all, j.indices, "simple", 1, 32, 0.1, j.seed) for j in jobs]
    assert same_weights(model, fh.load_weights(fh.make_model("simple"), fh.fedavg([u[0] for u in updates],
                                                                                    [u[1] for u in updates])))
    n = sum(r.num_samples for r in results)
    assert history[0]["train_loss"] == pytest.approx(sum(r.num_samples * r.loss for r in results) / n)
    assert history[0]["drift"] == fh.client_drift(results, w0)
    assert history[0]["sampled"] == [int(k) for k in clients] and len(clients) == round(FRACTION * NUM_CLIENTS)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_partial_participation_counts(data, fraction):
    _, history = run(make_task(data, fraction=fraction))
    expected = max(1, round(fraction * NUM_CLIENTS))
    assert [h["clients"] for h in history] == [expected, expected]
    for rnd, h in enumerate(history, 1):
        assert h["sampled"] == [int(k) for k in fh.sample_clients(NUM_CLIENTS, fraction, SEED, rnd)]


def test_seeds(data):
    a, _ = run(make_task(data, seed=0), 1)
    b, _ = run(make_task(data, seed=0), 1)
    c, _ = run(make_task(data, seed=1), 1)
    assert same_weights(a, b) and not same_weights(a, c)


class NeverStart:
    """An executor that fails the test if the loop starts it."""

    name = "never"

    def start(self, *args):
        pytest.fail("the executor started before the knobs were checked")

    def stop(self):
        pass


@pytest.mark.parametrize("rounds", [0, -1, 1.5, "3", None])
def test_run_rounds_validates_rounds_before_any_work(task, monkeypatch, rounds):
    monkeypatch.setattr(fh, "make_model", lambda *a, **k: pytest.fail("a model was made before the check"))
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        run(task, rounds, executor=NeverStart())


# ----------------------------------------------------------------------------
# The round policy: strict by default; min_clients
# ----------------------------------------------------------------------------


def fail_client_1(new_w: np.ndarray, global_w: np.ndarray, job: fh.ClientJob) -> np.ndarray:
    """A client-side transform that raises on client 1 (a client with a bug)."""
    if job.cid == 1:
        raise ValueError("boom")
    return new_w


def test_the_strict_policy_raises_on_a_failed_client_and_stops_the_executor(data):
    task, executor = make_task(data, fraction=1.0), fh.InProcess()
    with pytest.raises(RuntimeError, match=r"client 1 is failed: ValueError: boom \(RoundPolicy stops the run"):
        run(task, transform=fail_client_1, executor=executor)
    assert executor.x_all is None  # stopped: however the loop ends, no leaked workers
    with pytest.raises(RuntimeError, match="client 0 is late"):
        run(task, policy=fh.RoundPolicy(deadline_s=1e-9))
    # notebook 08's policy leaves the client out instead
    _, history = run(task, transform=fail_client_1, policy=fh.Resilient(deadline_s=None, max_norm_ratio=None))
    assert all(h["failed"] == {"1": "ValueError: boom"} and 1 not in h["accepted"] for h in history)


@pytest.mark.parametrize(("knobs", "match"), [
    ({"min_clients": 0}, "min_clients must be an integer >= 1"),
    ({"min_clients": 2.5}, "min_clients must be an integer >= 1"),
    ({"deadline_s": 0}, r"deadline_s must be a finite number in \(0, inf\)"),
    ({"deadline_s": float("nan")}, "deadline_s"),
    ({"deadline_s": float("inf")}, "deadline_s"),
])
def test_round_policy_refuses_bad_knobs_by_name(knobs, match):
    with pytest.raises(ValueError, match=match):
        fh.RoundPolicy(**knobs)


def test_min_clients_keeps_the_model(task):
    sampled = round(FRACTION * NUM_CLIENTS)
    model, history = run(task, policy=fh.RoundPolicy(min_clients=sampled + 1))
    assert torch.equal(flat(model), untrained(task))
    for h in history:
        assert not h["aggregated"] and h["train_loss"] is None and h["drift"] is None
        assert h["clients"] == len(h["accepted"]) == sampled  # they answered; too few to aggregate
    untrained_eval = fh.evaluate(fh.make_model("simple", SEED), *task.test)
    assert all((h["loss"], h["accuracy"]) == untrained_eval for h in history)
    model, history = run(task, policy=fh.RoundPolicy(min_clients=sampled))
    assert all(h["aggregated"] for h in history) and not torch.equal(flat(model), untrained(task))
    with pytest.raises(ValueError, match=rf"min_clients must be in \[1, {NUM_CLIENTS}\]"):
        run(task, policy=fh.RoundPolicy(min_clients=NUM_CLIENTS + 1), executor=NeverStart())


# ----------------------------------------------------------------------------
# The update pipeline: a client-side transform, a server-side aggregation rule
# ----------------------------------------------------------------------------


def half_step(new_w: np.ndarray, global_w: np.ndarray, job: fh.ClientJob) -> np.ndarray:
    """A transform that halves the client's update."""
    return global_w + np.float32(0.5) * (new_w - global_w)


@pytest.mark.parametrize("executor", ["in-process", "ray-tasks"])
def test_a_transform_that_sends_the_global_weights_makes_the_round_a_no_op(request, task, executor):
    if executor != "in-process":
        request.getfixturevalue("ray_cluster")  # there the transform runs in the Ray worker, with the client

    def send_global(new_w, global_w, job):  # defined here, so that Ray ships it by value (not by module)
        """Throw the client's training away: every client sends the global weights back."""
        return global_w

    model, history = run(task, transform=send_global, executor=EXECUTORS[executor]())
    assert torch.equal(flat(model), untrained(task))
    assert all(h["aggregated"] and h["drift"] == 0.0 and math.isfinite(h["train_loss"]) for h in history)


def test_the_transform_runs_on_each_client_and_changes_what_is_aggregated(task):
    calls = []

    def spy(new_w, global_w, job):
        calls.append((job.round, job.cid, new_w.dtype, global_w.dtype, new_w.shape))
        return half_step(new_w, global_w, job)

    model, _ = run(task, 1, transform=spy)
    n = untrained(task).numel()
    clients = fh.sample_clients(NUM_CLIENTS, FRACTION, SEED, 1)
    assert calls == [(1, int(k), np.float32, np.float32, (n,)) for k in clients]
    plain, _ = run(task, 1)
    w0 = untrained(task)
    torch.testing.assert_close(flat(model), w0 + 0.5 * (flat(plain) - w0), rtol=0, atol=1e-6)
    assert not torch.equal(flat(model), flat(plain))


def test_a_custom_aggregate_is_used(task, data):
    seen = []

    def first_client(results, global_w, jobs):
        seen.append(([r.cid for r in results], global_w.clone(), [(j.cid, j.round) for j in jobs]))
        return torch.tensor(results[0].weights, dtype=torch.float64)

    model, history = run(task, 1, aggregate=first_client)
    clients = [int(k) for k in fh.sample_clients(NUM_CLIENTS, FRACTION, SEED, 1)]
    assert len(seen) == 1 and seen[0][0] == clients and torch.equal(seen[0][1], untrained(task))
    assert seen[0][2] == [(k, 1) for k in clients]  # the rule also sees who was asked, and in which round
    train, _, parts = data
    job = fh.ClientJob(clients[0], 1, parts[clients[0]], fh.client_seed(SEED, 1, clients[0]))
    first = fh.train_client(fh.make_model("simple"), untrained(task).numpy(), train[0].numpy(), train[1].numpy(),
                            job, task.config)
    assert torch.equal(flat(model), torch.from_numpy(first.weights))
    assert history[0]["aggregated"] and history[0]["accepted"] == clients


# ----------------------------------------------------------------------------
# Callbacks and the history row's bytes
# ----------------------------------------------------------------------------


def test_callbacks_get_the_history_after_every_round(task):
    seen_a, seen_b = [], []
    _, history = run(task, 3, callbacks=[lambda h: seen_a.append([dict(r) for r in h]),
                                         lambda h: seen_b.append(len(h))])
    assert [len(h) for h in seen_a] == seen_b == [1, 2, 3]
    assert seen_a[-1] == history and seen_a[0][0] == history[0]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold"])
def test_bytes_sent_is_down_plus_up_as_serialized(task, name):
    """bytes_down: the weights and the strategy's payload to every sampled client; bytes_up: every answer
    that arrived; each as `wire_size` measures it (pickle protocol 5, as Ray sends it)."""
    answers, payloads = [], []
    strategy = fresh(name, NUM_CLIENTS)
    real_payload = strategy.payload

    def payload(cid, global_w):
        payloads.append(real_payload(cid, global_w))
        return payloads[-1]

    def capture(results, global_w, jobs):
        answers.append(list(results))
        return fh.weighted_mean(results, global_w, jobs)

    strategy.payload = payload
    _, history = run(task, strategy=strategy, aggregate=capture)
    n = untrained(task).numel()
    per_weights = fh.wire_size(np.zeros(n, np.float32))
    assert per_weights >= 4 * n
    sampled = round(FRACTION * NUM_CLIENTS)
    for rnd, (h, results) in enumerate(zip(history, answers)):
        sent = payloads[rnd * sampled : (rnd + 1) * sampled]
        assert h["bytes_down"] == sampled * per_weights + sum(fh.wire_size(p) for p in sent)
        assert h["bytes_up"] == sum(fh.wire_size(r) for r in results) > sampled * 4 * n
        assert h["bytes_sent"] == h["bytes_down"] + h["bytes_up"]
    if name == "scaffold":  # its payload, the correction c - c_i, is as big as the weights
        assert history[0]["bytes_down"] >= 2 * sampled * 4 * n
