"""Seconds per round of the engine (in process, 2NN, synthetic data, 1 local epoch) with and without
secure aggregation, for a few client counts; and the bytes each client uploads.

    python benchmarks/secagg_engine_cost.py
"""

from __future__ import annotations

import fed_helpers as fh

x, xt = fh.load_dataset("synthetic"), fh.load_dataset("synthetic", train=False)
cfg = fh.TrainConfig(model="2nn", epochs=1, batch_size=32, lr=0.05)
for n in (10, 30, 60):
    task = fh.FedTask(x, xt, fh.make_partition("iid", x[1].numpy(), n, seed=0), cfg, 1.0, 0)
    _, plain = fh.run_rounds(task, 2, progress=False)
    for degree in (None, fh.log_degree(n)):
        t, a = fh.secure_aggregation(task, clip_range=1.0, degree=degree)
        _, sec = fh.run_rounds(task, 2, transform=t, aggregate=a, progress=False)
        print({"clients": n, "degree": degree or n - 1, "plain_s": round(plain[-1]["seconds"], 2),
               "secure_s": round(sec[-1]["seconds"], 2), "server_protocol_s": round(a.last_round["server_seconds"], 2),
               "plain_up_per_client": plain[-1]["bytes_up"] // n, "secure_up_per_client": sec[-1]["bytes_up"] // n,
               "acc_plain": plain[-1]["accuracy"], "acc_secure": sec[-1]["accuracy"]}, flush=True)
        if fh.log_degree(n) is None:
            break
