"""What secure aggregation costs, per round, without training: the 2NN's d = 199,210 weights, n clients,
10% of them dropping out after ShareKeys. Prints bytes per client and seconds (one process, one core).

    python benchmarks/secagg_cost.py [n ...]
"""

from __future__ import annotations

import sys
import time

import numpy as np

import fed_helpers as fh

D, SEED, RND = 199_210, 0, 1


def measure(n: int, degree: int | None) -> dict:
    cids = tuple(range(n))
    fh.round_setup.cache_clear()
    t0 = time.perf_counter()
    setup = fh.round_setup(SEED, RND, cids, degree, 2 / 3)
    t_setup = time.perf_counter() - t0
    y = fh.encode_update(np.random.default_rng(0).uniform(-0.1, 0.1, D), 100, 1.0, 10_000, 0)
    t0 = time.perf_counter()
    masked = fh.masked_input(y, fh.client_keys(SEED, RND, 0), setup)  # one client's masking
    t_mask = time.perf_counter() - t0
    dropped = set(np.random.default_rng(1).choice(n, size=max(1, n // 10), replace=False).tolist())
    vectors = {c: masked if c == 0 else np.random.default_rng(c).integers(0, 2**32, D + 1, dtype=np.uint64)
               .astype(np.uint32) for c in cids if c not in dropped}  # stand-ins: the sum is not checked here
    vectors.setdefault(0, masked)
    t0 = time.perf_counter()
    _, cost = fh.simulate_unmasking(setup, vectors, SEED)
    t_server = time.perf_counter() - t0
    return {"n": n, "degree": degree or n - 1, "vector_up": 4 * (D + 1), **{k: round(v) for k, v in cost.items()},
            "setup_s": round(t_setup, 3), "client_mask_s": round(t_mask, 3), "server_round_s": round(t_server, 2)}


if __name__ == "__main__":
    for n in [int(a) for a in sys.argv[1:]] or [10, 50, 100]:
        for degree in (None, fh.log_degree(n)):
            print(measure(n, degree), flush=True)
            if fh.log_degree(n) is None:
                break
