"""Notebook 11's pieces: attacks (a kind of client fault) and robust aggregation rules (server-side
`aggregate` pieces of the round engine).

Each rule is checked against a case computed by hand; the rules that reduce to the mean give FedAvg's
bits through the engine; Krum picks the honest cluster; attacks are deterministic given a seed and the
same in process and on Ray; bad knobs are refused by name before any work.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from conftest import same_weights

import fed_helpers as fh


def results(vectors, sizes=None) -> list[fh.ClientResult]:
    """ClientResults with these weight vectors (float32) and sample counts (default: 1 each)."""
    sizes = sizes or [1] * len(vectors)
    return [fh.ClientResult(k, n, 0.0, np.asarray(v, dtype=np.float32)) for k, (v, n) in enumerate(zip(vectors, sizes))]


def zeros(d: int) -> torch.Tensor:
    return torch.zeros(d, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_task(synthetic_train, synthetic_test) -> fh.FedTask:
    """10 IID clients of the synthetic set, half sampled per round, a linear model."""
    parts = fh.make_partition("iid", synthetic_train[1].numpy(), 10, seed=0)
    return fh.FedTask(synthetic_train, synthetic_test, parts, fh.TrainConfig("simple", 1, 32, 0.1), 0.5, 7)


# --------------------------------------------------------------------------- rules: hand-computed cases


def test_median_by_hand():
    odd = fh.CoordinateMedian()(results([[1, 2], [3, 0], [10, 1]], [5, 1, 1]), zeros(2))
    assert odd.tolist() == [3.0, 1.0]  # sample weights ignored: one client, one vote
    even = fh.CoordinateMedian()(results([[1], [2], [3], [10]]), zeros(1))
    assert even.tolist() == [2.5]  # the mean of the two middle values
    assert odd.dtype == torch.float64


def test_trimmed_mean_by_hand():
    # n = 5, trim 0.2: b = 1 value cut at each end of each coordinate; survivors weighted by samples
    vecs = [[0, 100], [1, 4], [2, 3], [3, 2], [-50, 1]]
    sizes = [1, 1, 2, 1, 1]
    out = fh.TrimmedMean(0.2)(results(vecs, sizes), zeros(2))
    # coordinate 0: drop -50 and 3 -> {0 (1), 1 (1), 2 (2)}: (0 + 1 + 4) / 4; coordinate 1: drop 1 and 100
    # -> {4 (1), 3 (2), 2 (1)}: (4 + 6 + 2) / 4
    assert out.tolist() == pytest.approx([5 / 4, 12 / 4])


def test_krum_and_multikrum_by_hand():
    # 1-D points 0, 1, 2, 10, f = 0: each scores its n - f - 2 = 2 nearest squared distances
    w = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    assert fh.krum_scores(fh.pairwise_dist2(w), 0).tolist() == pytest.approx([5, 2, 5, 145])
    assert fh.krum_select(w, 0, 1) == [1]
    assert fh.krum_select(w, 0, 2) == [0, 1]  # 0 and 2 tie at 5: the lower index
    res = results([[0], [1], [2], [10]], [1, 3, 1, 1])
    assert fh.Krum(f=0)(res, zeros(1)).tolist() == [1.0]
    assert fh.Krum(f=0, m=2)(res, zeros(1)).tolist() == pytest.approx([0.75])  # (1 * 0 + 3 * 1) / 4


def test_bulyan_by_hand():
    # n = 7, f = 1: theta = 5 picked by Krum one at a time, then beta = 3 nearest the median averaged
    vecs = [[0], [1], [2], [3], [4], [5], [100]]
    out = fh.Bulyan(f=1)(results(vecs), zeros(1))
    # Krum (k = n - f - 2 nearest) picks 2, then 1 or 3 ... the 5 values 0..4 survive (100 and one
    # end point are left); their median is 2 and the three nearest are 1, 2, 3 -> 2
    assert out.tolist() == pytest.approx([2.0])


def test_centered_clipping_by_hand():
    res = results([[3, 4], [0, 0]])
    assert fh.CenteredClipping(tau=1.0, iters=1)(res, zeros(2)).tolist() == pytest.approx([0.3, 0.4])
    # second step: offsets (2.7, 3.6) -> clipped to (0.6, 0.8); (-0.3, -0.4) kept: v += 0.5 * (0.3, 0.4)
    assert fh.CenteredClipping(tau=1.0, iters=2)(res, zeros(2)).tolist() == pytest.approx([0.45, 0.6])
    unclipped = fh.CenteredClipping(tau=math.inf, iters=1)(results([[3, 4], [1, 0]], [1, 3]), zeros(2))
    assert unclipped.tolist() == pytest.approx([1.5, 1.0])  # tau inf: the weighted mean


def test_norm_clipping_by_hand():
    res = results([[3, 4], [0, 1]], [1, 3])
    assert fh.NormClip(max_norm=1.0, noise_std=0.0)(res, zeros(2)).tolist() == pytest.approx([0.15, 0.95])
    jobs = [fh.ClientJob(0, 4, np.arange(1), 0)]
    noisy = fh.NormClip(max_norm=1.0, noise_std=0.5, seed=3)(res, zeros(2), jobs)
    expected = torch.tensor([0.15, 0.95], dtype=torch.float64) + fh.dp_noise(3, 4, 2, 0.5)
    assert torch.allclose(noisy, expected)


# --------------------------------------------------------------------------- rules through the engine


@pytest.mark.parametrize("rule", [fh.TrimmedMean(0.0), fh.Krum(f=0, m=5), fh.NormClip(math.inf, 0.0),
                                  fh.make_rule("multi-krum", 5)], ids=["trim0", "multikrum-all", "clip-inf",
                                                                       "make-multikrum"])
def test_rules_that_reduce_to_the_mean_give_fedavgs_bits(tiny_task, rule):
    fedavg, _ = fh.run_rounds(tiny_task, 2, progress=False)
    policy = fh.Adversary(attack=fh.make_attack("sign-flip"), attack_fraction=0.0, num_clients=10)
    robust, _ = fh.run_rounds(tiny_task, 2, policy=policy, aggregate=rule, progress=False)
    assert same_weights(fedavg, robust)


def test_krum_picks_the_honest_cluster():
    rng = np.random.default_rng(0)
    honest = 1.0 + 0.1 * rng.standard_normal((7, 50))
    attackers = -3.0 + 2.0 * rng.standard_normal((3, 50))  # spread out, far from the honest ones
    w = torch.from_numpy(np.vstack([attackers, honest]))
    picked = fh.krum_select(w, f=3, m=7)
    assert picked == list(range(3, 10))
    res = results(list(w.numpy()))
    assert torch.allclose(fh.Krum(f=3)(res, zeros(50)), w[fh.krum_select(w, 3)[0]])


def test_identical_colluders_fool_krum():
    """The failure ALIE and IPM exploit: attackers who send the same vector are each other's nearest
    neighbours, so Krum picks one of them, when the honest updates spread more than their mean is long
    (stochastic updates: noise larger than signal); with a tight honest cluster Krum resists (above)."""
    rng = np.random.default_rng(1)
    honest = torch.from_numpy(1.0 + 2.0 * rng.standard_normal((7, 50)))
    crafted = fh.IPM(epsilon=0.1).craft(torch.zeros(3, 50, dtype=torch.float64), honest, [0, 1, 2])
    assert fh.krum_select(torch.vstack([crafted, honest]), f=3) == [0]


def test_rule_refuses_too_few_answers_by_keeping_the_model():
    assert fh.Krum(f=1)(results([[0], [1], [2], [3]]), zeros(1)) is None  # n = 4 <= 2f + 2
    assert fh.Bulyan(f=1)(results([[0]] * 6), zeros(1)) is None  # n = 6 < 4f + 3


# --------------------------------------------------------------------------- attacks


def test_attacker_ids_are_a_fixed_seeded_set():
    a = fh.attacker_ids(100, 0.2, 5)
    assert len(a) == 20 and list(a) == sorted(set(a.tolist()))
    assert np.array_equal(a, fh.attacker_ids(100, 0.2, 5))
    assert not np.array_equal(a, fh.attacker_ids(100, 0.2, 6))
    assert len(fh.attacker_ids(100, 0.0, 5)) == 0
    # its own stream: not the clients some round samples (a bug once made them round 11's sample)
    bad = set(fh.attacker_ids(100, 0.2, 0).tolist())
    for rnd in range(1, 200):
        assert len(bad & set(fh.sample_clients(100, 0.2, 0, rnd).tolist())) < 15  # 4 on average


def test_what_each_attack_sends():
    own = torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=torch.float64)
    honest = torch.tensor([[1.0, 1.0], [3.0, 5.0]], dtype=torch.float64)  # mean (2, 3), std (1, 2)
    assert fh.SignFlip(scale=2.0).craft(own, honest, [0, 1]).tolist() == [[-2.0, 4.0], [-6.0, 0.0]]
    assert fh.IPM(epsilon=0.5).craft(own, honest, [0, 1]).tolist() == [[-1.0, -1.5]] * 2
    assert fh.ALIE(z=1.0).craft(own, honest, [0, 1]).tolist() == [[1.0, 1.0]] * 2
    assert fh.ALIE(z=1.0, omniscient=False).craft(own, honest, [0, 1]).tolist() == [[1.0, -2.0]] * 2
    assert fh.alie_z(20, 4) == pytest.approx(statistics.NormalDist().inv_cdf(13 / 20))  # s = 11 - 4 = 7
    assert fh.Backdoor().craft(own, honest, [0, 1]).tolist() == (2 * own).tolist()  # boost n / a = 4 / 2
    x, y = np.zeros((4, 1, 28, 28), np.float32), np.arange(4)
    assert fh.LabelFlip().poison(x, y, 0)[1].tolist() == [9, 8, 7, 6]
    xp, yp = fh.Backdoor(target=7, poison_fraction=1.0).poison(x + np.eye(28, dtype=np.float32), y, 0)
    assert yp.tolist() == [7] * 4 and (xp[:, 0, 24:27, 24:27] == 1.0).all() and xp[:, 0, :24].sum() == 4 * 24


def test_attacks_are_deterministic_given_a_seed():
    own, honest = torch.zeros(2, 1000, dtype=torch.float64), torch.ones(3, 1000, dtype=torch.float64)
    g = fh.GaussianUpdate(std=1.0)
    assert torch.equal(g.craft(own, honest, [11, 12]), g.craft(own, honest, [11, 12]))
    assert not torch.equal(g.craft(own, honest, [11, 12]), g.craft(own, honest, [11, 13]))
    x, y = np.zeros((200, 1, 28, 28), np.float32), np.zeros(200, np.int64)
    b = fh.Backdoor(target=3, poison_fraction=0.5)
    assert np.array_equal(b.poison(x, y, 4)[1], b.poison(x, y, 4)[1])
    assert not np.array_equal(b.poison(x, y, 4)[1], b.poison(x, y, 5)[1])


def test_collude_replaces_only_the_attackers_answers():
    res = results([[1, 1], [2, 2], [3, 3]], [1, 2, 3])
    jobs = [fh.ClientJob(k, 1, np.arange(1), 100 + k, fault="attack" if k == 1 else None) for k in range(3)]
    out = fh.collude(fh.SignFlip(scale=1.0), res, zeros(2), jobs)
    assert [r.cid for r in out] == [0, 1, 2] and out[0] is res[0] and out[2] is res[2]
    assert out[1].weights.tolist() == [-2.0, -2.0] and out[1].weights.dtype == np.float32
    assert out[1].num_samples == 2


@pytest.mark.parametrize("attack", ["gaussian", "backdoor", "alie"])
def test_an_attacked_run_is_reproducible_and_differs_from_a_clean_one(tiny_task, attack):
    policy = lambda: fh.Adversary(attack=fh.make_attack(attack), attack_fraction=0.3, num_clients=10)
    a, ha = fh.run_rounds(tiny_task, 2, policy=policy(), aggregate=fh.CoordinateMedian(), progress=False)
    b, hb = fh.run_rounds(tiny_task, 2, policy=policy(), aggregate=fh.CoordinateMedian(), progress=False)
    clean, _ = fh.run_rounds(tiny_task, 2, aggregate=fh.CoordinateMedian(), progress=False)
    assert same_weights(a, b) and [h["accuracy"] for h in ha] == [h["accuracy"] for h in hb]
    assert not same_weights(a, clean)


def test_same_bits_in_process_and_on_ray(tiny_task, ray_cluster):
    policy = lambda: fh.Adversary(attack=fh.make_attack("backdoor"), attack_fraction=0.3, num_clients=10)
    rule = fh.make_rule("trimmed-mean", 5, trim=0.2)
    here, _ = fh.run_rounds(tiny_task, 2, executor=fh.InProcess(), policy=policy(), aggregate=rule, progress=False)
    there, _ = fh.run_rounds(tiny_task, 2, executor=fh.RayTasks(), policy=policy(), aggregate=rule, progress=False)
    assert same_weights(here, there)


def test_backdoor_success_is_measured_on_triggered_non_target_images():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.eye(10)[2])  # always says class 2
    x, y = torch.zeros(30, 1, 28, 28), torch.arange(30) % 10
    assert fh.backdoor_success(model, x, y, target=2) == 1.0
    assert fh.backdoor_success(model, x, y, target=5) == 0.0


# --------------------------------------------------------------------------- bad knobs, refused by name


@pytest.mark.parametrize("make, name", [
    (lambda: fh.TrimmedMean(0.5), "trim"),
    (lambda: fh.TrimmedMean(-0.1), "trim"),
    (lambda: fh.make_rule("krum", 10, f=4), "f"),  # n = 10 <= 2f + 2
    (lambda: fh.make_rule("multi-krum", 6, f=2), "f"),
    (lambda: fh.make_rule("bulyan", 10, f=2), "f"),  # n = 10 < 4f + 3
    (lambda: fh.make_rule("krum", 10, f=1, m=11), "m"),
    (lambda: fh.Krum(f=-1), "f"),
    (lambda: fh.CenteredClipping(tau=0.0), "tau"),
    (lambda: fh.NormClip(max_norm=-1.0), "max_norm"),
    (lambda: fh.make_rule("mean", 10), "rule"),
    (lambda: fh.Adversary(attack=fh.LabelFlip(), attack_fraction=1.0, num_clients=10), "attack_fraction"),
    (lambda: fh.Adversary(attack=fh.LabelFlip(), attack_fraction=-0.1, num_clients=10), "attack_fraction"),
    (lambda: fh.attacker_ids(10, 1.5, 0), "attack_fraction"),
    (lambda: fh.make_attack("flip"), "attack"),
    (lambda: fh.Backdoor(target=10), "target"),
    (lambda: fh.GaussianUpdate(std=0.0), "std"),
])
def test_bad_knobs_are_refused_by_name(make, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        make()


def test_krum_refusal_names_the_allowed_range():
    with pytest.raises(ValueError, match=r"f must be an integer in \[0, 3\].*n > 2f \+ 2 with n = 10"):
        fh.make_rule("krum", 10, f=4)


def test_the_screen_sees_what_the_attackers_send(tiny_task):
    """`tamper` runs before the policy's screen: notebook 08's norm rule rejects the Gaussian attackers'
    crafted updates (in rounds where they are a minority, so the median norm is an honest one)."""
    policy = fh.Adversary(attack=fh.GaussianUpdate(), attack_fraction=0.3, num_clients=10, max_norm_ratio=5.0)
    _, history = fh.run_rounds(tiny_task, 3, policy=policy, progress=False)
    bad = set(fh.attacker_ids(10, 0.3, tiny_task.seed).tolist())
    checked = 0
    for h in history:
        sampled_bad = bad & set(h["sampled"])
        if 0 < len(sampled_bad) < len(h["sampled"]) / 2:
            assert {int(k) for k in h["rejected"]} == sampled_bad and set(h["accepted"]).isdisjoint(bad)
            checked += 1
    assert checked > 0
