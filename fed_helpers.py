"""fed_helpers: the reusable pieces of the federated-learning course.

Every definition below is written and explained in exactly one notebook (its docstring
names which) and imported from here by the notebooks that come after it. The sections
follow the notebooks in order. `tests/test_sync.py` keeps each definition identical to the
notebook cell that introduces it (cells whose first line is `#| export`): change the
notebook, then copy the cell here, or the test fails and shows the difference.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
import ray
import torch
import torch.nn as nn
import torch.nn.functional as F
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
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


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
# 05_round_loop: the full FedAvg round loop
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


def check_round_knobs(
    rounds: int, client_fraction: float, partitions: Sequence[np.ndarray], local_epochs: int,
    batch_size: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
) -> None:
    """Raise ValueError naming the first round-loop knob out of range, before any work.

    Introduced in 05_round_loop.
    """
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not 0 < client_fraction <= 1:
        raise ValueError(f"client_fraction must be in (0, 1], got {client_fraction!r}")
    if len(partitions) == 0 or any(len(p) == 0 for p in partitions):
        raise ValueError("partitions must hold at least 1 client, each with at least 1 sample")
    check_training_knobs(local_epochs, batch_size, lr, momentum, weight_decay)


def run_federated(
    model_name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
    partitions: Sequence[np.ndarray], rounds: int = 10, client_fraction: float = 1.0,
    local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05, seed: int = 0,
    use_ray: bool = True, on_round: Callable[[list[dict]], None] | None = None, progress: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """FedAvg (McMahan et al. 2017): each round, sample clients, train them from the
    global model (on Ray in parallel, or one after another), average their weights by
    sample count, evaluate. Returns the final model and one history row per round.
    Introduced in 05_round_loop.
    """
    check_round_knobs(rounds, client_fraction, partitions, local_epochs, batch_size, lr)
    model = make_model(model_name, seed)
    x_all, y_all = train[0].numpy(), train[1].numpy()
    if use_ray:
        init_ray()
        x_all, y_all = ray.put(x_all), ray.put(y_all)  # into the object store once, not once per task
    history: list[dict] = []
    for rnd in tqdm(range(1, rounds + 1), desc="rounds", disable=not progress):
        start = time.perf_counter()
        clients = sample_clients(len(partitions), client_fraction, seed, rnd)
        state = model.state_dict()
        jobs = [(state, x_all, y_all, partitions[k], model_name, local_epochs, batch_size, lr,
                 client_seed(seed, rnd, k)) for k in clients]
        if use_ray:
            state_ref = ray.put(state)  # once per round, shared by every client
            results = ray.get([client_update_remote.remote(state_ref, *job[1:]) for job in jobs])
        else:
            results = [client_update(*job) for job in jobs]
        # results are in client-id order, whatever order the clients finished in
        load_weights(model, fedavg([r[0] for r in results], [r[1] for r in results]))
        loss, acc = evaluate(model, *test)
        sizes = np.array([r[1] for r in results])
        history.append({
            "round": rnd,
            "accuracy": acc,
            "loss": loss,
            "train_loss": float(np.dot(sizes, [r[2] for r in results]) / sizes.sum()),
            "clients": len(clients),
            "seconds": time.perf_counter() - start,
            "bytes_sent": 2 * len(clients) * state_dict_bytes(state),  # down + up
        })
        if on_round is not None:
            on_round(history)
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
    """An `on_round` callback that redraws `plot_history` in place after every round,
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


def flat_weights(model: nn.Module) -> torch.Tensor:
    """All of `model`'s parameters as one float32 vector (a copy), in state-dict order.

    Strategies do their arithmetic on this vector. Introduced in 06_client_drift.
    """
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


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


CLIENT_HOOKS = {"prox": prox_hook, "correction": correction_hook}


def train_client_flat(
    model: nn.Module, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, indices: np.ndarray,
    epochs: int, batch_size: int, lr: float, seed: int, momentum: float = 0.0, weight_decay: float = 0.0,
    payload: tuple[str, object] | None = None,
) -> tuple[int, float, np.ndarray]:
    """One client's work on flat weights: load the global `weights` into `model` (any
    model of the right architecture: its old weights are overwritten), train with the
    gradient hook the strategy's `payload` names (None: plain SGD, as in FedAvg), return
    (samples, last epoch's loss, new flat weights). Introduced in 06_client_drift.
    """
    with torch_threads(1):
        w = torch.from_numpy(np.array(weights))
        torch.nn.utils.vector_to_parameters(w, model.parameters())
        hook = CLIENT_HOOKS[payload[0]](model, w, payload[1]) if payload is not None else None
        x = torch.from_numpy(x_all[indices])
        y = torch.from_numpy(y_all[indices])
        losses = train_local(model, x, y, epochs, batch_size, lr, seed, momentum, weight_decay, hook)
        return len(indices), losses[-1], flat_weights(model).numpy()


train_client_flat_remote = ray.remote(num_cpus=1)(train_client_flat)


def _check_knob(name: str, value: float, low: float, high: float, high_open: bool = False) -> float:
    """Return `value` as a float, or raise ValueError naming the knob and its range.

    Introduced in 06_client_drift.
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and low <= value and (
        value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in [{low}, {high}{')' if high_open else ']'}, got {value!r}")
    return float(value)


class FedAvg:
    """McMahan et al. (2017). Client: plain local SGD. Server: the new global model is
    the sample-weighted mean of the client models. The base of every strategy below:
    each overrides only what it changes. Introduced in 06_client_drift.
    """

    name = "fedavg"

    def payload(self, cid: int, global_w: torch.Tensor) -> tuple[str, object] | None:
        """What client `cid` receives besides the weights (None: nothing, plain SGD)."""
        return None

    def receive(self, cid: int, global_w: torch.Tensor, client_w: torch.Tensor, steps: int, lr: float) -> None:
        """Called for each client's result, in client-id order (SCAFFOLD keeps state here)."""

    def server_step(self, global_w: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """The new global weights (float32) from the old ones and the float64 weighted mean."""
        return avg.to(torch.float32)


class FedProx(FedAvg):
    """Li et al. (2020). Client: local loss + (mu / 2) * ||w - w_global||^2, which limits
    how far a client drifts; mu = 0 is FedAvg. Server: as FedAvg. Introduced in 06_client_drift.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        self.mu = _check_knob("mu", mu, 0, float("inf"))

    def payload(self, cid: int, global_w: torch.Tensor) -> tuple[str, object]:
        return ("prox", self.mu)


class FedAvgM(FedAvg):
    """Server momentum (Hsu et al. 2019; Reddi et al. 2021). The mean client update
    delta = avg - w is a pseudo-gradient step; the server keeps a momentum m = beta*m + delta
    and moves w += server_lr * m. momentum 0 with server_lr 1 is FedAvg, bit for bit: the new
    weights are computed as the mean plus what the momentum changes. Introduced in 06_client_drift.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        self.server_lr = _check_knob("server_lr", server_lr, 0, float("inf"))
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
        self.server_lr = _check_knob("server_lr", server_lr, 0, float("inf"))
        self.beta1 = _check_knob("beta1", beta1, 0, 1, high_open=True)
        self.beta2 = _check_knob("beta2", beta2, 0, 1, high_open=True)
        self.tau = _check_knob("tau", tau, 1e-12, float("inf"))
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
    """Reddi et al. (2021): FedAdam with Yogi's second moment, which grows or shrinks v
    by at most (1 - beta2) * delta^2 per round, so one large update cannot inflate it.
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

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("client_*[0-9].npy"))


class Scaffold(FedAvg):
    """Karimireddy et al. (2020), option II. Server control variate c, one c_i per client
    (zero until the client first trains, kept in a `ClientStateStore`). Client: every
    gradient gets + (c - c_i), cancelling its drift. After K local steps with rate lr:
    c_i+ = c_i - c + (w_global - w_client) / (K * lr), and c += sum of (c_i+ - c_i) / num_clients.
    Server: w += server_lr * (avg - w). Introduced in 06_client_drift.
    """

    name = "scaffold"

    def __init__(self, num_clients: int, server_lr: float = 1.0, state_dir: str | Path | None = None):
        if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        self.num_clients = int(num_clients)
        self.server_lr = _check_knob("server_lr", server_lr, 0, float("inf"))
        self.store = ClientStateStore(state_dir)
        self.c: torch.Tensor | None = None  # float64, created at the first round
        self.dc_sum: torch.Tensor | None = None  # sum of this round's c_i+ - c_i

    def _c_i(self, cid: int) -> torch.Tensor:
        return torch.from_numpy(self.store.get(cid, np.zeros(len(self.c), np.float32))).double()

    def payload(self, cid: int, global_w: torch.Tensor) -> tuple[str, np.ndarray]:
        if self.c is None:
            self.c = torch.zeros(len(global_w), dtype=torch.float64)
        return ("correction", (self.c - self._c_i(cid)).to(torch.float32).numpy())

    def receive(self, cid: int, global_w: torch.Tensor, client_w: torch.Tensor, steps: int, lr: float) -> None:
        c_i = self._c_i(cid)
        c_new = c_i - self.c + (global_w.double() - client_w.double()) / (steps * lr)
        self.store.put(cid, c_new.to(torch.float32).numpy())
        self.dc_sum = (c_new - c_i) if self.dc_sum is None else self.dc_sum + (c_new - c_i)

    def server_step(self, global_w: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        if self.dc_sum is not None:
            self.c = self.c + self.dc_sum / self.num_clients
            self.dc_sum = None
        # = w + server_lr * (avg - w), written so that server_lr 1 returns the mean's own bits
        return (avg + (self.server_lr - 1) * (avg - global_w.double())).to(torch.float32)


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


def local_steps(num_samples: int, epochs: int, batch_size: int) -> int:
    """SGD steps a client with `num_samples` takes: epochs * ceil(samples / batch).

    Introduced in 06_client_drift.
    """
    return epochs * math.ceil(num_samples / batch_size)


def payload_bytes(payload: tuple[str, object] | None) -> int:
    """Bytes a strategy's payload adds to a client's download (arrays only; a number is free).

    Introduced in 06_client_drift.
    """
    return payload[1].nbytes if payload is not None and isinstance(payload[1], np.ndarray) else 0


def run_strategy(
    strategy: FedAvg, model_name: str, train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor], partitions: Sequence[np.ndarray], rounds: int = 10,
    client_fraction: float = 1.0, local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
    momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0, use_ray: bool = True,
    on_round: Callable[[list[dict]], None] | None = None, progress: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """Notebook 05's round loop with a `strategy`: each client gets the flat global weights
    and the strategy's payload, trains (Ray tasks, or one after another), and the results
    are folded in client-id order into a float64 weighted mean, handed to
    `strategy.receive`, and turned into the next global model by `strategy.server_step`.
    With `FedAvg()` it gives the same bits as `run_federated`. Introduced in 06_client_drift.
    """
    check_round_knobs(rounds, client_fraction, partitions, local_epochs, batch_size, lr, momentum, weight_decay)
    model = make_model(model_name, seed)
    x_all, y_all = train[0].numpy(), train[1].numpy()
    if use_ray:
        init_ray()
        x_all, y_all = ray.put(x_all), ray.put(y_all)
    history: list[dict] = []
    for rnd in tqdm(range(1, rounds + 1), desc=f"rounds ({strategy.name})", disable=not progress):
        start = time.perf_counter()
        clients = sample_clients(len(partitions), client_fraction, seed, rnd)
        w = flat_weights(model)
        jobs = [(partitions[k], client_seed(seed, rnd, k), strategy.payload(int(k), w)) for k in clients]
        knobs = (local_epochs, batch_size, lr)
        if use_ray:
            w_ref, model_ref = ray.put(w.numpy()), ray.put(model)
            results = ray.get([train_client_flat_remote.remote(model_ref, w_ref, x_all, y_all, idx, *knobs, s,
                                                               momentum, weight_decay, pay) for idx, s, pay in jobs])
        else:
            results = [train_client_flat(make_model(model_name), w.numpy(), x_all, y_all, idx, *knobs, s,
                                         momentum, weight_decay, pay) for idx, s, pay in jobs]
        sizes = np.array([r[0] for r in results], dtype=np.float64)
        coef = sizes / sizes.sum()
        avg = torch.zeros(len(w), dtype=torch.float64)
        spread = 0.0  # sum_k coef_k * ||w_k - w||^2, for the drift
        for k, c, (n, _, w_k) in zip(clients, coef, results):  # client-id order: a fixed summation order
            w_k = torch.tensor(w_k)  # a copy: arrays from Ray are read-only
            avg += float(c) * w_k.to(torch.float64)
            spread += float(c) * float((w_k.double() - w.double()).square().sum())
            strategy.receive(int(k), w, w_k, local_steps(n, local_epochs, batch_size), lr)
        drift = math.sqrt(max(spread - float((avg - w.double()).square().sum()), 0.0))
        torch.nn.utils.vector_to_parameters(strategy.server_step(w, avg), model.parameters())
        loss, acc = evaluate(model, *test)
        history.append({
            "round": rnd,
            "accuracy": acc,
            "loss": loss,
            "train_loss": float(np.dot(sizes, [r[1] for r in results]) / sizes.sum()),
            "drift": drift,  # RMS distance of the client models from their weighted mean
            "clients": len(clients),
            "seconds": time.perf_counter() - start,
            "bytes_sent": 2 * len(clients) * w.numel() * 4 + sum(payload_bytes(job[2]) for job in jobs),
        })
        if on_round is not None:
            on_round(history)
    return model, history


# ----------------------------------------------------------------------------
# 07_scaling_with_ray: a pool of long-lived actors and streaming aggregation
# ----------------------------------------------------------------------------


@ray.remote(num_cpus=1)
class ClientTrainer:
    """A long-lived Ray worker that keeps the dataset and one model between rounds and
    trains whichever clients it is given. Introduced in 07_scaling_with_ray.
    """

    def __init__(self, x_all: np.ndarray, y_all: np.ndarray, model_name: str):
        torch.set_num_threads(1)
        self.x_all, self.y_all = x_all, y_all  # zero-copy views of the object store
        self.model = make_model(model_name)

    def train(self, weights: np.ndarray, jobs: list[tuple[int, np.ndarray, int, tuple | None]], epochs: int,
              batch_size: int, lr: float, momentum: float = 0.0,
              weight_decay: float = 0.0) -> list[tuple[int, int, float, np.ndarray]]:
        """Train each (client id, indices, seed, payload) job; return (id, samples, loss, weights)."""
        return [(cid, *train_client_flat(self.model, weights, self.x_all, self.y_all, idx, epochs, batch_size,
                                         lr, seed, momentum, weight_decay, payload))
                for cid, idx, seed, payload in jobs]

    def node_id(self) -> str:
        """The Ray node this actor lives on."""
        return ray.get_runtime_context().get_node_id()


def stream_in_order(workers: list, weights_ref, chunks: list[list], args: tuple) -> Iterator[tuple]:
    """Hand `chunks` of client jobs to `workers`, keeping two chunks queued per worker,
    and yield each client's result as soon as it and every chunk before it have
    arrived: results come out in chunk order whatever order the workers finish in.
    Introduced in 07_scaling_with_ray.
    """
    pending, arrived, submitted, next_out = {}, {}, 0, 0

    def submit(worker: int) -> None:
        nonlocal submitted
        pending[workers[worker].train.remote(weights_ref, chunks[submitted], *args)] = (submitted, worker)
        submitted += 1

    for i in range(min(len(chunks), 2 * len(workers))):
        submit(i % len(workers))
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        i, worker = pending.pop(done)
        arrived[i] = ray.get(done)
        if submitted < len(chunks):
            submit(worker)
        while next_out in arrived:
            yield from arrived.pop(next_out)
            next_out += 1


def run_federated_pool(
    model_name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
    partitions: Sequence[np.ndarray], rounds: int = 10, client_fraction: float = 1.0,
    local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05, seed: int = 0,
    num_workers: int | None = None, use_ray: bool = True, chunk_size: int | None = None,
    on_round: Callable[[list[dict]], None] | None = None, progress: bool = True,
    strategy: FedAvg | None = None, momentum: float = 0.0, weight_decay: float = 0.0,
    start_timeout_s: float = 120.0,
) -> tuple[nn.Module, list[dict]]:
    """The round loop at scale: the same math as `run_strategy` (and, for FedAvg, as
    `run_federated`), bit for bit, but clients are trained in chunks by `num_workers`
    long-lived `ClientTrainer` actors (default: one per CPU), global weights travel as one
    flat buffer put once per round, and results are folded into a float64 sum in
    client-id order as they arrive, so the driver never holds all client models at once.
    `strategy` defaults to `FedAvg()`. With `use_ray=False` the same code runs in this
    process, one client after another: the compute floor. Actors that have not started within
    `start_timeout_s` (say, their CPUs are held by other actors) raise RuntimeError rather than
    wait forever. Introduced in 07_scaling_with_ray.
    """
    check_round_knobs(rounds, client_fraction, partitions, local_epochs, batch_size, lr, momentum, weight_decay)
    if num_workers is not None and (not isinstance(num_workers, (int, np.integer)) or num_workers < 1):
        raise ValueError(f"num_workers must be an integer >= 1 or None (one per CPU), got {num_workers!r}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None (automatic), got {chunk_size!r}")
    if not start_timeout_s > 0:
        raise ValueError(f"start_timeout_s must be > 0 (seconds), got {start_timeout_s!r}")
    strategy = strategy if strategy is not None else FedAvg()
    engine_start = time.perf_counter()
    model = make_model(model_name, seed)
    x_np, y_np = train[0].numpy(), train[1].numpy()
    if use_ray:
        init_ray()
        num_workers = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))  # one per CPU
        x_ref, y_ref = ray.put(x_np), ray.put(y_np)
        workers = [ClientTrainer.remote(x_ref, y_ref, model_name) for _ in range(num_workers)]
    else:
        local = make_model(model_name)
    history: list[dict] = []
    knobs = (local_epochs, batch_size, lr, momentum, weight_decay)
    try:  # however the loop ends (even Ctrl-C), stop the actors: no leaked workers
        if use_ray:  # an actor that cannot start (its CPU held by other actors) would leave us waiting forever
            ready, _ = ray.wait([w.node_id.remote() for w in workers], num_returns=num_workers,
                                timeout=start_timeout_s)
            if len(ready) < num_workers:
                raise RuntimeError(
                    f"only {len(ready)} of num_workers={num_workers} ClientTrainer actors started within "
                    f"start_timeout_s={start_timeout_s} s; "
                    f"Ray's free resources: {ray.available_resources()}. Actors left by an earlier cell may hold "
                    "the CPUs: ray.kill them, restart the kernel, or pass a smaller num_workers.")
        for rnd in tqdm(range(1, rounds + 1), desc=f"rounds ({strategy.name})", disable=not progress):
            start = time.perf_counter()
            clients = sample_clients(len(partitions), client_fraction, seed, rnd)
            sizes = np.array([len(partitions[k]) for k in clients], dtype=np.float64)
            coef = sizes / sizes.sum()
            w = flat_weights(model)
            weights = w.numpy()
            jobs = [(int(k), partitions[k], client_seed(seed, rnd, k), strategy.payload(int(k), w)) for k in clients]
            if use_ray:
                size = chunk_size or max(1, len(jobs) // (8 * num_workers))  # ~8 chunks per worker: balanced
                chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
                results = stream_in_order(workers, ray.put(weights), chunks, knobs)
            else:
                results = ((cid, *train_client_flat(local, weights, x_np, y_np, idx, *knobs[:3], s, *knobs[3:], pay))
                           for cid, idx, s, pay in jobs)
            total = torch.zeros(len(weights), dtype=torch.float64)
            loss_sum, spread = 0.0, 0.0
            for pos, (cid, n, loss, w_k) in enumerate(results):  # client-id order: a fixed summation order
                assert cid == clients[pos]
                if pos == 0:
                    first_result = time.perf_counter() - engine_start
                w_k = torch.tensor(w_k)  # a copy: arrays from Ray are read-only
                total += float(coef[pos]) * w_k.to(torch.float64)
                spread += float(coef[pos]) * float((w_k.double() - w.double()).square().sum())
                strategy.receive(cid, w, w_k, local_steps(n, local_epochs, batch_size), lr)
                loss_sum += n * loss
            drift = math.sqrt(max(spread - float((total - w.double()).square().sum()), 0.0))
            torch.nn.utils.vector_to_parameters(strategy.server_step(w, total), model.parameters())
            loss, acc = evaluate(model, *test)
            history.append({
                "round": rnd,
                "accuracy": acc,
                "loss": loss,
                "train_loss": loss_sum / sizes.sum(),
                "drift": drift,  # RMS distance of the client models from their weighted mean
                "clients": len(clients),
                "seconds": time.perf_counter() - start,
                "bytes_sent": 2 * len(clients) * weights.nbytes + sum(payload_bytes(job[3]) for job in jobs),
                "first_result": first_result,  # seconds from engine start to this round's first client result
                "elapsed": time.perf_counter() - engine_start,
            })
            if on_round is not None:
                on_round(history)
    finally:
        if use_ray:
            for worker in workers:
                ray.kill(worker)
    return model, history


# ----------------------------------------------------------------------------
# 08_when_clients_fail: stragglers, crashes, bad updates, checkpoint and resume
# ----------------------------------------------------------------------------

FAULTS = ("crash", "kill", "slow", "nan")


def assign_faults(clients: Sequence[int], seed: int, round_idx: int, crash: float = 0.0, kill: float = 0.0,
                  slow: float = 0.0, nan: float = 0.0) -> dict[int, str]:
    """Fault injection: {client id: fault} for this round's `clients`. Each client draws at
    most one fault: "crash" (raises), "kill" (its worker process exits), "slow" (answers late,
    or never: see `run_resilient`'s slow_s) or "nan" (sends NaN weights), with these probabilities.
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


def faulty_client(
    model_name: str, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, indices: np.ndarray,
    epochs: int, batch_size: int, lr: float, seed: int, momentum: float = 0.0, weight_decay: float = 0.0,
    payload: tuple[str, object] | None = None, fault: str | None = None, slow_s: float = 60.0,
    give_up_at: float | None = None,
) -> tuple[int, float, np.ndarray]:
    """`train_client_flat`, with the injected `fault` (see `assign_faults`) acted out.
    "kill" ends the process it runs in: call it only in a Ray worker. A "slow" client naps
    `slow_s` seconds, and gives up (TimeoutError) at `give_up_at` (a `time.time()`: the
    round's deadline), as a device does when the server's reporting window has closed.
    Introduced in 08_when_clients_fail.
    """
    if fault == "crash":
        raise RuntimeError("injected fault: the client crashed")
    if fault == "kill":
        os._exit(1)  # the worker process dies mid-task, as on an out-of-memory kill
    if fault == "slow":
        end = time.monotonic() + slow_s
        while time.monotonic() < end:  # short naps: ray.cancel can stop the task between two of them
            if give_up_at is not None and time.time() >= give_up_at:
                raise TimeoutError("the straggler gave up: the round's deadline has passed")
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    n, loss, w = train_client_flat(make_model(model_name), weights, x_all, y_all, indices, epochs, batch_size, lr,
                                   seed, momentum, weight_decay, payload)
    return (n, loss, np.full_like(w, np.nan)) if fault == "nan" else (n, loss, w)


# A dead worker is retried once (the task is a pure function: safe to rerun); an exception is not.
faulty_client_remote = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(faulty_client)


def describe_error(err: BaseException) -> str:
    """One line for the history: the error's type and first line (a Ray task error: its cause's).

    Introduced in 08_when_clients_fail.
    """
    cause = getattr(err, "cause", None) or err
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}"[:200]


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


def server_state(strategy: FedAvg) -> dict[str, torch.Tensor | None]:
    """What a strategy has learned on the server (its tensors, e.g. momentum or control
    variates), as saved in a checkpoint; its knobs are not state. Introduced in 08_when_clients_fail.
    """
    return {k: v for k, v in vars(strategy).items() if v is None or isinstance(v, torch.Tensor)}


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
        """After a stop: finish the commit of rounds up to `last_round` (checkpointed), drop later ones."""
        for pending in sorted(self.folder.glob("pending_*")):
            if int(pending.name.split("_")[1]) <= last_round:
                self.commit(pending)
            else:
                shutil.rmtree(pending)


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
    if not isinstance(state, dict) or not needed <= set(state) or state["format"] != 1:
        raise ValueError(f"checkpoint {path} is not a run_resilient checkpoint (format 1 with {sorted(needed)})")
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


def run_resilient(
    strategy: FedAvg, model_name: str, train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor], partitions: Sequence[np.ndarray], rounds: int = 10,
    client_fraction: float = 1.0, local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
    momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0, use_ray: bool = True,
    deadline_s: float | None = 300.0, min_clients: int = 1, max_norm_ratio: float | None = 20.0,
    faults: dict[str, float] | None = None, slow_s: float = float("inf"), run_dir: str | Path | None = None,
    on_round: Callable[[list[dict]], None] | None = None, progress: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """`run_strategy` for clients that fail. Each round waits at most `deadline_s` seconds
    (late clients are dropped and their tasks cancelled); a client that crashes, or whose
    worker dies, is left out; an update with NaN/Inf, the wrong shape, or a norm over
    `max_norm_ratio` x the round's median is rejected. The rest are averaged; with fewer
    than `min_clients` the global model is kept. `faults` injects {"crash", "kill", "slow",
    "nan": rate}. With `run_dir`, every round is checkpointed there and a rerun resumes
    from the last complete round. Each call starts the strategy's server state afresh (or from
    the checkpoint). Without faults or late clients it gives `run_strategy`'s bits. A "slow"
    client naps `slow_s` seconds (inf: never answers) before it trains. In process (`use_ray=False`, one client at a
    time) a "kill" is a crash, and a straggler that cannot make the deadline is late at once.
    Introduced in 08_when_clients_fail.
    """
    check_round_knobs(rounds, client_fraction, partitions, local_epochs, batch_size, lr, momentum, weight_decay)
    faults = dict(faults or {})
    if set(faults) - set(FAULTS):
        raise ValueError(f"faults may only name {list(FAULTS)}, got {sorted(set(faults) - set(FAULTS))}")
    assign_faults([], seed, 0, **faults)  # checks the rates
    if deadline_s is not None:
        _check_knob("deadline_s", deadline_s, 1e-3, float("inf"))
    _check_knob("slow_s", slow_s, 0, float("inf"))
    if deadline_s is None and math.isinf(slow_s) and faults.get("slow", 0) > 0:
        raise ValueError("faults['slow'] > 0 with slow_s=inf (stragglers that never answer) needs a deadline_s, "
                         "not None")
    if not isinstance(min_clients, (int, np.integer)) or not 1 <= min_clients <= len(partitions):
        raise ValueError(f"min_clients must be an integer in [1, {len(partitions)}] (the number of clients), "
                         f"got {min_clients!r}")
    if max_norm_ratio is not None:
        _check_knob("max_norm_ratio", max_norm_ratio, 1, float("inf"))
    model = make_model(model_name, seed)
    num_params = flat_weights(model).numel()
    history: list[dict] = []
    first, state = 1, None
    store = getattr(strategy, "store", None)
    if run_dir is not None:
        run_dir, fingerprint = Path(run_dir), {
            "model": model_name, "num_params": num_params, "strategy": strategy.name,
            "knobs": {k: v for k, v in vars(strategy).items() if isinstance(v, (int, float))},
            "partitions": hashlib.sha256(b"".join(np.asarray(p, np.int64).tobytes() + b"|" for p in partitions))
            .hexdigest(), "train_samples": len(train[1]), "client_fraction": client_fraction,
            "local_epochs": local_epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "seed": seed, "min_clients": int(min_clients),
            "max_norm_ratio": max_norm_ratio, "faults": faults}
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "checkpoint.pt"
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a write that a stop cut short
        state = load_checkpoint(path, fingerprint, strategy, num_params, rounds) if path.exists() else None
    for k in server_state(strategy):  # start afresh (or from the checkpoint), not from an earlier call's state
        setattr(strategy, k, None if state is None else state["strategy"][k])
    if store is not None:  # per-client state: in run_dir, or afresh in a temporary folder
        strategy.store = store = ClientStateStore() if run_dir is None else RoundStore(run_dir / "client_state")
        if run_dir is not None:
            store.recover(state["round"] if state else 0)
    if state is not None:  # all checked: now apply it
        torch.nn.utils.vector_to_parameters(state["weights"], model.parameters())
        history, first = state["history"], state["round"] + 1
    x_all, y_all = train[0].numpy(), train[1].numpy()
    if use_ray:
        init_ray()
        x_all, y_all = ray.put(x_all), ray.put(y_all)
    pending: dict = {}
    try:  # however the loop ends (even Ctrl-C), cancel what is still running
        for rnd in tqdm(range(first, rounds + 1), desc=f"rounds ({strategy.name})", disable=not progress,
                        initial=first - 1, total=rounds):
            start = time.perf_counter()
            clients = [int(k) for k in sample_clients(len(partitions), client_fraction, seed, rnd)]
            fault_of = assign_faults(clients, seed, rnd, **faults)
            w = flat_weights(model)
            payloads = {k: strategy.payload(k, w) for k in clients}
            if isinstance(store, RoundStore):
                store.begin(rnd)
            results, failed, late = {}, {}, []
            jobs = {k: (partitions[k], local_epochs, batch_size, lr, client_seed(seed, rnd, k), momentum,
                        weight_decay, payloads[k]) for k in clients}
            if use_ray:
                w_ref = ray.put(w.numpy())
                # Injected stragglers go last: here they share our CPUs, in the field each has its own device.
                order = sorted(clients, key=lambda k: fault_of.get(k) == "slow")
                give_up_at = None if deadline_s is None else time.time() + deadline_s  # told to every client
                pending = {faulty_client_remote.remote(model_name, w_ref, x_all, y_all, *jobs[k], fault_of.get(k),
                                                       slow_s, give_up_at): k for k in order}
                while pending:
                    left = None if deadline_s is None else max(0.0, deadline_s - (time.perf_counter() - start))
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
                    if not done:
                        break  # the deadline has passed
                    k = pending.pop(done[0])
                    try:
                        results[k] = ray.get(done[0])
                    except Exception as err:  # the client raised, or its worker died (after Ray's retry)
                        failed[k] = describe_error(err)
                for ref, k in pending.items():
                    ray.cancel(ref)  # stops the late work and frees its CPU; the worker lives on
                    late.append(k)
                pending = {}
            else:
                for k in clients:  # one at a time: a straggler that cannot make the deadline is late at once
                    if (fault_of.get(k) == "slow" and deadline_s is not None and slow_s >= deadline_s) or (
                            deadline_s is not None and time.perf_counter() - start > deadline_s):
                        late.append(k)
                        continue
                    try:
                        fault = "crash" if fault_of.get(k) == "kill" else fault_of.get(k)
                        results[k] = faulty_client(model_name, w.numpy(), x_all, y_all, *jobs[k], fault, slow_s)
                    except Exception as err:
                        failed[k] = describe_error(err)
            rejected, norms = {}, {}
            for k in sorted(results):
                reason = check_update(results[k][2], w)
                if reason is None:
                    norms[k] = float(np.linalg.norm(results[k][2].astype(np.float64) - w.double().numpy()))
                else:
                    rejected[k] = reason
            rejected.update(norm_outliers(norms, max_norm_ratio) if max_norm_ratio is not None else {})
            accepted = [k for k in clients if k in results and k not in rejected]  # client-id order
            aggregated = len(accepted) >= min_clients
            drift, train_loss = None, None
            if aggregated:
                sizes = np.array([results[k][0] for k in accepted], dtype=np.float64)
                coef = sizes / sizes.sum()
                avg = torch.zeros(len(w), dtype=torch.float64)
                spread = 0.0
                for k, c in zip(accepted, coef):  # client-id order: a fixed summation order
                    n, _, w_k = results[k]
                    w_k = torch.tensor(w_k)  # a copy: arrays from Ray are read-only
                    avg += float(c) * w_k.to(torch.float64)
                    spread += float(c) * float((w_k.double() - w.double()).square().sum())
                    strategy.receive(k, w, w_k, local_steps(n, local_epochs, batch_size), lr)
                drift = math.sqrt(max(spread - float((avg - w.double()).square().sum()), 0.0))
                train_loss = float(np.dot(sizes, [results[k][1] for k in accepted]) / sizes.sum())
                torch.nn.utils.vector_to_parameters(strategy.server_step(w, avg), model.parameters())
            elif progress:
                tqdm.write(f"round {rnd}: {len(accepted)} usable updates < min_clients={min_clients}: "
                           "the global model is kept")
            loss, acc = evaluate(model, *test)
            history.append({
                "round": rnd, "accuracy": acc, "loss": loss, "train_loss": train_loss, "drift": drift,
                "clients": len(accepted), "sampled": clients, "accepted": accepted,
                "failed": {str(k): v for k, v in sorted(failed.items())}, "late": sorted(late),
                "rejected": {str(k): v for k, v in sorted(rejected.items())},
                "faults": {str(k): v for k, v in sorted(fault_of.items())}, "aggregated": aggregated,
                "seconds": time.perf_counter() - start,
                "bytes_sent": (len(clients) + len(results)) * w.numel() * 4
                + sum(payload_bytes(p) for p in payloads.values()),
            })
            if run_dir is not None:
                save_checkpoint(path, {"format": 1, "round": rnd, "weights": flat_weights(model),
                                       "strategy": server_state(strategy), "history": json.dumps(history),
                                       "fingerprint": json.dumps(fingerprint)})
                if isinstance(store, RoundStore):
                    store.commit()
            if on_round is not None:
                on_round(history)
    finally:
        for ref in pending:
            ray.cancel(ref)
    return model, history
