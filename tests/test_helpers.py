"""Unit tests for the helpers of notebooks 01-04 (models, data, local training, Ray tasks and
weighted FedAvg) and the small helpers of 05 (client sampling, seeds, plots). The round engine
has its own file, test_engine.py; strategies, the actor pool and failures theirs.

Expected values are computed here by hand or from first principles, never copied from a
run. Training tests use the 6,000-sample synthetic dataset and small models; Fashion-MNIST is
only loaded where loading is what is tested. Ray is started once, by the session fixture
`ray_cluster`, and only for the tests that ask for it (they are at the end of the file).
"""

from __future__ import annotations

import gzip
import math
import random
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import same_weights

import fed_helpers as fh


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Two state dicts (not models: for those, conftest's `same_weights`) are bit-identical."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    """One sorted integer index array per client; disjoint; together exactly 0..n-1."""
    assert len(parts) == num_clients
    for p in parts:
        assert isinstance(p, np.ndarray)
        assert np.issubdtype(p.dtype, np.integer)
        assert len(p) >= 1
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique within a client"
    everything = np.concatenate(parts)
    assert len(everything) == n, "some sample is missing or given twice"
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


def sizes(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([len(p) for p in parts])


def skew_of(parts, labels) -> float:
    return fh.label_skew(fh.label_counts(parts, labels))


# ----------------------------------------------------------------------------
# 01_model
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(fh.MODELS))
def test_models_output_shape(name):
    model = fh.make_model(name)
    assert isinstance(model, fh.MODELS[name])
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert out.dtype == torch.float32


def test_count_parameters_matches_layer_arithmetic():
    assert fh.count_parameters(fh.make_model("2nn")) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert fh.count_parameters(fh.make_model("simple")) == 784 * 128 + 128 + 128 * 10 + 10
    conv = (1 * 16 * 5 * 5 + 16) + (16 * 32 * 5 * 5 + 32)
    assert fh.count_parameters(fh.make_model("cnn")) == conv + 32 * 7 * 7 * 128 + 128 + 128 * 10 + 10
    assert fh.count_parameters(nn.Linear(3, 2)) == 3 * 2 + 2


@pytest.mark.parametrize("name", sorted(fh.MODELS))
def test_make_model_seeded(name):
    a, b = fh.make_model(name, seed=7), fh.make_model(name, seed=7)
    assert same_weights(a, b)
    c = fh.make_model(name, seed=8)
    assert not any(torch.equal(a.state_dict()[k], c.state_dict()[k])
                   for k in a.state_dict() if k.endswith("weight"))


def test_make_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(5)  # what the next draw is without make_model in between
    torch.set_rng_state(before)
    fh.make_model("2nn", seed=0)
    fh.make_model("cnn", seed=99)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(5), expected)


def test_make_model_unknown_name():
    with pytest.raises(ValueError, match="model"):
        fh.make_model("resnet")


@pytest.mark.parametrize("name", sorted(fh.MODELS))
def test_state_dict_bytes_is_four_bytes_per_float32(name):
    model = fh.make_model(name)
    state = model.state_dict()
    assert all(t.dtype == torch.float32 for t in state.values())
    assert fh.state_dict_bytes(state) == 4 * fh.count_parameters(model)


def test_state_dict_bytes_other_dtypes():
    state = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(2, 5, dtype=torch.float64),
             "n": torch.tensor(0, dtype=torch.int64)}
    assert fh.state_dict_bytes(state) == 3 * 2 + 10 * 8 + 1 * 8
    assert fh.state_dict_bytes({}) == 0


def test_load_weights_copies_values():
    src, dst = fh.make_model("simple", seed=1), fh.make_model("simple", seed=2)
    assert not same_weights(src, dst)
    returned = fh.load_weights(dst, src.state_dict())
    assert returned is dst
    assert same_weights(dst, src)


def test_load_weights_rejects_other_model():
    with pytest.raises(ValueError, match="state dict does not fit TwoNN"):
        fh.load_weights(fh.make_model("2nn"), fh.make_model("simple").state_dict())


def test_load_weights_names_the_mismatch():
    model = fh.make_model("simple")
    wrong_shape = clone_state(model.state_dict())
    wrong_shape["fc2.bias"] = torch.zeros(11)
    with pytest.raises(ValueError, match=r"fc2\.bias"):
        fh.load_weights(model, wrong_shape)
    missing = clone_state(model.state_dict())
    del missing["fc1.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['fc1\.weight'\]"):
        fh.load_weights(model, missing)
    extra = {**clone_state(model.state_dict()), "fc9.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['fc9\.weight'\]"):
        fh.load_weights(model, extra)


def test_set_seed_reproducible():
    def draws():
        return random.random(), np.random.rand(4).tolist(), torch.rand(4).tolist()

    fh.set_seed(42)
    first = draws()
    fh.set_seed(42)
    assert draws() == first
    fh.set_seed(43)
    other = draws()
    assert all(a != b for a, b in zip(other, first))
    fh.set_seed(np.int64(42))  # NumPy integers are accepted too
    assert draws() == first


@pytest.mark.parametrize("seed", [-1, 1.5, "3", None])
def test_set_seed_bad(seed):
    with pytest.raises(ValueError, match="seed"):
        fh.set_seed(seed)


# ----------------------------------------------------------------------------
# 02_data: datasets
# ----------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_normalisation(fashion_train, fashion_test):
    (x, y), (xt, yt) = fashion_train, fashion_test
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert x.dtype == xt.dtype == torch.float32
    assert y.dtype == yt.dtype == torch.int64
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert abs(xt.mean().item()) < 0.1 and abs(xt.std().item() - 1) < 0.1
    # Fashion-MNIST is balanced: 10 classes, 6,000 / 1,000 of each
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    assert len(fh.DATASETS["fashion_mnist"][3]) == 10


def test_synthetic_dataset_shapes_and_determinism():
    x, y = fh.load_dataset("synthetic")
    xt, yt = fh.load_dataset("synthetic", train=False)
    assert x.shape == (6000, 1, 28, 28) and y.shape == (6000,)
    assert xt.shape == (1000, 1, 28, 28) and yt.shape == (1000,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10))
    x2, y2 = fh.load_dataset("synthetic")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x[:1000], xt)  # train and test are different draws
    xs, ys = fh.synthetic_dataset(train=True, seed=1)
    assert not torch.equal(xs, x) and not torch.equal(ys, y)


def test_synthetic_labels_come_from_one_teacher():
    """Train and test share the teacher: a linear model fitted on train labels transfers."""
    x, y = fh.synthetic_dataset(train=True)
    xt, yt = fh.synthetic_dataset(train=False)
    # least squares onto one-hot labels: a crude linear fit, far above chance if one teacher
    w = torch.linalg.lstsq(x.flatten(1).double(), F.one_hot(y, 10).double()).solution
    acc = ((xt.flatten(1).double() @ w).argmax(1) == yt).double().mean().item()
    assert acc > 0.5


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="dataset"):
        fh.load_dataset("cifar10", download=False)


def test_load_dataset_offline_fashion_mnist_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(fh, "DEBIAN_FASHION_MNIST", tmp_path / "no-such-dir")
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as info:
        fh.load_dataset("fashion_mnist", root=root, download=False)
    message = str(info.value)
    assert str(root / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "make data" in message
    assert all(f in message for f in fh.IDX_FILES)


def test_load_dataset_offline_mnist_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fh.load_dataset("mnist", root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "make data" in message
    assert "apt-get" not in message  # the Debian package only holds Fashion-MNIST


def test_load_dataset_default_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setattr(fh, "DEBIAN_FASHION_MNIST", tmp_path / "no-such-dir")
    monkeypatch.setenv("FED_DATA_DIR", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError) as info:
        fh.load_dataset("fashion_mnist", download=False)
    assert str(tmp_path / "mine" / "FashionMNIST" / "raw") in str(info.value)


def test_load_dataset_copies_debian_files(tmp_path, monkeypatch, fashion_train, fashion_test):
    """With nothing in root, the gzipped IDX files of Debian's package are decompressed
    into root and give exactly the normal dataset."""
    source = fh.default_data_dir() / "FashionMNIST" / "raw"  # filled by the fixtures' load
    debian = tmp_path / "debian"
    debian.mkdir()
    for f in fh.IDX_FILES:
        with open(source / f, "rb") as src, gzip.open(debian / f"{f}.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
    monkeypatch.setattr(fh, "DEBIAN_FASHION_MNIST", debian)
    root = tmp_path / "root"
    x, y = fh.load_dataset("fashion_mnist", train=True, root=root, download=False)
    assert all((root / "FashionMNIST" / "raw" / f).is_file() for f in fh.IDX_FILES)
    assert torch.equal(x, fashion_train[0]) and torch.equal(y, fashion_train[1])
    xt, yt = fh.load_dataset("fashion_mnist", train=False, root=root, download=False)
    assert torch.equal(xt, fashion_test[0]) and torch.equal(yt, fashion_test[1])


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FED_DATA_DIR", str(tmp_path / "elsewhere"))
    assert fh.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("FED_DATA_DIR")
    course = tmp_path / "course"
    (course / "notebooks" / "deep").mkdir(parents=True)
    (course / "fed_helpers.py").write_text("")
    monkeypatch.chdir(course / "notebooks" / "deep")  # found by walking up to fed_helpers.py
    assert fh.default_data_dir() == (course / "data").resolve()
    monkeypatch.chdir(course)
    assert fh.default_data_dir() == (course / "data").resolve()
    monkeypatch.setenv("FED_DATA_DIR", "")  # empty counts as unset
    assert fh.default_data_dir() == (course / "data").resolve()


# ----------------------------------------------------------------------------
# 02_data: partitioners
# ----------------------------------------------------------------------------

SCHEMES = [
    ("iid", {}),
    ("shards", {"shards_per_client": 2}),
    ("dirichlet", {"alpha": 0.1, "min_size": 10}),
    ("dirichlet", {"alpha": 0.5}),
    ("quantity", {"beta": 0.5, "min_size": 10}),
]
SCHEME_IDS = [f"{s}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for s, kw in SCHEMES]


@pytest.mark.parametrize("num_clients", [1, 7, 100])
@pytest.mark.parametrize(("scheme", "knobs"), SCHEMES, ids=SCHEME_IDS)
def test_partition_disjoint_and_complete(balanced_labels, scheme, knobs, num_clients):
    parts = fh.make_partition(scheme, balanced_labels, num_clients, seed=3, **knobs)
    assert_partition(parts, len(balanced_labels), num_clients)
    if "min_size" in knobs:
        assert sizes(parts).min() >= knobs["min_size"]


@pytest.mark.parametrize(("scheme", "knobs"), SCHEMES, ids=SCHEME_IDS)
def test_partition_on_fashion_mnist_labels(fashion_train, scheme, knobs):
    labels = fashion_train[1].numpy()
    parts = fh.make_partition(scheme, labels, 100, seed=0, **knobs)
    assert_partition(parts, len(labels), 100)


@pytest.mark.parametrize(("scheme", "knobs"), SCHEMES, ids=SCHEME_IDS)
def test_partition_seeded(balanced_labels, scheme, knobs):
    a = fh.make_partition(scheme, balanced_labels, 50, seed=11, **knobs)
    b = fh.make_partition(scheme, balanced_labels, 50, seed=11, **knobs)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    c = fh.make_partition(scheme, balanced_labels, 50, seed=12, **knobs)
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_make_partition_dispatches(balanced_labels):
    pairs = [
        (fh.make_partition("iid", balanced_labels, 20, seed=4),
         fh.partition_iid(balanced_labels, 20, seed=4)),
        (fh.make_partition("shards", balanced_labels, 20, seed=4, shards_per_client=3),
         fh.partition_shards(balanced_labels, 20, shards_per_client=3, seed=4)),
        (fh.make_partition("dirichlet", balanced_labels, 20, seed=4, alpha=0.3, min_size=5),
         fh.partition_dirichlet(balanced_labels, 20, alpha=0.3, min_size=5, seed=4)),
        (fh.make_partition("quantity", balanced_labels.tolist(), 20, seed=4, beta=2.0),  # a list works too
         fh.partition_quantity_skew(balanced_labels, 20, beta=2.0, seed=4)),
    ]
    for got, want in pairs:
        assert len(got) == len(want)
        assert all(np.array_equal(p, q) for p, q in zip(got, want))


def test_make_partition_unknown_scheme(balanced_labels):
    with pytest.raises(ValueError, match="partition scheme"):
        fh.make_partition("pathological", balanced_labels, 10)


@pytest.mark.parametrize("num_clients", [1, 3, 7, 100, 59999])
def test_iid_sizes_differ_by_at_most_one(balanced_labels, num_clients):
    s = sizes(fh.partition_iid(balanced_labels, num_clients))
    assert s.max() - s.min() <= 1
    assert s.sum() == len(balanced_labels)


def test_iid_has_little_label_skew(balanced_labels):
    parts = fh.partition_iid(balanced_labels, 100)
    assert skew_of(parts, balanced_labels) < 0.1


def test_dirichlet_skew_large_for_small_alpha_and_falls_with_alpha(balanced_labels):
    skews = [skew_of(fh.partition_dirichlet(balanced_labels, 100, alpha=a, seed=0), balanced_labels)
             for a in (0.1, 1.0, 10.0, 100.0)]
    assert skews[0] > 0.5
    assert all(a > b for a, b in zip(skews, skews[1:])), skews
    iid = skew_of(fh.partition_iid(balanced_labels, 100), balanced_labels)
    assert skews[0] > 5 * iid


def test_shards_hold_whole_label_sorted_shards(balanced_labels):
    """6,000 samples of each class, 100 clients x 2 shards: every shard is 300 samples of a
    single class, so each client holds 2 x 300 samples of at most 2 classes."""
    k, per = 100, 2
    parts = fh.partition_shards(balanced_labels, k, shards_per_client=per)
    shard = len(balanced_labels) // (k * per)
    assert 6000 % shard == 0  # shard edges fall on class edges
    counts = fh.label_counts(parts, balanced_labels)
    assert np.all(counts % shard == 0)
    assert np.all(counts.sum(1) == per * shard)
    assert np.all((counts > 0).sum(1) <= per)
    assert fh.label_skew(counts) > 0.5


@pytest.mark.parametrize(("num_clients", "per"), [(7, 3), (13, 1), (30, 4)])
def test_shards_sizes_and_label_bound(balanced_labels, num_clients, per):
    """Shard edges need not fall on class edges: a shard smaller than a class spans at most
    2 classes, so a client has at most 2 * shards_per_client classes."""
    parts = fh.partition_shards(balanced_labels, num_clients, shards_per_client=per)
    n_shards = num_clients * per
    lo, hi = len(balanced_labels) // n_shards, -(-len(balanced_labels) // n_shards)
    s = sizes(parts)
    assert np.all((per * lo <= s) & (s <= per * hi))
    counts = fh.label_counts(parts, balanced_labels)
    assert np.all((counts > 0).sum(1) <= 2 * per)


def test_quantity_skew_unequal_sizes_iid_labels(balanced_labels):
    k = 100
    parts = fh.partition_quantity_skew(balanced_labels, k, beta=0.5, min_size=2)
    s = sizes(parts)
    assert s.min() >= 2
    assert s.max() > 3 * len(balanced_labels) / k  # far from equal shares
    assert s.std() > 10 * sizes(fh.partition_iid(balanced_labels, k)).std() + 1
    # labels stay IID: every big client's mix is close to the overall mix
    counts = fh.label_counts(parts, balanced_labels)
    big = counts[s >= 500]
    assert len(big) >= 5
    tv = 0.5 * np.abs(big / big.sum(1, keepdims=True) - 0.1).sum(1)
    assert tv.max() < 0.15


def test_quantity_smaller_beta_more_unequal(balanced_labels):
    spread = [sizes(fh.partition_quantity_skew(balanced_labels, 100, beta=b)).std()
              for b in (0.1, 1.0, 100.0)]
    assert spread[0] > spread[1] > spread[2]


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_dirichlet_many_clients_terminates(balanced_labels, alpha):
    """60,000 samples over 10,000 clients with min_size=2: feasible, so it must finish
    (quickly: the top-up is one pass) and honour min_size."""
    parts = fh.partition_dirichlet(balanced_labels, 10_000, alpha=alpha, min_size=2)
    assert_partition(parts, 60_000, 10_000)
    assert sizes(parts).min() >= 2


def test_dirichlet_tightest_min_size_gives_equal_sizes(balanced_labels):
    # min_size == samples / clients leaves no slack: every client must get exactly 6
    parts = fh.partition_dirichlet(balanced_labels, 10_000, alpha=0.1, min_size=6)
    assert_partition(parts, 60_000, 10_000)
    assert np.all(sizes(parts) == 6)


def test_quantity_many_clients_terminates(balanced_labels):
    parts = fh.partition_quantity_skew(balanced_labels, 10_000, beta=0.1, min_size=2)
    assert_partition(parts, 60_000, 10_000)
    assert sizes(parts).min() >= 2


def test_one_sample_per_client():
    labels = np.arange(20) % 3
    for parts in (fh.partition_iid(labels, 20), fh.partition_shards(labels, 20, shards_per_client=1),
                  fh.partition_dirichlet(labels, 20, min_size=1),
                  fh.partition_quantity_skew(labels, 20, min_size=1)):
        assert_partition(parts, 20, 20)
        assert np.all(sizes(parts) == 1)


@pytest.mark.parametrize("partitioner", [fh.partition_dirichlet, fh.partition_quantity_skew])
@pytest.mark.parametrize("min_size", [7, 0, 60_001])
def test_infeasible_min_size_raises(balanced_labels, partitioner, min_size):
    with pytest.raises(ValueError, match="min_size"):
        partitioner(balanced_labels, 10_000, min_size=min_size)


@pytest.mark.parametrize("scheme", sorted(fh.PARTITIONERS))
@pytest.mark.parametrize("num_clients", [0, -1, 101, 2.5])
def test_bad_num_clients_raises(scheme, num_clients):
    labels = np.arange(100) % 10
    knobs = {"min_size": 1} if scheme in ("dirichlet", "quantity") else {}
    with pytest.raises(ValueError, match="num_clients"):
        fh.make_partition(scheme, labels, num_clients, **knobs)


@pytest.mark.parametrize("alpha", [0, -0.5, float("nan")])
def test_bad_alpha_raises(balanced_labels, alpha):
    with pytest.raises(ValueError, match="alpha"):
        fh.partition_dirichlet(balanced_labels, 10, alpha=alpha)


@pytest.mark.parametrize("beta", [0, -1.0])
def test_bad_beta_raises(balanced_labels, beta):
    with pytest.raises(ValueError, match="beta"):
        fh.partition_quantity_skew(balanced_labels, 10, beta=beta)


@pytest.mark.parametrize("per", [0, 6001, 1.5])
def test_bad_shards_per_client_raises(balanced_labels, per):
    # 60,000 samples over 10 clients: at most 6,000 shards each
    with pytest.raises(ValueError, match="shards_per_client"):
        fh.partition_shards(balanced_labels, 10, shards_per_client=per)


def test_label_counts_by_hand():
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    expected = np.array([[1, 1, 0], [0, 1, 2], [0, 0, 1]])
    np.testing.assert_array_equal(fh.label_counts(parts, labels, num_classes=3), expected)
    assert fh.label_counts(parts, labels).shape == (3, 10)  # default: 10 classes, unused ones zero


def test_label_skew_by_hand():
    assert fh.label_skew(np.array([[5, 5], [10, 10], [1, 1]])) == pytest.approx(0.0)
    # two clients, one class each: each mix is 0.5 from the overall (0.5, 0.5)
    assert fh.label_skew(np.array([[4, 0], [0, 4]])) == pytest.approx(0.5)
    # C clients, one class each: 1 - 1/C
    assert fh.label_skew(np.eye(10) * 7) == pytest.approx(0.9)
    # hand-computed mixed case: overall (0.5, 0.5); client 0 (0.75, 0.25) -> 0.25; client 1 -> 0.25
    assert fh.label_skew(np.array([[3, 1], [1, 3]])) == pytest.approx(0.25)


def test_plot_label_distribution(balanced_labels):
    counts = fh.label_counts(fh.partition_dirichlet(balanced_labels, 8, alpha=0.5), balanced_labels)
    names = fh.DATASETS["fashion_mnist"][3]
    ax = fh.plot_label_distribution(counts, names, title="dirichlet")
    assert ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_title() == "dirichlet"
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == names
    assert len(ax.containers) == 10
    # stacked: the top of the last class's bar is each client's total
    tops = [bar.get_y() + bar.get_height() for bar in ax.containers[-1]]
    np.testing.assert_allclose(tops, counts.sum(1))


def test_plot_label_distribution_on_given_axes():
    _, ax = plt.subplots()
    counts = np.array([[1, 2, 3], [3, 2, 1]])
    assert fh.plot_label_distribution(counts, ax=ax) is ax
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["class 0", "class 1", "class 2"]
    assert ax.get_xlabel() and ax.get_ylabel()


# ----------------------------------------------------------------------------
# 03_local_training
# ----------------------------------------------------------------------------


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with fh.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        with fh.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_train_local_lowers_loss(synthetic_train, synthetic_test):
    model = fh.make_model("simple", seed=0)
    loss_before, acc_before = fh.evaluate(model, *synthetic_test)
    losses = fh.train_local(model, *synthetic_train, epochs=2, lr=0.05, seed=0)
    loss_after, acc_after = fh.evaluate(model, *synthetic_test)
    assert len(losses) == 2 and all(isinstance(v, float) for v in losses)
    assert losses[1] < losses[0]
    assert loss_after < loss_before
    assert acc_after > acc_before
    assert acc_after > 0.2  # chance is 0.1


def test_train_local_seeded(synthetic_train):
    x, y = synthetic_train[0][:1000], synthetic_train[1][:1000]

    def trained(seed, global_seed=0):
        torch.manual_seed(global_seed)  # must not matter: the batch order comes from `seed` alone
        model = fh.make_model("simple", seed=0)
        losses = fh.train_local(model, x, y, epochs=1, batch_size=50, seed=seed)
        return model.state_dict(), losses

    a, loss_a = trained(1)
    b, loss_b = trained(1, global_seed=999)
    assert states_equal(a, b) and loss_a == loss_b
    c, _ = trained(2)
    assert not states_equal(a, c)


@pytest.mark.parametrize(("knob", "value"), [("epochs", 0), ("epochs", 1.5), ("batch_size", 0),
                                             ("batch_size", -4), ("lr", 0), ("lr", -0.1), ("lr", float("nan")),
                                             ("lr", float("inf")), ("lr", -math.inf)])
def test_train_local_bad_knobs(synthetic_train, knob, value):
    model = fh.make_model("simple")
    before = clone_state(model.state_dict())
    with pytest.raises(ValueError, match=knob):
        fh.train_local(model, *synthetic_train, **{knob: value})
    assert states_equal(model.state_dict(), before)


def test_train_local_bad_data():
    model = fh.make_model("simple")
    with pytest.raises(ValueError, match="same number"):
        fh.train_local(model, torch.zeros(5, 1, 28, 28), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="same number"):
        fh.train_local(model, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))


class FixedLogits(nn.Module):
    """Returns logits[i] for an input whose first pixel is i: outputs fully under our control."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x.flatten(1)[:, 0].long()]


def test_evaluate_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0],
                           [0.0, 3.0, 1.0],
                           [1.0, 1.0, 4.0],
                           [5.0, 0.0, 0.0],
                           [0.0, 0.5, 0.0]])
    y = torch.tensor([0, 1, 0, 1, 1])  # predictions 0, 1, 2, 0, 1: right, right, wrong, wrong, right
    x = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 28, 28).contiguous()
    expected_loss = sum(
        math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist(), y.tolist())
    ) / 5
    for batch_size in (2, 5, 2000):  # batches of 2, 2, 1 must add up like one batch
        loss, acc = fh.evaluate(FixedLogits(logits), x, y, batch_size=batch_size)
        assert acc == pytest.approx(3 / 5)
        assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_evaluate_range_and_eval_mode(synthetic_test):
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 10))
    model.train()
    first = fh.evaluate(model, *synthetic_test, batch_size=300)
    assert not model.training  # dropout off: evaluation is deterministic
    assert fh.evaluate(model, *synthetic_test) == pytest.approx(first)
    loss, acc = first
    assert 0.0 <= acc <= 1.0 and loss > 0


# ----------------------------------------------------------------------------
# 04_remote_train_aggregate
# ----------------------------------------------------------------------------


def test_client_update_matches_manual_training(synthetic_train):
    x_all, y_all = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    indices = np.arange(3, 6000, 7)
    global_state = fh.make_model("simple", seed=5).state_dict()
    snapshot = clone_state(global_state)
    threads = torch.get_num_threads()

    state, n, loss = fh.client_update(global_state, x_all, y_all, indices, model_name="simple",
                                      epochs=2, batch_size=16, lr=0.1, seed=9)
    assert n == len(indices)
    assert states_equal(global_state, snapshot), "client_update modified the global state"
    assert torch.get_num_threads() == threads
    assert not states_equal(state, snapshot)

    with fh.torch_threads(1):
        model = fh.make_model("simple")
        model.load_state_dict(snapshot)
        losses = fh.train_local(model, torch.from_numpy(x_all[indices]), torch.from_numpy(y_all[indices]),
                                epochs=2, batch_size=16, lr=0.1, seed=9)
    assert states_equal(state, model.state_dict())
    assert loss == losses[-1]


def test_client_update_rejects_foreign_state(synthetic_train):
    x_all, y_all = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    with pytest.raises(ValueError, match="state dict"):
        fh.client_update(fh.make_model("simple").state_dict(), x_all, y_all, np.arange(10), model_name="2nn")


def test_fedavg_weighted_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([5.0, 6.0]), "b": torch.tensor([4.0])}
    out = fh.fedavg([a, b], [1, 3])  # 0.25 * a + 0.75 * b
    assert torch.equal(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * 6]))
    assert torch.equal(out["b"], torch.tensor([0.75 * 4.0]))
    assert out["w"].dtype == torch.float32
    plain = {k: (a[k] + b[k]) / 2 for k in a}
    assert not torch.equal(out["w"], plain["w"])  # sizes differ: weighted != plain mean
    equal = fh.fedavg([a, b], [2, 2])
    assert all(torch.equal(equal[k], plain[k]) for k in a)
    assert a["w"].tolist() == [1.0, 2.0] and b["w"].tolist() == [5.0, 6.0]  # inputs untouched


def test_fedavg_three_states_float64_accumulation():
    states = [{"t": torch.full((2, 2), v, dtype=torch.float64)} for v in (1.0, 10.0, 100.0)]
    out = fh.fedavg(states, np.array([1, 2, 7]))
    assert out["t"].dtype == torch.float64
    assert torch.allclose(out["t"], torch.full((2, 2), (1 * 1 + 2 * 10 + 7 * 100) / 10, dtype=torch.float64))


def test_fedavg_single_state_is_identity():
    state = fh.make_model("2nn", seed=3).state_dict()
    out = fh.fedavg([state], [123])
    assert states_equal(out, state)
    assert all(out[k].data_ptr() != state[k].data_ptr() for k in state)  # a copy, not the same tensors


def test_fedavg_integer_tensors_copied_from_first():
    a = {"w": torch.tensor([0.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0]), "n": torch.tensor(8)}
    out = fh.fedavg([a, b], [1, 1])
    assert torch.equal(out["n"], torch.tensor(3)) and out["n"].dtype == torch.int64
    assert torch.equal(out["w"], torch.tensor([1.0]))


def test_fedavg_of_models_loads_back():
    states = [fh.make_model("cnn", seed=s).state_dict() for s in range(3)]
    avg = fh.fedavg(states, [10, 20, 30])
    model = fh.load_weights(fh.make_model("cnn"), avg)
    expected = (10 * states[0]["fc2.bias"].double() + 20 * states[1]["fc2.bias"].double()
                + 30 * states[2]["fc2.bias"].double()) / 60
    assert torch.allclose(model.state_dict()["fc2.bias"].double(), expected, atol=1e-7)


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([], [], "states"),
        ([{"w": torch.zeros(2)}], [1, 2], "weights"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1], "weights"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1, -1], "weights"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [0, 0], "weights"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1, float("nan")], "weights"),
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1, 1], r"states\[1\]"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2), "v": torch.zeros(1)}], [1, 1], r"states\[1\]"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1], r"states\[1\]"),
    ],
    ids=["empty", "too-many-weights", "too-few-weights", "negative", "zero-sum", "nan",
         "other-key", "extra-key", "other-shape"],
)
def test_fedavg_bad_input(states, weights, match):
    with pytest.raises(ValueError, match=match):
        fh.fedavg(states, weights)


# ----------------------------------------------------------------------------
# 05_round_loop: sampling and seeds
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [1, 7, 10, 100])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_sample_clients_size_sorted_unique(num_clients, fraction):
    ids = fh.sample_clients(num_clients, fraction, seed=0, round_idx=1)
    assert len(ids) == max(1, round(fraction * num_clients))
    assert np.all(np.diff(ids) > 0)  # sorted and unique
    assert ids.min() >= 0 and ids.max() < num_clients
    if fraction == 1.0:
        np.testing.assert_array_equal(ids, np.arange(num_clients))


def test_sample_clients_deterministic_per_seed_and_round():
    a = fh.sample_clients(100, 0.1, seed=3, round_idx=4)
    np.testing.assert_array_equal(a, fh.sample_clients(100, 0.1, seed=3, round_idx=4))
    assert not np.array_equal(a, fh.sample_clients(100, 0.1, seed=3, round_idx=5))
    assert not np.array_equal(a, fh.sample_clients(100, 0.1, seed=4, round_idx=4))
    rounds = {tuple(fh.sample_clients(100, 0.1, seed=3, round_idx=r)) for r in range(1, 21)}
    assert len(rounds) == 20


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_sample_clients_bad_fraction(fraction):
    with pytest.raises(ValueError, match="client_fraction"):
        fh.sample_clients(10, fraction, seed=0, round_idx=1)


def test_client_seed():
    s = fh.client_seed(0, 1, 2)
    assert isinstance(s, int) and 0 <= s < 2**32
    assert s == fh.client_seed(0, 1, 2)
    others = {fh.client_seed(0, 1, 3), fh.client_seed(0, 2, 2), fh.client_seed(1, 1, 2)}
    assert s not in others and len(others) == 3
    torch.Generator().manual_seed(s)  # usable as a torch seed


# ----------------------------------------------------------------------------
# 05_round_loop: plots (the engine itself is tested in test_engine.py)
# ----------------------------------------------------------------------------


def test_plot_history():
    hist = lambda accs: [{"round": r, "accuracy": a, "loss": 2 - a} for r, a in enumerate(accs, 1)]
    runs = {"iid": hist([0.3, 0.5, 0.6]), "dirichlet": hist([0.2, 0.3])}
    fig = fh.plot_history(runs, baseline=0.8)
    ax_acc, ax_loss = fig.axes
    for ax in (ax_acc, ax_loss):
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None
        assert {"iid", "dirichlet"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    assert "centralized" in [t.get_text() for t in ax_acc.get_legend().get_texts()]
    iid_line = next(line for line in ax_acc.get_lines() if line.get_label() == "iid")
    np.testing.assert_allclose(iid_line.get_ydata(), [30, 50, 60])  # accuracy in percent
    np.testing.assert_allclose(iid_line.get_xdata(), [1, 2, 3])
    loss_line = next(line for line in ax_loss.get_lines() if line.get_label() == "dirichlet")
    np.testing.assert_allclose(loss_line.get_ydata(), [1.8, 1.7])
    no_baseline = fh.plot_history(runs)
    assert "centralized" not in [t.get_text() for t in no_baseline.axes[0].get_legend().get_texts()]


def test_live_plot_outside_jupyter(capsys):
    earlier = {"before": [{"round": 1, "accuracy": 0.4, "loss": 1.5}]}
    update = fh.live_plot("now", earlier=earlier, baseline=0.9)
    open_before = len(plt.get_fignums())
    history = [{"round": 1, "accuracy": 0.3, "loss": 1.9}]
    update(history)
    history.append({"round": 2, "accuracy": 0.5, "loss": 1.4})
    update(history)
    assert len(plt.get_fignums()) == open_before  # each redraw closes its figure
    capsys.readouterr()


# ----------------------------------------------------------------------------
# Ray (session fixture `ray_cluster`: started once, here at the end of the file)
# ----------------------------------------------------------------------------


def test_init_ray_is_idempotent(ray_cluster):
    assert ray_cluster.is_initialized()
    assert ray_cluster.cluster_resources().get("CPU") == 2
    fh.init_ray(num_cpus=2)  # a second call does nothing (no error, same cluster)
    fh.init_ray()
    assert ray_cluster.cluster_resources().get("CPU") == 2


def test_client_update_remote_matches_local(ray_cluster, synthetic_train):
    x_all, y_all = synthetic_train[0].numpy(), synthetic_train[1].numpy()
    state = fh.make_model("simple", seed=2).state_dict()
    indices = np.arange(0, 6000, 11)
    args = (x_all, y_all, indices, "simple", 1, 32, 0.05, 17)
    remote_state, n, loss = ray_cluster.get(fh.client_update_remote.remote(state, *args))
    local_state, n_local, loss_local = fh.client_update(state, *args)
    assert n == n_local == len(indices)
    assert loss == loss_local
    assert states_equal(remote_state, local_state)
