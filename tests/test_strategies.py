"""Notebook 06_client_drift's strategies (FedProx, FedAvgM, FedAdam, FedYogi, SCAFFOLD) on the round
engine of 05, and the pieces of 01/02 that 06 introduced (LeNet5, partition_classes).

Expected values are computed by hand (or in NumPy, next to the formula) wherever possible; SCAFFOLD
is also checked against a convex case whose answer is known (least squares on heterogeneous clients).
The runs use small synthetic data, the "simple" model, 1-4 clients and 1-3 rounds, in this process:
that every executor gives the same bits for every strategy is tests/test_engine.py's business.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import STRAT_KNOBS, flat, fresh, same_weights

import fed_helpers as fh

NAMES = sorted(STRAT_KNOBS)
NUM_CLIENTS = 4
# 3 of 4 clients per round (client_fraction < 1 exercises sampling and SCAFFOLD's store), with local
# momentum and weight decay, so that they travel with every strategy too.
CFG = fh.TrainConfig("simple", epochs=1, batch_size=20, lr=0.05, momentum=0.5, weight_decay=1e-4)
PLAIN = fh.TrainConfig("simple", epochs=1, batch_size=20, lr=0.05)
ROUNDS, FRACTION, SEED = 2, 0.75, 3


@pytest.fixture(scope="module")
def parts(synthetic_train):
    """4 label-skewed clients (2 label-sorted shards each) over the first 400 training samples."""
    out = fh.make_partition("shards", synthetic_train[1][:400].numpy(), NUM_CLIENTS, seed=0, shards_per_client=2)
    assert sum(len(p) for p in out) == 400
    return out


def task(train, test, parts, cfg=CFG, fraction=FRACTION, seed=SEED) -> fh.FedTask:
    return fh.FedTask(train, test, parts, cfg, fraction, seed)


def run(strategy, train, test, parts, rounds=ROUNDS, **task_knobs):
    """run_rounds in this process, quietly."""
    return fh.run_rounds(task(train, test, parts, **task_knobs), rounds, strategy=strategy, progress=False)


@pytest.fixture(scope="module")
def floor(synthetic_train, synthetic_test, parts):
    """Each strategy (with its STRAT_KNOBS) run once per module with CFG, in this process."""
    cache: dict[str, tuple[nn.Module, list[dict]]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = run(fresh(name, NUM_CLIENTS), synthetic_train, synthetic_test, parts)
        return cache[name]

    return get


# ----------------------------------------------------------------------------
# make_strategy and knob checking
# ----------------------------------------------------------------------------


def test_registry_holds_every_strategy_by_name():
    assert set(fh.STRATEGIES) == set(STRAT_KNOBS)  # a new strategy must be added to conftest's STRAT_KNOBS
    for name in NAMES:
        s = fresh(name, NUM_CLIENTS)
        assert type(s) is fh.STRATEGIES[name] and s.name == name
        assert isinstance(s, fh.FedAvg)


def test_make_strategy_sets_its_knobs(tmp_path):
    adam = fh.make_strategy("fedadam", server_lr=0.03, beta1=0.5, beta2=0.75, tau=0.25)
    assert (adam.server_lr, adam.beta1, adam.beta2, adam.tau) == (0.03, 0.5, 0.75, 0.25)
    assert fh.make_strategy("fedprox", mu=0.2).mu == 0.2
    assert fh.make_strategy("fedprox", mu=0).mu == 0.0  # mu = 0 is allowed: it is FedAvg
    avgm = fh.make_strategy("fedavgm", server_lr=0.5, momentum=0.0)  # momentum's lower end is allowed
    assert (avgm.server_lr, avgm.momentum) == (0.5, 0.0)
    sc = fh.make_strategy("scaffold", 7, server_lr=0.5, state_dir=tmp_path / "s")
    assert (sc.num_clients, sc.server_lr, sc.store.folder) == (7, 0.5, tmp_path / "s")
    assert (tmp_path / "s").is_dir()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("name", "num_clients", "knobs", "match"),
    [
        ("fedsgd", 1, {}, r"strategy must be one of \['fedadam', 'fedavg', 'fedavgm', 'fedprox', 'fedyogi', "
                          r"'scaffold'\], got 'fedsgd'"),
        ("fedprox", 1, {"momentum": 0.9}, r"strategy 'fedprox' takes the knobs \['mu'\], got unknown \['momentum'\]"),
        ("fedadam", 1, {"mu": 0.1, "beta3": 0.5}, r"takes the knobs .*'tau'.*got unknown \['beta3', 'mu'\]"),
        ("fedprox", 1, {"mu": -0.1}, r"mu must be a finite number in \[0, inf\), got -0.1"),
        ("fedprox", 1, {"mu": "0.1"}, r"mu must be a finite number in \[0, inf\)"),
        ("fedprox", 1, {"mu": True}, r"mu must be a finite number in \[0, inf\), got True"),
        ("fedprox", 1, {"mu": NAN}, r"mu must be a finite number in \[0, inf\), got nan"),
        ("fedprox", 1, {"mu": INF}, r"mu must be a finite number in \[0, inf\), got inf"),
        ("fedavgm", 1, {"server_lr": -0.5}, r"server_lr must be a finite number in \(0, inf\), got -0.5"),
        ("fedavgm", 1, {"momentum": 1}, r"momentum must be a finite number in \[0, 1\), got 1"),
        ("fedavgm", 1, {"momentum": -0.1}, r"momentum must be a finite number in \[0, 1\)"),
        ("fedavgm", 1, {"momentum": NAN}, r"momentum must be a finite number in \[0, 1\), got nan"),
        ("fedadam", 1, {"beta1": 1}, r"beta1 must be a finite number in \[0, 1\), got 1"),
        ("fedyogi", 1, {"beta2": 1.0}, r"beta2 must be a finite number in \[0, 1\), got 1.0"),
        ("fedyogi", 1, {"beta2": -INF}, r"beta2 must be a finite number in \[0, 1\), got -inf"),
        ("fedadam", 1, {"tau": 0}, r"tau must be a finite number in \(0, inf\), got 0"),
        ("fedadam", 1, {"tau": INF}, r"tau must be a finite number in \(0, inf\), got inf"),
        ("scaffold", 0, {}, r"num_clients must be an integer >= 1, got 0"),
        ("scaffold", 2.5, {}, r"num_clients must be an integer >= 1, got 2.5"),
        ("scaffold", 3, {"server_lr": -1}, r"server_lr must be a finite number in \(0, inf\), got -1"),
    ],
)
def test_make_strategy_rejects_bad_names_and_knobs(name, num_clients, knobs, match):
    with pytest.raises(ValueError, match=match):
        fh.make_strategy(name, num_clients, **knobs)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "scaffold"])
@pytest.mark.parametrize("server_lr", [0, 0.0, NAN, INF, -INF])
def test_server_lr_must_be_positive_and_finite(name, server_lr):
    """A server learning rate of 0 would never move the model; NaN or inf would wreck it. Both are
    refused by name when the strategy is made, before any work."""
    with pytest.raises(ValueError, match=rf"^server_lr must be a finite number in \(0, inf\), got {server_lr!r}$"):
        fh.make_strategy(name, 2, server_lr=server_lr)


@pytest.mark.parametrize("knobs", [{"mu": 0.1}, {"kwargs": 1}, {"args": 1}])
def test_make_strategy_fedavg_takes_no_knobs(knobs):
    """FedAvg has no knobs: any knob is a ValueError that lists none allowed (not
    object.__init__'s `args`/`kwargs`, and no TypeError from FedAvg(kwargs=1))."""
    match = r"strategy 'fedavg' takes the knobs \[\], got unknown \['" + next(iter(knobs))
    with pytest.raises(ValueError, match=match):
        fh.make_strategy("fedavg", **knobs)


# ----------------------------------------------------------------------------
# FedProx
# ----------------------------------------------------------------------------


def tiny_model_with_grads() -> tuple[nn.Module, list[torch.Tensor]]:
    """nn.Linear(2, 2) with weights [[1, 2], [3, 4]], bias [5, 6] and gradients set to known values."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model.bias.copy_(torch.tensor([5.0, 6.0]))
    grads = [torch.tensor([[0.5, -0.5], [1.0, 0.0]]), torch.tensor([0.25, -1.0])]
    model.weight.grad, model.bias.grad = grads[0].clone(), grads[1].clone()
    return model, grads


def test_split_like_gives_views_shaped_like_the_parameters():
    model, _ = tiny_model_with_grads()
    w = torch.arange(6, dtype=torch.float32)
    weight, bias = fh.split_like(model, w)
    assert torch.equal(weight, torch.tensor([[0.0, 1.0], [2.0, 3.0]])) and torch.equal(bias, torch.tensor([4.0, 5.0]))
    w[5] = -1.0
    assert bias[1] == -1.0  # a view, not a copy


def test_prox_hook_adds_mu_times_distance_to_global_by_hand():
    model, _ = tiny_model_with_grads()
    global_w = torch.tensor([0.0, 2.0, 5.0, 4.0, 1.0, 6.0])  # weight row-major, then bias
    hook = fh.prox_hook(model, global_w, mu=0.5)
    hook()
    # grad + 0.5 * (w - w_global): w - w_global = [[1, 0], [-2, 0]], [4, 0]
    assert torch.equal(model.weight.grad, torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
    assert torch.equal(model.bias.grad, torch.tensor([2.25, -1.0]))
    hook()  # it adds again on every call (train_local zeroes the gradients between steps)
    assert torch.equal(model.bias.grad, torch.tensor([4.25, -1.0]))
    assert torch.equal(global_w, torch.tensor([0.0, 2.0, 5.0, 4.0, 1.0, 6.0]))  # the anchor is left alone


def test_fedprox_payload_is_its_hook_and_mu():
    assert fh.FedProx(mu=0.25).payload(3, torch.zeros(2)) == (fh.prox_hook, 0.25)
    assert fh.FedAvg().payload(3, torch.zeros(2)) is None


def test_fedprox_mu_zero_equals_fedavg_bit_for_bit(synthetic_train, synthetic_test, parts, floor):
    avg_model, avg_hist = floor("fedavg")
    model, hist = run(fh.make_strategy("fedprox", mu=0.0), synthetic_train, synthetic_test, parts)
    assert same_weights(model, avg_model)
    assert [h["accuracy"] for h in hist] == [h["accuracy"] for h in avg_hist]


def test_fedprox_client_stays_closer_to_global_than_fedavg(synthetic_train):
    """One client trained by train_client from the same weights with the same seed: the prox term
    must pull it back toward the global weights. (train_client's parameters are views of the
    weights vector it gives the hook: the anchor must not move with them.)"""
    x, y = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    w0 = fh.flat_weights(fh.make_model("simple", 1)).numpy()
    cfg = fh.TrainConfig("simple", epochs=2, batch_size=16, lr=0.05)
    dist = {}
    for mu in (0.0, 1.0):
        job = fh.ClientJob(0, 1, np.arange(300), seed=7, payload=(fh.prox_hook, mu))
        dist[mu] = float(np.linalg.norm(fh.train_client(fh.make_model("simple"), w0, x, y, job, cfg).weights - w0))
    assert dist[0.0] > 0
    assert dist[1.0] < 0.9 * dist[0.0], f"FedProx(mu=1) moved {dist[1.0]:.4f}, FedAvg {dist[0.0]:.4f}"


def test_fedprox_lowers_drift(synthetic_train, synthetic_test, parts):
    """Same as above, seen through the engine's drift (the clients' spread)."""
    _, avg = run(fh.FedAvg(), synthetic_train, synthetic_test, parts, cfg=PLAIN)
    _, prox = run(fh.FedProx(mu=5.0), synthetic_train, synthetic_test, parts, cfg=PLAIN)
    assert all(a["drift"] > 0 for a in avg)
    for a, b in zip(avg, prox):
        assert b["drift"] < 0.8 * a["drift"], (b["drift"], a["drift"])


# ----------------------------------------------------------------------------
# FedAvgM
# ----------------------------------------------------------------------------


def test_fedavgm_momentum_zero_lr_one_equals_fedavg_bit_for_bit(synthetic_train, synthetic_test, parts, floor):
    avg_model, avg_hist = floor("fedavg")
    model, hist = run(fh.make_strategy("fedavgm", server_lr=1.0, momentum=0.0), synthetic_train, synthetic_test,
                      parts)
    assert same_weights(model, avg_model)
    assert [h["accuracy"] for h in hist] == [h["accuracy"] for h in avg_hist]


def test_fedavgm_server_step_two_rounds_by_hand():
    s = fh.FedAvgM(server_lr=0.5, momentum=0.5)
    w0 = torch.tensor([0.0, 1.0, -2.0])
    # round 1: delta = avg - w = [1, 0, 2]; m = delta; w = w + 0.5 m
    w1 = s.server_step(w0, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert w1.dtype == torch.float32
    assert torch.equal(w1, torch.tensor([0.5, 1.0, -1.0]))
    # round 2: delta = [0.5, 3, -1] - w1 = [0, 2, 0]; m = 0.5 * [1, 0, 2] + delta = [0.5, 2, 1]
    w2 = s.server_step(w1, torch.tensor([0.5, 3.0, -1.0], dtype=torch.float64))
    assert torch.equal(s.m, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    assert torch.equal(w2, torch.tensor([0.75, 2.0, -0.5]))
    assert torch.equal(w0, torch.tensor([0.0, 1.0, -2.0]))  # the input is not changed in place
    s.reset()  # a new run: the momentum is forgotten
    assert s.m is None and (s.server_lr, s.momentum) == (0.5, 0.5)


def test_fedavgm_neutral_server_step_returns_the_mean_bit_for_bit():
    """The smallest case behind the failure above: momentum 0 and server_lr 1 must return
    avg.to(float32), as FedAvg does. (BUG: w + 1 * (avg - w) in float64 rounds avg - w when
    |w| > |avg|, and rounding that to float32 lands 1 ulp off.)"""
    w = torch.tensor([0.0013342542806640267, 0.0008407916757278144])  # exact float32 values
    avg = torch.tensor([0.0003779668913921341, -0.00012003500523860561], dtype=torch.float64)
    expected = fh.FedAvg().server_step(w, avg)
    assert torch.equal(expected, avg.to(torch.float32))
    assert torch.equal(fh.FedAvgM(server_lr=1.0, momentum=0.0).server_step(w, avg), expected)


# ----------------------------------------------------------------------------
# FedAdam, FedYogi
# ----------------------------------------------------------------------------


def reddi_numpy(name, w0, avgs, lr, b1, b2, tau):
    """Reddi et al. (2021), Algorithm 2, without bias correction: returns the weights after each step."""
    w, m, v, out = np.float32(w0), np.zeros(len(w0)), np.full(len(w0), tau**2), []
    for avg in avgs:
        d = np.asarray(avg, np.float64) - w.astype(np.float64)
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        w = (w + lr * m / (np.sqrt(v) + tau)).astype(np.float32)
        out.append((w, m.copy(), v.copy()))
    return out


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_step_matches_numpy_over_three_steps(name):
    knobs = dict(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    s = fh.make_strategy(name, **knobs)
    w0 = np.array([0.0, 1.0, -2.0, 0.5], np.float32)
    # coordinate 1 never moves (delta 0), coordinate 3 gets a small delta (delta^2 < v after step 1)
    avgs = [np.array([0.5, 1.0, -1.0, 0.51]), np.array([0.2, 1.0, -3.0, 0.5]), np.array([1.5, 1.0, -0.5, 0.48])]
    expected = reddi_numpy(name, w0, avgs, knobs["server_lr"], knobs["beta1"], knobs["beta2"], knobs["tau"])
    w = torch.from_numpy(w0)
    for avg, (w_ref, m_ref, v_ref) in zip(avgs, expected):
        w = s.server_step(w, torch.from_numpy(avg))
        assert w.dtype == torch.float32
        np.testing.assert_allclose(s.m.numpy(), m_ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(s.v.numpy(), v_ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-7)
    assert w[1] == 1.0  # no update, no move
    # by hand, step 1 of coordinate 0: d = 0.5, m = 0.05, v = 0.99 * 0.01 + 0.01 * 0.25 (Adam)
    v1 = 0.0124 if name == "fedadam" else 0.01 + 0.0025
    np.testing.assert_allclose(expected[0][0][0], 0.1 * 0.05 / (math.sqrt(v1) + 0.1), rtol=1e-6)


def test_yogi_differs_from_adam_only_in_the_second_moment_by_hand():
    knobs = dict(server_lr=1.0, beta1=0.5, beta2=0.75, tau=0.5)  # v starts at tau^2 = 0.25
    adam, yogi = fh.FedAdam(**knobs), fh.FedYogi(**knobs)
    w = torch.zeros(3)
    avg = torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64)  # delta^2 = 1 > v, 1/16 < v, 0
    wa, wy = adam.server_step(w, avg), yogi.server_step(w, avg)
    assert torch.equal(adam.m, yogi.m)
    # Adam: v = 0.75 v + 0.25 d^2;  Yogi: v = v - 0.25 d^2 sign(v - d^2)
    assert torch.equal(adam.v, torch.tensor([0.4375, 0.203125, 0.1875], dtype=torch.float64))
    assert torch.equal(yogi.v, torch.tensor([0.5, 0.234375, 0.25], dtype=torch.float64))
    # where d^2 > v Yogi's v grows by (1 - beta2) d^2 and ends above Adam's: a smaller step
    assert yogi.v[0] > adam.v[0] and abs(wy[0]) < abs(wa[0])
    np.testing.assert_allclose(wy.numpy(), [0.5 / (math.sqrt(0.5) + 0.5), 0.125 / (math.sqrt(0.234375) + 0.5), 0.0],
                               rtol=1e-6)


# ----------------------------------------------------------------------------
# SCAFFOLD
# ----------------------------------------------------------------------------


def test_correction_hook_adds_c_minus_c_i_by_hand():
    model, grads = tiny_model_with_grads()
    correction = np.array([1.0, -1.0, 0.5, 0.0, -0.25, 2.0], np.float32)  # c - c_i, row-major weight then bias
    before = fh.flat_weights(model)
    hook = fh.correction_hook(model, before, correction)
    hook()
    assert torch.equal(model.weight.grad, torch.tensor([[1.5, -1.5], [1.5, 0.0]]))
    assert torch.equal(model.bias.grad, torch.tensor([0.0, 1.0]))
    assert torch.equal(fh.flat_weights(model), before)  # only gradients change
    correction.setflags(write=False)  # as an array from Ray arrives: the hook keeps its own copy
    fh.correction_hook(model, before, correction)()


def test_scaffold_receive_and_server_update_by_hand(tmp_path):
    """The paper's case, every client weighing the same (receive without a sample count)."""
    s = fh.Scaffold(num_clients=4, server_lr=0.5, state_dir=tmp_path)
    w_g = torch.tensor([1.0, 2.0, 3.0])
    first = s.payload(1, w_g)
    assert first[0] is fh.correction_hook and np.array_equal(first[1], np.zeros(3, np.float32))  # c = c_i = 0
    s.c = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    s.store.put(1, np.array([0.5, 0.0, 1.0], np.float32))
    assert np.array_equal(s.payload(1, w_g)[1], np.array([0.5, 2.0, -2.0], np.float32))  # c - c_1
    assert np.array_equal(s.payload(3, w_g)[1], np.array([1.0, 2.0, -1.0], np.float32))  # c - 0
    # client 1: K = 4 steps of lr 0.25 -> K * lr = 1; w_g - w_k = [1, -2, 0.5]
    s.receive(1, w_g, torch.tensor([0.0, 4.0, 2.5]), 4, 0.25)
    # c_1+ = c_1 - c + (w_g - w_k) / (K lr) = [0.5, 0, 1] - [1, 2, -1] + [1, -2, 0.5]
    assert np.array_equal(s.store.get(1, None), np.array([0.5, -4.0, 2.5], np.float32))
    # client 3: K = 8 steps of lr 0.5 -> K * lr = 4; w_g - w_k = [2, 0, -1] * 4
    s.receive(3, w_g, torch.tensor([-7.0, 2.0, 7.0]), 8, 0.5)
    assert np.array_equal(s.store.get(3, None), np.array([1.0, -2.0, 0.0], np.float32))  # 0 - c + [2, 0, -1]
    assert torch.equal(s.c, torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))  # c moves at server_step only
    new_w = s.server_step(w_g, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    # sum of c_i+ - c_i = [0, -4, 1.5] + [1, -2, 0] = [1, -6, 1.5]; c += that / num_clients (4, not 2 sampled)
    assert torch.equal(s.c, torch.tensor([1.25, 0.5, -0.625], dtype=torch.float64))
    assert torch.equal(new_w, torch.tensor([2.0, 2.0, 1.5]))  # w + 0.5 (avg - w)
    s.server_step(new_w, new_w.double())  # a round without receive leaves c alone
    assert torch.equal(s.c, torch.tensor([1.25, 0.5, -0.625], dtype=torch.float64))
    assert np.array_equal(s.payload(1, w_g)[1], np.array([0.75, 4.5, -3.125], np.float32))  # new c - c_1+
    assert len(s.store) == 2


def test_scaffold_weighs_control_variates_by_samples_by_hand():
    """With sample counts, c moves by (sampled / num_clients) x the sample-weighted mean of the
    c_i+ - c_i: the weights the engine averages the models with."""
    s = fh.Scaffold(num_clients=4)
    w_g = torch.tensor([1.0, 2.0, 3.0])
    s.payload(1, w_g), s.payload(3, w_g)  # c = 0
    s.receive(1, w_g, torch.tensor([0.0, 4.0, 2.5]), 4, 0.25, num_samples=1)  # c_1+ - c_1 = [1, -2, 0.5]
    s.receive(3, w_g, torch.tensor([-7.0, 2.0, 7.0]), 8, 0.5, num_samples=3)  # c_3+ - c_3 = [2, 0, -1]
    assert np.array_equal(s.store.get(3, None), np.array([2.0, 0.0, -1.0], np.float32))  # c_i+: weights don't matter
    new_w = s.server_step(w_g, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    # (2 of 4 clients) x (1 [1, -2, 0.5] + 3 [2, 0, -1]) / 4 samples = 0.5 x [7, -2, -2.5] / 4
    assert torch.equal(s.c, torch.tensor([0.875, -0.25, -0.3125], dtype=torch.float64))
    assert torch.equal(new_w, torch.tensor([3.0, 2.0, 0.0]))  # server_lr 1: the mean, bit for bit
    assert s.seen == [0, 0] and s.dc_sum is None  # ready for the next round
    s.reset()  # a new run forgets c and every c_i
    assert s.c is None and len(s.store) == 0


def test_scaffold_one_client_first_round_is_local_sgd(synthetic_train, synthetic_test):
    idx = np.arange(150)
    s = fh.Scaffold(num_clients=1)
    cfg = fh.TrainConfig("simple", epochs=1, batch_size=32, lr=0.05)
    model, hist = fh.run_rounds(fh.FedTask(synthetic_train, synthetic_test, [idx], cfg, 1.0, 9), 1, strategy=s,
                                progress=False)
    ref = fh.make_model("simple", 9)
    w0 = fh.flat_weights(ref)
    with fh.torch_threads(1):
        fh.train_local(ref, synthetic_train[0][idx], synthetic_train[1][idx], 1, 32, 0.05, fh.client_seed(9, 1, 0))
    w1 = fh.flat_weights(ref)
    assert not torch.equal(w0, w1)
    assert torch.equal(fh.flat_weights(model), w1)
    assert hist[0]["drift"] == 0.0
    # c_1+ = (w0 - w1) / (K lr) with K = ceil(150 / 32) = 5 steps; c = c_1+ (one client, all the samples)
    expected = (w0.double() - w1.double()) / (5 * 0.05)
    np.testing.assert_allclose(s.store.get(0, None), expected.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.c.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)


def test_engine_gives_scaffold_the_sample_counts(synthetic_train, synthetic_test):
    """Through run_rounds, c after round 1 is the sample-weighted mean of the clients' c_i."""
    parts = [np.arange(0, 30), np.arange(30, 120)]
    s = fh.Scaffold(2)
    fh.run_rounds(fh.FedTask(synthetic_train, synthetic_test, parts, PLAIN, 1.0, 0), 1, strategy=s, progress=False)
    c_0, c_1 = (torch.from_numpy(s.store.get(k, None)).double() for k in (0, 1))
    assert not torch.allclose(c_0, c_1)
    np.testing.assert_allclose(s.c.numpy(), ((30 * c_0 + 90 * c_1) / 120).numpy(), rtol=1e-5, atol=1e-8)


def find_skipping_client(num_clients, fraction):
    """(seed, client) where the client is sampled in round 1, not in round 2, and again in round 3."""
    for seed in range(1000):
        r1, r2, r3 = (set(fh.sample_clients(num_clients, fraction, seed, r).tolist()) for r in (1, 2, 3))
        for cid in sorted((r1 - r2) & r3):
            return seed, cid, (r1, r2, r3)
    raise AssertionError("no such seed")


def test_scaffold_state_persists_for_a_client_that_skips_a_round(synthetic_train, synthetic_test, parts):
    seed, cid, sampled = find_skipping_client(NUM_CLIENTS, 0.5)
    s = fh.Scaffold(NUM_CLIENTS)
    payloads, seen = {}, []
    original_payload = s.payload

    def recording_payload(k, w):
        out = original_payload(k, w)
        payloads[(len(seen) + 1, k)] = out[1].copy()
        return out

    def after_round(history):
        seen.append({"c": s.c.clone(), "c_i": s.store.get(cid, None), "stored": len(s.store)})

    s.payload = recording_payload
    fh.run_rounds(task(synthetic_train, synthetic_test, parts, PLAIN, 0.5, seed), 3, strategy=s,
                  callbacks=[after_round], progress=False)
    assert sorted(k for r, k in payloads if r == 2) == sorted(sampled[1]) and (2, cid) not in payloads
    c_i_1 = seen[0]["c_i"]
    assert c_i_1 is not None and np.abs(c_i_1).max() > 0  # it trained in round 1: a file, not the default
    assert np.array_equal(seen[1]["c_i"], c_i_1)  # round 2 (skipped) did not touch it
    # round 3's payload is c (after round 2) minus the c_i stored in round 1
    expected = (seen[1]["c"] - torch.from_numpy(c_i_1).double()).to(torch.float32).numpy()
    assert np.array_equal(payloads[(3, cid)], expected)
    assert not np.array_equal(seen[2]["c_i"], c_i_1)  # and round 3 updated it
    # the store holds exactly the clients that trained so far
    r1, r2, r3 = sampled
    assert [x["stored"] for x in seen] == [len(r1), len(r1 | r2), len(r1 | r2 | r3)]


def test_scaffold_sends_one_extra_vector_per_client(floor):
    params = fh.count_parameters(fh.make_model("simple"))
    assert params == 784 * 128 + 128 + 128 * 10 + 10
    payload = fh.wire_size((fh.correction_hook, np.zeros(params, np.float32))) - fh.wire_size(None)
    assert params * 4 < payload < params * 4 + 200  # the vector c - c_i, and the hook by name
    _, avg = floor("fedavg")
    _, sc = floor("scaffold")
    for a, b in zip(avg, sc):
        assert a["clients"] == b["clients"] == 3
        assert b["bytes_down"] - a["bytes_down"] == 3 * payload
        assert b["bytes_up"] == a["bytes_up"]  # the server keeps the c_i: nothing extra comes back


# ----------------------------------------------------------------------------
# SCAFFOLD against a case with a known answer: least squares on heterogeneous clients
# ----------------------------------------------------------------------------

LS_SIZES, LS_DIM, LS_STEPS, LS_LR, LS_ROUNDS = [20, 60, 180, 540], 5, 5, 0.04, 40


@pytest.fixture(scope="module")
def ls_clients():
    """Client k: its own A_k (n_k x 5, with its own scale and shift) and b_k = A_k u_k + noise, its own u_k."""
    rng = np.random.default_rng(0)
    out = []
    for k, n in enumerate(LS_SIZES):
        A = rng.normal(size=(n, LS_DIM)) * (1 + k) ** 0.5 + rng.normal(size=LS_DIM)
        b = A @ rng.normal(size=LS_DIM) + 0.5 * rng.normal(size=n)
        out.append((torch.tensor(A, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)))
    return out


def ls_optimum(clients, shares) -> torch.Tensor:
    """argmin_w sum_k shares_k ||A_k w - b_k||^2 / n_k, from the normal equations in float64."""
    H = sum(s * A.double().T @ A.double() / len(A) for s, (A, _) in zip(shares, clients))
    g = sum(s * A.double().T @ b.double() / len(A) for s, (A, b) in zip(shares, clients))
    return torch.linalg.solve(H, g)


def ls_rounds(strategy, clients, steps=LS_STEPS, with_samples=True):
    """The engine's round by hand, with a linear model and full-batch gradient steps (so the answer is
    exact): the strategy's payload, the hook it makes, `steps` steps as train_local takes them (zero_grad,
    backward, hook, step), weighted_mean, receive (with each client's sample count, as run_round gives
    it, unless not `with_samples`), server_step. Returns the global weights and the drift of each round."""
    model, w, ws, drifts = nn.Linear(LS_DIM, 1, bias=False), torch.zeros(LS_DIM), [], []
    for _ in range(LS_ROUNDS):
        results = []
        for k, (A, b) in enumerate(clients):
            payload = strategy.payload(k, w)
            fh.set_flat_weights(model, w)
            hook = payload[0](model, w, payload[1]) if payload is not None else None
            opt = torch.optim.SGD(model.parameters(), lr=LS_LR)
            for _ in range(steps):
                opt.zero_grad()
                ((model(A).squeeze(1) - b) ** 2).mean().backward()
                if hook is not None:
                    hook()
                opt.step()
            results.append(fh.ClientResult(k, len(A), weights=fh.flat_weights(model).numpy()))
        avg = fh.weighted_mean(results, w)
        for r in results:
            k_steps = fh.local_steps(r.num_samples, steps, r.num_samples)  # one full batch per epoch
            extra = {"num_samples": r.num_samples} if with_samples and isinstance(strategy, fh.Scaffold) else {}
            strategy.receive(r.cid, w, torch.tensor(r.weights), k_steps, LS_LR, **extra)
        drifts.append(fh.client_drift(results, w))
        w = strategy.server_step(w, avg)
        ws.append(w.double())
    return ws, drifts


def test_least_squares_scaffold_reaches_the_global_optimum_fedavg_does_not(ls_clients):
    """SCAFFOLD's fixed point is the global optimum (the corrected gradients are the federation's);
    FedAvg's, with several local steps on heterogeneous clients, is not."""
    shares = np.array(LS_SIZES, np.float64) / sum(LS_SIZES)
    w_star = ls_optimum(ls_clients, shares)
    scale = float(w_star.norm())
    sc_ws, sc_drift = ls_rounds(fh.Scaffold(len(LS_SIZES)), ls_clients)
    avg_ws, avg_drift = ls_rounds(fh.FedAvg(), ls_clients)
    assert float((sc_ws[-1] - w_star).norm()) < 1e-5 * scale  # float32 precision
    assert float((sc_ws[-1] - sc_ws[-2]).norm()) < 1e-5 * scale  # a fixed point
    assert sc_drift[-1] < 1e-5 * sc_drift[0]  # the clients no longer drift apart
    assert float((avg_ws[-1] - w_star).norm()) > 0.05 * scale  # FedAvg settles elsewhere...
    assert float((avg_ws[-1] - avg_ws[-2]).norm()) < 1e-5 * scale  # ...at a fixed point of its own
    assert avg_drift[-1] > 0.5 * avg_drift[0]  # with clients that keep pulling apart
    one_ws, _ = ls_rounds(fh.FedAvg(), ls_clients, steps=1)  # one local step: plain gradient descent...
    assert float((one_ws[-1] - w_star).norm()) < 1e-3 * scale  # ...on the global loss: the problem is right


def test_least_squares_scaffold_with_equal_weights_finds_another_optimum(ls_clients):
    """The paper weighs every client's c_i the same; with the models averaged by samples that
    converges to the optimum of the unweighted mean of the clients' losses, not the federation's."""
    w_star = ls_optimum(ls_clients, np.array(LS_SIZES, np.float64) / sum(LS_SIZES))
    w_equal = ls_optimum(ls_clients, np.full(len(LS_SIZES), 1 / len(LS_SIZES)))
    scale = float(w_star.norm())
    assert float((w_equal - w_star).norm()) > 0.3 * scale  # the two objectives differ a lot here
    ws, drifts = ls_rounds(fh.Scaffold(len(LS_SIZES)), ls_clients, with_samples=False)
    assert float((ws[-1] - w_equal).norm()) < 1e-5 * scale
    assert drifts[-1] < 1e-5 * drifts[0]


# ----------------------------------------------------------------------------
# ClientStateStore
# ----------------------------------------------------------------------------


def test_client_state_store_explicit_folder(tmp_path, monkeypatch):
    folder = tmp_path / "state"
    store = fh.ClientStateStore(folder)
    default = np.full(3, -1.0, np.float32)
    assert store.get(5, default) is default and len(store) == 0  # unknown client: the default, no file
    replaced = []
    real_replace = fh.os.replace
    monkeypatch.setattr(fh.os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b)))
    store.put(5, np.array([1.0, 2.0, 3.0], np.float32))
    store.put(12, np.array([4.0, 5.0, 6.0], np.float32))
    store.put(5, np.array([7.0, 8.0, 9.0], np.float32))  # overwrite
    assert np.array_equal(store.get(5, default), [7.0, 8.0, 9.0])
    assert np.array_equal(store.get(12, default), [4.0, 5.0, 6.0])
    assert store.get(6, default) is default
    assert len(store) == 2
    # atomic: each write went to a temporary file that was then renamed onto the client's file
    assert len(replaced) == 3 and replaced[2][1] == str(store.path(5)) and replaced[2][0] != replaced[2][1]
    assert not list(folder.glob("*.tmp*")), "a temporary file was left behind"
    assert sorted(p.name for p in folder.iterdir()) == ["client_12.npy", "client_5.npy"]
    del store
    gc.collect()
    again = fh.ClientStateStore(folder)  # an explicit folder outlives its store
    assert np.array_equal(again.get(12, default), [4.0, 5.0, 6.0]) and len(again) == 2
    assert again.clear() is again and len(again) == 0 and folder.is_dir()


def test_client_state_store_default_folder_is_temporary():
    store = fh.ClientStateStore()
    folder = store.folder
    store.put(0, np.zeros(2, np.float32))
    assert folder.is_dir() and len(store) == 1
    other = fh.ClientStateStore()
    assert other.folder != folder and len(other) == 0  # each store has its own folder
    del store
    gc.collect()
    assert not folder.exists()


# ----------------------------------------------------------------------------
# Every strategy in the engine
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if n != "fedavg"])
def test_each_strategy_changes_the_result(floor, name):
    """Every strategy (with the knobs in STRAT_KNOBS) gives other weights than FedAvg: its own code runs."""
    assert not same_weights(floor(name)[0], floor("fedavg")[0])


@pytest.mark.parametrize("name", NAMES)
def test_each_strategy_trains_and_records_drift(floor, name):
    model, hist = floor(name)
    assert not torch.equal(flat(model), flat(fh.make_model("simple", SEED)))  # it did train
    assert torch.isfinite(flat(model)).all()
    assert [h["round"] for h in hist] == [1, 2] and all(h["clients"] == 3 and h["drift"] > 0 for h in hist)


def test_strategies_are_reset_by_each_run(synthetic_train, synthetic_test, parts, floor):
    """run_rounds starts the server afresh: a strategy used twice gives the same bits twice."""
    for name in ("fedavgm", "scaffold"):
        s = fresh(name, NUM_CLIENTS)
        first, _ = run(s, synthetic_train, synthetic_test, parts)
        again, _ = run(s, synthetic_train, synthetic_test, parts)
        assert same_weights(first, again) and same_weights(first, floor(name)[0])


def test_drift_is_weighted_rms_distance_from_the_mean_by_hand():
    """client_drift (the history's `drift`) by hand: clients of 1 and 3 samples at known weights."""
    g = torch.tensor([0.0, 0.0])
    results = [fh.ClientResult(0, 1, weights=np.array([4.0, 0.0], np.float32)),
               fh.ClientResult(1, 3, weights=np.array([0.0, 0.0], np.float32))]
    # mean = 0.25 [4, 0] = [1, 0]; 0.25 * 3^2 + 0.75 * 1^2 = 3
    assert fh.client_drift(results, g) == pytest.approx(math.sqrt(3.0), rel=1e-12)
    assert fh.client_drift(results[:1], g) == 0.0  # one client: no spread


# ----------------------------------------------------------------------------
# 01_model: LeNet-5
# ----------------------------------------------------------------------------


def test_lenet_is_registered_and_has_the_right_shape_and_size():
    assert fh.MODELS["lenet"] is fh.LeNet5
    model = fh.make_model("lenet", 0)
    for batch in (1, 5):
        out = model(torch.randn(batch, 1, 28, 28))
        assert out.shape == (batch, 10) and out.dtype == torch.float32
    conv1 = 1 * 6 * 5 * 5 + 6  # 28x28 padded -> 28x28, pooled to 14x14
    conv2 = 6 * 16 * 5 * 5 + 16  # 14x14 -> 10x10, pooled to 5x5
    fc = (16 * 5 * 5 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert fh.count_parameters(model) == conv1 + conv2 + fc == 61_706


def test_lenet_seeded():
    a, b, c = fh.make_model("lenet", 4), fh.make_model("lenet", 4), fh.make_model("lenet", 5)
    assert same_weights(a, b)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------
# 02_data: partition_classes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("num_clients", [10, 20, 100])
def test_partition_classes_exact_classes_complete_disjoint_balanced(balanced_labels, num_clients, k):
    parts = fh.partition_classes(balanced_labels, num_clients, classes_per_client=k, seed=4)
    assert len(parts) == num_clients
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(balanced_labels)))
    held = [set(np.unique(balanced_labels[p]).tolist()) for p in parts]
    assert all(len(h) == k for h in held)
    counts = fh.label_counts(parts, balanced_labels)
    for c in range(10):
        shares = counts[:, c][counts[:, c] > 0]
        assert shares.sum() == 6000
        assert shares.max() - shares.min() <= 1  # each class split equally among its holders
        if num_clients % 10 == 0:  # the ring gives each class the same number of holders
            assert len(shares) == num_clients * k // 10


def test_partition_classes_fewest_clients(balanced_labels):
    parts = fh.partition_classes(balanced_labels, 5, classes_per_client=6, seed=0)  # 5 + 6 - 1 = 10 classes
    assert all(len(np.unique(balanced_labels[p])) == 6 for p in parts)
    assert sum(len(p) for p in parts) == 60_000


def test_partition_classes_seeded_and_reached_by_make_partition(balanced_labels):
    a = fh.partition_classes(balanced_labels, 20, classes_per_client=2, seed=7)
    b = fh.make_partition("classes", balanced_labels, 20, seed=7, classes_per_client=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    c = fh.partition_classes(balanced_labels, 20, classes_per_client=2, seed=8)
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    d = fh.make_partition("classes", balanced_labels, 20, seed=7, classes_per_client=3)
    assert all(len(np.unique(balanced_labels[p])) == 3 for p in d)


@pytest.mark.parametrize(
    ("num_clients", "k", "match"),
    [
        (10, 0, r"classes_per_client must be an integer in \[1, 10\]"),
        (10, 11, r"classes_per_client must be an integer in \[1, 10\]"),
        (10, 1.5, r"classes_per_client must be an integer in \[1, 10\]"),
        (3, 2, r"num_clients \+ classes_per_client - 1 must be >= 10"),
        (8, 2, r"num_clients \+ classes_per_client - 1 must be >= 10"),
    ],
)
def test_partition_classes_bad_knobs(balanced_labels, num_clients, k, match):
    with pytest.raises(ValueError, match=match):
        fh.partition_classes(balanced_labels, num_clients, classes_per_client=k)
    with pytest.raises(ValueError, match="classes_per_client"):
        fh.make_partition("classes", balanced_labels, num_clients, classes_per_client=k)
