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

import fed_helpers as fh

matplotlib.use("Agg")  # no windows: figures are only inspected, never shown


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
