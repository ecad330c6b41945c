"""Shared fixtures for the course's tests.

Nothing here downloads anything: datasets are loaded with download=False, and the tests
that need Fashion-MNIST are skipped when it is not on this machine.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import ray
import torch

import fed_helpers as fh

matplotlib.use("Agg")  # no windows: figures are only inspected, never shown

# A non-trivial knob per strategy, so that every strategy's own code path is exercised.
STRAT_KNOBS = {
    "fedavg": {},
    "fedprox": {"mu": 0.5},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"server_lr": 0.01},
    "fedyogi": {"server_lr": 0.01},
    "scaffold": {},
}


def fresh(name: str, num_clients: int, **knobs) -> fh.FedAvg:
    """A new strategy `name` with its STRAT_KNOBS, overridden by `knobs` (strategies hold state)."""
    return fh.make_strategy(name, num_clients, **{**STRAT_KNOBS[name], **knobs})


def flat(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters as one flat vector (the engine's weight format)."""
    return fh.flat_weights(model)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when the two models hold bit-identical state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU Ray started once for the whole session (ray.init takes ~15 s), shut down at
    the end if this fixture started it. Only tests that need Ray ask for it."""
    started_here = not ray.is_initialized()
    fh.init_ray(num_cpus=2)
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_train():
    """The 6,000-sample synthetic training set: (x, y) tensors. Do not modify in place."""
    return fh.load_dataset("synthetic", train=True)


@pytest.fixture(scope="session")
def synthetic_test():
    """The 1,000-sample synthetic test set: (x, y) tensors. Do not modify in place."""
    return fh.load_dataset("synthetic", train=False)


@pytest.fixture(scope="session")
def balanced_labels() -> np.ndarray:
    """60,000 labels, 6,000 of each of 10 classes, in a fixed random order (like Fashion-MNIST's
    training labels, without needing the dataset)."""
    return np.random.default_rng(1234).permutation(np.repeat(np.arange(10), 6000))


def _load_fashion(train: bool):
    try:
        return fh.load_dataset("fashion_mnist", train=train, download=False)
    except FileNotFoundError as err:  # not on this machine, and tests never download
        pytest.skip(f"Fashion-MNIST is not available offline: {err}")


@pytest.fixture(scope="session")
def fashion_train():
    """Fashion-MNIST training set (60,000 samples), from data/ or Debian's package."""
    return _load_fashion(train=True)


@pytest.fixture(scope="session")
def fashion_test():
    """Fashion-MNIST test set (10,000 samples)."""
    return _load_fashion(train=False)


@pytest.fixture(autouse=True)
def _close_figures():
    """Close every matplotlib figure a test leaves open."""
    yield
    plt.close("all")
