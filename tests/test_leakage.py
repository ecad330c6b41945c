"""Notebook 09's attacks: the AUC and advantage of membership inference, the image metrics, label
recovery and gradient inversion (on a tiny model, so the whole file runs in seconds)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fed_helpers as fh

MEAN, STD = fh.DATASETS["fashion_mnist"][1:3]


def tiny_mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    """784 -> hidden -> 10 with a ReLU: the 2NN's shape in miniature."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def blob_image() -> torch.Tensor:
    """A smooth 28x28 test image (pixels in [0, 1]): a bright ellipse on a dark ground, shape (1, 1, 28, 28)."""
    r, c = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    return (1 - ((r - 13) / 9) ** 2 - ((c - 15) / 6) ** 2).clamp(0, 1).view(1, 1, 28, 28)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


def pairwise_auc(pos, neg) -> float:
    """The AUC by its definition: over all (positive, negative) pairs, 1 for a win, 1/2 for a tie."""
    return float(np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]))


def brute_advantage(pos, neg) -> float:
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    return max(0.0, *[(pos >= t).mean() - (neg >= t).mean() for t in np.concatenate([pos, neg])])


# ---------------------------------------------------------------- AUC and advantage


@pytest.mark.parametrize("pos, neg, auc, adv", [
    ([3, 2], [1, 0], 1.0, 1.0),               # perfectly separated
    ([0, 1], [2, 3], 0.0, 0.0),               # perfectly reversed: AUC 0, and no threshold helps
    ([1, 1, 1], [1, 1], 0.5, 0.0),            # all tied: a coin
    ([2, 1], [1, 0], 0.875, 0.5),             # one tie among four pairs: (1 + 1 + 1/2 + 1) / 4
    ([1, 2, 3], [2], 0.5, 1 / 3),             # (0 + 1/2 + 1) / 3; best threshold t = 3: TPR 1/3, FPR 0
    ([0.9, 0.8, 0.4], [0.5, 0.3, 0.3, 0.1], 11 / 12, 3 / 4),  # 4 + 4 + 3 wins of 12; t = 0.4: 1 - 1/4
])
def test_auc_and_advantage_on_hand_computed_cases(pos, neg, auc, adv):
    assert fh.roc_auc(pos, neg) == pytest.approx(auc, abs=1e-12)
    assert fh.attack_advantage(pos, neg) == pytest.approx(adv, abs=1e-12)


def test_auc_and_advantage_match_their_definitions_on_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        pos, neg = rng.integers(0, 5, rng.integers(1, 12)), rng.integers(0, 5, rng.integers(1, 12))  # many ties
        assert fh.roc_auc(pos, neg) == pytest.approx(pairwise_auc(pos, neg), abs=1e-12)
        assert fh.attack_advantage(pos, neg) == pytest.approx(brute_advantage(pos, neg), abs=1e-12)
        assert fh.roc_auc(neg, pos) == pytest.approx(1 - fh.roc_auc(pos, neg), abs=1e-12)  # swapping the roles


@pytest.mark.parametrize("pos, neg, name", [([], [1.0], "pos"), ([1.0], [], "neg"), ([1.0, math.nan], [0.0], "pos"),
                                            ([1.0], [math.inf], "neg")])
def test_auc_refuses_empty_or_non_finite_scores_by_name(pos, neg, name):
    for f in (fh.roc_auc, fh.attack_advantage):
        with pytest.raises(ValueError, match=f"^{name} must hold"):
            f(pos, neg)


def test_membership_attack_scores_low_loss_as_member():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g)
    with fh.torch_threads(1):  # two threads on a busy 2-core machine: 100x slower
        fh.train_local(model, x[:20], y[:20], epochs=60, batch_size=10, lr=0.1)  # memorises 20 random labels
    out = fh.membership_attack(model, (x[:20], y[:20]), (x[20:], y[20:]))
    losses = fh.sample_losses(model, x, y).numpy()
    assert out["auc"] == pytest.approx(fh.roc_auc(-losses[:20], -losses[20:]))
    assert out["member_loss"] < out["nonmember_loss"] and out["auc"] > 0.9 and out["advantage"] > 0.7


# ---------------------------------------------------------------- image metrics


def test_mse_psnr_ssim_on_known_inputs():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full((2, 1, 8, 8), 0.1)
    b[1, :, :4] = 0.2  # image 1: half its pixels off by 0.2, half by 0.1
    assert fh.image_mse(a, b).tolist() == pytest.approx([0.01, 0.025])
    assert fh.psnr(a, b).tolist() == pytest.approx([20.0, 10 * math.log10(40)])
    assert fh.psnr(b, b).tolist() == [math.inf, math.inf]
    assert fh.ssim(b, b).tolist() == pytest.approx([1.0, 1.0])
    c1, c2 = torch.full((1, 1, 8, 8), 0.2), torch.full((1, 1, 8, 8), 0.4)  # constants: only luminance differs
    assert float(fh.ssim(c1, c2)) == pytest.approx((2 * 0.08 + 1e-4) / (0.04 + 0.16 + 1e-4), rel=1e-6)
    noisy = (blob_image() + 0.2 * torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert 0 < float(fh.ssim(noisy, blob_image())) < 0.9


def test_metrics_refuse_mismatched_shapes_and_windows():
    with pytest.raises(ValueError, match="a and b must be image batches"):
        fh.psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 7))
    with pytest.raises(ValueError, match="a and b must be image batches"):
        fh.image_mse(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"window must be an integer in \[1, 8\]"):
        fh.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), window=9)


def test_to_pixels_undoes_the_normalisation_and_refuses_other_datasets():
    pixels = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fh.to_pixels(normalised(pixels)), pixels, atol=1e-6)
    with pytest.raises(ValueError, match="dataset must be 'fashion_mnist' or 'mnist'"):
        fh.to_pixels(pixels, "synthetic")


def test_match_images_undoes_a_shuffle():
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    shuffled = images[torch.tensor([3, 0, 5, 1, 4, 2])]
    assert torch.equal(fh.match_images(images, shuffled), images)


# ---------------------------------------------------------------- the update, labels, inversion


def test_observed_gradient_is_the_gradient_after_one_step_and_restores_the_model():
    model, x, y = tiny_mlp(), normalised(blob_image()), torch.tensor([3])
    before = fh.flat_weights(model)
    observed = fh.observed_gradient(model, x, y, lr=0.1, steps=1)
    exact = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert torch.equal(fh.flat_weights(model), before)
    for o, e in zip(observed, exact):
        assert o.shape == e.shape and torch.allclose(o, e, atol=1e-5)
    several = fh.observed_gradient(model, x, y, lr=0.1, steps=4)
    assert not torch.allclose(several[0], observed[0], atol=1e-5)  # a sum of gradients at moving weights
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            fh.observed_gradient(model, x, y, steps=bad)


@pytest.mark.parametrize("steps", [1, 5])
def test_infer_labels_returns_the_true_label_of_one_sample(steps):
    g = torch.Generator().manual_seed(0)
    for label in range(10):
        model = tiny_mlp(seed=label)
        x = torch.randn(1, 1, 28, 28, generator=g)
        update = fh.observed_gradient(model, x, torch.tensor([label]), lr=0.1, steps=steps)
        assert fh.infer_labels(update[-2]).tolist() == [label]


def test_infer_labels_refuses_bad_knobs_by_name():
    with pytest.raises(ValueError, match=r"count must be an integer in \[1, 10\]"):
        fh.infer_labels(torch.zeros(10, 32), count=11)
    with pytest.raises(ValueError, match="last_weight_grad must be a"):
        fh.infer_labels(torch.zeros(10))


def test_inversion_recovers_one_image_and_is_deterministic():
    model, x, y = tiny_mlp(), normalised(blob_image()), torch.tensor([3])
    target = fh.observed_gradient(model, x, y, lr=0.1)
    first = fh.invert_gradient(model, target, y, iterations=150, seed=0)
    again = fh.invert_gradient(model, target, y, iterations=150, seed=0)
    other = fh.invert_gradient(model, target, y, iterations=150, seed=1)
    quality = float(fh.psnr(fh.to_pixels(first), blob_image()))
    start = fh.invert_gradient(model, target, y, iterations=1, lr=1e-9, seed=0)  # hardly moved: the noise
    assert quality > 25, f"PSNR {quality:.1f} dB"  # measured 35.3 dB; the starting noise 5.4 dB
    assert float(fh.psnr(fh.to_pixels(start), blob_image())) < 10
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_inversion_refuses_bad_knobs_by_name():
    model, x, y = tiny_mlp(), normalised(blob_image()), torch.tensor([3])
    target = fh.observed_gradient(model, x, y)
    for knobs, message in [({"iterations": 0}, "iterations must be an integer >= 1"),
                           ({"lr": 0.0}, r"lr must be a finite number in \(0, inf\)"),
                           ({"lr": math.nan}, "lr must be"),
                           ({"tv_weight": -1.0}, r"tv_weight must be a finite number in \[0, inf\)"),
                           ({"dataset": "synthetic"}, "dataset must be 'fashion_mnist' or 'mnist'")]:
        with pytest.raises(ValueError, match=message):
            fh.invert_gradient(model, target, y, **knobs)
    with pytest.raises(ValueError, match="labels must be a non-empty 1-d int64 tensor"):
        fh.invert_gradient(model, target, torch.tensor([3.0]))
    with pytest.raises(ValueError, match="target must hold one number per parameter"):
        fh.invert_gradient(model, target[:-1], y)


def test_show_reconstructions_draws_one_row_per_attack():
    images = torch.rand(3, 1, 28, 28)
    fig = fh.show_reconstructions(images, {"a": images, "b": images.flip(0)}, titles=["x", "y", "z"])
    assert len(fig.axes) == 9 and fig.axes[3].get_title() == "inf dB"
