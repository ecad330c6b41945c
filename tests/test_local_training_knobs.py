"""The local-training knobs of train_local (03_local_training): momentum, weight_decay and
grad_hook, their checks (NaN and +-inf refused by name), local_steps, and how the engine's
TrainConfig carries them to every client (train_client, 05_round_loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fed_helpers as fh


@pytest.fixture(scope="module")
def small(synthetic_train):
    """70 training samples: 5 batches of 16 (the last one holds 6)."""
    return synthetic_train[0][:70], synthetic_train[1][:70]


def trained(data, **kw) -> tuple[torch.Tensor, list[float]]:
    model = fh.make_model("simple", 2)
    losses = fh.train_local(model, *data, **{"epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 1, **kw})
    return fh.flat_weights(model), losses


def test_zero_momentum_and_decay_give_the_default_bits(small):
    w_default, loss_default = trained(small)
    w_explicit, loss_explicit = trained(small, momentum=0.0, weight_decay=0.0, grad_hook=None)
    assert torch.equal(w_default, w_explicit) and loss_default == loss_explicit
    assert not torch.equal(w_default, fh.flat_weights(fh.make_model("simple", 2)))  # it did train


def test_momentum_changes_the_result(small):
    w_plain, _ = trained(small)
    w_momentum, _ = trained(small, momentum=0.9)
    assert not torch.equal(w_plain, w_momentum)
    # momentum keeps moving in the same direction: after the same steps it has gone further
    w0 = fh.flat_weights(fh.make_model("simple", 2))
    assert (w_momentum - w0).norm() > (w_plain - w0).norm()


def test_weight_decay_shrinks_the_weights(small):
    w_plain, _ = trained(small)
    w_decay, _ = trained(small, weight_decay=0.5)
    assert w_decay.norm() < w_plain.norm()


def test_weight_decay_alone_scales_the_weights_by_hand(small):
    """With the gradient zeroed by the hook, SGD's only force is the decay:
    each step multiplies every weight by (1 - lr * weight_decay)."""
    model = fh.make_model("simple", 2)
    w0 = fh.flat_weights(model)

    def zero():
        for p in model.parameters():
            p.grad.zero_()

    fh.train_local(model, *small, epochs=2, batch_size=16, lr=0.1, seed=1, weight_decay=0.5, grad_hook=zero)
    steps = 2 * 5
    torch.testing.assert_close(fh.flat_weights(model), w0 * (1 - 0.1 * 0.5) ** steps, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("n", "batch_size", "epochs", "steps"), [(70, 16, 3, 15), (64, 16, 2, 8), (1, 32, 2, 2)])
def test_grad_hook_runs_once_per_step_after_backward_before_the_step(synthetic_train, n, batch_size, epochs, steps):
    assert fh.local_steps(n, epochs, batch_size) == steps == epochs * math.ceil(n / batch_size)
    model = fh.make_model("simple", 0)
    w0 = fh.flat_weights(model)
    calls = []

    def hook():
        assert all(p.grad is not None for p in model.parameters())  # after backward
        calls.append(fh.flat_weights(model))

    fh.train_local(model, synthetic_train[0][:n], synthetic_train[1][:n], epochs, batch_size, 0.05, 0, grad_hook=hook)
    assert len(calls) == steps
    assert torch.equal(calls[0], w0)  # before the first step
    assert not torch.equal(calls[-1], w0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_hook_that_zeroes_gradients_freezes_the_model(small, momentum):
    model = fh.make_model("simple", 2)
    w0 = fh.flat_weights(model)

    def zero():
        for p in model.parameters():
            p.grad.zero_()

    losses = fh.train_local(model, *small, epochs=2, batch_size=16, lr=0.05, momentum=momentum, grad_hook=zero)
    assert torch.equal(fh.flat_weights(model), w0)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # same model: same mean loss each epoch


def test_grad_hook_can_change_the_step_by_hand(small):
    """A hook that doubles every gradient is the same as doubling lr (plain SGD)."""
    model = fh.make_model("simple", 2)

    def double():
        for p in model.parameters():
            p.grad.mul_(2)

    fh.train_local(model, *small, epochs=1, batch_size=16, lr=0.05, seed=1, grad_hook=double)
    ref = fh.make_model("simple", 2)
    fh.train_local(ref, *small, epochs=1, batch_size=16, lr=0.1, seed=1)
    torch.testing.assert_close(fh.flat_weights(model), fh.flat_weights(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "epochs", "batch_size", "steps"),
                         [(100, 1, 32, 4), (96, 1, 32, 3), (97, 2, 32, 8), (1, 3, 32, 3), (5, 1, 1, 5)])
def test_local_steps_by_hand(n, epochs, batch_size, steps):
    assert fh.local_steps(n, epochs, batch_size) == steps


@pytest.mark.parametrize(("knob", "value", "match"), [
    ("momentum", -0.1, r"momentum must be a finite number in \[0, 1\), got -0.1"),
    ("momentum", 1.0, r"momentum must be a finite number in \[0, 1\), got 1.0"),
    ("momentum", float("nan"), r"momentum must be a finite number in \[0, 1\), got nan"),
    ("momentum", float("inf"), r"momentum must be a finite number in \[0, 1\), got inf"),
    ("weight_decay", -1, r"weight_decay must be a finite number in \[0, inf\), got -1"),
    ("weight_decay", -1e-9, r"weight_decay must be a finite number in \[0, inf\)"),
    ("weight_decay", float("nan"), r"weight_decay must be a finite number in \[0, inf\), got nan"),
    ("weight_decay", float("inf"), r"weight_decay must be a finite number in \[0, inf\), got inf"),
    ("lr", float("nan"), r"lr must be a finite number in \(0, inf\), got nan"),
    ("lr", float("inf"), r"lr must be a finite number in \(0, inf\), got inf"),
    ("momentum", True, r"momentum must be a finite number in \[0, 1\), got True"),  # a bool is not a number
    ("weight_decay", "0.1", r"weight_decay must be a finite number"),
])
def test_check_training_knobs_rejects(small, knob, value, match):
    with pytest.raises(ValueError, match=match):
        fh.check_training_knobs(**{"epochs": 1, "batch_size": 32, "lr": 0.05, knob: value})
    model = fh.make_model("simple", 0)
    w0 = fh.flat_weights(model)
    with pytest.raises(ValueError, match=match):
        fh.train_local(model, *small, **{knob: value})
    assert torch.equal(fh.flat_weights(model), w0)


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.99, 0.0), (0.5, 1.0), (np.float64(0.9), 0)])
def test_check_training_knobs_accepts(momentum, weight_decay):
    assert fh.check_training_knobs(1, 32, 0.05, momentum, weight_decay) is None


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 0.1)])
def test_train_client_trains_with_the_config_knobs(synthetic_train, momentum, weight_decay):
    """The knobs travel in one TrainConfig, not by position: train_client is train_local with them."""
    cfg = fh.TrainConfig("simple", epochs=2, batch_size=16, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    x_all, y_all = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    job = fh.ClientJob(cid=3, round=1, indices=np.arange(5, 600, 7), seed=11)
    w0 = fh.flat_weights(fh.make_model("simple", 4))
    result = fh.train_client(fh.make_model("simple", 9), w0.numpy(), x_all, y_all, job, cfg)  # its weights: replaced
    with fh.torch_threads(1):
        ref = fh.make_model("simple", 4)
        losses = fh.train_local(ref, torch.from_numpy(x_all[job.indices]), torch.from_numpy(y_all[job.indices]),
                                2, 16, 0.05, 11, momentum, weight_decay)
    assert torch.equal(torch.from_numpy(result.weights), fh.flat_weights(ref))
    assert (result.cid, result.num_samples, result.loss, result.status) == (3, len(job.indices), losses[-1], "ok")
    assert result.weights.dtype == np.float32
