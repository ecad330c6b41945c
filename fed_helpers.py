"""fed_helpers: the reusable pieces of the federated-learning course.

Every definition below is written and explained in exactly one notebook (its docstring
names which) and imported from here by the notebooks that come after it. The sections
follow the notebooks in order. `tests/test_sync.py` keeps each definition identical to the
notebook cell that introduces it (cells whose first line is `#| export`): change the
notebook, then copy the cell here, or the test fails and shows the difference.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
import ray
import torch
import torch.nn as nn
import torch.nn.functional as F
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------
# 01_model: the models, and the state dict that travels
# ----------------------------------------------------------------------------


class SimpleNN(nn.Module):
    """The overview's model: 784 -> 128 -> 10 MLP. Introduced in 01_model."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class TwoNN(nn.Module):
    """McMahan et al. (2017)'s "2NN": 784 -> 200 -> 200 -> 10 MLP. Introduced in 01_model."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class SmallCNN(nn.Module):
    """Two 5x5 conv layers (16, 32 channels) with 2x2 max-pooling, then FC 128 -> 10.

    Introduced in 01_model.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28x28 -> 14x14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 14x14 -> 7x7
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LeNet5(nn.Module):
    """LeCun et al. (1998)'s LeNet-5 for 28x28 images: conv 6@5x5 (padded), 2x2 max-pool,
    conv 16@5x5, 2x2 max-pool, then FC 120 -> 84 -> 10, with ReLU. Introduced in 01_model.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28x28 -> 14x14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 14x14 -> 10x10 -> 5x5
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


MODELS = {"simple": SimpleNN, "2nn": TwoNN, "cnn": SmallCNN, "lenet": LeNet5}


def make_model(name: str = "2nn", seed: int = 0) -> nn.Module:
    """Build model `name` with weights drawn from `seed`. Introduced in 01_model.

    The global torch random state is left untouched, so building a model never
    changes what happens next in the notebook.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable numbers in `model`. Introduced in 01_model."""
    return sum(p.numel() for p in model.parameters())


def state_dict_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of raw tensor data in a state dict: what one model copy costs to send.

    Introduced in 01_model.
    """
    return sum(t.numel() * t.element_size() for t in state.values())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy `state` into `model`, or raise ValueError saying how they differ.

    Introduced in 01_model.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = {k: (got[k], expected[k]) for k in expected.keys() & got.keys() if got[k] != expected[k]}
    if missing or unexpected or wrong:
        raise ValueError(
            f"state dict does not fit {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shapes (got, expected) {wrong}"
        )
    model.load_state_dict(state)
    return model


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch in this process. Introduced in 01_model."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    seed = int(seed)  # random.seed rejects NumPy integers
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# 02_data: datasets and how they are split across clients
# ----------------------------------------------------------------------------

DATASETS = {
    # name: (torchvision class name, pixel mean, pixel std, class names)
    "fashion_mnist": (
        "FashionMNIST",
        0.2860,
        0.3530,
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    ),
    "mnist": ("MNIST", 0.1307, 0.3081, [str(d) for d in range(10)]),
    "synthetic": (None, 0.0, 1.0, [f"class {c}" for c in range(10)]),
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def default_data_dir() -> Path:
    """$FED_DATA_DIR if set, else `data/` at the course's top level. Introduced in 02_data."""
    if os.environ.get("FED_DATA_DIR"):
        return Path(os.environ["FED_DATA_DIR"])
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "fed_helpers.py").exists():
            return folder / "data"
    return here / "data"


def synthetic_dataset(train: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 28x28 images labelled by a fixed random linear "teacher", so there is
    something to learn (unlike the overview's random labels). 6,000 train / 1,000 test
    samples. Introduced in 02_data.
    """
    teacher = torch.Generator().manual_seed(seed)
    w = torch.randn(28 * 28, 10, generator=teacher)
    g = torch.Generator().manual_seed(seed + (1 if train else 2))
    x = torch.randn(6000 if train else 1000, 1, 28, 28, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return x, y


def load_dataset(
    name: str = "fashion_mnist", train: bool = True, root: str | Path | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) as normalised float32, and labels (N,) as int64.

    Looks in `root` (default: `default_data_dir()`), then in Debian's
    /usr/share/datasets/fashion-mnist, then lets torchvision download.
    Introduced in 02_data.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {sorted(DATASETS)}, got {name!r}")
    cls_name, mean, std, _ = DATASETS[name]
    if cls_name is None:
        return synthetic_dataset(train)
    import torchvision

    root = Path(root) if root is not None else default_data_dir()
    raw = root / cls_name / "raw"
    have = all((raw / f).exists() for f in IDX_FILES)
    if not have and name == "fashion_mnist" and DEBIAN_FASHION_MNIST.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for f in IDX_FILES:  # Debian's .gz bytes differ from upstream's: decompress ourselves
            with gzip.open(DEBIAN_FASHION_MNIST / f"{f}.gz") as src, open(raw / f, "wb") as dst:
                shutil.copyfileobj(src, dst)
        have = True
    try:
        ds = getattr(torchvision.datasets, cls_name)(root, train=train, download=download and not have)
    except Exception as err:  # offline, or download refused
        hint = ("sudo apt-get install dataset-fashion-mnist  (Debian/Ubuntu), or "
                if name == "fashion_mnist" else "")
        raise FileNotFoundError(
            f"{cls_name} not found in {raw} and could not be downloaded ({err}). To get it: "
            f"{hint}run `make data` on a machine with internet, or put the four "
            f"decompressed files {IDX_FILES} into {raw}."
        ) from err
    x = ds.data.unsqueeze(1).float().div(255).sub(mean).div(std)
    return x, ds.targets.long()


def _check_split(labels: np.ndarray, num_clients: int, min_size: int = 1) -> int:
    """Validate the knobs shared by every partitioner; return the sample count.

    Introduced in 02_data.
    """
    n = len(labels)
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be an integer in [1, {n}] (the number of samples), "
                         f"got {num_clients!r}")
    if not isinstance(min_size, (int, np.integer)) or not 1 <= min_size <= n // num_clients:
        raise ValueError(f"min_size must be an integer in [1, {n // num_clients}] "
                         f"(samples / num_clients) for {num_clients} clients, got {min_size!r}")
    return n


def _split_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Turn "sample i belongs to client owner[i]" into one sorted index array per client.

    Introduced in 02_data.
    """
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_clients)
    return np.split(order, np.cumsum(counts)[:-1])


def partition_iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle, then deal out equal shares (sizes differ by at most 1). Introduced in 02_data."""
    n = _check_split(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: sort by label, cut into
    num_clients * shards_per_client shards, give each client `shards_per_client` of them.
    Introduced in 02_data.
    """
    n = _check_split(labels, num_clients)
    if not isinstance(shards_per_client, (int, np.integer)) or not (
        1 <= shards_per_client <= n // num_clients
    ):
        raise ValueError(f"shards_per_client must be an integer in [1, {n // num_clients}], "
                         f"got {shards_per_client!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)  # random order within each label
    by_label = perm[np.argsort(np.asarray(labels)[perm], kind="stable")]
    shards = np.array_split(by_label, num_clients * shards_per_client)
    deal = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]


def partition_classes(
    labels: np.ndarray, num_clients: int, classes_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Every client holds exactly `classes_per_client` distinct classes (the "#C = k" split
    of Li et al.'s NIID-Bench, 2022). Classes are put in a random ring and client k takes
    the k-th class and the ones after it; each class is shared equally by the clients that
    hold it. Introduced in 02_data.
    """
    labels = np.asarray(labels)
    n = _check_split(labels, num_clients)
    classes = np.unique(labels)
    if not isinstance(classes_per_client, (int, np.integer)) or not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be an integer in [1, {len(classes)}] (the number of "
                         f"classes), got {classes_per_client!r}")
    if num_clients + classes_per_client - 1 < len(classes):
        raise ValueError(f"num_clients + classes_per_client - 1 must be >= {len(classes)} (the number of "
                         f"classes), or some classes would be held by nobody; got {num_clients} clients "
                         f"with {classes_per_client} classes each")
    rng = np.random.default_rng(seed)
    ring = rng.permutation(classes)
    held = [ring[(k + np.arange(classes_per_client)) % len(classes)] for k in range(num_clients)]
    owner = np.empty(n, dtype=np.int64)
    for c in classes:
        holders = [k for k in range(num_clients) if c in held[k]]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, part in zip(holders, np.array_split(idx, len(holders))):
            owner[part] = k
    return _split_by_owner(owner, num_clients)


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float = 0.5, min_size: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Label skew after Hsu et al. (2019): each class is split across clients in
    proportions drawn from Dirichlet(alpha); small alpha = few classes per client.
    Clients below `min_size` then receive random samples from clients above it: one
    pass, no resampling loop. Introduced in 02_data.
    """
    labels = np.asarray(labels)
    n = _check_split(labels, num_clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (small = strong skew, large = near IID), got {alpha!r}")
    rng = np.random.default_rng(seed)
    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
        owner[idx] = np.repeat(np.arange(num_clients), np.diff(np.r_[0, cuts, len(idx)]))
    # Top up small clients: every client keeps min_size samples it already has; the rest
    # of the big clients' samples, in random order, are the pool that the small ones draw from.
    need = np.maximum(min_size - np.bincount(owner, minlength=num_clients), 0)
    if need.sum() > 0:
        shuffled = rng.permutation(n)
        by_owner = shuffled[np.argsort(owner[shuffled], kind="stable")]
        starts = np.r_[0, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]]
        rank = np.arange(n) - np.repeat(starts, np.bincount(owner, minlength=num_clients))
        spare = by_owner[rank >= min_size]
        donated = rng.permutation(spare)[: need.sum()]
        owner[donated] = np.repeat(np.arange(num_clients), need)
    return _split_by_owner(owner, num_clients)


def partition_quantity_skew(
    labels: np.ndarray, num_clients: int, beta: float = 0.5, min_size: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """IID labels but unequal sizes: client shares drawn from Dirichlet(beta), each client
    at least `min_size` samples. Introduced in 02_data.
    """
    n = _check_split(labels, num_clients, min_size)
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (small = very unequal sizes), got {beta!r}")
    rng = np.random.default_rng(seed)
    extra = rng.multinomial(n - num_clients * min_size, rng.dirichlet(np.full(num_clients, float(beta))))
    sizes = min_size + extra
    perm = rng.permutation(n)
    return [np.sort(part) for part in np.split(perm, np.cumsum(sizes)[:-1])]


PARTITIONERS = {
    "iid": partition_iid,
    "shards": partition_shards,
    "classes": partition_classes,
    "dirichlet": partition_dirichlet,
    "quantity": partition_quantity_skew,
}


def make_partition(
    scheme: str, labels: np.ndarray, num_clients: int, seed: int = 0, **knobs
) -> list[np.ndarray]:
    """Split by the named scheme; `knobs` go to its partitioner. Introduced in 02_data."""
    if scheme not in PARTITIONERS:
        raise ValueError(f"partition scheme must be one of {sorted(PARTITIONERS)}, got {scheme!r}")
    return PARTITIONERS[scheme](np.asarray(labels), num_clients, seed=seed, **knobs)


def label_counts(partitions: Sequence[np.ndarray], labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """(clients, classes) matrix: how many samples of each class each client holds.

    Introduced in 02_data.
    """
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in partitions])


def label_skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the overall
    mix: 0 for identical mixes, near 1 when clients hold disjoint classes.
    Introduced in 02_data.
    """
    counts = np.asarray(counts, dtype=np.float64)
    overall = counts.sum(0) / counts.sum()
    per_client = counts / counts.sum(1, keepdims=True)
    return float(0.5 * np.abs(per_client - overall).sum(1).mean())


def plot_label_distribution(
    counts: np.ndarray, class_names: Sequence[str] | None = None, title: str = "", ax=None
):
    """Stacked bars: samples of each class held by each client. Introduced in 02_data."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    bottom = np.zeros(len(counts))
    colors = plt.get_cmap("tab10")
    for c in range(counts.shape[1]):
        name = class_names[c] if class_names is not None else f"class {c}"
        ax.bar(np.arange(len(counts)), counts[:, c], bottom=bottom, color=colors(c % 10), label=name)
        bottom += counts[:, c]
    ax.set_xlabel("client id")
    ax.set_ylabel("samples (count)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    return ax


# ----------------------------------------------------------------------------
# 03_local_training: one client trains and is evaluated
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` PyTorch threads. The thread count changes the order of
    float additions, hence the last bits of the result. Introduced in 03_local_training.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_knob(
    name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """Return `value` as a float, or raise ValueError naming the knob and its range. NaN is
    always refused, and so are +-inf unless `allow_inf`. Introduced in 03_local_training.
    """
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = number and not math.isnan(value) and (allow_inf or math.isfinite(value)) and (
        low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        shown = "(" + f"{low:g}" if low_open else "[" + f"{low:g}"
        shown += f", {high:g}" + (")" if high_open or (math.isinf(high) and not allow_inf) else "]")
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number in {shown}, got {value!r}")
    return float(value)


def check_training_knobs(
    epochs: int, batch_size: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> None:
    """Raise ValueError naming the first local-training knob out of range.

    Introduced in 03_local_training.
    """
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _check_knob("lr", lr, 0, math.inf, low_open=True)
    _check_knob("momentum", momentum, 0, 1, high_open=True)
    _check_knob("weight_decay", weight_decay, 0, math.inf)


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 1,
    batch_size: int = 32, lr: float = 0.05, seed: int = 0, momentum: float = 0.0,
    weight_decay: float = 0.0, grad_hook: Callable[[], None] | None = None,
) -> list[float]:
    """SGD (optionally with momentum and weight decay) on cross-entropy; returns the mean
    training loss of each epoch. The batch order comes from `seed` alone. `grad_hook`, if
    given, runs after each backward pass, before the step, and may change the gradients
    (notebook 06 uses it for FedProx and SCAFFOLD). Introduced in 03_local_training.
    """
    check_training_knobs(epochs, batch_size, lr, momentum, weight_decay)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number (>= 1) of samples, got {len(x)} and {len(y)}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            if grad_hook is not None:
                grad_hook()
            opt.step()
            total += loss.item() * len(batch)
        losses.append(total / len(x))
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in [0, 1]) of `model` on (x, y).

    Introduced in 03_local_training.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number (>= 1) of samples, got {len(x)} and {len(y)}")
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(out, target, reduction="sum").item()
        correct += (out.argmax(1) == target).sum().item()
    return loss / len(x), correct / len(x)


# ----------------------------------------------------------------------------
# 04_remote_train_aggregate: Ray tasks and weighted FedAvg
# ----------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> str:
    """Start Ray once per kernel (running it again is harmless) and return the
    dashboard's address ("" when it is off). A new local Ray, unless RAY_ADDRESS names a
    cluster to join: a bare ray.init() would join whatever cluster was last started on this
    machine. Introduced in 04_remote_train_aggregate.
    """
    ctx = ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=num_cpus,
                   include_dashboard=dashboard, logging_level="ERROR", ignore_reinit_error=True,
                   runtime_env={"worker_process_setup_hook": "fed_helpers.ray_worker_setup"})
    return ctx.dashboard_url or ""


def ray_worker_setup() -> None:
    """Run by each Ray worker process as it starts (`init_ray` asks Ray to): it imports this
    module, and with it torch, before the worker takes its first task, so that cancelling a
    task never stops a worker half-way through an import. Introduced in 04_remote_train_aggregate.
    """
    torch.set_num_threads(1)  # a worker is given one CPU


def client_update(
    global_state: dict[str, torch.Tensor], x_all: np.ndarray, y_all: np.ndarray,
    indices: np.ndarray, model_name: str = "2nn", epochs: int = 1, batch_size: int = 32,
    lr: float = 0.05, seed: int = 0,
) -> tuple[dict[str, torch.Tensor], int, float]:
    """One client's work in a round: start from the global weights, train on its own
    samples, return (new weights, number of samples, last epoch's training loss).

    One PyTorch thread, so the result is bit-identical wherever it runs.
    Introduced in 04_remote_train_aggregate.
    """
    with torch_threads(1):
        model = load_weights(make_model(model_name), global_state)
        x = torch.from_numpy(x_all[indices])  # fancy indexing copies just this client's rows
        y = torch.from_numpy(y_all[indices])
        losses = train_local(model, x, y, epochs, batch_size, lr, seed)
    return model.state_dict(), len(indices), losses[-1]


client_update_remote = ray.remote(num_cpus=1)(client_update)


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of client states: sum_k w_k * state_k / sum_k w_k, each tensor
    accumulated in float64 in the given order. Weights are usually sample counts.
    Introduced in 04_remote_train_aggregate.
    """
    if len(states) == 0:
        raise ValueError("states must hold at least 1 client state, got 0")
    if len(weights) != len(states):
        raise ValueError(f"weights must have one entry per state ({len(states)}), got {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and sum to > 0, got {list(weights)}")
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != first.keys() or any(s[k].shape != first[k].shape for k in first):
            raise ValueError(f"states[{i}] has other keys or shapes than states[0]: "
                             "all clients must train the same model")
    out = {}
    for k, ref in first.items():
        if not ref.is_floating_point():
            out[k] = ref.clone()  # e.g. integer counters: averaging makes no sense
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for wk, s in zip(w / w.sum(), states):
            acc += float(wk) * s[k].to(torch.float64)
        out[k] = acc.to(ref.dtype)
    return out


# ----------------------------------------------------------------------------
# 05_round_loop: one round engine, built here with FedAvg and extended by every later notebook
# ----------------------------------------------------------------------------


def sample_clients(num_clients: int, fraction: float, seed: int, round_idx: int) -> np.ndarray:
    """The sorted ids of the max(1, round(fraction * num_clients)) clients that take part
    in round `round_idx`; the same (seed, round) always gives the same clients.
    Introduced in 05_round_loop.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"client_fraction must be in (0, 1], got {fraction!r}")
    m = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, round_idx])
    return np.sort(rng.choice(num_clients, size=m, replace=False))


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """A seed for one client in one round, derived from the run's seed.

    Introduced in 05_round_loop.
    """
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def flat_weights(model: nn.Module) -> torch.Tensor:
    """All of `model`'s parameters as one float32 vector (a copy), in state-dict order:
    the one weight format of the engine. Introduced in 05_round_loop.
    """
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def set_flat_weights(model: nn.Module, flat: torch.Tensor | np.ndarray) -> nn.Module:
    """Load the flat vector `flat` into `model`'s parameters (which become views of a copy
    of it). Introduced in 05_round_loop.
    """
    flat = flat.detach().clone() if isinstance(flat, torch.Tensor) else torch.tensor(flat)
    torch.nn.utils.vector_to_parameters(flat.to(torch.float32), model.parameters())
    return model


@dataclass(frozen=True)
class TrainConfig:
    """Every local-training knob, checked once when it is made. Introduced in 05_round_loop."""

    model: str = "2nn"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        check_training_knobs(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay)


@dataclass(frozen=True)
class ClientJob:
    """One client's work order for one round. Introduced in 05_round_loop."""

    cid: int  # client id
    round: int
    indices: np.ndarray  # which training samples the client holds
    seed: int  # its batch order, from (run seed, round, client)
    payload: tuple | None = None  # from the strategy: (hook maker, its argument), or None (plain SGD)
    give_up_at: float | None = None  # the round's deadline, as a time.time()
    fault: str | None = None  # set only by fault injection (notebook 08)


@dataclass(frozen=True)
class ClientResult:
    """What comes back from one client. Introduced in 05_round_loop."""

    cid: int
    num_samples: int = 0
    loss: float = float("nan")  # its last local epoch's mean training loss
    weights: np.ndarray | None = None  # its new flat float32 weights, as sent
    status: str = "ok"  # "ok", "failed" (it raised, or its worker died) or "late" (missed the deadline)
    error: str = ""


def train_client(
    model: nn.Module, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, job: ClientJob, cfg: TrainConfig
) -> ClientResult:
    """The engine's one client function: load the global `weights` into `model` (any model of
    the right architecture: its old weights are overwritten), train on the job's samples with the
    gradient hook its payload makes, and return the new flat weights. One PyTorch thread, so
    the bits do not depend on where it runs. Introduced in 05_round_loop.
    """
    with torch_threads(1):
        w = torch.tensor(weights)  # a copy: arrays from Ray are read-only
        torch.nn.utils.vector_to_parameters(w, model.parameters())
        hook = job.payload[0](model, w, job.payload[1]) if job.payload is not None else None
        x, y = torch.from_numpy(x_all[job.indices]), torch.from_numpy(y_all[job.indices])
        losses = train_local(model, x, y, cfg.epochs, cfg.batch_size, cfg.lr, job.seed, cfg.momentum,
                             cfg.weight_decay, hook)
        return ClientResult(job.cid, len(job.indices), losses[-1], flat_weights(model).numpy())


def describe_error(err: BaseException) -> str:
    """One line for the history: the error's type and first line (a Ray task error: its cause's).

    Introduced in 05_round_loop.
    """
    cause = getattr(err, "cause", None) or err
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}"[:200]


def run_client(
    client: Callable, model: nn.Module, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray,
    job: ClientJob, cfg: TrainConfig,
) -> ClientResult:
    """Run `client` on `job` as every executor does: a job whose deadline has passed is late
    without starting; an exception becomes a "failed" result (a TimeoutError a "late" one)
    instead of stopping the round. Introduced in 05_round_loop.
    """
    if job.give_up_at is not None and time.time() >= job.give_up_at:
        return ClientResult(job.cid, status="late", error="the round's deadline passed before it started")
    try:
        return client(model, weights, x_all, y_all, job, cfg)
    except Exception as err:
        return ClientResult(job.cid, status="late" if isinstance(err, TimeoutError) else "failed",
                            error=describe_error(err))


@dataclass(frozen=True)
class TransformedClient:
    """A client function whose update is changed on the client, before it leaves:
    `transform(new_weights, global_weights, job)` returns what is sent: float32 weights, or integers
    kept as they are (10's masked vectors). Introduced in 05_round_loop.
    """

    inner: Callable
    transform: Callable

    def __call__(self, model, weights, x_all, y_all, job, cfg) -> ClientResult:
        r = self.inner(model, weights, x_all, y_all, job, cfg)
        sent = np.asarray(self.transform(r.weights, weights, job))
        return replace(r, weights=sent if sent.dtype.kind in "iu" else sent.astype(np.float32, copy=False))


class InProcess:
    """Executor: every client in this process, one after another. The compute floor, and the
    reference for the bits. Every executor has `start`, `run` (results in client-id order,
    honouring each job's deadline) and `stop`. Introduced in 05_round_loop.
    """

    name = "in-process"

    def start(self, x_all: np.ndarray, y_all: np.ndarray, cfg: TrainConfig, client: Callable) -> None:
        self.x_all, self.y_all, self.client, self.model = x_all, y_all, client, make_model(cfg.model)

    def run(self, jobs: list[ClientJob], weights: np.ndarray, cfg: TrainConfig) -> list[ClientResult]:
        out = [run_client(self.client, self.model, weights, self.x_all, self.y_all, job, cfg) for job in jobs]
        return sorted(out, key=lambda r: r.cid)

    def stop(self) -> None:
        self.x_all = self.y_all = None


def ray_client(client: Callable, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, job: ClientJob,
               cfg: TrainConfig) -> ClientResult:
    """What one Ray task runs: `run_client` on a fresh model. Introduced in 05_round_loop."""
    return run_client(client, make_model(cfg.model), weights, x_all, y_all, job, cfg)


# A dead worker is retried once (the task is a pure function: safe to rerun); an exception never is.
ray_client_remote = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(ray_client)


def gather(pending: dict, give_up_at: float | None, on_done: Callable | None = None) -> list[ClientResult]:
    """Wait for the Ray refs in `pending` ({ref: its jobs}) until `give_up_at`. A ref that
    raises (its worker or actor died) fails its jobs; refs still running at the deadline are
    cancelled and their jobs are late. `on_done(ref, error)` (error: None, or what the ref raised)
    may return more {ref: jobs} to wait for.
    Results come back in client-id order. Introduced in 05_round_loop.
    """
    results: list[ClientResult] = []
    try:
        while pending:
            left = None if give_up_at is None else max(0.0, give_up_at - time.time())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not done:
                break  # the deadline has passed
            jobs, error = pending.pop(done[0]), None
            try:
                out = ray.get(done[0])
                results += out if isinstance(out, list) else [out]
            except Exception as err:  # its worker died (after Ray's retry), or its actor did
                error = err
                results += [ClientResult(j.cid, status="failed", error=describe_error(err)) for j in jobs]
            if on_done is not None:
                pending.update(on_done(done[0], error))
    finally:  # at the deadline, and however else we leave (even Ctrl-C): stop what still runs
        for ref in pending:
            ray.cancel(ref)
    late = [ClientResult(j.cid, status="late", error="no answer by the deadline")
            for jobs in pending.values() for j in jobs]
    return sorted(results + late, key=lambda r: r.cid)


class RayTasks:
    """Executor: one Ray task per client per round, as in notebook 04: the data is put into
    the object store once per run, the weights once per round. Introduced in 05_round_loop.
    """

    name = "ray-tasks"

    def start(self, x_all: np.ndarray, y_all: np.ndarray, cfg: TrainConfig, client: Callable) -> None:
        init_ray()
        self.x_ref, self.y_ref, self.client = ray.put(x_all), ray.put(y_all), client

    def run(self, jobs: list[ClientJob], weights: np.ndarray, cfg: TrainConfig) -> list[ClientResult]:
        w_ref = ray.put(weights)
        pending = {ray_client_remote.remote(self.client, w_ref, self.x_ref, self.y_ref, job, cfg): [job]
                   for job in jobs}
        return gather(pending, jobs[0].give_up_at if jobs else None)

    def stop(self) -> None:
        self.x_ref = self.y_ref = None  # frees the data in the object store


class FedAvg:
    """McMahan et al. (2017), the engine's default strategy. A strategy decides what each
    client receives (`payload`) and how the server steps (`receive`, `server_step`). Client:
    plain local SGD. Server: the new global model is the aggregate (the sample-weighted mean).
    Notebook 06's strategies override only what they change. Introduced in 05_round_loop.
    """

    name = "fedavg"

    def payload(self, cid: int, global_w: torch.Tensor) -> tuple | None:
        """What client `cid` receives besides the weights: (hook maker, argument), or None (plain SGD)."""
        return None

    def receive(self, cid: int, global_w: torch.Tensor, client_w: torch.Tensor, steps: int, lr: float,
                num_samples: int = 1) -> None:
        """Called for each accepted client's result (its `steps` of rate `lr` on `num_samples`), in
        client-id order (SCAFFOLD keeps state here)."""

    def server_step(self, global_w: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """The new global weights (float32) from the old ones and the float64 aggregate."""
        return avg.to(torch.float32)

    def reset(self) -> None:
        """Forget what an earlier run taught the server: every tensor it holds is dropped."""
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, None)


def local_steps(num_samples: int, epochs: int, batch_size: int) -> int:
    """SGD steps a client with `num_samples` takes: epochs * ceil(samples / batch).

    Introduced in 05_round_loop.
    """
    return epochs * math.ceil(num_samples / batch_size)


def weighted_mean(results: Sequence[ClientResult], global_w: torch.Tensor, jobs: Sequence = ()) -> torch.Tensor:
    """The default server-side aggregation: sum_k (n_k / n) * w_k in float64, folded in the
    given (client-id) order, so the bits never depend on who finished first. An aggregation rule
    also gets the round's `jobs` (who was asked; this one needs only who answered).
    Introduced in 05_round_loop.
    """
    sizes = np.array([r.num_samples for r in results], dtype=np.float64)
    avg = torch.zeros(len(global_w), dtype=torch.float64)
    for r, c in zip(results, sizes / sizes.sum()):
        avg += float(c) * torch.tensor(r.weights, dtype=torch.float64)
    return avg


def client_drift(results: Sequence[ClientResult], global_w: torch.Tensor) -> float:
    """Root-mean-square distance of the client models from their sample-weighted mean
    (weighted by samples). Notebook 06 explains why it matters. Introduced in 05_round_loop.
    """
    sizes = np.array([r.num_samples for r in results], dtype=np.float64)
    g, mean, spread = global_w.double(), torch.zeros(len(global_w), dtype=torch.float64), 0.0
    for r, c in zip(results, sizes / sizes.sum()):
        d = torch.tensor(r.weights, dtype=torch.float64) - g
        mean += float(c) * d
        spread += float(c) * float(d.square().sum())
    return math.sqrt(max(spread - float(mean.square().sum()), 0.0))


def wire_size(obj: object) -> int:
    """Bytes `obj` takes when serialized the way Ray sends it: pickle protocol 5, with numpy
    arrays as out-of-band buffers (measured without copying them). Introduced in 05_round_loop.
    """
    buffers: list = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)  # a read-only array (from Ray) adds a byte:
    return len(head) - sum(b.raw().readonly for b in buffers) + sum(b.raw().nbytes for b in buffers)  # as sent


@dataclass
class RoundPolicy:
    """How a round treats its clients. This one is strict: a client that fails, or misses
    `deadline_s` (seconds; None: no deadline), stops the run with its error, since without
    fault injection that is a bug. Notebook 08's `Resilient` tolerates them. A round with fewer
    than `min_clients` usable updates keeps the model. Introduced in 05_round_loop.
    """

    deadline_s: float | None = None
    min_clients: int = 1

    def __post_init__(self) -> None:
        if self.deadline_s is not None:
            _check_knob("deadline_s", self.deadline_s, 0, math.inf, low_open=True)
        if not isinstance(self.min_clients, (int, np.integer)) or self.min_clients < 1:
            raise ValueError(f"min_clients must be an integer >= 1, got {self.min_clients!r}")

    def wrap(self, client: Callable) -> Callable:
        """The client function as this policy runs it (08 wraps it in fault injection)."""
        return client

    def plan(self, jobs: list[ClientJob], seed: int) -> list[ClientJob]:
        """The round's jobs, in the order they are handed out (08 adds faults here)."""
        return jobs

    def tamper(self, results: list[ClientResult], global_w: torch.Tensor, jobs: list[ClientJob]) -> list[ClientResult]:
        """What reaches the server of the round's `results`: here, all of them as they are (11's
        colluding attackers replace their own answers here, having seen the others')."""
        return results

    def screen(self, results: list[ClientResult], global_w: torch.Tensor) -> dict[int, str]:
        """{client id: reason} for the answers not to aggregate; here, raise at the first failure."""
        for r in results:
            if r.status != "ok":
                raise RuntimeError(f"client {r.cid} is {r.status}: {r.error} (RoundPolicy stops the run; "
                                   "notebook 08's Resilient policy leaves such clients out)")
        return {}


@dataclass(frozen=True, eq=False)
class FedTask:
    """What a federated run learns, and from whom: the data, its split across clients, the
    local-training knobs, the share of clients per round and the seed; all checked when it is
    made, before any work. Introduced in 05_round_loop.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    partitions: Sequence[np.ndarray]
    config: TrainConfig = TrainConfig()
    client_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.train[1])
        _check_knob("client_fraction", self.client_fraction, 0, 1, low_open=True)
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if len(self.partitions) == 0 or any(len(p) == 0 for p in self.partitions):
            raise ValueError("partitions must hold at least 1 client, each with at least 1 sample")
        for k, p in enumerate(self.partitions):
            p = np.asarray(p)
            if p.dtype.kind not in "iu" or p.min() < 0 or p.max() >= n:
                raise ValueError(f"partitions[{k}] must hold integer sample indices in [0, {n - 1}] (the training "
                                 f"set has {n} samples), got {p.dtype} values in [{p.min()}, {p.max()}]")


def make_jobs(task: FedTask, strategy: FedAvg, global_w: torch.Tensor, rnd: int,
              deadline_s: float | None) -> list[ClientJob]:
    """Sample round `rnd`'s clients and write each one's job, in client-id order.

    Introduced in 05_round_loop.
    """
    clients = sample_clients(len(task.partitions), task.client_fraction, task.seed, rnd)
    give_up_at = None if deadline_s is None else time.time() + deadline_s
    return [ClientJob(int(k), rnd, task.partitions[k], client_seed(task.seed, rnd, int(k)),
                      strategy.payload(int(k), global_w), give_up_at) for k in clients]


def history_row(rnd: int, jobs: list[ClientJob], results: list[ClientResult], rejected: dict[int, str],
                accepted: list[ClientResult], aggregated: bool, weights: np.ndarray, global_w: torch.Tensor,
                test_loss: float, test_acc: float, seconds: float) -> dict:
    """The one history format: a JSON-ready row per round. `bytes_sent` is what crossed the
    network, down (weights and payload to every sampled client) plus up (every answer that
    arrived), as serialized. Introduced in 05_round_loop.
    """
    answered = [r for r in results if r.status == "ok"]
    masked = any(r.weights.dtype.kind in "iu" for r in accepted)  # 10: the server cannot see the updates
    sizes = np.array([r.num_samples for r in accepted], dtype=np.float64)
    down = len(jobs) * wire_size(weights) + sum(wire_size(j.payload) for j in jobs)
    up = sum(wire_size(r) for r in answered)
    return {
        "round": rnd, "accuracy": test_acc, "loss": test_loss,
        "train_loss": float(np.dot(sizes, [r.loss for r in accepted]) / sizes.sum()) if aggregated else None,
        "drift": client_drift(accepted, global_w) if aggregated and not masked else None,
        "clients": len(accepted), "sampled": sorted(j.cid for j in jobs), "accepted": [r.cid for r in accepted],
        "failed": {str(r.cid): r.error for r in results if r.status == "failed"},
        "late": [r.cid for r in results if r.status == "late"],
        "rejected": {str(k): v for k, v in sorted(rejected.items())},
        "aggregated": aggregated, "seconds": seconds, "bytes_down": down, "bytes_up": up, "bytes_sent": down + up,
    }


def run_round(rnd: int, model: nn.Module, task: FedTask, strategy: FedAvg, executor, policy: RoundPolicy,
              aggregate: Callable) -> dict:
    """One round: plan the jobs, run them, screen the answers, aggregate the accepted ones,
    let the strategy step, evaluate. Returns the round's history row. Introduced in 05_round_loop.
    """
    start, cfg = time.perf_counter(), task.config
    w = flat_weights(model)
    jobs = policy.plan(make_jobs(task, strategy, w, rnd, policy.deadline_s), task.seed)
    results = executor.run(jobs, w.numpy(), cfg)  # in client-id order, whoever finished first
    with torch_threads(1):  # on vectors this size, extra threads cost more than they give (measured: 1.1 s -> 0.05 s)
        results = policy.tamper(results, w, jobs)  # what arrives (11: attackers that collude)
        rejected = policy.screen(results, w)
        accepted = [r for r in results if r.status == "ok" and r.cid not in rejected]
        avg = aggregate(accepted, w, jobs) if len(accepted) >= policy.min_clients else None
        aggregated = avg is not None  # else the model is kept (a rule may refuse too: 10's aborted secure sum)
        if aggregated:
            for r in accepted:
                steps = local_steps(r.num_samples, cfg.epochs, cfg.batch_size)
                strategy.receive(r.cid, w, torch.tensor(r.weights), steps, cfg.lr, r.num_samples)
            set_flat_weights(model, strategy.server_step(w, avg))
    loss, acc = evaluate(model, *task.test)  # the caller's threads: the same numbers as evaluating the model later
    return history_row(rnd, jobs, results, rejected, accepted, aggregated, w.numpy(), w, loss, acc,
                       time.perf_counter() - start)


def run_rounds(
    task: FedTask, rounds: int, strategy: FedAvg | None = None, executor=None, policy: RoundPolicy | None = None,
    transform: Callable | None = None, aggregate: Callable = weighted_mean, checkpoint=None,
    callbacks: Sequence[Callable[[list[dict]], None]] = (), progress: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """The round engine: `rounds` rounds of `task`, with pieces that later notebooks replace:
    the `strategy` (FedAvg), the `executor` (`InProcess`), the round `policy` (strict), the
    client-side `transform` of each update, the server-side `aggregate` rule, a `checkpoint`er
    (resume), and `callbacks` called with the history after every round. Returns the final
    model and the history. Introduced in 05_round_loop.
    """
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    strategy, executor, policy = strategy or FedAvg(), executor or InProcess(), policy or RoundPolicy()
    if policy.min_clients > len(task.partitions):
        raise ValueError(f"min_clients must be in [1, {len(task.partitions)}] (the number of clients), "
                         f"got {policy.min_clients}")
    client = policy.wrap(train_client if transform is None else TransformedClient(train_client, transform))
    model, history = make_model(task.config.model, task.seed), []
    strategy.reset()  # each run starts the server afresh...
    if checkpoint is not None:  # ...or from its last checkpoint
        history = checkpoint.restore(model, strategy, rounds, task, policy, transform, aggregate)
    executor.start(task.train[0].numpy(), task.train[1].numpy(), task.config, client)
    try:  # however the loop ends (even Ctrl-C), the executor stops: no leaked workers
        for rnd in tqdm(range(len(history) + 1, rounds + 1), desc=f"rounds ({strategy.name}, {executor.name})",
                        initial=len(history), total=rounds, disable=not progress):
            if checkpoint is not None:
                checkpoint.begin(rnd, strategy)
            history.append(run_round(rnd, model, task, strategy, executor, policy, aggregate))
            try:  # the callbacks first, so that what they write into the row is saved with it
                for callback in callbacks:
                    callback(history)
            finally:  # and the round is saved even if one of them stops the run
                if checkpoint is not None:
                    checkpoint.save(model, strategy, history)
    finally:
        executor.stop()
    return model, history


def plot_history(histories: dict[str, list[dict]], baseline: float | None = None):
    """Test accuracy and loss per round, one line per run, side by side.

    `baseline` draws a centralized accuracy for reference. Introduced in 05_round_loop.
    """
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, hist in histories.items():
        rounds = [h["round"] for h in hist]
        ax_acc.plot(rounds, [100 * h["accuracy"] for h in hist], marker="o", label=label)
        ax_loss.plot(rounds, [h["loss"] for h in hist], marker="o", label=label)
    if baseline is not None:
        ax_acc.axhline(100 * baseline, color="gray", linestyle="--", label="centralized")
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="Global model accuracy")
    ax_loss.set(xlabel="round", ylabel="test loss (cross-entropy)", title="Global model loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def live_plot(label: str, earlier: dict[str, list[dict]] | None = None, baseline: float | None = None):
    """A `run_rounds` callback that redraws `plot_history` in place after every round,
    with finished runs in `earlier` shown alongside. Introduced in 05_round_loop.
    """
    from IPython.display import display

    handle = None

    def update(history: list[dict]) -> None:
        nonlocal handle
        fig = plot_history({**(earlier or {}), label: history}, baseline)
        if handle is None:
            handle = display(fig, display_id=True)
        else:
            handle.update(fig)
        plt.close(fig)

    return update


# ----------------------------------------------------------------------------
# 06_client_drift: strategies beyond FedAvg (FedProx, server optimizers, SCAFFOLD)
# ----------------------------------------------------------------------------


def split_like(model: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of the flat vector `flat`, one per parameter of `model`, in the same shapes.

    Introduced in 06_client_drift.
    """
    params = list(model.parameters())
    return [v.view_as(p) for v, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


def prox_hook(model: nn.Module, global_w: torch.Tensor, mu: float) -> Callable[[], None]:
    """FedProx's client side: the gradient of (mu / 2) * ||w - w_global||^2, added to
    every gradient, pulls the client back toward the global model. The hook keeps its own
    copy of `global_w`: the model's parameters may be views of that very vector (as after
    `vector_to_parameters`), and an anchor that moves with them would pull with zero force.
    Introduced in 06_client_drift.
    """
    params, anchor = list(model.parameters()), split_like(model, global_w.clone())

    def hook() -> None:
        for p, a in zip(params, anchor):
            p.grad.add_(p.detach() - a, alpha=mu)

    return hook


def correction_hook(model: nn.Module, global_w: torch.Tensor, correction: np.ndarray) -> Callable[[], None]:
    """SCAFFOLD's client side: add the drift correction c - c_i (server control variate
    minus this client's) to every gradient. Introduced in 06_client_drift.
    """
    params, corr = list(model.parameters()), split_like(model, torch.tensor(correction))  # a copy: Ray's is read-only

    def hook() -> None:
        for p, c in zip(params, corr):
            p.grad.add_(c)

    return hook


class FedProx(FedAvg):
    """Li et al. (2020). Client: local loss + (mu / 2) * ||w - w_global||^2, which limits
    how far a client drifts; mu = 0 is FedAvg. Server: as FedAvg. Introduced in 06_client_drift.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        self.mu = _check_knob("mu", mu, 0, math.inf)

    def payload(self, cid: int, global_w: torch.Tensor) -> tuple:
        return (prox_hook, self.mu)


class FedAvgM(FedAvg):
    """Server momentum (Hsu et al. 2019; Reddi et al. 2021). The mean client update
    delta = avg - w is a pseudo-gradient step; the server keeps a momentum m = beta*m + delta
    and moves w += server_lr * m. momentum 0 with server_lr 1 is FedAvg, bit for bit: the new
    weights are computed as the mean plus what the momentum changes. Introduced in 06_client_drift.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        self.server_lr = _check_knob("server_lr", server_lr, 0, math.inf, low_open=True)
        self.momentum = _check_knob("momentum", momentum, 0, 1, high_open=True)
        self.m: torch.Tensor | None = None

    def server_step(self, global_w: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        delta = avg - global_w.double()
        self.m = delta if self.m is None else self.momentum * self.m + delta
        return (avg + (self.server_lr * self.m - delta)).to(torch.float32)  # = w + server_lr * m


class FedAdam(FedAvg):
    """Reddi et al. (2021), "Adaptive Federated Optimization": Adam on the server, with
    the mean client update delta = avg - w as the (negative) gradient; tau bounds the
    per-coordinate step, and there is no bias correction, as in the paper. Introduced in 06_client_drift.
    """

    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.server_lr = _check_knob("server_lr", server_lr, 0, math.inf, low_open=True)
        self.beta1 = _check_knob("beta1", beta1, 0, 1, high_open=True)
        self.beta2 = _check_knob("beta2", beta2, 0, 1, high_open=True)
        self.tau = _check_knob("tau", tau, 0, math.inf, low_open=True)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Adam's v: an exponential moving average of delta^2."""
        return self.beta2 * v + (1 - self.beta2) * delta_sq

    def server_step(self, global_w: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        delta = avg - global_w.double()
        if self.m is None:
            self.m, self.v = torch.zeros_like(delta), torch.full_like(delta, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.second_moment(self.v, delta * delta)
        return (global_w.double() + self.server_lr * self.m / (self.v.sqrt() + self.tau)).to(torch.float32)


class FedYogi(FedAdam):
    """Reddi et al. (2021): FedAdam with Yogi's second moment, which moves v toward delta^2 by
    (1 - beta2) * delta^2 per round. After large updates Adam's v decays by a factor beta2 a round;
    Yogi's falls only as fast as the new updates are large, so its steps do not suddenly grow.
    Introduced in 06_client_drift.
    """

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


class ClientStateStore:
    """Per-client state kept between rounds, one `.npy` file per client that has any, in
    `folder` (default: a temporary folder, removed with the store). Clients never seen
    cost nothing, so the driver's memory does not grow with the number of clients; each
    write goes to a temporary file, then is renamed, so a file is never half-written.
    Introduced in 06_client_drift.
    """

    def __init__(self, folder: str | Path | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="client_state_") if folder is None else None
        self.folder = Path(self._tmp.name if folder is None else folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, cid: int) -> Path:
        """The file that holds client `cid`'s state."""
        return self.folder / f"client_{int(cid)}.npy"

    def get(self, cid: int, default: np.ndarray) -> np.ndarray:
        """Client `cid`'s state, or `default` if it has none yet."""
        path = self.path(cid)
        return np.load(path) if path.exists() else default

    def put(self, cid: int, value: np.ndarray) -> None:
        """Save client `cid`'s state atomically."""
        tmp = self.folder / f"client_{int(cid)}.tmp.npy"
        np.save(tmp, value)
        os.replace(tmp, self.path(cid))

    def clear(self) -> "ClientStateStore":
        """Delete every client's state; returns the (now empty) store."""
        for f in self.folder.glob("client_*.npy"):
            f.unlink()
        return self

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("client_*[0-9].npy"))


class Scaffold(FedAvg):
    """Karimireddy et al. (2020), option II, with the model's sample weights. Server control variate c, one
    c_i per client (zero until it trains; in a `ClientStateStore`). Client: gradients get + (c - c_i); after
    K steps of rate lr, c_i+ = c_i - c + (w_global - w_client) / (K * lr). Server: c += (sampled / num_clients)
    x the sample-weighted mean of c_i+ - c_i, and w += server_lr * (avg - w). Introduced in 06_client_drift.
    """

    name = "scaffold"

    def __init__(self, num_clients: int, server_lr: float = 1.0, state_dir: str | Path | None = None):
        if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        self.num_clients, self.state_dir = int(num_clients), state_dir
        self.server_lr = _check_knob("server_lr", server_lr, 0, math.inf, low_open=True)
        self.reset()

    def reset(self) -> None:  # forget c, this round's sum of n_i (c_i+ - c_i) and (clients, samples), every c_i
        self.c, self.dc_sum, self.seen, self.store = None, None, [0, 0], ClientStateStore(self.state_dir).clear()

    def _c_i(self, cid: int) -> torch.Tensor:
        return torch.from_numpy(self.store.get(cid, np.zeros(len(self.c), np.float32))).double()

    def payload(self, cid: int, global_w: torch.Tensor) -> tuple:
        self.c = torch.zeros(len(global_w), dtype=torch.float64) if self.c is None else self.c
        return (correction_hook, (self.c - self._c_i(cid)).to(torch.float32).numpy())

    def receive(self, cid: int, global_w: torch.Tensor, client_w: torch.Tensor, steps: int, lr: float,
                num_samples: int = 1) -> None:
        c_i = self._c_i(cid)
        c_new = c_i - self.c + (global_w.double() - client_w.double()) / (steps * lr)
        self.store.put(cid, c_new.to(torch.float32).numpy())
        self.dc_sum = (c_new - c_i) * num_samples + (0 if self.dc_sum is None else self.dc_sum)
        self.seen = [self.seen[0] + 1, self.seen[1] + num_samples]

    def server_step(self, global_w: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        if self.dc_sum is not None:
            (clients, samples), self.seen = self.seen, [0, 0]
            self.c, self.dc_sum = self.c + self.dc_sum * (clients / (self.num_clients * samples)), None
        return (avg + (self.server_lr - 1) * (avg - global_w.double())).to(torch.float32)  # lr 1: avg's bits


STRATEGIES = {s.name: s for s in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, Scaffold)}


def make_strategy(name: str = "fedavg", num_clients: int = 1, **knobs) -> FedAvg:
    """Build the strategy `name` with its `knobs` (e.g. mu=0.1, server_lr=0.03); unknown
    names or knobs raise ValueError listing what is allowed. Introduced in 06_client_drift.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    cls = STRATEGIES[name]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)  # FedAvg: object's *args
    allowed = [p.name for p in inspect.signature(cls.__init__).parameters.values()
               if p.kind in named and p.name not in ("self", "num_clients")]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r} takes the knobs {allowed}, got unknown {unknown}")
    return cls(num_clients, **knobs) if cls is Scaffold else cls(**knobs)


# ----------------------------------------------------------------------------
# 07_scaling_with_ray: the actor-pool executor
# ----------------------------------------------------------------------------


@ray.remote(num_cpus=1)
class ClientTrainer:
    """A long-lived Ray worker that keeps the dataset and one model between rounds and runs
    the client function on whichever chunk of jobs it is given. Introduced in 07_scaling_with_ray.
    """

    def __init__(self, x_all: np.ndarray, y_all: np.ndarray, model_name: str, client: Callable):
        torch.set_num_threads(1)
        self.x_all, self.y_all = x_all, y_all  # zero-copy views of the object store
        self.model, self.client = make_model(model_name), client
        # A process's first SGD step imports much of torch (seconds): take it now, while the actor starts.
        train_local(self.model, torch.tensor(x_all[:1]), torch.tensor(y_all[:1]))  # (copies: views are read-only)

    def train(self, weights: np.ndarray, jobs: list[ClientJob], cfg: TrainConfig) -> list[ClientResult]:
        """Run each job of the chunk, one after another (a job past its deadline is late at once)."""
        return [run_client(self.client, self.model, weights, self.x_all, self.y_all, job, cfg) for job in jobs]

    def node_id(self) -> str:
        """The Ray node this actor lives on."""
        return ray.get_runtime_context().get_node_id()


def wait_started(workers: list, pings: list, at_least: int, timeout_s: float) -> list[int]:
    """The positions of the `workers` (actors) that have started, i.e. whose `pings` (one `node_id`
    call each) have answered, once `at_least` have. An actor that cannot start (its CPU held by
    others) must not leave us waiting forever: if fewer have after `timeout_s` seconds, all are
    killed and RuntimeError says why. Introduced in 07_scaling_with_ray.
    """
    ray.wait(pings, num_returns=at_least, timeout=timeout_s)
    done = set(ray.wait(pings, num_returns=len(pings), timeout=0)[0])
    if len(done) < at_least:
        free = ray.available_resources()
        for worker in workers:
            ray.kill(worker)
        raise RuntimeError(
            f"only {len(done)} of num_workers={len(workers)} ClientTrainer actors started within start_timeout_s="
            f"{timeout_s} s; Ray's free resources: {free}. Actors left by an earlier cell may hold the CPUs: "
            "ray.kill them, restart the kernel, or pass a smaller num_workers.")
    return [i for i, ping in enumerate(pings) if ping in done]


def run_chunks(pool: "ActorPool", chunks: list[list[ClientJob]], w_ref, cfg: TrainConfig) -> list[ClientResult]:
    """Hand `chunks` of jobs to the `pool`'s started actors, two queued per actor and the next to
    whichever finishes first, until the jobs' deadline. An actor that dies fails the chunks it
    holds, and a fresh one takes its place in the pool; it gets chunks this round only if no other
    actor is left (it is slow to start, and never starts if its node is gone). Results in client-id
    order. Introduced in 07_scaling_with_ray.
    """
    up = wait_started(pool.workers, pool.pings, 1, pool.start_timeout_s)  # one still starting sits out
    todo, owner, busy = chunks[::-1], {}, set(up)  # chunks are popped from the end: in order

    def submit(i: int) -> dict:
        if not todo or i not in busy:
            return {}
        chunk = todo.pop()
        ref = pool.workers[i].train.remote(w_ref, chunk, cfg)
        owner[ref] = (i, pool.workers[i])
        return {ref: chunk}

    def on_done(ref, error) -> dict:
        i, worker = owner.pop(ref)
        if isinstance(error, ray.exceptions.RayActorError) and pool.workers[i] is worker:  # it died
            ray.kill(worker)  # (one that only lost touch must not come back holding a CPU)
            pool.workers[i] = ClientTrainer.remote(*pool.args)
            pool.pings[i] = pool.workers[i].node_id.remote()
            if len(busy) > 1:  # the others carry on; the fresh one joins in a later round
                busy.discard(i)
        return submit(i)

    pending = {}
    for i in up * 2:  # two chunks queued per actor, so none waits for the driver
        pending.update(submit(i))
    give_up_at = chunks[0][0].give_up_at if chunks else None
    results = gather(pending, give_up_at, on_done)
    never_sent = [ClientResult(j.cid, status="late", error="no answer by the deadline") for c in todo for j in c]
    return sorted(results + never_sent, key=lambda r: r.cid)


class ActorPool:
    """Executor: `num_workers` long-lived `ClientTrainer` actors (default: one per CPU) that keep
    the data; each round the weights are put once and the jobs go out in chunks of `chunk_size`
    (default: about 8 per worker), two queued per worker, the next to whichever finishes first.
    A dead actor's chunks fail, and a fresh actor takes its place. Introduced in 07_scaling_with_ray.
    """

    name = "actor-pool"

    def __init__(self, num_workers: int | None = None, chunk_size: int | None = None, start_timeout_s: float = 120.0):
        for knob, value in (("num_workers", num_workers), ("chunk_size", chunk_size)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{knob} must be an integer >= 1 or None (automatic), got {value!r}")
        self.start_timeout_s = _check_knob("start_timeout_s", start_timeout_s, 0, math.inf, low_open=True)
        self.num_workers, self.chunk_size, self.workers, self.pings = num_workers, chunk_size, [], []

    def start(self, x_all: np.ndarray, y_all: np.ndarray, cfg: TrainConfig, client: Callable) -> None:
        init_ray()
        n = self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.args = (ray.put(x_all), ray.put(y_all), cfg.model, client)  # kept: a replacement actor needs them
        self.workers = [ClientTrainer.remote(*self.args) for _ in range(n)]
        self.pings = [w.node_id.remote() for w in self.workers]  # each answers once its actor has started
        wait_started(self.workers, self.pings, n, self.start_timeout_s)

    def run(self, jobs: list[ClientJob], weights: np.ndarray, cfg: TrainConfig) -> list[ClientResult]:
        size = self.chunk_size or max(1, len(jobs) // (8 * len(self.workers)))  # ~8 chunks per worker: balanced
        return run_chunks(self, [jobs[i : i + size] for i in range(0, len(jobs), size)], ray.put(weights), cfg)

    def stop(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers, self.pings, self.args = [], [], None


class KeptRunning:
    """An executor that keeps another running across `run_rounds` calls until `close()`: a run
    with the same data, model and client function skips the start-up (seconds for an actor pool);
    a run that changes any of them restarts it. Introduced in 07_scaling_with_ray.
    """

    def __init__(self, inner):
        self.inner, self.name, self.key = inner, inner.name, None

    def start(self, x_all: np.ndarray, y_all: np.ndarray, cfg: TrainConfig, client: Callable) -> None:
        key = (x_all.__array_interface__["data"], y_all.__array_interface__["data"], x_all.shape, cfg.model, client)
        if key != self.key:  # other data, model or client function: the workers must start afresh
            self.close()
            self.inner.start(x_all, y_all, cfg, client)
            self.key = key

    def run(self, jobs: list[ClientJob], weights: np.ndarray, cfg: TrainConfig) -> list[ClientResult]:
        return self.inner.run(jobs, weights, cfg)

    def stop(self) -> None:
        """What `run_rounds` calls after each run: the inner executor keeps running."""

    def close(self) -> None:
        """Stop the inner executor for good (its workers, its data in the object store)."""
        if self.key is not None:
            self.inner.stop()
            self.key = None


# ----------------------------------------------------------------------------
# 08_when_clients_fail: stragglers, crashes, bad updates, checkpoint and resume
# ----------------------------------------------------------------------------

FAULTS = ("crash", "kill", "slow", "nan")


def assign_faults(clients: Sequence[int], seed: int, round_idx: int, crash: float = 0.0, kill: float = 0.0,
                  slow: float = 0.0, nan: float = 0.0) -> dict[int, str]:
    """Fault injection: {client id: fault} for this round's `clients`. Each client draws at
    most one fault: "crash" (raises), "kill" (its worker process exits), "slow" (answers late,
    or never: see `Resilient`'s slow_s) or "nan" (sends NaN weights), with these probabilities.
    The draw depends on (seed, round, client) only, so a faulty run is reproducible.
    Introduced in 08_when_clients_fail.
    """
    rates = {"crash": crash, "kill": kill, "slow": slow, "nan": nan}
    for name, rate in rates.items():
        _check_knob(name, rate, 0, 1)
    if sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"the fault rates crash + kill + slow + nan must add up to at most 1, "
                         f"got {sum(rates.values()):g}")
    out = {}
    for k in clients:
        u = np.random.default_rng([seed, round_idx, int(k), 8]).random()
        for name, rate in rates.items():
            if u < rate:
                out[int(k)] = name
                break
            u -= rate
    return out


def in_ray_worker() -> bool:
    """True inside a Ray worker process (a task or an actor), False in the driver (this kernel).

    Introduced in 08_when_clients_fail.
    """
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def straggle(slow_s: float, give_up_at: float | None) -> None:
    """A straggler's nap of `slow_s` seconds, in 50 ms slices (so a gentle `ray.cancel` can stop
    it), giving up (TimeoutError) at `give_up_at`, as a device does when the server's window has
    closed. In this process, where it would only hold up the clients after it, a nap that cannot
    end before `give_up_at` gives up at once. Introduced in 08_when_clients_fail.
    """
    if give_up_at is not None and not in_ray_worker() and time.time() + slow_s >= give_up_at:
        raise TimeoutError("the straggler cannot answer before the round's deadline")
    end = time.monotonic() + slow_s
    while time.monotonic() < end:
        if give_up_at is not None and time.time() >= give_up_at:
            raise TimeoutError("the straggler gave up: the round's deadline has passed")
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def faulty_client(
    model: nn.Module, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, job: ClientJob, cfg: TrainConfig,
    inner: Callable = train_client, slow_s: float = math.inf,
) -> ClientResult:
    """The client function `inner`, with the job's injected fault (see `assign_faults`) acted
    out: "crash" raises; "kill" ends the Ray worker it runs in (in this process, it crashes
    instead); "slow" naps `slow_s` seconds first (`straggle`); "nan" sends NaN weights.
    Introduced in 08_when_clients_fail.
    """
    if job.fault == "crash" or (job.fault == "kill" and not in_ray_worker()):
        raise RuntimeError(f"injected fault: the client crashed ({job.fault})")
    if job.fault == "kill":
        os._exit(1)  # the worker process dies mid-task, as on an out-of-memory kill
    if job.fault == "slow":
        straggle(slow_s, job.give_up_at)
    r = inner(model, weights, x_all, y_all, job, cfg)
    return replace(r, weights=np.full_like(r.weights, np.nan)) if job.fault == "nan" else r


def check_update(client_w: object, global_w: torch.Tensor) -> str | None:
    """Why a client's returned weights must not be averaged (not a float32 vector of the
    global model's shape, NaN or Inf), or None if they may. Introduced in 08_when_clients_fail.
    """
    shape = tuple(global_w.shape)
    if not isinstance(client_w, np.ndarray) or client_w.dtype != np.float32 or client_w.shape != shape:
        got = f"{client_w.dtype} {client_w.shape}" if isinstance(client_w, np.ndarray) else type(client_w).__name__
        return f"wrong shape or type: expected float32 {shape}, got {got}"
    if not np.isfinite(client_w).all():
        return "NaN or Inf in the weights"
    return None


def norm_outliers(update_norms: dict[int, float], max_ratio: float) -> dict[int, str]:
    """{client: reason} for updates whose norm ||w_k - w|| exceeds `max_ratio` times the
    median of this round's norms (needs 3 or more). Introduced in 08_when_clients_fail.
    """
    if len(update_norms) < 3:
        return {}
    median = float(np.median(list(update_norms.values())))
    return {k: f"update norm {v:.3g} is over {max_ratio:g} x the median {median:.3g}"
            for k, v in update_norms.items() if v > max_ratio * median}


def screen_updates(results: list[ClientResult], global_w: torch.Tensor, max_norm_ratio: float | None) -> dict[int, str]:
    """{client id: reason} for the answers that must not be aggregated: those `check_update`
    refuses, then those whose update norm is over `max_norm_ratio` x the median (None: no norm
    rule). Failed and late clients are not answers. Introduced in 08_when_clients_fail.
    """
    rejected, norms = {}, {}
    for r in (r for r in results if r.status == "ok"):
        reason = check_update(r.weights, global_w)
        if reason is None:
            norms[r.cid] = float(np.linalg.norm(r.weights.astype(np.float64) - global_w.double().numpy()))
        else:
            rejected[r.cid] = reason
    return {**rejected, **(norm_outliers(norms, max_norm_ratio) if max_norm_ratio is not None else {})}


def server_state(strategy: FedAvg) -> dict[str, torch.Tensor | None]:
    """What a strategy has learned on the server (its tensors, e.g. momentum or control
    variates; None before the first round), as saved in a checkpoint; its knobs, what its
    constructor takes, are not state. Introduced in 08_when_clients_fail.
    """
    knobs = inspect.signature(type(strategy).__init__).parameters
    return {k: v for k, v in vars(strategy).items() if k not in knobs and (v is None or isinstance(v, torch.Tensor))}


class RoundStore(ClientStateStore):
    """A `ClientStateStore` whose writes during a round wait in a `pending_<round>` folder
    and move into place only once the round's checkpoint is saved, so the per-client state
    on disk always matches the last checkpoint. Introduced in 08_when_clients_fail.
    """

    pending: Path | None = None

    def begin(self, round_idx: int) -> None:
        """Start collecting round `round_idx`'s writes."""
        self.pending = self.folder / f"pending_{round_idx}"
        shutil.rmtree(self.pending, ignore_errors=True)
        self.pending.mkdir()

    def put(self, cid: int, value: np.ndarray) -> None:
        if self.pending is None:
            raise RuntimeError("RoundStore.put outside a round: call begin(round) first")
        tmp = self.pending / f"client_{int(cid)}.tmp.npy"
        np.save(tmp, value)
        os.replace(tmp, self.pending / f"client_{int(cid)}.npy")

    def commit(self, pending: Path | None = None) -> None:
        """Move a round's writes into place (each by an atomic rename; safe to repeat)."""
        pending = pending or self.pending
        for f in sorted(pending.glob("client_*[0-9].npy")):
            os.replace(f, self.folder / f.name)
        shutil.rmtree(pending)
        self.pending = None

    def recover(self, last_round: int) -> None:
        """After a stop: finish the commit of rounds up to `last_round` (checkpointed), drop later
        ones; with no checkpoint (`last_round` 0), every client's state is dropped."""
        for pending in sorted(self.folder.glob("pending_*")):
            if int(pending.name.split("_")[1]) <= last_round:
                self.commit(pending)
            else:
                shutil.rmtree(pending)
        if last_round == 0:
            self.clear()


def save_checkpoint(path: Path, state: dict) -> None:
    """`torch.save(state)` to `path` atomically: written to a temporary file, flushed to
    disk, then renamed over `path`. A crash leaves the old checkpoint or the new one, never
    half of one. Introduced in 08_when_clients_fail.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: dict, strategy: FedAvg, num_params: int, rounds: int) -> dict:
    """Read and check all of a checkpoint (`weights_only=True`: tensors and plain values, no
    code) before anything is changed: a corrupt file, one from another run, or one with more
    than `rounds` rounds raises ValueError saying what is wrong. Introduced in 08_when_clients_fail.
    """
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({describe_error(err)}); "
                         "delete it to start this run afresh") from err
    needed = {"format", "round", "weights", "strategy", "history", "fingerprint"}
    if not isinstance(state, dict) or not needed <= set(state) or state["format"] != 2:
        raise ValueError(f"checkpoint {path} is not a checkpoint of this engine (format 2 with {sorted(needed)})")
    saved = json.loads(state["fingerprint"])
    if saved != fingerprint:
        diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ValueError(f"checkpoint {path} is from a different run: {', '.join(diff)} differ; "
                         "use another run_dir, or the settings it was made with")
    w, expected = state["weights"], server_state(strategy)
    if not isinstance(w, torch.Tensor) or w.shape != (num_params,) or not torch.isfinite(w).all():
        raise ValueError(f"checkpoint {path}: the weights are not {num_params} finite numbers")
    if set(state["strategy"]) != set(expected):
        raise ValueError(f"checkpoint {path}: strategy state has {sorted(state['strategy'])}, "
                         f"{strategy.name} needs {sorted(expected)}")
    for k, v in state["strategy"].items():
        if v is not None and (not isinstance(v, torch.Tensor) or v.numel() != num_params):
            raise ValueError(f"checkpoint {path}: strategy state {k!r} is not a tensor of {num_params} numbers")
    try:
        history = json.loads(state["history"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: the history is not valid JSON ({describe_error(err)})") from err
    done = state["round"]
    if not isinstance(done, int) or [h.get("round") for h in history] != list(range(1, done + 1)):
        raise ValueError(f"checkpoint {path}: round {done!r} does not match the {len(history)} rounds in its history")
    if done > rounds:
        raise ValueError(f"checkpoint {path} already holds {done} rounds, more than rounds={rounds}: "
                         "ask for more rounds, or use another run_dir")
    return {**state, "history": history}


def piece_knobs(piece: object) -> dict:
    """A dataclass piece's fields as plain values, nested pieces too, leaving out those declared
    repr=False (10's key secret: no secret goes into a checkpoint). Introduced in 08_when_clients_fail.
    """
    return {f.name: piece_knobs(v) if is_dataclass(v) else v for f in fields(piece) if f.repr
            for v in [getattr(piece, f.name)]}


def run_fingerprint(task: FedTask, strategy: FedAvg, policy: RoundPolicy, transform: Callable | None,
                    aggregate: Callable) -> dict:
    """Everything that decides a run's bits, as plain values: a checkpoint made with other
    settings is refused. The executor is not in it: every executor gives the same bits.
    Introduced in 08_when_clients_fail.
    """
    parts = hashlib.sha256(b"".join(np.asarray(p, np.int64).tobytes() + b"|" for p in task.partitions))
    name = lambda f: None if f is None else getattr(f, "__qualname__", type(f).__qualname__)
    piece = lambda f: {"name": name(f), **piece_knobs(f)} if is_dataclass(f) and not isinstance(f, type) else name(f)
    return {"config": asdict(task.config), "client_fraction": task.client_fraction, "seed": task.seed,
            "partitions": parts.hexdigest(), "train_samples": len(task.train[1]), "strategy": strategy.name,
            "knobs": {k: v for k, v in vars(strategy).items() if isinstance(v, (int, float))},
            "policy": {"name": type(policy).__name__, **asdict(policy)},
            "transform": piece(transform), "aggregate": piece(aggregate)}  # a piece's knobs too (09's DP)


class Checkpointer:
    """The engine's checkpoint piece, for any executor: after every round, the weights, the
    strategy's server state and the history go to `run_dir/checkpoint.pt` atomically, and
    per-client state (SCAFFOLD's) to a `RoundStore` committed with it; a rerun resumes after
    the last complete round, once all of the checkpoint is checked. Introduced in 08_when_clients_fail.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / "checkpoint.pt"

    def restore(self, model: nn.Module, strategy: FedAvg, rounds: int, task: FedTask, policy: RoundPolicy,
                transform: Callable | None, aggregate: Callable) -> list[dict]:
        """Load the last checkpoint into `model` and `strategy`; return its history ([] if none)."""
        self.fingerprint = run_fingerprint(task, strategy, policy, transform, aggregate)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)  # a write that a stop cut short
        state = (load_checkpoint(self.path, self.fingerprint, strategy, flat_weights(model).numel(), rounds)
                 if self.path.exists() else None)
        if hasattr(strategy, "store"):  # per-client state lives beside the checkpoint (none without one)
            strategy.store = RoundStore(self.run_dir / "client_state")
            strategy.store.recover(state["round"] if state else 0)
        if state is not None:  # all checked: now apply it
            for k, v in state["strategy"].items():
                setattr(strategy, k, v)
            set_flat_weights(model, state["weights"])
        return state["history"] if state else []

    def begin(self, rnd: int, strategy: FedAvg) -> None:
        """Round `rnd` starts: per-client writes wait in a pending folder until `save`."""
        if isinstance(getattr(strategy, "store", None), RoundStore):
            strategy.store.begin(rnd)

    def save(self, model: nn.Module, strategy: FedAvg, history: list[dict]) -> None:
        """Checkpoint the round just finished, then commit its per-client writes."""
        save_checkpoint(self.path, {"format": 2, "round": history[-1]["round"], "weights": flat_weights(model),
                                    "strategy": server_state(strategy), "history": json.dumps(history),
                                    "fingerprint": json.dumps(self.fingerprint)})
        if isinstance(getattr(strategy, "store", None), RoundStore):
            strategy.store.commit()


@dataclass
class Resilient(RoundPolicy):
    """The round policy for clients that fail. Each round waits at most `deadline_s` seconds
    (late clients are left out); a client that raises or whose worker dies is left out; an
    update that fails `check_update`, or whose norm is over `max_norm_ratio` x the round's median,
    is rejected. With fewer than `min_clients` usable updates the model is kept. `faults` injects
    {"crash", "kill", "slow", "nan": rate}; a "slow" client naps `slow_s` (inf: never answers).
    Introduced in 08_when_clients_fail.
    """

    deadline_s: float | None = 300.0
    min_clients: int = 1
    max_norm_ratio: float | None = 20.0
    faults: dict[str, float] = field(default_factory=dict)
    slow_s: float = math.inf

    def __post_init__(self) -> None:
        super().__post_init__()
        if set(self.faults) - set(FAULTS):
            raise ValueError(f"faults may only name {list(FAULTS)}, got {sorted(set(self.faults) - set(FAULTS))}")
        assign_faults([], 0, 0, **self.faults)  # checks the rates
        _check_knob("slow_s", self.slow_s, 0, math.inf, allow_inf=True)
        if self.max_norm_ratio is not None:
            _check_knob("max_norm_ratio", self.max_norm_ratio, 1, math.inf)
        if self.deadline_s is None and math.isinf(self.slow_s) and self.faults.get("slow", 0) > 0:
            raise ValueError("faults['slow'] > 0 with slow_s=inf (stragglers that never answer) needs a "
                             "deadline_s, not None")

    def wrap(self, client: Callable) -> Callable:
        return functools.partial(faulty_client, inner=client, slow_s=self.slow_s) if self.faults else client

    def plan(self, jobs: list[ClientJob], seed: int) -> list[ClientJob]:
        fault_of = assign_faults([j.cid for j in jobs], seed, jobs[0].round, **self.faults) if jobs else {}
        jobs = [replace(j, fault=fault_of.get(j.cid)) for j in jobs]
        # Stragglers are handed out last: here they share our CPUs; in the field each has its own device.
        return sorted(jobs, key=lambda j: j.fault == "slow")

    def screen(self, results: list[ClientResult], global_w: torch.Tensor) -> dict[int, str]:
        return screen_updates(results, global_w, self.max_norm_ratio)


# ----------------------------------------------------------------------------
# 09_what_updates_leak: what an update reveals (gradient inversion, membership inference)
# ----------------------------------------------------------------------------
# (attacks: below this line)


def observed_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1, steps: int = 1,
                      seed: int = 0) -> list[torch.Tensor]:
    """What an honest-but-curious server reads off one client's update. The client takes `steps`
    full-batch SGD steps on (x, y) from `model`'s weights (the global model, restored afterwards)
    with `train_local`; the server divides the update by the learning rate, (w_global - w_client)
    / lr, and splits it into the parameters' shapes. After one step that is the batch's gradient
    (up to rounding); after more, a sum of gradients taken at moving weights.
    Introduced in 09_what_updates_leak.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    w_global = flat_weights(model)
    with torch_threads(1):
        train_local(model, x, y, epochs=int(steps), batch_size=len(x), lr=lr, seed=seed)
    w_client = flat_weights(model)
    set_flat_weights(model, w_global)  # the server's copy of the model is the global one
    return [t.clone() for t in split_like(model, (w_global - w_client) / lr)]


def infer_labels(last_weight_grad: torch.Tensor, count: int = 1) -> torch.Tensor:
    """The labels of a batch, read off the gradient (or update) of the last layer's weights
    (classes x features), when that layer sees non-negative features (after a ReLU) and the loss is
    softmax cross-entropy. Row c is the batch's sum of (p_c - [y = c]) times the features, so only
    rows of classes in the batch can sum below zero. Returns the `count` most negative rows, sorted:
    exact for one sample, even after several local steps (Zhao et al. 2020, iDLG); for a batch
    with distinct labels usually right (Yin et al. 2021). Introduced in 09_what_updates_leak.
    """
    if last_weight_grad.dim() != 2:
        raise ValueError(f"last_weight_grad must be a (classes, features) matrix, got shape "
                         f"{tuple(last_weight_grad.shape)}")
    classes = last_weight_grad.shape[0]
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or not 1 <= count <= classes:
        raise ValueError(f"count must be an integer in [1, {classes}], got {count!r}")
    return torch.sort(torch.argsort(last_weight_grad.sum(1))[: int(count)]).values


def pixel_scale(dataset: str = "fashion_mnist") -> tuple[float, float]:
    """(mean, std) of `load_dataset`'s normalisation of an image dataset: a pixel p in [0, 1]
    is stored as (p - mean) / std. Introduced in 09_what_updates_leak.
    """
    if dataset not in ("fashion_mnist", "mnist"):
        raise ValueError(f"dataset must be 'fashion_mnist' or 'mnist', got {dataset!r}")
    return DATASETS[dataset][1], DATASETS[dataset][2]


def to_pixels(x: torch.Tensor, dataset: str = "fashion_mnist") -> torch.Tensor:
    """Undo `load_dataset`'s normalisation: the images with pixels in [0, 1] (clamped).

    Introduced in 09_what_updates_leak.
    """
    mean, std = pixel_scale(dataset)
    return (x * std + mean).clamp(0, 1)


def image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image pair, for batches (N, C, H, W) of equal shape.

    Introduced in 09_what_updates_leak.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a and b must be image batches (N, C, H, W) of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image pair in dB, for pixels in [0, 1]: 10 log10(1 / MSE).
    Identical images give inf. Introduced in 09_what_updates_leak.
    """
    return 10 * torch.log10(1 / image_mse(a, b))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each image pair, pixels in [0, 1]: the mean of
    the SSIM map over `window` x `window` uniform windows (no padding), C1 = 0.01^2, C2 = 0.03^2.
    1 for identical images. Introduced in 09_what_updates_leak.
    """
    image_mse(a, b)  # checks the shapes
    if not isinstance(window, (int, np.integer)) or not 1 <= window <= min(a.shape[-2:]):
        raise ValueError(f"window must be an integer in [1, {min(a.shape[-2:])}], got {window!r}")
    c1, c2 = 0.01**2, 0.03**2
    mean = lambda t: F.avg_pool2d(t, window, stride=1)
    a, b = a.double(), b.double()
    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b, cov = mean(a * a) - mu_a**2, mean(b * b) - mu_b**2, mean(a * b) - mu_a * mu_b
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1).float()


def match_images(originals: torch.Tensor, guesses: torch.Tensor) -> torch.Tensor:
    """`guesses` reordered so that guess i pairs with original i: greedily, the closest pair (lowest
    MSE) first, then the closest of the rest, and so on. An attack on a batch returns its images in
    no particular order. Introduced in 09_what_updates_leak.
    """
    image_mse(originals, guesses)  # checks the shapes
    dist = (originals[:, None].float() - guesses[None].float()).pow(2).flatten(2).mean(2)
    order = torch.empty(len(originals), dtype=torch.long)
    for _ in range(len(originals)):
        i, j = divmod(int(dist.argmin()), dist.shape[1])
        order[i] = j
        dist[i, :], dist[:, j] = math.inf, math.inf
    return guesses[order]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between vertically and between horizontally neighbouring pixels,
    summed: the image prior of Geiping et al. (2020). Introduced in 09_what_updates_leak.
    """
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_gradient(model: nn.Module, target: list[torch.Tensor], labels: torch.Tensor, iterations: int = 200,
                    lr: float = 0.1, tv_weight: float = 1e-4, seed: int = 0, dataset: str = "fashion_mnist",
                    image_shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """Gradient inversion (Geiping et al. 2020): images whose gradient under `model`, with `labels`,
    points where `target` (an observed gradient, one tensor per parameter) does. Adam on the sign
    of the gradient of 1 - cosine(dummy gradient, target) + tv_weight * TV(dummy), its step cut
    tenfold at 3/8, 5/8 and 7/8 of the iterations, pixels kept in [0, 1]. Starts from seeded
    uniform noise; one PyTorch thread, so a seed gives the same bits. Returns the images in
    `load_dataset`'s normalisation. Introduced in 09_what_updates_leak.
    """
    if not isinstance(iterations, (int, np.integer)) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    _check_knob("lr", lr, 0, math.inf, low_open=True)
    _check_knob("tv_weight", tv_weight, 0, math.inf)
    if labels.dtype != torch.int64 or labels.dim() != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-d int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    params, goal = list(model.parameters()), torch.cat([t.detach().flatten() for t in target])
    if goal.numel() != sum(p.numel() for p in params):
        raise ValueError(f"target must hold one number per parameter of the model, "
                         f"{sum(p.numel() for p in params):,}, got {goal.numel():,}")
    mean, std = pixel_scale(dataset)
    lo, hi = -mean / std, (1 - mean) / std  # pixels 0 and 1, normalised
    with torch_threads(1):
        noise = torch.rand((len(labels), *image_shape), generator=torch.Generator().manual_seed(seed))
        dummy = (lo + (hi - lo) * noise).requires_grad_(True)
        opt = torch.optim.Adam([dummy], lr=lr)
        cuts = torch.optim.lr_scheduler.MultiStepLR(opt, [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], 0.1)
        for _ in range(int(iterations)):
            grads = torch.autograd.grad(F.cross_entropy(model(dummy), labels), params, create_graph=True)
            cos = F.cosine_similarity(torch.cat([g.flatten() for g in grads]), goal, dim=0)
            loss = 1 - cos + tv_weight * total_variation(dummy)
            dummy.grad = torch.autograd.grad(loss, [dummy])[0].sign()
            opt.step()
            cuts.step()
            with torch.no_grad():
                dummy.clamp_(lo, hi)
    return dummy.detach()


def show_reconstructions(originals: torch.Tensor, rows: dict[str, torch.Tensor], titles: list[str] | None = None,
                         scale: float = 1.1):
    """One figure: the original images (pixels in [0, 1]) in the top row, under them one row per
    entry of `rows` (its label on the left), each image titled with its PSNR against the original
    above it. `titles` (one per column) go over the originals. Introduced in 09_what_updates_leak.
    """
    n = len(originals)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(scale * max(n, 2), scale * 1.25 * (1 + len(rows))),
                             squeeze=False)
    for i in range(n):
        axes[0, i].imshow(originals[i, 0], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(titles[i] if titles else "", fontsize=7)
        for r, images in enumerate(rows.values(), start=1):
            axes[r, i].imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
            axes[r, i].set_title(f"{float(psnr(images[i : i + 1], originals[i : i + 1])):.1f} dB", fontsize=7)
    for r, name in enumerate(["original", *rows]):
        axes[r, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    fig.tight_layout()
    return fig


@torch.no_grad()
def sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Each sample's cross-entropy under `model`: the score of the loss-threshold attack.

    Introduced in 09_what_updates_leak.
    """
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number (>= 1) of samples, got {len(x)} and {len(y)}")
    model.eval()
    return torch.cat([F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none")
                      for i in range(0, len(x), batch_size)])


def _scores(pos: Sequence[float], neg: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both score lists as flat float arrays, or ValueError. Introduced in 09_what_updates_leak."""
    pos, neg = np.asarray(pos, dtype=float).ravel(), np.asarray(neg, dtype=float).ravel()
    for name, s in (("pos", pos), ("neg", neg)):
        if len(s) == 0 or not np.isfinite(s).all():
            raise ValueError(f"{name} must hold at least one score, all finite, got {len(s)} scores")
    return pos, neg


def roc_auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve of telling `pos` from `neg` by "higher score means positive": the
    chance that a random positive outscores a random negative, ties counting half (Mann-Whitney U
    from mid-ranks). 0.5: no better than a coin. Introduced in 09_what_updates_leak.
    """
    pos, neg = _scores(pos, neg)
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # the mean 1-based rank of each distinct score
    u = mid_rank[inverse][: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def attack_advantage(pos: Sequence[float], neg: Sequence[float]) -> float:
    """The best threshold's membership advantage (Yeom et al. 2018): max over t of TPR - FPR when
    "score >= t" means positive, t over every score and +inf (so it is >= 0). Chosen in hindsight,
    it bounds what any threshold on this score achieves. Introduced in 09_what_updates_leak.
    """
    pos, neg = _scores(pos, neg)
    t = np.unique(np.concatenate([pos, neg]))
    tpr = 1 - np.searchsorted(np.sort(pos), t, side="left") / len(pos)
    fpr = 1 - np.searchsorted(np.sort(neg), t, side="left") / len(neg)
    return float(max(0.0, (tpr - fpr).max()))


def membership_attack(model: nn.Module, members: tuple[torch.Tensor, torch.Tensor],
                      nonmembers: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Yeom et al. (2018)'s loss-threshold attack on the model a client sent: a sample with a low
    loss is guessed to be a training sample. Scores = -loss; returns the AUC, the best threshold's
    advantage, and both groups' mean loss. Introduced in 09_what_updates_leak.
    """
    loss_in, loss_out = sample_losses(model, *members).numpy(), sample_losses(model, *nonmembers).numpy()
    return {"auc": roc_auc(-loss_in, -loss_out), "advantage": attack_advantage(-loss_in, -loss_out),
            "member_loss": float(loss_in.mean()), "nonmember_loss": float(loss_out.mean())}


# ----------------------------------------------------------------------------
# 09_what_updates_leak: differential privacy as pieces of the engine (clip, noise, accountant)
# ----------------------------------------------------------------------------
# (differential privacy: below this line)


def clip_scale(delta: torch.Tensor, max_norm: float) -> float:
    """min(1, max_norm / ||delta||), the factor that clips `delta` to L2 norm `max_norm` (the norm
    summed in float64). Introduced in 09_what_updates_leak.
    """
    norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    return 1.0 if norm <= max_norm else max_norm / norm


@dataclass(frozen=True)
class ClipUpdate:
    """Client-side update transform: scale the update (new - global weights) down to L2 norm
    `max_norm` (C) if it is longer; a shorter update leaves unchanged, bit for bit (C = inf: no
    clipping). Introduced in 09_what_updates_leak.
    """

    max_norm: float

    def __post_init__(self) -> None:
        _check_knob("max_norm", self.max_norm, 0, math.inf, low_open=True, allow_inf=True)

    def __call__(self, new_w: np.ndarray, global_w: np.ndarray, job: ClientJob | None = None) -> np.ndarray:
        delta = np.subtract(new_w, global_w)  # float32, one new array (global_w may be Ray's read-only one)
        scale = clip_scale(torch.from_numpy(delta), self.max_norm)
        if scale == 1.0:
            return new_w
        delta *= np.float32(scale)
        return np.add(delta, global_w, out=delta)


def clipped_sum(results: Sequence[ClientResult], global_w: torch.Tensor, max_norm: float) -> torch.Tensor:
    """sum_k n_k clip(x_k - w), each update clipped to `max_norm`, in float64 and client-id order:
    what the server adds up under DP (n_k: a result's num_samples). Introduced in 09_what_updates_leak.
    """
    total, g = torch.zeros(len(global_w), dtype=torch.float64), global_w.numpy()
    for r in results:
        delta = torch.from_numpy(np.subtract(r.weights, g))  # float32, as the client's update arrived
        total.add_(delta, alpha=r.num_samples * clip_scale(delta, max_norm))  # accumulated in float64
    return total


def dp_noise(seed: int, rnd: int, size: int, std: float) -> torch.Tensor:
    """Round `rnd`'s Gaussian noise, N(0, std^2) per coordinate in float64, from its own
    stream of the run's `seed`: a rerun or a resumed run draws the same. Introduced in 09_what_updates_leak.
    """
    rng = np.random.default_rng([seed, rnd, 909])  # 909: not a stream the clients use
    return torch.from_numpy(rng.standard_normal(size) * std)


@dataclass(frozen=True)
class DPMean:
    """User-level DP's aggregation, McMahan et al. (2018)'s fixed-denominator estimator: weigh client k
    by w_k = min(n_k, weight_cap), sum the updates clipped to `clip` C (again: the server must not trust
    the clients), add N(0, (z C weight_cap)^2), z = `noise_multiplier` (one client moves the sum by at
    most C weight_cap), divide by `expected_weight` q W, not by who answered. Introduced in 09_what_updates_leak.
    """

    clip: float
    noise_multiplier: float
    weight_cap: int
    expected_weight: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_knob("clip", self.clip, 0, math.inf, low_open=True, allow_inf=True)
        _check_knob("noise_multiplier", self.noise_multiplier, 0, math.inf)
        cap = self.weight_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
            raise ValueError(f"weight_cap must be an integer >= 1 (samples), got {self.weight_cap!r}")
        _check_knob("expected_weight", self.expected_weight, 0, math.inf, low_open=True)
        if self.noise_multiplier > 0 and math.isinf(self.clip):
            raise ValueError("noise_multiplier > 0 needs a finite clip: the noise's std is noise_multiplier * clip")

    def noise_std(self) -> float:
        """The std of the noise on the mean: z C weight_cap / (q W)."""
        z = self.noise_multiplier
        return z * self.clip * self.weight_cap / self.expected_weight if z > 0 else 0.0

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob]) -> torch.Tensor:
        capped = [replace(r, num_samples=min(r.num_samples, self.weight_cap)) for r in accepted]
        if math.isinf(self.clip) and sum(r.num_samples for r in capped) == self.expected_weight:
            avg = weighted_mean(capped, global_w)  # nothing to clip, no one missing: FedAvg's mean, its bits
        else:
            avg = global_w.double() + clipped_sum(capped, global_w, self.clip) / self.expected_weight
        std = self.noise_std()
        return avg + dp_noise(self.seed, jobs[0].round, len(avg), std) if std > 0 else avg


def dp_mean(task: FedTask, clip: float, noise_multiplier: float, weight_cap: int | None = None) -> DPMean:
    """`DPMean` for `task`: q W from its clients (weight_cap None: the largest client's samples, so
    w_k = n_k as in FedAvg), its seed for the noise. Introduced in 09_what_updates_leak.
    """
    sizes = [len(p) for p in task.partitions]
    cap = max(sizes) if weight_cap is None else weight_cap
    m = len(sample_clients(len(sizes), task.client_fraction, task.seed, 1))  # the same number every round
    total = sum(min(n, cap) for n in sizes) if isinstance(cap, (int, np.integer)) else 1.0  # bad cap: DPMean says
    return DPMean(clip, noise_multiplier, cap, m / len(sizes) * total, task.seed)


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The (user-level) epsilon at `delta` after `rounds` releases of the subsampled Gaussian
    mechanism (sampling rate q, noise z), from Opacus's RDP accountant: 0 for no rounds, inf for
    z = 0. Introduced in 09_what_updates_leak.
    """
    _check_knob("noise_multiplier", noise_multiplier, 0, math.inf)
    _check_knob("sample_rate", sample_rate, 0, 1, low_open=True)
    _check_knob("delta", delta, 0, 1, low_open=True, high_open=True)
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if rounds == 0 or noise_multiplier == 0:
        return 0.0 if rounds == 0 else math.inf
    from opacus.accountants import RDPAccountant  # imported here: Ray workers never need it
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 384, 512, 768, 1024]  # high orders: small eps
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=int(rounds), orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


@dataclass(frozen=True)
class PrivacyLedger:
    """Callback: writes into each round's history row the `epsilon` spent so far at `delta`,
    counting the rounds that released a model (a round that kept the model released nothing).
    Introduced in 09_what_updates_leak.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float

    @classmethod
    def for_task(cls, task: FedTask, noise_multiplier: float, delta: float) -> "PrivacyLedger":
        """The ledger for `task`: q is the share of its clients a round samples."""
        n = len(task.partitions)
        return cls(noise_multiplier, len(sample_clients(n, task.client_fraction, task.seed, 1)) / n, delta)

    def __call__(self, history: list[dict]) -> None:
        released = sum(bool(h["aggregated"]) for h in history)
        history[-1].update(epsilon=dp_epsilon(self.noise_multiplier, self.sample_rate, released, self.delta),
                           delta=self.delta)


# ----------------------------------------------------------------------------
# 10_secure_aggregation: the server learns the sum and nothing else
# ----------------------------------------------------------------------------
# Bonawitz et al. (2017), "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
# honest-but-curious version, with SecAgg+ (Bell et al. 2020) as a neighbour graph. What is real:
# X25519 key agreement, HKDF-SHA256, ChaCha20 masks, Shamir shares encrypted with
# ChaCha20-Poly1305, integer arithmetic mod 2^32, the unmasking. What is simulated: the clients'
# setup messages (keys and encrypted shares) and their unmasking answers are computed inside the
# server-side rule from per-client keys derived from (run seed, round, client id), so anyone who
# knows the run's seed knows every key: a teaching simulation, not a deployment. The server's
# arithmetic only uses what it would receive: public keys, ciphertexts it routes, the masked
# vectors, and the shares the survivors return.
#
# Shamir is ours (about 25 lines, tested) over the prime field of the Mersenne prime 2^521 - 1:
# one field element holds a whole 32-byte secret (a self-mask seed, an X25519 private key), the
# arithmetic is Python's exact integers, and no new package is needed (pycryptodome's Shamir works
# on 16-byte secrets in GF(2^128), so a 32-byte key would have to be split in two).

SECAGG_PRIME = 2**521 - 1  # a Mersenne prime: the Shamir field
SHARE_BYTES = 66  # one field element, little-endian (521 bits)
MASKED_BITS = 32  # masked vectors are uint32: arithmetic mod 2^32


class SecAggAbort(RuntimeError):
    """The round cannot be unmasked (too few holders of some client's shares answered): the server
    aborts and keeps the model. Introduced in 10_secure_aggregation.
    """


class SecAggTampered(ValueError):
    """A rebuilt secret does not match what its client advertised (a share was altered): the
    server refuses the round loudly rather than produce a wrong sum. Introduced in 10_secure_aggregation.
    """


def prg_bytes(key: bytes, nbytes: int) -> bytes:
    """`nbytes` of ChaCha20 keystream under the 32-byte `key` (nonce 0: each key is expanded once).

    Introduced in 10_secure_aggregation.
    """
    enc = Cipher(ChaCha20(key, bytes(16)), mode=None).encryptor()
    return enc.update(bytes(nbytes))


def prg_mask(key: bytes, size: int) -> np.ndarray:
    """A mask of `size` uint32 words expanded from `key` by ChaCha20 (`prg_bytes`).

    Introduced in 10_secure_aggregation.
    """
    return np.frombuffer(prg_bytes(key, 4 * size), dtype="<u4")  # read-only, no copy


def kdf(secret: bytes, info: str) -> bytes:
    """HKDF-SHA256 of `secret` into a 32-byte key bound to `info` (round, clients, purpose).

    Introduced in 10_secure_aggregation.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


def _poly_at(coeffs: Sequence[int], x: int) -> int:
    """The polynomial with `coeffs` (constant first) at `x`, mod the prime (Horner).

    Introduced in 10_secure_aggregation.
    """
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % SECAGG_PRIME
    return acc


def shamir_split(secret: int, holders: Sequence[int], t: int, key: bytes) -> dict[int, int]:
    """Shamir's t-of-n sharing of `secret` (an int in [0, 2^521 - 1)) among `holders` (client ids;
    holder h gets the polynomial at x = h + 1), the t - 1 random coefficients drawn from ChaCha20
    under `key`. Any t shares rebuild it; t - 1 say nothing. Introduced in 10_secure_aggregation.
    """
    n = len(holders)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= n:
        raise ValueError(f"t must be an integer in [1, {n}] (the number of holders), got {t!r}")
    if not 0 <= secret < SECAGG_PRIME:
        raise ValueError("secret must be an integer in [0, 2^521 - 1)")
    coins = prg_bytes(key, SHARE_BYTES * (t - 1))
    coeffs = [secret] + [int.from_bytes(coins[i * SHARE_BYTES:(i + 1) * SHARE_BYTES], "little") % SECAGG_PRIME
                         for i in range(t - 1)]
    return {int(h): _poly_at(coeffs, int(h) + 1) for h in holders}


def lagrange_at_zero(shares: dict[int, int]) -> int:
    """The polynomial through the points {h + 1: share} evaluated at 0 (with t of them: the secret).

    Introduced in 10_secure_aggregation.
    """
    xs = {h: h + 1 for h in shares}
    out = 0
    for h, y in shares.items():
        num = den = 1
        for g, x in xs.items():
            if g != h:
                num, den = num * x % SECAGG_PRIME, den * (x - xs[h]) % SECAGG_PRIME
        out = (out + y * num * pow(den, -1, SECAGG_PRIME)) % SECAGG_PRIME
    return out


def shamir_combine(shares: dict[int, int], t: int) -> int:
    """The secret from at least `t` shares {holder: share}; fewer raise SecAggAbort.

    Introduced in 10_secure_aggregation.
    """
    if len(shares) < t:
        raise SecAggAbort(f"{len(shares)} shares cannot rebuild a secret shared t-of-n with t = {t}")
    return lagrange_at_zero({h: shares[h] for h in sorted(shares)[:t]})


@dataclass(frozen=True)
class RoundKeys:
    """One client's secrets for one round: the X25519 keys for masks (c) and for encrypting shares
    (s), the self-mask seed b and the key for its Shamir coefficients. Introduced in 10_secure_aggregation.
    """

    cid: int
    c_sk: X25519PrivateKey
    s_sk: X25519PrivateKey
    b: bytes
    coins: bytes


def client_keys(seed: int, rnd: int, cid: int, secret: bytes = b"") -> RoundKeys:
    """Client `cid`'s fresh round-`rnd` secrets, expanded by HKDF from the run's `secret` (32 bytes
    from os.urandom: `secure_aggregation`'s default) or, with no secret, from (run seed, round, client
    id): reproducible, for tests and demonstrations, and known to anyone who knows the seed. A device
    would draw its own; here the clients' parts are simulated and must agree. Introduced in 10_secure_aggregation.
    """
    root = secret or np.random.SeedSequence([seed, rnd, cid, 10]).generate_state(8).tobytes()
    part = lambda what: kdf(root, f"secagg round {rnd} client {cid} {what}")
    return RoundKeys(int(cid), X25519PrivateKey.from_private_bytes(part("c")),
                     X25519PrivateKey.from_private_bytes(part("s")), part("b"), part("coins"))


def agreed_key(sk: X25519PrivateKey, peer_pk: bytes, rnd: int, i: int, j: int, purpose: str) -> bytes:
    """ECDH of `sk` with the peer's raw public key, then HKDF-SHA256 with the round, both client ids
    (in the order given) and the purpose in the info. Introduced in 10_secure_aggregation.
    """
    shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    return kdf(shared, f"secagg {purpose} round {rnd} clients {i} {j}")


def check_degree(degree: int | None) -> None:
    """Raise ValueError unless `degree` is None (every pair) or an even integer >= 2 (SecAgg+).

    Introduced in 10_secure_aggregation.
    """
    if degree is not None and (isinstance(degree, bool) or not isinstance(degree, (int, np.integer))
                               or degree < 2 or degree % 2):
        raise ValueError(f"degree must be None (every pair) or an even integer >= 2, got {degree!r}")


def secagg_graph(cids: Sequence[int], degree: int | None, seed: int, rnd: int) -> dict[int, tuple[int, ...]]:
    """Who masks with whom: every pair (Bonawitz et al.; `degree` None, or >= len(cids) - 1), or
    SecAgg+'s `degree`-regular Harary graph (each client joined to the degree/2 nearest on each side
    of a ring) over a random order seeded by (seed, round). Introduced in 10_secure_aggregation.
    """
    check_degree(degree)
    cids = sorted(int(c) for c in cids)
    n = len(cids)
    if degree is None or degree >= n - 1:
        return {c: tuple(v for v in cids if v != c) for c in cids}
    order = [int(c) for c in np.random.default_rng([seed, rnd, 1010]).permutation(cids)]
    nb: dict[int, set[int]] = {c: set() for c in cids}
    for pos, c in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = order[(pos + step) % n]
            nb[c].add(other)
            nb[other].add(c)
    return {c: tuple(sorted(nb[c])) for c in cids}


def log_degree(n: int) -> int | None:
    """SecAgg+'s k ~ log n for `n` clients: log2(n) rounded up to an even integer, or None (every
    pair) when that would join each client to all the others anyway. Introduced in 10_secure_aggregation.
    """
    k = max(2, 2 * math.ceil(math.log2(max(n, 2)) / 2))
    return k if k < n - 1 else None


def abort_bound(n: int, degree: int | None, threshold: float, dropout: float) -> float:
    """An upper bound (a union over the n clients) on the chance that a round aborts when each client drops
    out independently with probability `dropout`: some client keeps fewer than t_u of its holders (its
    `degree` neighbours and itself) alive. Introduced in 10_secure_aggregation.
    """
    _check_knob("dropout", dropout, 0, 1)
    _check_knob("threshold", threshold, 0, 1, low_open=True)
    holders = n if degree is None or degree >= n - 1 else degree + 1
    t = max(1, math.ceil(threshold * holders))
    tail = sum(math.comb(holders, j) * (1 - dropout) ** j * dropout ** (holders - j) for j in range(t))
    return min(1.0, n * tail)


def degree_for_dropout(n: int, dropout: float, threshold: float = 2 / 3, target: float = 0.01) -> int | None:
    """The smallest even SecAgg+ degree whose `abort_bound` is at most `target`, or None (every pair) if
    only the complete graph gets there, or not even it. Introduced in 10_secure_aggregation.
    """
    for k in range(2, n - 1, 2):
        if abort_bound(n, k, threshold, dropout) <= target:
            return k
    return None


@dataclass(frozen=True, eq=False)
class RoundSetup:
    """What the server broadcasts after the key-advertising step: the round, the neighbour graph, every
    client's two raw public keys, and t_u for each client's shares (held by its neighbours and itself).
    Introduced in 10_secure_aggregation.
    """

    round: int
    graph: dict[int, tuple[int, ...]]
    c_pk: dict[int, bytes]
    s_pk: dict[int, bytes]
    thresholds: dict[int, int]
    b_commit: dict[int, bytes]  # SHA-256 of each self-mask seed: a rebuilt seed is checked against it


def round_setup(seed: int, rnd: int, cids: tuple[int, ...], degree: int | None, threshold: float,
                secret: bytes = b"") -> RoundSetup:
    """Round `rnd`'s `RoundSetup` for the clients `cids`: t_u = ceil(threshold * (holders of u's
    shares)). Simulated: each client's public keys come from `client_keys`. Introduced in 10_secure_aggregation.
    """
    _check_knob("threshold", threshold, 0, 1, low_open=True)
    graph = secagg_graph(cids, degree, seed, rnd)
    keys = {c: client_keys(seed, rnd, c, secret) for c in graph}
    raw = lambda sk: sk.public_key().public_bytes_raw()
    return RoundSetup(rnd, graph, {c: raw(k.c_sk) for c, k in keys.items()}, {c: raw(k.s_sk) for c, k in keys.items()},
                      {c: max(1, math.ceil(threshold * (len(graph[c]) + 1))) for c in graph},
                      {c: hashlib.sha256(k.b).digest() for c, k in keys.items()})


def pair_mask(keys: RoundKeys, setup: RoundSetup, v: int, size: int) -> np.ndarray:
    """The mask that client `keys.cid` and its neighbour `v` share: ChaCha20 under their agreed key.

    Introduced in 10_secure_aggregation.
    """
    u = keys.cid
    return prg_mask(agreed_key(keys.c_sk, setup.c_pk[v], setup.round, min(u, v), max(u, v), "mask"), size)


def masked_input(y: np.ndarray, keys: RoundKeys, setup: RoundSetup) -> np.ndarray:
    """Client u's double-masked vector, mod 2^32: y + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
    over its neighbours v. Introduced in 10_secure_aggregation.
    """
    out = np.asarray(y, dtype=np.uint32).copy()
    out += prg_mask(keys.b, len(out))
    for v in setup.graph[keys.cid]:
        m = pair_mask(keys, setup, v, len(out))
        if v > keys.cid:
            out += m
        else:
            out -= m
    return out


def share_keys(keys: RoundKeys, setup: RoundSetup) -> dict[int, bytes]:
    """Client u's ShareKeys message: for each holder v (its neighbours and itself), v's Shamir shares
    of b_u and of u's mask private key, encrypted and authenticated (ChaCha20-Poly1305 under the key
    u and v agree with their s keys) so that the server, which routes them, cannot read them.
    Introduced in 10_secure_aggregation.
    """
    u = keys.cid
    holders, t = sorted((*setup.graph[u], u)), setup.thresholds[u]
    b_sh = shamir_split(int.from_bytes(keys.b, "little"), holders, t, kdf(keys.coins, "b"))
    c_sh = shamir_split(int.from_bytes(keys.c_sk.private_bytes_raw(), "little"), holders, t, kdf(keys.coins, "c"))
    out = {}
    for v in holders:
        box = ChaCha20Poly1305(agreed_key(keys.s_sk, setup.s_pk[v], setup.round, u, v, "share"))
        plain = b_sh[v].to_bytes(SHARE_BYTES, "little") + c_sh[v].to_bytes(SHARE_BYTES, "little")
        out[v] = box.encrypt(bytes(12), plain, f"{setup.round}|{u}|{v}".encode())
    return out


def open_share(keys: RoundKeys, setup: RoundSetup, sender: int, box: bytes) -> tuple[int, int]:
    """Holder `keys.cid` decrypts (and authenticates) the shares `sender` sent it: (b share, c share).

    Introduced in 10_secure_aggregation.
    """
    key = agreed_key(keys.s_sk, setup.s_pk[sender], setup.round, sender, keys.cid, "share")
    plain = ChaCha20Poly1305(key).decrypt(bytes(12), box, f"{setup.round}|{sender}|{keys.cid}".encode())
    return int.from_bytes(plain[:SHARE_BYTES], "little"), int.from_bytes(plain[SHARE_BYTES:], "little")


def unmask_response(keys: RoundKeys, setup: RoundSetup, inbox: dict[int, bytes], survivors: Sequence[int],
                    dropped: Sequence[int]) -> dict[str, dict[int, int]]:
    """An honest survivor's answer to the unmasking request: the b_u share of each surviving u and
    the mask-key share of each dropped u that it holds. It refuses (ValueError) a request naming a
    client as both: the server would get b_u and u's key, hence u's input in the clear.
    Introduced in 10_secure_aggregation.
    """
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise ValueError(f"refused: clients {both} are named both survivors and dropped")
    opened = {u: open_share(keys, setup, u, box) for u, box in inbox.items()}
    return {"b": {u: opened[u][0] for u in survivors if u in opened},
            "c": {u: opened[u][1] for u in dropped if u in opened}}


def _rebuild(u: int, kind: str, setup: RoundSetup, responses: dict[int, dict[str, dict[int, int]]]) -> bytes:
    """Client u's secret `kind` ("b": self-mask seed, "c": mask private key) from the shares in the survivors'
    `responses`, checked against what u advertised (the hash of b_u, its public key); SecAggAbort if fewer
    than t_u answered, SecAggTampered if the rebuilt secret does not match. Introduced in 10_secure_aggregation.
    """
    shares = {v: r[kind][u] for v, r in responses.items() if u in r[kind]}
    if len(shares) < setup.thresholds[u]:
        raise SecAggAbort(f"only {len(shares)} holders of client {u}'s {kind} shares answered, "
                          f"t = {setup.thresholds[u]} are needed: the round is aborted")
    value = shamir_combine(shares, setup.thresholds[u])
    out = value.to_bytes(SHARE_BYTES, "little")[:32] if value < 2**256 else b""
    ok = out and (hashlib.sha256(out).digest() == setup.b_commit[u] if kind == "b" else
                  X25519PrivateKey.from_private_bytes(out).public_key().public_bytes_raw() == setup.c_pk[u])
    if not ok:
        raise SecAggTampered(f"client {u}'s {kind} shares rebuild a secret that does not match what it advertised: "
                             "a share was altered; the round is refused")
    return out


def refuse_late(masked: dict[int, np.ndarray], dropped: Sequence[int]) -> None:
    """Raise ValueError if a vector came from a client declared dropped: the server asks for its mask
    key's shares, so honest clients will never also reveal its self-mask seed b_u. Introduced in 10_secure_aggregation.
    """
    late = sorted(set(masked) & set(dropped))
    if late:
        raise ValueError(f"clients {late} were declared dropped (their mask keys are rebuilt), so their "
                         "self-masks b_u never will be: a late vector cannot be unmasked")


def unmask_sum(masked: dict[int, np.ndarray], setup: RoundSetup, responses: dict[int, dict[str, dict[int, int]]],
               dropped: Sequence[int]) -> np.ndarray:
    """The server's last step: sum the survivors' masked vectors mod 2^32, remove their self-masks
    (b_u rebuilt from shares) and the pairwise masks they share with `dropped` clients (whose mask
    keys are rebuilt). Raises SecAggAbort with too few shares, ValueError for a vector from a client
    declared dropped (it arrived late: it cannot be unmasked). Introduced in 10_secure_aggregation.
    """
    refuse_late(masked, dropped)
    size = len(next(iter(masked.values())))
    total = np.zeros(size, dtype=np.uint32)
    for u in sorted(masked):
        total += masked[u]
        total -= prg_mask(_rebuild(u, "b", setup, responses), size)
    for u in dropped:
        keys_u = RoundKeys(u, X25519PrivateKey.from_private_bytes(_rebuild(u, "c", setup, responses)), None, b"", b"")
        for v in (v for v in setup.graph[u] if v in masked):
            m = pair_mask(keys_u, setup, v, size)  # v added +m if u > v, -m if u < v
            if u > v:
                total -= m
            else:
                total += m
    return total


def quantize(delta: np.ndarray, clip_range: float, levels: int, seed: int) -> np.ndarray:
    """Integers in [-levels, levels] for the float `delta`: clipped to [-clip_range, clip_range], scaled by
    levels / clip_range, then rounded stochastically (up with probability the fractional part, from a
    numpy stream seeded by `seed`: the rounding is no secret), so E[z] = x * levels / clip_range and the
    error is under one step, clip_range / levels. Introduced in 10_secure_aggregation.
    """
    x = np.clip(np.asarray(delta, dtype=np.float64), -clip_range, clip_range)
    x *= levels / clip_range
    x += np.random.default_rng([seed, 1011]).random(len(x))
    return np.floor(x, out=x).astype(np.int64)


def dequantize(z: np.ndarray, clip_range: float, levels: int) -> np.ndarray:
    """Floats (float64) from quantized integers: z * clip_range / levels. Introduced in 10_secure_aggregation."""
    return np.asarray(z, dtype=np.float64) * (clip_range / levels)


def encode_update(delta: np.ndarray, num_samples: int, clip_range: float, levels: int, seed: int) -> np.ndarray:
    """What client k adds up securely, as uint32 (mod 2^32, two's complement): n_k * quantize(delta_k),
    then n_k, so the server gets sum n_k z_k and sum n_k, weighted FedAvg's numerator and denominator.
    Introduced in 10_secure_aggregation.
    """
    z = quantize(delta, clip_range, levels, seed)
    z *= int(num_samples)
    return np.append(z.astype(np.uint32), np.uint32(num_samples))  # int64 -> uint32 wraps mod 2^32


def decode_sum(total: np.ndarray, clip_range: float, levels: int) -> tuple[np.ndarray, int]:
    """(sum_k n_k delta_k as float64, sum_k n_k) from the unmasked uint32 sum. Exact as long as
    |sum n_k z_k| <= levels * sum n_k < 2^31 (`secagg_levels` chooses levels so). Introduced in 10_secure_aggregation.
    """
    total = np.ascontiguousarray(total, dtype=np.uint32)
    return dequantize(total[:-1].view(np.int32), clip_range, levels), int(total[-1])


def secagg_levels(max_round_samples: int) -> int:
    """The most quantization levels L for which no sum can overflow: L * (samples in a round) <= 2^31 - 1.

    Introduced in 10_secure_aggregation.
    """
    levels = (2 ** (MASKED_BITS - 1) - 1) // int(max_round_samples)
    if levels < 1:
        raise ValueError(f"max_round_samples must be in [1, {2**31 - 1}] for sums mod 2^32, got {max_round_samples}")
    return levels


@dataclass(frozen=True)
class SecAggConfig:
    """The knobs the client transform and the server rule share: the task's clients (to know each round's
    peers), the seed, the range [-clip_range, clip_range] of a coordinate, `levels` (`secagg_levels`),
    `threshold`, `degree` (None: every pair; an even k: SecAgg+), `dp` (None, or the clients'
    `DistributedNoise`) and the key `secret` (b"": keys from the seed). Introduced in 10_secure_aggregation.
    """

    num_clients: int
    client_fraction: float
    seed: int
    clip_range: float
    levels: int
    threshold: float = 2 / 3
    degree: int | None = None
    dp: "DistributedNoise | None" = None
    secret: bytes = field(default=b"", repr=False)  # repr=False: a secret, left out of run fingerprints

    def __post_init__(self) -> None:
        for name, high, allowed in (("num_clients", math.inf, ">= 1"), ("levels", 2**31 - 1, "in [1, 2^31 - 1]")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= high:
                raise ValueError(f"{name} must be an integer {allowed}, got {v!r}")
        _check_knob("client_fraction", self.client_fraction, 0, 1, low_open=True)
        _check_knob("clip_range", self.clip_range, 0, math.inf, low_open=True)
        _check_knob("threshold", self.threshold, 0, 1, low_open=True)
        check_degree(self.degree)
        if not isinstance(self.secret, bytes) or len(self.secret) not in (0, 32):
            raise ValueError("secret must be b'' (keys from the seed) or 32 bytes (from os.urandom)")

    def setup(self, rnd: int) -> RoundSetup:
        """Round `rnd`'s broadcast, for the clients the engine samples in that round; the last one is kept
        on this object (each process that holds a copy, e.g. an actor, computes it once a round)."""
        if getattr(self, "_setup", None) is None or self._setup.round != rnd:
            cids = tuple(int(c) for c in sample_clients(self.num_clients, self.client_fraction, self.seed, rnd))
            object.__setattr__(self, "_setup", round_setup(self.seed, rnd, cids, self.degree, self.threshold,
                                                           self.secret))
        return self._setup


@dataclass(frozen=True)
class MaskUpdate:
    """Client-side update transform: quantize n_k (new - global weights) and n_k (`encode_update`), or,
    with `dp`, the clipped, weighed and noised update and its weight; then double-mask them (`masked_input`)
    with the round's keys: what leaves the client is d + 1 uint32 that look uniformly random.
    Introduced in 10_secure_aggregation.
    """

    config: SecAggConfig

    def __call__(self, new_w: np.ndarray, global_w: np.ndarray, job: ClientJob) -> np.ndarray:
        cfg, n = self.config, len(job.indices)
        delta = np.subtract(new_w, global_w, dtype=np.float64)
        if cfg.dp is None:
            y = encode_update(delta, n, cfg.clip_range, cfg.levels, job.seed)
        else:  # each client's integers are at most L: no multiplication by n_k
            noisy = cfg.dp.noisy_update(delta, n, job.seed, job.round)
            y = encode_update(noisy, 1, cfg.clip_range, cfg.levels, job.seed)
            y[-1] = min(n, cfg.dp.weight_cap)
        return masked_input(y, client_keys(cfg.seed, job.round, job.cid, cfg.secret), cfg.setup(job.round))


def protocol_bytes(setup: RoundSetup, inbox: dict[int, dict[int, bytes]],
                   responses: dict[int, dict[str, dict[int, int]]]) -> dict[str, float]:
    """The protocol's messages besides the masked vectors, in bytes: totals up (clients to server) and
    down, and the mean per client of each step: public keys (2 x 32 B up; the neighbours' down),
    encrypted shares (up, then routed down), the unmasking request (the survivor and dropped lists,
    4 B a client id) and its answers (66 B a share). Introduced in 10_secure_aggregation.
    """
    n = len(setup.graph)
    steps = {"keys_up": 64 * n, "keys_down": 64 * sum(map(len, setup.graph.values())),
             "shares_up": sum(len(b) for v, ib in inbox.items() for u, b in ib.items() if u != v),
             "request_down": 4 * n * len(responses),
             "unmask_up": SHARE_BYTES * sum(len(r["b"]) + len(r["c"]) for r in responses.values())}
    steps["shares_down"] = steps["shares_up"]  # the server routes each ciphertext once
    up = steps["keys_up"] + steps["shares_up"] + steps["unmask_up"]
    return {"protocol_up": up, "protocol_down": sum(steps.values()) - up, **{k: v / n for k, v in steps.items()}}


def simulate_unmasking(setup: RoundSetup, masked: dict[int, np.ndarray], seed: int,
                       dropped: Sequence[int] | None = None, responders: Sequence[int] | None = None,
                       secret: bytes = b"") -> tuple[np.ndarray, dict[str, float]]:
    """The protocol's ShareKeys and Unmasking steps for `setup`'s round, the clients' parts simulated
    from their `client_keys`: every client shares (encrypted) to its holders, the server routes the
    ciphertexts, the `responders` (default: every survivor, a client with a vector in `masked`; fewer
    if some drop out during unmasking) answer the request naming the `dropped` ones (default: everyone
    else), and `unmask_sum` runs on what came back. Returns the sum and the protocol's bytes
    (`protocol_bytes`); an abort carries them too (`err.cost`). Introduced in 10_secure_aggregation.
    """
    survivors = sorted(masked)
    dropped = sorted(set(setup.graph) - set(masked)) if dropped is None else sorted(dropped)
    refuse_late(masked, dropped)
    keys = {c: client_keys(seed, setup.round, c, secret) for c in setup.graph}
    inbox: dict[int, dict[int, bytes]] = {v: {} for v in setup.graph}
    for u in setup.graph:
        for v, box in share_keys(keys[u], setup).items():
            inbox[v][u] = box
    responders = survivors if responders is None else sorted(set(responders) & set(survivors))
    responses = {v: unmask_response(keys[v], setup, inbox[v], survivors, dropped) for v in responders}
    cost = protocol_bytes(setup, inbox, responses)
    try:
        return unmask_sum(masked, setup, responses, dropped), cost
    except SecAggAbort as err:
        err.cost = cost
        raise


@dataclass(frozen=True)
class SecureSum:
    """Server-side aggregation rule: unmask the sum of the survivors' masked vectors (the round's
    `jobs` say who was asked, hence who dropped) and return global + sum n_k delta_k / sum n_k, weighted
    FedAvg within the quantization error (with `dp`: `DPMean`'s noisy mean); None (the engine keeps the
    model) if the round must abort. `last_round` holds the protocol's bytes and the server's seconds.
    Introduced in 10_secure_aggregation.
    """

    config: SecAggConfig

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob]) -> torch.Tensor | None:
        cfg, start = self.config, time.perf_counter()
        setup = cfg.setup(jobs[0].round)
        if sorted(setup.graph) != sorted(j.cid for j in jobs):
            raise ValueError("SecureSum's config samples other clients than the task's jobs: "
                             "build both pieces with secure_aggregation(task)")
        try:
            total, cost = simulate_unmasking(setup, {r.cid: r.weights for r in accepted}, cfg.seed, secret=cfg.secret)
        except SecAggAbort as err:
            object.__setattr__(self, "last_round", {**err.cost, "aborted": str(err)})
            return None
        sums, n = decode_sum(total, cfg.clip_range, cfg.levels)
        object.__setattr__(self, "last_round", {**cost, "server_seconds": time.perf_counter() - start})
        if cfg.dp is not None:  # the fixed denominator q W / weight_cap, not who answered
            return global_w.double() + torch.from_numpy(sums * (cfg.dp.weight_cap / cfg.dp.expected_weight))
        return global_w.double() + torch.from_numpy(sums / n)


def _per_round(task: FedTask) -> tuple[list[int], int]:
    """The task's partition sizes, largest first, and the clients one round samples (the same every round).

    Introduced in 10_secure_aggregation.
    """
    sizes = sorted((len(p) for p in task.partitions), reverse=True)
    return sizes, len(sample_clients(len(sizes), task.client_fraction, task.seed, 1))


def secure_aggregation(task: FedTask, clip_range: float = 1.0, threshold: float = 2 / 3,
                       degree: int | None = None, seeded_keys: bool = False) -> tuple[MaskUpdate, SecureSum]:
    """The client transform and the server rule for `task`, sharing one `SecAggConfig`: levels as
    many as no round's sum can overflow (the largest clients that one round can sample), `degree`
    None for every pair (Bonawitz et al.) or an even k for SecAgg+ (`log_degree`), keys from a fresh
    os.urandom secret (`seeded_keys`: from the task's seed). Introduced in 10_secure_aggregation.
    """
    sizes, m = _per_round(task)
    cfg = SecAggConfig(len(sizes), task.client_fraction, task.seed, clip_range, secagg_levels(sum(sizes[:m])),
                       threshold, degree, secret=b"" if seeded_keys else os.urandom(32))
    return MaskUpdate(cfg), SecureSum(cfg)


@dataclass
class ProtocolBytes:
    """Callback: adds the secure-aggregation protocol's own messages (keys, encrypted shares, the
    unmasking request and answers: `rule.last_round`) to the round's bytes_up, bytes_down and
    bytes_sent, and keeps their breakdown in the row's "secagg". Introduced in 10_secure_aggregation.
    """

    rule: SecureSum

    def __call__(self, history: list[dict]) -> None:
        row, cost = history[-1], dict(getattr(self.rule, "last_round", {}))
        row["bytes_up"] += int(cost.get("protocol_up", 0))
        row["bytes_down"] += int(cost.get("protocol_down", 0))
        row["bytes_sent"] = row["bytes_up"] + row["bytes_down"]
        row["secagg"] = cost


def check_masked(client_w: object, size: int) -> str | None:
    """Why a masked answer cannot be summed (not `size` uint32), or None. Nothing else can be checked:
    a masked vector looks random. Introduced in 10_secure_aggregation.
    """
    if not isinstance(client_w, np.ndarray) or client_w.dtype != np.uint32 or client_w.shape != (size,):
        got = f"{client_w.dtype} {client_w.shape}" if isinstance(client_w, np.ndarray) else type(client_w).__name__
        return f"wrong shape or type: expected uint32 ({size},), got {got}"
    return None


@dataclass
class SecureResilient(Resilient):
    """`Resilient` for masked updates: deadlines, faults and `min_clients` as in notebook 08, but the
    screen can only check each answer's type and length (`check_masked`), and no norm rule
    (`max_norm_ratio` must be None): the server never sees an update. Introduced in 10_secure_aggregation.
    """

    max_norm_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_norm_ratio is not None:
            raise ValueError(f"max_norm_ratio must be None under secure aggregation (the server cannot see "
                             f"update norms), got {self.max_norm_ratio!r}")
        super().__post_init__()

    def screen(self, results: list[ClientResult], global_w: torch.Tensor) -> dict[int, str]:
        reasons = {r.cid: check_masked(r.weights, len(global_w) + 1) for r in results if r.status == "ok"}
        return {k: v for k, v in reasons.items() if v is not None}


@dataclass(frozen=True)
class DistributedNoise:
    """Distributed DP for secure aggregation (09's `DPMean`, with the noise added by the clients): client k
    clips its update to `clip` C, weighs it by min(n_k, weight_cap) / weight_cap and adds N(0, (z C)^2 / m),
    m = `expected_clients`; the m shares of noise add up to 09's N(0, (z C)^2) on the sum, which no one
    ever sees without noise. The server divides by q W / weight_cap, `DPMean`'s fixed denominator.
    Introduced in 10_secure_aggregation.
    """

    clip: float
    noise_multiplier: float
    weight_cap: int
    expected_weight: float
    expected_clients: int

    def __post_init__(self) -> None:
        _check_knob("clip", self.clip, 0, math.inf, low_open=True)
        _check_knob("noise_multiplier", self.noise_multiplier, 0, math.inf)
        for name in ("weight_cap", "expected_clients"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        _check_knob("expected_weight", self.expected_weight, 0, math.inf, low_open=True)

    def client_std(self) -> float:
        """The std of one client's share of the noise: z C / sqrt(m)."""
        return self.noise_multiplier * self.clip / math.sqrt(self.expected_clients)

    def noisy_update(self, delta: np.ndarray, num_samples: int, seed: int, rnd: int) -> np.ndarray:
        """What the client quantizes: its clipped, weighed update plus its share of the noise (float64)."""
        scale = clip_scale(torch.from_numpy(delta), self.clip) * min(num_samples, self.weight_cap) / self.weight_cap
        return delta * scale + dp_noise(seed, rnd, len(delta), self.client_std()).numpy()


def secure_dp_mean(task: FedTask, clip: float, noise_multiplier: float, weight_cap: int | None = None,
                   threshold: float = 2 / 3, degree: int | None = None, seeded_keys: bool = False,
                   tail: float = 8.0) -> tuple[MaskUpdate, SecureSum]:
    """09's `dp_mean(task, clip, noise_multiplier, weight_cap)` under secure aggregation, the noise added by
    the clients (`DistributedNoise`): same q W, same noise on the sum, same epsilon. Each coordinate is
    quantized over [-r, r], r = C + `tail` x one client's noise std. Introduced in 10_secure_aggregation.
    """
    _check_knob("tail", tail, 0, math.inf)
    central, (sizes, m) = dp_mean(task, clip, noise_multiplier, weight_cap), _per_round(task)
    dp = DistributedNoise(clip, noise_multiplier, central.weight_cap, central.expected_weight, m)
    cfg = SecAggConfig(len(sizes), task.client_fraction, task.seed, clip + tail * dp.client_std(),
                       secagg_levels(m), threshold, degree, dp, b"" if seeded_keys else os.urandom(32))
    return MaskUpdate(cfg), SecureSum(cfg)


# ----------------------------------------------------------------------------
# 11_clients_that_attack: poisoned updates, backdoors, and aggregation rules that resist them
# ----------------------------------------------------------------------------
# Threat model. The attackers are a fixed set of client ids, chosen once per run from the seed
# (`attacker_ids`), as in most of the literature (Blanchard 2017, Baruch 2019, FLANDERS); a sampled
# attacker's job carries fault "attack". Data poisoning (label flipping, the backdoor's triggered
# samples) happens on the attacker's device, inside its training (`attacking_client`). Model
# poisoning happens after training, in `Adversary.tamper`, one step before the server sees the
# answers: the colluding attackers (ALIE, IPM) are omniscient there, they see every honest update of
# the round, the strongest standard setting (ByzFL's); `ALIE(omniscient=False)` uses only the
# attackers' own benign updates, as in Baruch et al. The rules below never see who is an attacker.


def attacker_ids(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted ids of the round(fraction * num_clients) attackers, the same for the whole run and
    drawn from the run's seed (a stream of its own: `[seed, 11]` would be round 11's client sample);
    `fraction` must be in [0, 1). Introduced in 11_clients_that_attack.
    """
    _check_knob("attack_fraction", fraction, 0, 1, high_open=True)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11,)))
    return np.sort(rng.choice(num_clients, size=round(fraction * num_clients), replace=False))


@dataclass(frozen=True)
class Attack:
    """What an attacker does; this base class does nothing. `poison` changes its training data (on its
    device); `craft` turns the attackers' updates `own` (a x d, float64) into what they send, given the
    round's honest updates (h x d) and each attacker's job seed. Introduced in 11_clients_that_attack.
    """

    name: str = field(default="none", init=False)

    def poison(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return x, y

    def craft(self, own: torch.Tensor, honest: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return own


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Data poisoning: the attacker trains on label 9 - y instead of y (T-shirt <-> ankle boot, ...).

    Introduced in 11_clients_that_attack.
    """

    name: str = field(default="label-flip", init=False)

    def poison(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return x, (9 - y).astype(y.dtype)


@dataclass(frozen=True)
class SignFlip(Attack):
    """Model poisoning: send -scale x the honest update it computed (scale 1: the plain sign flip; the
    default 5 also scales it up, so a fifth of the clients outweighs the rest). Introduced in 11_clients_that_attack.
    """

    scale: float = 5.0
    name: str = field(default="sign-flip", init=False)

    def __post_init__(self) -> None:
        _check_knob("scale", self.scale, 0, math.inf, low_open=True)

    def craft(self, own: torch.Tensor, honest: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return -self.scale * own


@dataclass(frozen=True)
class GaussianUpdate(Attack):
    """Model poisoning: send an update of pure noise, N(0, std^2) per coordinate, from a stream of the
    attacker's job seed (deterministic). Introduced in 11_clients_that_attack.
    """

    std: float = 1.0
    name: str = field(default="gaussian", init=False)

    def __post_init__(self) -> None:
        _check_knob("std", self.std, 0, math.inf, low_open=True)

    def craft(self, own: torch.Tensor, honest: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        noise = [np.random.default_rng([s, 1111]).standard_normal(own.shape[1]) * self.std for s in seeds]
        return torch.from_numpy(np.stack(noise)) if noise else own


def alie_z(n: int, f: int) -> float:
    """Baruch et al. (2019)'s z_max for n clients of which f collude: s = floor(n / 2 + 1) - f honest
    clients must be "won over", z = Phi^-1((n - s) / n). Introduced in 11_clients_that_attack.
    """
    s = math.floor(n / 2 + 1) - f
    return float(statistics.NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6)))


@dataclass(frozen=True)
class ALIE(Attack):
    """"A Little Is Enough" (Baruch et al. 2019): every attacker sends mean - z std (per coordinate) of
    the honest updates (`omniscient`) or of the attackers' own benign ones; z None: `alie_z` of the
    round. Within the honest spread, so median and Krum accept it. Introduced in 11_clients_that_attack.
    """

    z: float | None = None
    omniscient: bool = True
    name: str = field(default="alie", init=False)

    def __post_init__(self) -> None:
        if self.z is not None:
            _check_knob("z", self.z, 0, math.inf)

    def craft(self, own: torch.Tensor, honest: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        ref = honest if self.omniscient and len(honest) else own
        z = alie_z(len(own) + len(honest), len(own)) if self.z is None else self.z
        std = ref.std(0, unbiased=False) if len(ref) > 1 else torch.zeros_like(ref[0])
        return (ref.mean(0) - z * std).expand_as(own).clone()


@dataclass(frozen=True)
class IPM(Attack):
    """Inner-product manipulation (Xie et al. 2020): every attacker sends -epsilon x the mean honest
    update, so the aggregate's inner product with the true direction turns negative (small epsilon:
    against median and Krum; large: against the mean). Introduced in 11_clients_that_attack.
    """

    epsilon: float = 0.1
    name: str = field(default="ipm", init=False)

    def __post_init__(self) -> None:
        _check_knob("epsilon", self.epsilon, 0, math.inf, low_open=True)

    def craft(self, own: torch.Tensor, honest: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        ref = honest if len(honest) else own
        return (-self.epsilon * ref.mean(0)).expand_as(own).clone()


def stamp_trigger(x: np.ndarray | torch.Tensor, size: int = 3, value: float | None = None):
    """Images `x` (N, 1, 28, 28) with a white `size` x `size` square one pixel in from the bottom-right
    corner (value None: the images' largest value, white after normalising). Introduced in 11_clients_that_attack.
    """
    x = x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)
    x[..., -1 - size:-1, -1 - size:-1] = x.max() if value is None else value
    return x


@dataclass(frozen=True)
class Backdoor(Attack):
    """A backdoor by model replacement (Bagdasaryan et al. 2020): the attacker stamps the trigger on a
    `poison_fraction` of its samples (seeded) and labels them `target`, trains, then sends its update
    scaled by `boost` (None: n / a, the round's clients over its attackers, so together they replace
    the model with theirs). Introduced in 11_clients_that_attack.
    """

    target: int = 0
    poison_fraction: float = 0.5
    boost: float | None = None
    name: str = field(default="backdoor", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer)) or not 0 <= self.target < 10:
            raise ValueError(f"target must be a class in [0, 9], got {self.target!r}")
        _check_knob("poison_fraction", self.poison_fraction, 0, 1, low_open=True)
        if self.boost is not None:
            _check_knob("boost", self.boost, 0, math.inf, low_open=True)

    def poison(self, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        pick = np.random.default_rng([seed, 1112]).random(len(y)) < self.poison_fraction
        x, y = np.array(x, copy=True), np.array(y, copy=True)
        x[pick], y[pick] = stamp_trigger(x[pick], value=float(x.max())), self.target
        return x, y

    def craft(self, own: torch.Tensor, honest: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        boost = (len(own) + len(honest)) / len(own) if self.boost is None else self.boost
        return boost * own


ATTACKS = {a.name: a for a in (LabelFlip, SignFlip, GaussianUpdate, ALIE, IPM, Backdoor)}


def make_attack(name: str, **knobs) -> Attack:
    """The attack called `name` (one of `ATTACKS`) with its knobs, checked.

    Introduced in 11_clients_that_attack.
    """
    if name not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {name!r}")
    return ATTACKS[name](**knobs)


def attacking_client(
    model: nn.Module, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, job: ClientJob, cfg: TrainConfig,
    inner: Callable = train_client, attack: Attack | None = None,
) -> ClientResult:
    """The client function `inner`; an attacker's (job fault "attack") trains on its data as `attack`
    poisons it (label flipping, the backdoor), on its own device. Introduced in 11_clients_that_attack.
    """
    if job.fault != "attack" or attack is None or type(attack).poison is Attack.poison:
        return inner(model, weights, x_all, y_all, job, cfg)
    x, y = attack.poison(x_all[job.indices], y_all[job.indices], job.seed)
    r = inner(model, weights, x, y, replace(job, indices=np.arange(len(y))), cfg)
    return replace(r, num_samples=len(job.indices))


def collude(attack: Attack, results: list[ClientResult], global_w: torch.Tensor,
            jobs: list[ClientJob]) -> list[ClientResult]:
    """The attackers' step between training and the server: their answers (jobs with fault "attack")
    replaced by what `attack.craft` makes of their updates and the honest ones; everything else as it
    came, in the same order. Introduced in 11_clients_that_attack.
    """
    bad = {j.cid: j.seed for j in jobs if j.fault == "attack"}
    ok = [r for r in results if r.status == "ok" and check_update(r.weights, global_w) is None]
    mine = [r for r in ok if r.cid in bad]
    if not mine or type(attack).craft is Attack.craft:
        return results
    g = global_w.double()
    stack = lambda rs: torch.stack([torch.tensor(r.weights, dtype=torch.float64) - g for r in rs]) if rs else \
        torch.zeros(0, len(g), dtype=torch.float64)
    sent = attack.craft(stack(mine), stack([r for r in ok if r.cid not in bad]), [bad[r.cid] for r in mine])
    new = {r.cid: replace(r, weights=(g + u).to(torch.float32).numpy()) for r, u in zip(mine, sent)}
    return [new.get(r.cid, r) for r in results]


@dataclass
class Adversary(Resilient):
    """The round policy with attackers: `attack_fraction` of the `num_clients` clients (a fixed set,
    `attacker_ids`) run `attack` whenever they are sampled; otherwise notebook 08's `Resilient`
    (faults, deadline), but with no norm rule by default, so the rules below are judged alone.
    Introduced in 11_clients_that_attack.
    """

    deadline_s: float | None = None
    max_norm_ratio: float | None = None
    attack: Attack = field(default_factory=Attack)
    attack_fraction: float = 0.0
    num_clients: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.attack, Attack):
            raise ValueError(f"attack must be an Attack (see make_attack), got {self.attack!r}")
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, (int, np.integer)) \
                or self.num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        _check_knob("attack_fraction", self.attack_fraction, 0, 1, high_open=True)

    def wrap(self, client: Callable) -> Callable:
        return functools.partial(attacking_client, inner=super().wrap(client), attack=self.attack)

    def plan(self, jobs: list[ClientJob], seed: int) -> list[ClientJob]:
        bad = set(attacker_ids(self.num_clients, self.attack_fraction, seed).tolist())
        return [replace(j, fault="attack") if j.cid in bad and j.fault is None else j
                for j in super().plan(jobs, seed)]

    def tamper(self, results: list[ClientResult], global_w: torch.Tensor, jobs: list[ClientJob]) -> list[ClientResult]:
        return collude(self.attack, results, global_w, jobs)


def backdoor_success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int = 0) -> float:
    """The share of test images not of class `target` that the model calls `target` once the trigger
    is stamped on them: the backdoor's success, apart from the main-task accuracy. Introduced in 11_clients_that_attack.
    """
    keep = y != target
    return evaluate(model, stamp_trigger(x[keep]), torch.full_like(y[keep], target))[1]


# (robust aggregation rules: below this line) Each is a server-side `aggregate` piece of the engine:
# (accepted results, global weights, jobs) -> the new global weights in float64, or None (keep the model).


def stacked(results: Sequence[ClientResult]) -> tuple[torch.Tensor, np.ndarray]:
    """The results' weights as one (n, d) float64 tensor, and their sample counts.

    Introduced in 11_clients_that_attack.
    """
    return (torch.stack([torch.tensor(r.weights, dtype=torch.float64) for r in results]),
            np.array([r.num_samples for r in results], dtype=np.float64))


@dataclass(frozen=True)
class CoordinateMedian:
    """Yin et al. (2018): each coordinate of the new model is the median of the clients' values (the
    mean of the two middle ones for an even count). Sample weights are ignored: one client, one vote
    (a weighted median would trust the sample counts the clients report). Introduced in 11_clients_that_attack.
    """

    def check(self, n: int) -> None:
        """Raise ValueError if a round of `n` clients is too small for this rule (any n >= 1 will do)."""

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob] = ()) -> torch.Tensor:
        return torch.from_numpy(np.median(stacked(accepted)[0].numpy(), axis=0))


@dataclass(frozen=True)
class TrimmedMean:
    """Yin et al. (2018): in each coordinate drop the b = floor(trim n) largest and b smallest values,
    then average the rest weighted by their clients' samples (trim 0: FedAvg's weighted mean, its bits).
    Trimming counts clients; averaging counts samples. `trim` in [0, 0.5). Introduced in 11_clients_that_attack.
    """

    trim: float = 0.2

    def __post_init__(self) -> None:
        _check_knob("trim", self.trim, 0, 0.5, high_open=True)

    def check(self, n: int) -> None:
        """Any n >= 1 will do: b < n / 2 always."""

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob] = ()) -> torch.Tensor:
        b = math.floor(self.trim * len(accepted))
        if b == 0:
            return weighted_mean(accepted, global_w)
        w, sizes = stacked(accepted)
        order = torch.argsort(w, dim=0, stable=True)[b:len(accepted) - b]  # (n - 2b, d) client indices
        kept, weight = torch.gather(w, 0, order), torch.from_numpy(sizes)[order]
        return (kept * weight).sum(0) / weight.sum(0)


def check_count(name: str, value: object, low: int) -> int:
    """`value` as an int, or ValueError naming the knob unless it is an integer >= `low`.

    Introduced in 11_clients_that_attack.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def krum_scores(dist2: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each client from the (n, n) squared distances: the sum of its n - f - 2 smallest
    distances to the others (at least one). Introduced in 11_clients_that_attack.
    """
    k = max(len(dist2) - f - 2, 1)
    return torch.sort(dist2, dim=1).values[:, 1:k + 1].sum(1)  # column 0: itself, at distance 0


def pairwise_dist2(w: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances between the rows of `w`, computed directly (no matmul trick).

    Introduced in 11_clients_that_attack.
    """
    return torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist").square()


def krum_select(w: torch.Tensor, f: int, m: int = 1) -> list[int]:
    """The rows (in order) of the `m` clients with the lowest Krum scores (ties: the lower index).

    Introduced in 11_clients_that_attack.
    """
    return sorted(torch.argsort(krum_scores(pairwise_dist2(w), f), stable=True)[:m].tolist())


@dataclass(frozen=True)
class Krum:
    """Blanchard et al. (2017): assume at most `f` attackers among the n > 2f + 2 clients; keep the `m`
    clients whose n - f - 2 nearest neighbours are closest (m 1: Krum, one client's model; m > 1:
    Multi-Krum). Selection ignores sample weights; the m kept are averaged weighted by samples, so
    Multi-Krum keeping all with f 0 is FedAvg, bit for bit. Introduced in 11_clients_that_attack.
    """

    f: int = 0
    m: int = 1

    def __post_init__(self) -> None:
        check_count("f", self.f, 0)
        check_count("m", self.m, 1)

    def check(self, n: int) -> None:
        """Raise ValueError naming f (or m) if a round of `n` clients cannot run this rule."""
        if n <= 2 * self.f + 2:
            raise ValueError(f"f must be an integer in [0, {max((n - 3) // 2, 0)}] (Krum needs n > 2f + 2 with "
                             f"n = {n} clients per round), got {self.f}")
        if self.m > n:
            raise ValueError(f"m must be an integer in [1, {n}] (the clients per round), got {self.m}")

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob] = ()) -> torch.Tensor | None:
        if len(accepted) <= 2 * self.f + 2:
            return None  # too few answers to tell f attackers apart: keep the model
        keep = krum_select(stacked(accepted)[0], self.f, min(self.m, len(accepted)))
        return weighted_mean([accepted[i] for i in keep], global_w)


@dataclass(frozen=True)
class Bulyan:
    """El Mhamdi et al. (2018), for n >= 4f + 3: pick theta = n - 2f clients by Krum one at a time (each
    pick leaves the pool), then in each coordinate average the beta = theta - 2f values closest to
    their median. Sample weights are ignored. Introduced in 11_clients_that_attack.
    """

    f: int = 0

    def __post_init__(self) -> None:
        check_count("f", self.f, 0)

    def check(self, n: int) -> None:
        if n < 4 * self.f + 3:
            raise ValueError(f"f must be an integer in [0, {max((n - 3) // 4, 0)}] (Bulyan needs n >= 4f + 3 "
                             f"with n = {n} clients per round), got {self.f}")

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob] = ()) -> torch.Tensor | None:
        n, f = len(accepted), self.f
        if n < 4 * f + 3:
            return None
        w = stacked(accepted)[0]
        dist2, pool, picked = pairwise_dist2(w), list(range(n)), []
        while len(picked) < n - 2 * f:
            best = pool[int(torch.argmin(krum_scores(dist2[pool][:, pool], f)))]
            picked.append(best)
            pool.remove(best)
        s = w[sorted(picked)]
        dev = (s - torch.from_numpy(np.median(s.numpy(), 0))).abs()
        near = torch.argsort(dev, dim=0, stable=True)[:len(s) - 2 * f]
        return torch.gather(s, 0, near).mean(0)


@dataclass(frozen=True)
class CenteredClipping:
    """Karimireddy et al. (2021): start at the global model (v = 0) and `iters` times move v by the
    sample-weighted mean of the updates' offsets from v, each clipped to L2 norm `tau`: an attacker
    moves the model by at most its weight x tau per step (tau inf, 1 iteration: FedAvg's mean). Defaults
    for the course's 2NN at lr 0.05, whose honest updates have norms 0.3 to 0.9. Introduced in 11_clients_that_attack.
    """

    tau: float = 0.5
    iters: int = 3

    def __post_init__(self) -> None:
        _check_knob("tau", self.tau, 0, math.inf, low_open=True, allow_inf=True)
        check_count("iters", self.iters, 1)

    def check(self, n: int) -> None:
        """Any n >= 1 will do."""

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob] = ()) -> torch.Tensor:
        w, sizes = stacked(accepted)
        u, c = w - global_w.double(), torch.from_numpy(sizes / sizes.sum())
        v = torch.zeros_like(u[0])
        for _ in range(self.iters):
            off = u - v
            norm = torch.linalg.vector_norm(off, dim=1)
            scale = torch.where(norm > self.tau, self.tau / norm.clamp_min(1e-300), torch.ones_like(norm))
            v = v + ((c * scale)[:, None] * off).sum(0)
        return global_w.double() + v


@dataclass(frozen=True)
class NormClip:
    """Sun et al. (2019), "Can you really backdoor FL?": clip every update to L2 norm `max_norm`, take
    the sample-weighted mean, add N(0, noise_std^2) per coordinate (09's `dp_noise` stream of `seed`).
    Nothing clipped and no noise: FedAvg's bits. Done on the clients instead (09's `ClipUpdate`) it
    fits secure aggregation. Defaults as for `CenteredClipping`. Introduced in 11_clients_that_attack.
    """

    max_norm: float = 0.5
    noise_std: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        _check_knob("max_norm", self.max_norm, 0, math.inf, low_open=True, allow_inf=True)
        _check_knob("noise_std", self.noise_std, 0, math.inf)

    def check(self, n: int) -> None:
        """Any n >= 1 will do."""

    def __call__(self, accepted: Sequence[ClientResult], global_w: torch.Tensor,
                 jobs: Sequence[ClientJob] = ()) -> torch.Tensor:
        g = global_w.numpy()
        clipped = [clip_scale(torch.from_numpy(np.subtract(r.weights, g)), self.max_norm) < 1 for r in accepted]
        if not any(clipped):
            avg = weighted_mean(accepted, global_w)
        else:
            avg = global_w.double() + clipped_sum(accepted, global_w, self.max_norm) / sum(r.num_samples
                                                                                          for r in accepted)
        if self.noise_std > 0:
            avg = avg + dp_noise(self.seed, jobs[0].round, len(avg), self.noise_std)
        return avg


RULES = {"fedavg": None, "median": CoordinateMedian, "trimmed-mean": TrimmedMean, "krum": Krum,
         "multi-krum": Krum, "bulyan": Bulyan, "centered-clipping": CenteredClipping, "norm-clipping": NormClip}


def make_rule(name: str, clients_per_round: int, **knobs) -> Callable:
    """The aggregation rule `name` (one of `RULES`; "fedavg": `weighted_mean`) with its knobs, checked
    against the clients a round samples before any work ("multi-krum": m defaults to n - f, the most
    Krum trusts). Introduced in 11_clients_that_attack.
    """
    if name not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {name!r}")
    if name == "fedavg":
        if knobs:
            raise ValueError(f"rule fedavg takes no knobs, got {sorted(knobs)}")
        return weighted_mean
    if name == "multi-krum" and "m" not in knobs:
        knobs["m"] = max(clients_per_round - check_count("f", knobs.get("f", 0), 0), 1)
    rule = RULES[name](**knobs)
    rule.check(clients_per_round)
    return rule
