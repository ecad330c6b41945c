"""Secure aggregation (notebook 10): Bonawitz et al.'s double masking with Shamir-shared secrets,
SecAgg+'s sparse graph, the quantization, and the pieces plugged into the round engine.

Every check can fail: sums are compared as exact integers with the plain sum, thresholds are
tested on both sides (t and t - 1), the uniformity check is shown to reject the unmasked vector,
and the engine's result is compared with plain FedAvg against the stated quantization bound.
"""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import flat

import fed_helpers as fh

SEED, RND = 7, 3
CIDS = (1, 4, 5, 8, 11, 12, 20)  # non-contiguous ids, as a sampled round has


def random_inputs(cids, size: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32) for c in cids}


def plain_sum(ys: dict[int, np.ndarray], which) -> np.ndarray:
    total = np.zeros(len(next(iter(ys.values()))), dtype=np.uint32)
    for c in which:
        total += ys[c]
    return total


def masked_all(setup: fh.RoundSetup, ys: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    return {c: fh.masked_input(ys[c], fh.client_keys(SEED, setup.round, c), setup) for c in ys}


# ---------------------------------------------------------------- primitives


def test_prg_kdf_and_pair_masks():
    k1, k2 = fh.kdf(b"secret", "round 1"), fh.kdf(b"secret", "round 2")
    assert len(k1) == 32 and k1 != k2  # the info (round, clients) is bound into the key
    assert np.array_equal(fh.prg_mask(k1, 1000), fh.prg_mask(k1, 1000))
    assert not np.array_equal(fh.prg_mask(k1, 1000), fh.prg_mask(k2, 1000))
    assert np.array_equal(fh.prg_mask(k1, 1000)[:10], fh.prg_mask(k1, 10))  # a stream, not a reseeded draw
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    a, b = fh.client_keys(SEED, RND, 4), fh.client_keys(SEED, RND, 11)
    assert np.array_equal(fh.pair_mask(a, setup, 11, 50), fh.pair_mask(b, setup, 4, 50))  # ECDH agrees
    other = fh.round_setup(SEED, RND + 1, CIDS, None, 0.6)
    a2 = fh.client_keys(SEED, RND + 1, 4)
    assert not np.array_equal(fh.pair_mask(a, setup, 11, 50), fh.pair_mask(a2, other, 11, 50))  # fresh keys


def test_shamir_any_t_shares_rebuild_and_t_minus_1_do_not():
    secret = int.from_bytes(bytes(range(32)), "little")
    holders, t = [0, 3, 4, 9, 10], 3
    shares = fh.shamir_split(secret, holders, t, b"k" * 32)
    for subset in itertools.combinations(holders, t):
        assert fh.shamir_combine({h: shares[h] for h in subset}, t) == secret
    for subset in itertools.combinations(holders, t - 1):
        part = {h: shares[h] for h in subset}
        assert fh.lagrange_at_zero(part) != secret  # t - 1 points fit another polynomial
        with pytest.raises(fh.SecAggAbort, match="t = 3"):
            fh.shamir_combine(part, t)
    assert fh.shamir_combine(fh.shamir_split(secret, holders, 5, b"q" * 32), 5) == secret


def test_encrypted_shares_open_only_for_their_holder():
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    boxes = fh.share_keys(fh.client_keys(SEED, RND, 5), setup)
    assert sorted(boxes) == sorted(CIDS)  # its neighbours and itself
    b_share, c_share = fh.open_share(fh.client_keys(SEED, RND, 8), setup, 5, boxes[8])
    assert 0 <= b_share < fh.SECAGG_PRIME and 0 <= c_share < fh.SECAGG_PRIME
    with pytest.raises(Exception):  # noqa: B017 (cryptography's InvalidTag): another holder cannot read it
        fh.open_share(fh.client_keys(SEED, RND, 11), setup, 5, boxes[8])


# ---------------------------------------------------------------- masking and recovery


def test_masks_cancel_for_every_survivor_set_of_size_at_least_t():
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    t = setup.thresholds[CIDS[0]]
    assert t == math.ceil(0.6 * len(CIDS)) == 5
    ys = random_inputs(CIDS, 300)
    masked = masked_all(setup, ys)
    for size in range(t, len(CIDS) + 1):
        for survivors in itertools.combinations(CIDS, size):
            total, _ = fh.simulate_unmasking(setup, {c: masked[c] for c in survivors}, SEED)
            assert np.array_equal(total, plain_sum(ys, survivors)), survivors


def test_recovery_with_exactly_t_survivors_and_abort_with_t_minus_1():
    cids = (0, 2, 3, 6, 7, 9)
    setup = fh.round_setup(SEED, RND, cids, None, 0.5)
    t = setup.thresholds[0]
    assert t == 3
    ys = random_inputs(cids, 64, seed=1)
    masked = masked_all(setup, ys)
    total, _ = fh.simulate_unmasking(setup, {c: masked[c] for c in cids[:t]}, SEED)
    assert np.array_equal(total, plain_sum(ys, cids[:t]))
    with pytest.raises(fh.SecAggAbort, match="t = 3 are needed"):
        fh.simulate_unmasking(setup, {c: masked[c] for c in cids[: t - 1]}, SEED)


def test_masked_sum_without_unmasking_is_not_the_sum():
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    ys = random_inputs(CIDS, 100)
    masked = masked_all(setup, ys)
    # With everyone present the pairwise masks cancel but the self-masks stay: b_u is needed.
    raw = plain_sum(masked, CIDS)
    assert (raw != plain_sum(ys, CIDS)).mean() > 0.99
    selfmasks = plain_sum({c: fh.prg_mask(fh.client_keys(SEED, RND, c).b, 100) for c in CIDS}, CIDS)
    assert np.array_equal(raw - selfmasks, plain_sum(ys, CIDS))


def test_late_arrival_cannot_be_unmasked():
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    ys = random_inputs(CIDS, 200, seed=2)
    masked = masked_all(setup, ys)
    late, on_time = CIDS[2], [c for c in CIDS if c != CIDS[2]]
    # The server declared `late` dropped (it asks for its mask key's shares); then its vector arrives.
    with pytest.raises(ValueError, match="declared dropped"):
        fh.simulate_unmasking(setup, masked, SEED, dropped=[late])
    # Honest clients refuse to give both of a client's secrets (b_u and its mask key) in one request.
    keys = fh.client_keys(SEED, RND, on_time[0])
    with pytest.raises(ValueError, match="refused"):
        fh.unmask_response(keys, setup, {}, survivors=CIDS, dropped=[late])
    # Even holding its rebuilt mask key, the server sees the late vector under its self-mask b_u only.
    total, _ = fh.simulate_unmasking(setup, {c: masked[c] for c in on_time}, SEED)
    assert np.array_equal(total, plain_sum(ys, on_time))
    k_late = fh.client_keys(SEED, RND, late)
    stripped = masked[late].copy()
    for v in setup.graph[late]:
        m = fh.pair_mask(k_late, setup, v, 200)
        stripped = stripped - m if v > late else stripped + m
    assert np.array_equal(stripped, ys[late] + fh.prg_mask(k_late.b, 200))
    assert (stripped != ys[late]).mean() > 0.99


def test_masked_vector_looks_uniform():
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    delta = np.full(20_000, 0.01)  # a very structured update: one value everywhere
    y = fh.encode_update(delta, 50, 1.0, 10_000, seed=0)
    masked = fh.masked_input(y, fh.client_keys(SEED, RND, 4), setup)

    def looks_uniform(v: np.ndarray) -> bool:
        bits = np.unpackbits(v.view(np.uint8)).reshape(-1, 32).mean(0)  # each bit position's share of ones
        counts = np.bincount(v.view(np.uint8), minlength=256)
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())  # 255 dof: mean 255, sd 22.6
        return bool(np.abs(bits - 0.5).max() < 5 * 0.5 / math.sqrt(len(v)) and chi2 < 255 + 6 * 22.6)

    assert looks_uniform(masked)
    assert not looks_uniform(y)  # the check can fail: the unmasked vector is far from uniform


# ---------------------------------------------------------------- quantization


def test_quantize_round_trip_error_and_unbiased():
    rng = np.random.default_rng(0)
    delta, r, levels = rng.uniform(-0.5, 0.5, 50_000), 0.5, 1000
    z = fh.quantize(delta, r, levels, seed=3)
    assert z.min() >= -levels and z.max() <= levels
    err = fh.dequantize(z, r, levels) - delta
    assert np.abs(err).max() < r / levels  # under one step
    assert abs(err.mean()) < 5 * (r / levels) / math.sqrt(len(delta))  # stochastic rounding: unbiased
    assert np.array_equal(z, fh.quantize(delta, r, levels, seed=3))  # seeded
    assert np.array_equal(fh.quantize(np.array([3.0, -3.0]), r, levels, 0), [levels, -levels])  # clipped


def test_weighted_sum_decodes_and_cannot_overflow():
    sizes, r = [300, 100, 2000], 1.0
    levels = fh.secagg_levels(sum(sizes))
    assert levels * sum(sizes) <= 2**31 - 1 < (levels + 1) * sum(sizes)
    for sign in (1.0, -1.0):  # the extremes: every coordinate of every client at +-r
        total = plain_sum({k: fh.encode_update(np.full(5, sign * r), n, r, levels, k) for k, n in enumerate(sizes)},
                          range(3))
        sums, n = fh.decode_sum(total, r, levels)
        assert n == sum(sizes) and np.allclose(sums, sign * r * sum(sizes))
    twice = 2 * levels  # too many levels for these clients: the sum wraps around and decodes wrong
    total = plain_sum({k: fh.encode_update(np.full(5, r), n, r, twice, k) for k, n in enumerate(sizes)}, range(3))
    assert not np.allclose(fh.decode_sum(total, r, twice)[0], r * sum(sizes))
    deltas = [np.random.default_rng(k).uniform(-0.3, 0.3, 100) for k in range(3)]
    total = plain_sum({k: fh.encode_update(deltas[k], n, r, levels, k) for k, n in enumerate(sizes)}, range(3))
    sums, _ = fh.decode_sum(total, r, levels)
    exact = sum(n * d for n, d in zip(sizes, deltas))
    assert np.abs(sums - exact).max() < sum(sizes) * r / levels


# ---------------------------------------------------------------- SecAgg+


def test_secagg_plus_graph_is_k_regular_symmetric_and_seeded():
    cids = list(range(3, 103))
    g = fh.secagg_graph(cids, 8, seed=1, rnd=2)
    assert sorted(g) == cids
    assert all(len(v) == 8 and c not in v for c, v in g.items())
    assert all(c in g[v] for c, vs in g.items() for v in vs)  # symmetric
    assert g == fh.secagg_graph(cids, 8, seed=1, rnd=2)
    assert g != fh.secagg_graph(cids, 8, seed=1, rnd=3) and g != fh.secagg_graph(cids, 8, seed=2, rnd=2)
    assert fh.secagg_graph(cids[:9], 8, 1, 2) == {c: tuple(v for v in cids[:9] if v != c) for c in cids[:9]}
    assert fh.log_degree(100) == 8 and fh.log_degree(8) == 4 and fh.log_degree(5) is None


def test_secagg_plus_masks_cancel_when_every_neighbourhood_has_t():
    cids = tuple(range(0, 30, 2))
    setup = fh.round_setup(SEED, RND, cids, 4, 0.6)
    assert set(setup.thresholds.values()) == {3}  # ceil(0.6 * (4 neighbours + itself))
    ys = random_inputs(cids, 50, seed=4)
    masked = masked_all(setup, ys)
    rng, outcomes = np.random.default_rng(5), set()
    for _ in range(12):
        survivors = sorted(rng.choice(cids, size=rng.integers(8, 15), replace=False).tolist())
        ok = all(sum(v in survivors for v in (*setup.graph[u], u)) >= setup.thresholds[u] for u in cids)
        outcomes.add(ok)
        if ok:
            total, _ = fh.simulate_unmasking(setup, {c: masked[c] for c in survivors}, SEED)
            assert np.array_equal(total, plain_sum(ys, survivors))
        else:
            with pytest.raises(fh.SecAggAbort):
                fh.simulate_unmasking(setup, {c: masked[c] for c in survivors}, SEED)
    assert outcomes == {True, False}  # both branches were exercised


# ---------------------------------------------------------------- in the engine


CFG = fh.TrainConfig(model="simple", epochs=1, batch_size=32, lr=0.1)


@pytest.fixture(scope="module")
def task(synthetic_train, synthetic_test) -> fh.FedTask:
    parts = fh.make_partition("dirichlet", synthetic_train[1].numpy(), 10, alpha=0.5, seed=SEED)
    return fh.FedTask(synthetic_train, synthetic_test, parts, CFG, 0.8, SEED)


def test_engine_one_round_is_fedavg_within_the_quantization_bound(task):
    transform, aggregate = fh.secure_aggregation(task, clip_range=1.0)
    plain, h0 = fh.run_rounds(task, 1, progress=False)
    secure, h1 = fh.run_rounds(task, 1, transform=transform, aggregate=aggregate, progress=False)
    step = aggregate.config.clip_range / aggregate.config.levels
    gap = float((flat(secure) - flat(plain)).abs().max())
    start = fh.flat_weights(fh.make_model(CFG.model, SEED))
    assert float((flat(plain) - start).abs().max()) < 1.0  # no coordinate was clipped: the bound applies
    assert 0 < gap < step + 1e-6  # under one quantization step (+ float32 rounding), and not bit-identical
    assert h1[0]["drift"] is None and h0[0]["drift"] is not None  # the server cannot see the updates
    d = len(start)
    assert h1[0]["bytes_up"] > 8 * 4 * (d + 1) and set(aggregate.last_round) >= {"keys_up", "shares_up"}
    assert pickle.loads(pickle.dumps(transform)) == transform  # it can travel to Ray workers


def test_engine_secagg_plus_with_dropouts_and_abort(task):
    faults = {"crash": 0.3}
    plain, hp = fh.run_rounds(task, 3, policy=fh.Resilient(max_norm_ratio=None, faults=faults), progress=False)
    # t = 2 of each client's 5 holders: round 2 (3 of 8 crash) aborts with t = 3, as client 6 keeps 1 live neighbour
    transform, aggregate = fh.secure_aggregation(task, clip_range=1.0, threshold=0.4, degree=4)
    secure, hs = fh.run_rounds(task, 3, policy=fh.SecureResilient(faults=faults), transform=transform,
                               aggregate=aggregate, progress=False)
    assert any(h["failed"] for h in hs)  # dropouts happened and were recovered from
    assert [h["accepted"] for h in hs] == [h["accepted"] for h in hp] and all(h["aggregated"] for h in hs)
    assert float((flat(secure) - flat(plain)).abs().max()) < 1e-3
    assert abs(hs[-1]["accuracy"] - hp[-1]["accuracy"]) <= 0.01
    strict_t, strict = fh.secure_aggregation(task, clip_range=1.0, threshold=1.0)  # t = everyone: any dropout aborts
    kept, hk = fh.run_rounds(task, 1, policy=fh.SecureResilient(faults=faults), transform=strict_t,
                             aggregate=strict, progress=False)
    assert hs[0]["failed"] and not hk[0]["aggregated"] and "aborted" in strict.last_round
    assert torch.equal(flat(kept), fh.flat_weights(fh.make_model(CFG.model, SEED)))  # the model was kept


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize("knobs, name", [
    ({"clip_range": 0.0}, "clip_range"), ({"clip_range": math.nan}, "clip_range"),
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"degree": 3}, "degree"),
    ({"degree": 0}, "degree"), ({"degree": True}, "degree"), ({"levels": 0}, "levels"),
    ({"client_fraction": 0.0}, "client_fraction"), ({"num_clients": 0}, "num_clients"),
])
def test_bad_knobs_are_refused_by_name(knobs, name):
    good = {"num_clients": 10, "client_fraction": 0.5, "seed": 0, "clip_range": 1.0, "levels": 100}
    with pytest.raises(ValueError, match=name):
        fh.SecAggConfig(**{**good, **knobs})


def test_other_bad_inputs_are_refused_by_name(task):
    with pytest.raises(ValueError, match="max_round_samples"):
        fh.secagg_levels(2**31)
    with pytest.raises(ValueError, match=r"t must be an integer in \[1, 3\]"):
        fh.shamir_split(5, [0, 1, 2], 4, b"k" * 32)
    with pytest.raises(ValueError, match="max_norm_ratio"):
        fh.SecureResilient(max_norm_ratio=20.0)
    with pytest.raises(ValueError, match="threshold"):
        fh.secure_aggregation(task, threshold=-1)
    with pytest.raises(ValueError, match="degree"):
        fh.secagg_graph(range(10), 5, 0, 0)


def test_engine_secure_run_resumes_bit_for_bit(task, tmp_path):
    transform, aggregate = fh.secure_aggregation(task, clip_range=1.0, degree=4)
    straight, hs = fh.run_rounds(task, 3, transform=transform, aggregate=aggregate, progress=False)
    fh.run_rounds(task, 2, transform=transform, aggregate=aggregate, checkpoint=fh.Checkpointer(tmp_path),
                  progress=False)
    resumed, hr = fh.run_rounds(task, 3, transform=transform, aggregate=aggregate,
                                checkpoint=fh.Checkpointer(tmp_path), progress=False)
    assert torch.equal(flat(straight), flat(resumed))  # keys, masks and rounding all come from the seed
    assert [h["accuracy"] for h in hs] == [h["accuracy"] for h in hr]
    other, _ = fh.secure_aggregation(task, clip_range=0.5, degree=4)
    with pytest.raises(ValueError, match="different run"):  # the pieces' knobs are in the fingerprint
        fh.run_rounds(task, 3, transform=other, aggregate=aggregate, checkpoint=fh.Checkpointer(tmp_path),
                      progress=False)


def test_dropouts_during_unmasking_are_tolerated_down_to_t():
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.5)
    t = setup.thresholds[CIDS[0]]
    assert t == 4
    ys = random_inputs(CIDS, 80, seed=6)
    masked = masked_all(setup, ys)
    survivors = CIDS[:6]  # CIDS[6] dropped before sending its vector
    for answering in (survivors[:t], survivors[1:t + 1]):  # some survivors leave before answering
        total, _ = fh.simulate_unmasking(setup, {c: masked[c] for c in survivors}, SEED, responders=answering)
        assert np.array_equal(total, plain_sum(ys, survivors))  # every survivor's vector is in the sum
    with pytest.raises(fh.SecAggAbort):
        fh.simulate_unmasking(setup, {c: masked[c] for c in survivors}, SEED, responders=survivors[: t - 1])


# ---------------------------------------------------------------- tampering, key source, bytes, DP, Ray


def unmasking_answers(setup, survivors, dropped):
    keys = {c: fh.client_keys(SEED, setup.round, c) for c in setup.graph}
    inbox = {v: {} for v in setup.graph}
    for u in setup.graph:
        for v, box in fh.share_keys(keys[u], setup).items():
            inbox[v][u] = box
    return {v: fh.unmask_response(keys[v], setup, inbox[v], survivors, dropped) for v in survivors}


@pytest.mark.parametrize("kind", ["b", "c"])
def test_a_tampered_share_makes_recovery_fail_loudly(kind):
    setup = fh.round_setup(SEED, RND, CIDS, None, 0.6)
    ys = random_inputs(CIDS, 50)
    masked = masked_all(setup, ys)
    dropped, survivors = [CIDS[-1]], list(CIDS[:-1])
    answers = unmasking_answers(setup, survivors, dropped)
    target = survivors[0] if kind == "b" else dropped[0]
    honest = fh.unmask_sum({c: masked[c] for c in survivors}, setup, answers, dropped)
    assert np.array_equal(honest, plain_sum(ys, survivors))  # untouched, the answers rebuild the exact sum
    first_holder = min(v for v in answers if target in answers[v][kind])  # its share is among the t used
    answers[first_holder][kind][target] = (answers[first_holder][kind][target] + 1) % fh.SECAGG_PRIME
    with pytest.raises(fh.SecAggTampered, match=f"client {target}'s {kind} shares"):
        fh.unmask_sum({c: masked[c] for c in survivors}, setup, answers, dropped)


def test_keys_come_from_os_urandom_by_default_and_the_model_from_the_seed(task):
    t1, a1 = fh.secure_aggregation(task, degree=4)
    t2, a2 = fh.secure_aggregation(task, degree=4)
    ts, _ = fh.secure_aggregation(task, degree=4, seeded_keys=True)
    assert len(t1.config.secret) == 32 and t1.config.secret != t2.config.secret and ts.config.secret == b""
    key = lambda t: fh.client_keys(t.config.seed, 1, 0, t.config.secret).b
    assert key(t1) != key(t2)  # fresh keys, fresh masks ...
    assert key(ts) == fh.client_keys(task.seed, 1, 0).b  # ... or the seed's, in tests
    m1, h1 = fh.run_rounds(task, 2, transform=t1, aggregate=a1, progress=False)
    m2, h2 = fh.run_rounds(task, 2, transform=t2, aggregate=a2, progress=False)
    assert torch.equal(flat(m1), flat(m2))  # ... but the masks cancel exactly: the same model, bit for bit
    assert "secret" not in str(fh.run_fingerprint(task, fh.FedAvg(), fh.RoundPolicy(), t1, a1))
    assert fh.run_fingerprint(task, fh.FedAvg(), fh.RoundPolicy(), t1, a1) == \
        fh.run_fingerprint(task, fh.FedAvg(), fh.RoundPolicy(), t2, a2)  # a run with fresh keys may resume
    with pytest.raises(ValueError, match="secret"):
        fh.SecAggConfig(10, 0.5, 0, 1.0, 100, secret=b"short")


def test_protocol_bytes_enter_the_history(task):
    transform, aggregate = fh.secure_aggregation(task, degree=4, seeded_keys=True)
    _, plain = fh.run_rounds(task, 1, transform=transform, aggregate=aggregate, progress=False)
    _, counted = fh.run_rounds(task, 1, transform=transform, aggregate=aggregate, progress=False,
                               callbacks=[fh.ProtocolBytes(aggregate)])
    cost, n = counted[0]["secagg"], len(counted[0]["sampled"])
    assert counted[0]["bytes_up"] - plain[0]["bytes_up"] == cost["protocol_up"] > 0
    assert counted[0]["bytes_down"] - plain[0]["bytes_down"] == cost["protocol_down"] > 0
    assert counted[0]["bytes_sent"] == counted[0]["bytes_up"] + counted[0]["bytes_down"]
    assert cost["protocol_up"] == pytest.approx(n * (cost["keys_up"] + cost["shares_up"] + cost["unmask_up"]))
    # each client sends its 4 neighbours one ciphertext: 2 shares of 66 B + a 16 B tag
    assert cost["shares_up"] == 4 * (2 * fh.SHARE_BYTES + 16) and cost["keys_down"] == 4 * 64


def zero_update_round(transform, aggregate, task, rnd=1):
    """Every sampled client sends a zero update: what the secure sum returns is the noise alone."""
    w = np.zeros(fh.count_parameters(fh.make_model(CFG.model)), dtype=np.float32)
    jobs = fh.make_jobs(task, fh.FedAvg(), torch.from_numpy(w), rnd, None)
    results = [fh.ClientResult(j.cid, len(j.indices), 0.0, transform(w, w, j)) for j in jobs]
    return aggregate(results, torch.from_numpy(w), jobs), jobs, results


def test_distributed_noise_adds_up_to_central_dp_noise(task):
    clip, z = 0.5, 2.0
    transform, aggregate = fh.secure_dp_mean(task, clip, z, seeded_keys=True)
    central = fh.dp_mean(task, clip, z)
    noise, jobs, results = zero_update_round(transform, aggregate, task)
    assert noise.std().item() == pytest.approx(central.noise_std(), rel=0.02)  # the same Gaussian on the mean
    assert abs(noise.mean().item()) < 5 * central.noise_std() / math.sqrt(len(noise))
    fewer, _, _ = zero_update_round(transform, lambda acc, w, j: aggregate(acc[2:], w, j), task)
    # 2 of the 8 clients drop out (6 = t still answer): their shares of the noise's variance are missing,
    # so 09's ledger, which assumes the whole noise, would understate epsilon
    assert fewer.std().item() == pytest.approx(central.noise_std() * math.sqrt(6 / 8), rel=0.02)
    assert fh.PrivacyLedger.for_task(task, z, 1e-5).sample_rate == pytest.approx(central.expected_weight
                                                                                 / sum(map(len, task.partitions)))


def test_secure_dp_without_noise_is_dp_mean_within_the_quantization(task):
    clip = 0.3
    transform, aggregate = fh.secure_dp_mean(task, clip, 0.0, weight_cap=400, seeded_keys=True)
    secure, hs = fh.run_rounds(task, 2, transform=transform, aggregate=aggregate, progress=False)
    central, hc = fh.run_rounds(task, 2, aggregate=fh.dp_mean(task, clip, 0.0, weight_cap=400), progress=False)
    gap = float((flat(secure) - flat(central)).abs().max())
    assert 0 < gap < 1e-4  # a quantization step is clip_range / levels = 0.3 / 268 million
    with pytest.raises(ValueError, match="weight_cap"):
        fh.secure_dp_mean(task, clip, 1.0, weight_cap=0)
    with pytest.raises(ValueError, match="clip"):
        fh.secure_dp_mean(task, -1.0, 1.0)
    with pytest.raises(ValueError, match="tail"):
        fh.secure_dp_mean(task, clip, 1.0, tail=-1.0)


@pytest.mark.parametrize("executor", ["ray-tasks", "actor-pool"])
def test_a_secure_run_on_ray_gives_the_in_process_bits(request, task, executor):
    request.getfixturevalue("ray_cluster")  # the transform (quantize, mask) runs in the Ray workers
    transform, aggregate = fh.secure_aggregation(task, degree=4)
    policy = fh.SecureResilient(faults={"crash": 0.2})
    ref, href = fh.run_rounds(task, 2, transform=transform, aggregate=aggregate, policy=policy, progress=False)
    ex = fh.RayTasks() if executor == "ray-tasks" else fh.ActorPool(num_workers=2)
    got, hgot = fh.run_rounds(task, 2, transform=transform, aggregate=aggregate, policy=policy, executor=ex,
                              progress=False)
    assert torch.equal(flat(ref), flat(got)) and any(h["failed"] for h in hgot)
    assert [h["accepted"] for h in href] == [h["accepted"] for h in hgot]
