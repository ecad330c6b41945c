"""The scalable round loop of 07_scaling_with_ray: same math as run_federated, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fed_helpers as fh

KW = dict(rounds=2, client_fraction=0.5, local_epochs=1, batch_size=16, lr=0.05, seed=5, progress=False)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def skewed(synthetic_train):
    # very different client sizes, so actors finish chunks in another order than client ids
    return fh.make_partition("quantity", synthetic_train[1].numpy(), 16, seed=2, beta=0.3)


def test_flat_weights_is_a_copy_in_state_dict_order():
    model = fh.make_model("2nn", 1)
    flat = fh.flat_weights(model)
    assert torch.equal(flat, torch.cat([t.flatten() for t in model.state_dict().values()]))
    flat += 1
    assert not torch.equal(flat, fh.flat_weights(model))


def test_train_client_flat_equals_client_update(synthetic_train):
    x, y = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    model = fh.make_model("2nn", 3)
    idx = np.arange(100, 400)
    n, loss, flat = fh.train_client_flat(fh.make_model("2nn", 42), fh.flat_weights(model).numpy(), x, y, idx,
                                         2, 16, 0.05, 11)
    state, n_ref, loss_ref = fh.client_update(model.state_dict(), x, y, idx, "2nn", 2, 16, 0.05, 11)
    assert n == n_ref == 300 and loss == loss_ref
    assert torch.equal(torch.from_numpy(flat), torch.cat([t.flatten() for t in state.values()]))


def test_floor_equals_run_federated(synthetic_train, synthetic_test, skewed):
    ref, ref_hist = fh.run_federated("2nn", synthetic_train, synthetic_test, skewed, use_ray=False, **KW)
    floor, hist = fh.run_federated_pool("2nn", synthetic_train, synthetic_test, skewed, use_ray=False, **KW)
    assert same_weights(ref, floor)
    for a, b in zip(ref_hist, hist):
        assert a["accuracy"] == b["accuracy"] and a["clients"] == b["clients"]
        assert a["bytes_sent"] == b["bytes_sent"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
    assert all(0 < h["first_result"] <= h["elapsed"] for h in hist)
    assert [h["elapsed"] for h in hist] == sorted(h["elapsed"] for h in hist)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_actor_pool_equals_floor_whatever_the_chunking(ray_cluster, synthetic_train, synthetic_test, skewed,
                                                       chunk_size):
    floor, _ = fh.run_federated_pool("2nn", synthetic_train, synthetic_test, skewed, use_ray=False, **KW)
    pool, hist = fh.run_federated_pool("2nn", synthetic_train, synthetic_test, skewed, use_ray=True, num_workers=2,
                                       chunk_size=chunk_size, **KW)
    assert same_weights(floor, pool)
    assert len(hist) == KW["rounds"] and hist[-1]["clients"] == 8


def test_actor_pool_learns_and_other_seed_differs(ray_cluster, synthetic_train, synthetic_test):
    parts = fh.make_partition("iid", synthetic_train[1].numpy(), 6, seed=0)
    kw = {**KW, "rounds": 3, "client_fraction": 1.0}
    model, hist = fh.run_federated_pool("2nn", synthetic_train, synthetic_test, parts, **kw)
    other, _ = fh.run_federated_pool("2nn", synthetic_train, synthetic_test, parts, **{**kw, "seed": 6})
    assert hist[-1]["accuracy"] > 0.15 and hist[-1]["loss"] < hist[0]["loss"]
    assert not same_weights(model, other)


def test_stream_in_order_yields_clients_in_order(ray_cluster, synthetic_train):
    x_ref, y_ref = ray_cluster.put(synthetic_train[0].numpy()), ray_cluster.put(synthetic_train[1].numpy())
    workers = [fh.ClientTrainer.remote(x_ref, y_ref, "simple") for _ in range(2)]
    weights = ray_cluster.put(fh.flat_weights(fh.make_model("simple")).numpy())
    sizes = [2000, 5, 5, 5, 1500, 5, 5]  # the big chunks finish last
    jobs = [(k, np.arange(n), k, None) for k, n in enumerate(sizes)]  # (client, indices, seed, payload)
    out = list(fh.stream_in_order(workers, weights, [[j] for j in jobs], (1, 32, 0.05)))
    assert [r[0] for r in out] == list(range(len(sizes)))
    assert [r[1] for r in out] == sizes
    for w in workers:
        ray_cluster.kill(w)


@pytest.mark.parametrize("knob, value", [("num_workers", 0), ("num_workers", 1.5), ("chunk_size", 0),
                                         ("rounds", 0), ("client_fraction", 1.5), ("lr", 0.0),
                                         ("batch_size", 0), ("start_timeout_s", 0)])
def test_bad_knobs_raise_before_work(synthetic_train, synthetic_test, knob, value):
    parts = fh.make_partition("iid", synthetic_train[1].numpy(), 4)
    kw = {**KW, knob: value}
    with pytest.raises(ValueError, match=knob):
        fh.run_federated_pool("2nn", synthetic_train, synthetic_test, parts, use_ray=False, **kw)


def test_pool_raises_instead_of_waiting_when_actors_cannot_start(ray_cluster, synthetic_train, synthetic_test):
    """Two actors left over (say, by a notebook cell that failed) hold both CPUs: the pool's
    own actors cannot start, and it says so within start_timeout_s instead of hanging."""
    parts = fh.make_partition("iid", synthetic_train[1].numpy(), 4)
    x_ref, y_ref = ray_cluster.put(synthetic_train[0].numpy()), ray_cluster.put(synthetic_train[1].numpy())
    hogs = [fh.ClientTrainer.remote(x_ref, y_ref, "simple") for _ in range(2)]
    ray_cluster.get([h.node_id.remote() for h in hogs])
    try:
        with pytest.raises(RuntimeError, match="start_timeout_s"):
            fh.run_federated_pool("simple", synthetic_train, synthetic_test, parts, use_ray=True, num_workers=2,
                                  start_timeout_s=3, **{**KW, "rounds": 1})
    finally:
        for h in hogs:
            ray_cluster.kill(h)
    # and with the CPUs free again, the pool runs
    _, hist = fh.run_federated_pool("simple", synthetic_train, synthetic_test, parts, use_ray=True, num_workers=2,
                                    **{**KW, "rounds": 1})
    assert len(hist) == 1
