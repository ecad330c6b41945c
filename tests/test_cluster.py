"""The actor-pool round loop on a two-node Ray cluster (two raylets on this machine) gives
the same weights as on one node and as the in-process compute floor.

Runs in a subprocess so that its clusters never meet the Ray instance of other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import hashlib, json
import ray
import fed_helpers as fh
from ray.cluster_utils import Cluster

train, test = fh.load_dataset("synthetic"), fh.load_dataset("synthetic", train=False)
parts = fh.make_partition("quantity", train[1].numpy(), 12, seed=1, beta=0.5)
kw = dict(rounds=2, client_fraction=0.5, batch_size=16, lr=0.05, seed=3, progress=False)

def digest(model):
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()

out = {}
out["floor"] = digest(fh.run_federated_pool("2nn", train, test, parts, use_ray=False, **kw)[0])

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="ERROR")
x_ref, y_ref = ray.put(train[0].numpy()), ray.put(train[1].numpy())
trainers = [fh.ClientTrainer.remote(x_ref, y_ref, "2nn") for _ in range(2)]
out["nodes"] = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
out["trainer_nodes"] = len(set(ray.get([t.node_id.remote() for t in trainers])))
for t in trainers:
    ray.kill(t)
out["two_nodes"] = digest(fh.run_federated_pool("2nn", train, test, parts, use_ray=True, num_workers=2, **kw)[0])
ray.shutdown()
cluster.shutdown()

fh.init_ray(2)
out["one_node"] = digest(fh.run_federated_pool("2nn", train, test, parts, use_ray=True, num_workers=2, **kw)[0])
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_two_node_cluster_matches_single_node_and_floor():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["nodes"] == 2 and out["trainer_nodes"] == 2, out  # one trainer on each node
    assert out["two_nodes"] == out["one_node"] == out["floor"], out
