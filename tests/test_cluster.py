"""Ray clusters of their own, in one subprocess (so that they never meet the Ray instance of
the other tests, and so that they are started once: each start costs seconds):

- notebook 07: the actor-pool round loop on a two-node cluster (two raylets on this machine)
  gives the same weights as on one node and as the in-process compute floor;
- notebook 08: a node that leaves the cluster mid-run costs clients, not the run;
- notebook 08: clients cancelled at a deadline on a fresh Ray, whose workers are still
  starting, do not break the workers for later runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import fed_helpers as fh

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import hashlib, json, threading, time
import ray, torch
import fed_helpers as fh
from ray.cluster_utils import Cluster

def digest(model):
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()

train, test = fh.load_dataset("synthetic"), fh.load_dataset("synthetic", train=False)
out = {"pool": {}, "leave": {}, "cancel": {}}

# --- 07: the actor pool, on no Ray (the floor), two nodes, one node -------------------------
pool_parts = fh.make_partition("quantity", train[1].numpy(), 12, seed=1, beta=0.5)
pool_kw = dict(rounds=2, client_fraction=0.5, batch_size=16, lr=0.05, seed=3, progress=False)
pool = out["pool"]
pool["floor"] = digest(fh.run_federated_pool("2nn", train, test, pool_parts, use_ray=False, **pool_kw)[0])

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
worker = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="ERROR")
cluster.wait_for_nodes()
x_ref, y_ref = ray.put(train[0].numpy()), ray.put(train[1].numpy())
trainers = [fh.ClientTrainer.remote(x_ref, y_ref, "2nn") for _ in range(2)]
pool["nodes"] = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
pool["trainer_nodes"] = len(set(ray.get([t.node_id.remote() for t in trainers])))
for t in trainers:
    ray.kill(t)
pool["two_nodes"] = digest(fh.run_federated_pool("2nn", train, test, pool_parts, use_ray=True, num_workers=2,
                                                 **pool_kw)[0])

# --- 08: the worker node leaves during round 2 of a run_resilient run ----------------------
parts = fh.make_partition("shards", train[1].numpy(), 6, seed=0, shards_per_client=2)  # ~1,000 samples each
leave = out["leave"]
leave.update(faults={"crash": 0.2}, ended_at=[], nodes_before=len([n for n in ray.nodes() if n["Alive"]]))
t0 = time.perf_counter()

def remove():
    time.sleep(0.1)
    leave["removed_at"] = time.perf_counter() - t0
    cluster.remove_node(worker)
    leave["removed_by"] = time.perf_counter() - t0

remover = threading.Thread(target=remove)

def on_round(history):
    leave["ended_at"].append(time.perf_counter() - t0)
    if len(history) == 1:
        remover.start()

model, leave["history"] = fh.run_resilient(
    fh.FedAvg(), "simple", train, (test[0][:200], test[1][:200]), parts, rounds=4, local_epochs=2, batch_size=10,
    lr=0.05, seed=3, use_ray=True, deadline_s=120, faults=leave["faults"], on_round=on_round, progress=False)
remover.join()
leave["finite"] = bool(torch.isfinite(fh.flat_weights(model)).all())
leave["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
ray.shutdown()
cluster.shutdown()

# --- 08: a fresh Ray; the first round's deadline falls while its workers are starting ------
fh.init_ray(2)
small = (train[0][:800], train[1][:800])
parts = fh.make_partition("shards", small[1].numpy(), 8, seed=0, shards_per_client=2)
kw = dict(client_fraction=0.75, local_epochs=1, batch_size=25, lr=0.05, seed=5, progress=False)
cancel = out["cancel"]
_, cancel["first"] = fh.run_resilient(fh.FedAvg(), "simple", small, test, parts, use_ray=True, rounds=1,
                                      deadline_s=1.0, **kw)
ref, _ = fh.run_strategy(fh.FedAvg(), "simple", small, test, parts, use_ray=False, rounds=2, **kw)
model, cancel["second"] = fh.run_resilient(fh.FedAvg(), "simple", small, test, parts, use_ray=True, rounds=2,
                                           deadline_s=None, **kw)
cancel["same_bits"] = torch.equal(fh.flat_weights(model), fh.flat_weights(ref))

pool["one_node"] = digest(fh.run_federated_pool("2nn", train, test, pool_parts, use_ray=True, num_workers=2,
                                                **pool_kw)[0])
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def clusters() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_two_node_cluster_matches_single_node_and_floor(clusters):
    out = clusters["pool"]
    assert out["nodes"] == 2 and out["trainer_nodes"] == 2, out  # one trainer on each node
    assert out["two_nodes"] == out["one_node"] == out["floor"], out


def test_a_node_that_leaves_mid_run_costs_clients_not_the_run(clusters):
    out = clusters["leave"]
    assert out["nodes_before"] == 2 and out["nodes_after"] == 1, out
    assert out["finite"]
    hist = out["history"]
    assert [r["round"] for r in hist] == [1, 2, 3, 4]
    for r in hist:
        sampled = set(r["sampled"])
        groups = [set(r["accepted"]), {int(k) for k in r["failed"]}, set(r["late"]), {int(k) for k in r["rejected"]}]
        assert set().union(*groups) == sampled and sum(map(len, groups)) == len(sampled), r
        assert r["faults"] == {str(k): v for k, v in fh.assign_faults(r["sampled"], 3, r["round"],
                                                                      **out["faults"]).items()}
        assert math.isfinite(r["loss"])
    assert all(r["accepted"] for r in hist[2:])  # after the node left, the head node alone carries on
    print("node removed at", out["removed_at"], "-", out.get("removed_by"), "s; rounds ended at",
          [round(t, 2) for t in out["ended_at"]], "; round 2:", {k: hist[1][k] for k in ("accepted", "failed", "late")})


def test_cancelled_clients_do_not_break_later_runs(clusters):
    """A late client's task is cancelled, and its worker lives on: the next run on the same
    Ray must still get every client's update (run_strategy's bits, nobody failed). The first
    round's 1 s deadline falls while the fresh Ray's workers are still starting (each imports
    fed_helpers and torch as it starts: `ray_worker_setup`), so a cancel cannot cut an import short.
    """
    out = clusters["cancel"]
    if not out["first"][0]["late"]:
        pytest.skip("this machine trained every client of a fresh Ray within 1 s: nothing was cancelled")
    failed = {r["round"]: r["failed"] for r in out["second"]}
    assert all(r["failed"] == {} and r["accepted"] == r["sampled"] for r in out["second"]), failed
    assert out["same_bits"]
