"""Differential privacy as pieces of the round engine (notebook 09): the client-side clip,
the server-side noisy fixed-denominator mean, the accountant and the privacy ledger.

Every check here can fail: norms are measured, the noise's std is estimated from a fixed-seed
draw, epsilon is compared with a conversion computed independently, and "z = 0, C = inf is
FedAvg" is checked bit for bit through the whole engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import flat, fresh

import fed_helpers as fh

NUM_CLIENTS, SEED = 12, 5
CFG = fh.TrainConfig(model="simple", epochs=1, batch_size=32, lr=0.1)


@pytest.fixture(scope="module")
def equal_task(synthetic_train, synthetic_test) -> fh.FedTask:
    """12 clients of exactly 500 samples each, a third of them per round."""
    parts = fh.make_partition("iid", synthetic_train[1].numpy(), NUM_CLIENTS, seed=SEED)
    assert {len(p) for p in parts} == {500}
    return fh.FedTask(synthetic_train, synthetic_test, parts, CFG, 1 / 3, SEED)


@pytest.fixture(scope="module")
def skewed_task(synthetic_train, synthetic_test) -> fh.FedTask:
    """12 clients of unequal sizes (Dirichlet 0.3), half of them per round."""
    parts = fh.make_partition("dirichlet", synthetic_train[1].numpy(), NUM_CLIENTS, alpha=0.3, seed=SEED)
    assert len({len(p) for p in parts}) > 3
    return fh.FedTask(synthetic_train, synthetic_test, parts, CFG, 0.5, SEED)


def result(cid: int, weights, n: int) -> fh.ClientResult:
    return fh.ClientResult(cid, num_samples=n, weights=np.asarray(weights, dtype=np.float32))


def job(cid: int, rnd: int, n: int) -> fh.ClientJob:
    return fh.ClientJob(cid, rnd, np.arange(n), 0)


# ----------------------------------------------------------------------------
# The client-side clip
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.01, 0.5, 3.0])
def test_clipping_bounds_every_update(max_norm):
    rng = np.random.default_rng(0)
    g = rng.standard_normal(1000).astype(np.float32)
    for scale in (1e-4, 0.01, 1.0, 100.0):
        new = (g + scale * rng.standard_normal(1000)).astype(np.float32)
        out = fh.ClipUpdate(max_norm)(new, g)
        before, after = np.linalg.norm(new.astype(np.float64) - g), np.linalg.norm(out.astype(np.float64) - g)
        assert out.dtype == np.float32 and after <= max_norm * (1 + 1e-5)
        if before <= max_norm:
            assert out is new  # a short update leaves untouched: not even rounded
        else:
            assert after == pytest.approx(max_norm, rel=1e-5)  # scaled to the bound, direction kept
            cos = np.dot(out - g, new - g) / (after * before)
            assert cos == pytest.approx(1.0, abs=1e-5)


def test_clip_scale_by_hand():
    assert fh.clip_scale(torch.tensor([3.0, 4.0]), 1.0) == pytest.approx(0.2, rel=1e-15)
    assert fh.clip_scale(torch.tensor([3.0, 4.0]), 5.0) == 1.0 == fh.clip_scale(torch.zeros(3), 0.1)
    assert fh.clip_scale(torch.tensor([3.0, 4.0]), math.inf) == 1.0


def test_infinite_clip_changes_nothing():
    g = np.zeros(5, np.float32)
    new = np.array([1e30, -1e30, 3, 4, 5], np.float32)
    assert fh.ClipUpdate(math.inf)(new, g) is new


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_clip_refuses_bad_norms_by_name(bad):
    with pytest.raises(ValueError, match="max_norm"):
        fh.ClipUpdate(bad)


# ----------------------------------------------------------------------------
# The server-side noisy mean
# ----------------------------------------------------------------------------


def test_server_clips_even_an_unclipped_update_and_uses_the_fixed_denominator():
    """Two of three planned clients answer, one of them with an update of norm 10 (it skipped its
    clip): the server clips it to C = 1, weighs by min(n, cap) and divides by q W, not by the answers."""
    g = torch.zeros(3)
    answers = [result(0, [10.0, 0.0, 0.0], 100), result(2, [0.0, 0.5, 0.0], 30)]
    rule = fh.DPMean(clip=1.0, noise_multiplier=0.0, weight_cap=50, expected_weight=150.0)
    avg = rule(answers, g, [job(0, 1, 100), job(1, 1, 50), job(2, 1, 30)])
    expected = (50 * np.array([1.0, 0, 0]) + 30 * np.array([0, 0.5, 0])) / 150.0
    np.testing.assert_allclose(avg.numpy(), expected, rtol=1e-12)
    assert avg.dtype == torch.float64


def test_noise_std_matches_z_times_clip_over_the_denominator():
    """With updates that are all zero, what the rule returns is its noise: N(0, (z C cap / qW)^2)."""
    n, z, clip, cap, qw = 200_000, 1.3, 0.7, 40, 120.0
    g = torch.zeros(n)
    answers = [result(k, np.zeros(n), 40) for k in range(3)]
    rule = fh.DPMean(clip, z, cap, qw, seed=11)
    noise = rule(answers, g, [job(k, 4, 40) for k in range(3)]).numpy()
    want = z * clip * cap / qw
    assert rule.noise_std() == pytest.approx(want, rel=1e-12)
    # the std of 200,000 normal draws is within 1% of the truth (its own std is ~0.16%)
    assert noise.std() == pytest.approx(want, rel=0.01) and abs(noise.mean()) < 5 * want / math.sqrt(n)
    again = rule(answers, g, [job(k, 4, 40) for k in range(3)]).numpy()
    other_round = rule(answers, g, [job(k, 5, 40) for k in range(3)]).numpy()
    other_seed = fh.DPMean(clip, z, cap, qw, seed=12)(answers, g, [job(k, 4, 40) for k in range(3)]).numpy()
    assert np.array_equal(noise, again)  # seeded by (seed, round): reproducible
    assert not np.array_equal(noise, other_round) and not np.array_equal(noise, other_seed)
    assert abs(np.corrcoef(noise, other_round)[0, 1]) < 0.01


@pytest.mark.parametrize(
    ("knobs", "name"),
    [({"clip": 0}, "clip"), ({"clip": float("nan")}, "clip"), ({"noise_multiplier": -0.1}, "noise_multiplier"),
     ({"noise_multiplier": math.inf}, "noise_multiplier"), ({"weight_cap": 0}, "weight_cap"),
     ({"weight_cap": 2.5}, "weight_cap"), ({"weight_cap": True}, "weight_cap"),
     ({"expected_weight": 0}, "expected_weight"), ({"clip": math.inf, "noise_multiplier": 1.0}, "finite clip")],
)
def test_dp_mean_refuses_bad_knobs_by_name(knobs, name):
    base = {"clip": 1.0, "noise_multiplier": 0.5, "weight_cap": 10, "expected_weight": 30.0}
    with pytest.raises(ValueError, match=name):
        fh.DPMean(**{**base, **knobs})


def test_dp_mean_for_a_task(skewed_task):
    sizes = [len(p) for p in skewed_task.partitions]
    rule = fh.dp_mean(skewed_task, 1.0, 0.5)
    assert rule.weight_cap == max(sizes) and rule.seed == SEED
    assert rule.expected_weight == pytest.approx(6 / 12 * sum(sizes))
    capped = fh.dp_mean(skewed_task, 1.0, 0.5, weight_cap=100)
    assert capped.expected_weight == pytest.approx(6 / 12 * sum(min(n, 100) for n in sizes))
    with pytest.raises(ValueError, match="weight_cap"):
        fh.dp_mean(skewed_task, 1.0, 0.5, weight_cap=0)


# ----------------------------------------------------------------------------
# Through the engine
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedadam"])
def test_no_noise_and_no_clip_is_fedavg_bit_for_bit(equal_task, name):
    plain, _ = fh.run_rounds(equal_task, 3, strategy=fresh(name, NUM_CLIENTS), progress=False)
    dp, history = fh.run_rounds(equal_task, 3, strategy=fresh(name, NUM_CLIENTS), transform=fh.ClipUpdate(math.inf),
                                aggregate=fh.dp_mean(equal_task, math.inf, 0.0), progress=False)
    assert torch.equal(flat(plain), flat(dp))
    assert all(h["aggregated"] for h in history)


def test_clipping_and_noise_change_the_model_reproducibly(equal_task):
    def dp_run(z):
        return fh.run_rounds(equal_task, 2, transform=fh.ClipUpdate(0.5), aggregate=fh.dp_mean(equal_task, 0.5, z),
                             progress=False)[0]

    plain = fh.run_rounds(equal_task, 2, progress=False)[0]
    clipped, noisy, noisy_again = dp_run(0.0), dp_run(1.0), dp_run(1.0)
    assert torch.equal(flat(noisy), flat(noisy_again))
    assert not torch.equal(flat(plain), flat(clipped)) and not torch.equal(flat(clipped), flat(noisy))


def test_a_dropout_shrinks_the_step_instead_of_reweighting(skewed_task):
    """With a crashed client, the server divides by the round's expected weight, not by who answered."""
    seen = {}
    rule = fh.dp_mean(skewed_task, math.inf, 0.0)

    def spy(accepted, w, jobs):
        seen.update(accepted=accepted, w=w, jobs=jobs)
        return rule(accepted, w, jobs)

    policy = fh.Resilient(deadline_s=None, max_norm_ratio=None, faults={"crash": 0.34})
    model, history = fh.run_rounds(skewed_task, 1, policy=policy, aggregate=spy, progress=False)
    assert history[0]["failed"] and history[0]["aggregated"]
    w = seen["w"].double()
    want = w + sum(r.num_samples * (torch.from_numpy(r.weights).double() - w) for r in seen["accepted"]) / \
        rule.expected_weight
    np.testing.assert_allclose(flat(model).double().numpy(), want.float().double().numpy(), rtol=0, atol=1e-6)
    fedavg = fh.weighted_mean(seen["accepted"], seen["w"])
    assert not torch.allclose(flat(model).double(), fedavg, atol=1e-4)  # FedAvg would have renormalised


# ----------------------------------------------------------------------------
# The accountant
# ----------------------------------------------------------------------------


def gaussian_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """Independent reference for q = 1: T rounds of the Gaussian mechanism have RDP T a / (2 z^2) at
    order a (Mironov 2017), converted to (eps, delta) with Balle et al. (2020)'s bound
    eps = rdp + log((a - 1) / a) - (log delta + log a) / (a - 1), minimised over a fine grid of orders."""
    orders = np.concatenate([np.linspace(1.01, 10, 2000), np.linspace(10, 1000, 20000)])
    eps = rounds * orders / (2 * z**2) + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(eps.min())


def exact_gaussian_delta(z: float, eps: float) -> float:
    """The exact delta(eps) of one Gaussian mechanism of noise z (Balle & Wang 2018)."""
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))
    return phi(-eps * z + 1 / (2 * z)) - math.exp(eps) * phi(-eps * z - 1 / (2 * z))


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_epsilon_without_subsampling_matches_the_closed_form(z, rounds):
    eps = fh.dp_epsilon(z, 1.0, rounds, 1e-5)
    ref = gaussian_rdp_epsilon(z, rounds, 1e-5)
    # Opacus optimises over its own grid of orders (coarser): its epsilon is the same or a little larger
    assert ref * (1 - 1e-9) <= eps <= ref * 1.03


def test_epsilon_is_an_upper_bound_on_the_exact_gaussian():
    eps = fh.dp_epsilon(1.0, 1.0, 1, 1e-5)
    assert exact_gaussian_delta(1.0, eps) <= 1e-5  # at the accountant's eps the true delta is smaller
    assert exact_gaussian_delta(1.0, 0.8 * eps) > 1e-5  # and the bound is not loose by 20%


def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise():
    by_rounds = [fh.dp_epsilon(1.0, 0.1, t, 1e-5) for t in (1, 10, 100, 1000)]
    by_noise = [fh.dp_epsilon(z, 0.1, 100, 1e-5) for z in (0.5, 1.0, 2.0, 4.0)]
    by_rate = [fh.dp_epsilon(1.0, q, 100, 1e-5) for q in (0.01, 0.1, 1.0)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == 3
    assert fh.dp_epsilon(1.0, 0.1, 100, 1e-7) > fh.dp_epsilon(1.0, 0.1, 100, 1e-5)  # a smaller delta costs eps
    assert fh.dp_epsilon(0.0, 0.1, 3, 1e-5) == math.inf and fh.dp_epsilon(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize(
    ("args", "name"),
    [((-1.0, 0.1, 1, 1e-5), "noise_multiplier"), ((1.0, 0.0, 1, 1e-5), "sample_rate"),
     ((1.0, 1.5, 1, 1e-5), "sample_rate"), ((1.0, 0.1, -1, 1e-5), "rounds"), ((1.0, 0.1, 2.5, 1e-5), "rounds"),
     ((1.0, 0.1, 1, 0.0), "delta"), ((1.0, 0.1, 1, 1.0), "delta"), ((1.0, 0.1, 1, float("nan")), "delta")],
)
def test_epsilon_refuses_bad_knobs_by_name(args, name):
    with pytest.raises(ValueError, match=name):
        fh.dp_epsilon(*args)


def test_the_ledger_writes_epsilon_per_released_round(equal_task):
    ledger = fh.PrivacyLedger(1.0, 1 / 3, 1e-5)
    _, history = fh.run_rounds(equal_task, 3, transform=fh.ClipUpdate(1.0), aggregate=fh.dp_mean(equal_task, 1.0, 1.0),
                               callbacks=[ledger], progress=False)
    assert [h["epsilon"] for h in history] == [fh.dp_epsilon(1.0, 1 / 3, t, 1e-5) for t in (1, 2, 3)]
    assert all(h["delta"] == 1e-5 for h in history)
    assert fh.PrivacyLedger.for_task(equal_task, 1.0, 1e-5) == ledger  # q: 4 of 12 clients a round
    kept = fh.RoundPolicy(min_clients=NUM_CLIENTS)  # more than a round samples: nothing is released
    _, history = fh.run_rounds(equal_task, 2, policy=kept, aggregate=fh.dp_mean(equal_task, 1.0, 1.0),
                               callbacks=[ledger], progress=False)
    assert [h["epsilon"] for h in history] == [0.0, 0.0]


def test_a_checkpoint_made_with_other_noise_is_refused(equal_task, tmp_path):
    def go(z, rounds):
        return fh.run_rounds(equal_task, rounds, transform=fh.ClipUpdate(1.0), aggregate=fh.dp_mean(equal_task, 1.0, z),
                             callbacks=[fh.PrivacyLedger(z, 1 / 3, 1e-5)],
                             checkpoint=fh.Checkpointer(tmp_path), progress=False)

    _, first = go(1.0, 1)
    with pytest.raises(ValueError, match="noise_multiplier|aggregate|settings"):
        go(2.0, 2)
    _, resumed = go(1.0, 2)
    assert resumed[0]["epsilon"] == first[0]["epsilon"] and resumed[1]["epsilon"] > resumed[0]["epsilon"]


@pytest.mark.parametrize("executor", ["ray-tasks", "actor-pool"])
def test_dp_runs_give_the_same_bits_on_every_executor(equal_task, ray_cluster, executor):
    """Clipping on the workers, noise on the driver: DP-FedAvg on Ray equals DP-FedAvg in process, epsilon too."""
    def go(ex):
        return fh.run_rounds(equal_task, 2, executor=ex, transform=fh.ClipUpdate(0.5),
                             aggregate=fh.dp_mean(equal_task, 0.5, 1.0), callbacks=[fh.PrivacyLedger(1.0, 1 / 3, 1e-5)],
                             progress=False)

    ref, ref_history = go(fh.InProcess())
    model, history = go(fh.RayTasks() if executor == "ray-tasks" else fh.ActorPool(num_workers=2))
    assert torch.equal(flat(model), flat(ref))
    assert [h["epsilon"] for h in history] == [h["epsilon"] for h in ref_history]
