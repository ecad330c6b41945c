"""Ray clusters of their own, in one subprocess (so that they never meet the Ray instance of
the other tests, and so that they are started once: each start costs seconds):

- notebook 07: the actor-pool executor on a two-node cluster (two raylets on this machine)
  gives the same weights as on one node and as the in-process floor;
- notebooks 07 and 08: a node that leaves the cluster mid-run costs clients, not the run, on the
  actor pool (its actor dies; the one left carries on) and on Ray tasks (retried elsewhere);
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
    return hashlib.sha256(fh.flat_weights(model).numpy().tobytes()).hexdigest()

train, test = fh.load_dataset("synthetic"), fh.load_dataset("synthetic", train=False)
out = {"pool": {}, "leave": {}, "cancel": {}}

# --- 07: the actor pool, in process (the floor), on two nodes, on one node --------------------
pool_task = fh.FedTask(train, test, fh.make_partition("quantity", train[1].numpy(), 12, seed=1, beta=0.5),
                       fh.TrainConfig(batch_size=16), client_fraction=0.5, seed=3)
pool = out["pool"]
pool["floor"] = digest(fh.run_rounds(pool_task, 2, progress=False)[0])

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
worker = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="ERROR")
cluster.wait_for_nodes()
x_ref, y_ref = ray.put(train[0].numpy()), ray.put(train[1].numpy())
trainers = [fh.ClientTrainer.remote(x_ref, y_ref, "2nn", fh.train_client) for _ in range(2)]
pool["nodes"] = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
pool["trainer_nodes"] = len(set(ray.get([t.node_id.remote() for t in trainers])))
for t in trainers:
    ray.kill(t)
pool["two_nodes"] = digest(fh.run_rounds(pool_task, 2, executor=fh.ActorPool(num_workers=2), progress=False)[0])

# --- 07/08: the worker node leaves during round 2, on each Ray executor -----------------------
leave_task = fh.FedTask(train, (test[0][:200], test[1][:200]),
                        fh.make_partition("shards", train[1].numpy(), 6, seed=0, shards_per_client=2),  # ~1,000 each
                        fh.TrainConfig("simple", epochs=2, batch_size=10), seed=3)
faults = {"crash": 0.2}
out["leave"]["faults"] = faults
for name, executor in (("actor-pool", fh.ActorPool(num_workers=2)), ("ray-tasks", fh.RayTasks())):
    leave = out["leave"][name] = {"ended_at": [], "nodes_before": len([n for n in ray.nodes() if n["Alive"]])}
    t0 = time.perf_counter()

    def remove(node=worker, leave=leave, t0=t0):
        time.sleep(0.1)
        leave["removed_at"] = time.perf_counter() - t0
        cluster.remove_node(node)
        leave["removed_by"] = time.perf_counter() - t0

    remover = threading.Thread(target=remove)

    def on_round(history, leave=leave, t0=t0, remover=remover):
        leave["ended_at"].append(time.perf_counter() - t0)
        if len(history) == 1:
            remover.start()

    model, leave["history"] = fh.run_rounds(leave_task, 4, executor=executor,
                                            policy=fh.Resilient(deadline_s=120, faults=faults),
                                            callbacks=[on_round], progress=False)
    remover.join()
    leave["finite"] = bool(torch.isfinite(fh.flat_weights(model)).all())
    leave["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
    if name == "actor-pool":  # the worker node comes back for the next executor
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
ray.shutdown()
cluster.shutdown()

# --- 08: a fresh Ray; the first round's deadline falls while its workers are starting ---------
fh.init_ray(2)
small = (train[0][:800], train[1][:800])
cancel_task = fh.FedTask(small, test, fh.make_partition("shards", small[1].numpy(), 8, seed=0, shards_per_client=2),
                         fh.TrainConfig("simple", batch_size=25), client_fraction=0.75, seed=5)
cancel = out["cancel"]
_, cancel["first"] = fh.run_rounds(cancel_task, 1, executor=fh.RayTasks(), policy=fh.Resilient(deadline_s=1.0),
                                   progress=False)
ref, _ = fh.run_rounds(cancel_task, 2, progress=False)
model, cancel["second"] = fh.run_rounds(cancel_task, 2, executor=fh.RayTasks(),
                                        policy=fh.Resilient(deadline_s=None), progress=False)
cancel["same_bits"] = torch.equal(fh.flat_weights(model), fh.flat_weights(ref))

pool["one_node"] = digest(fh.run_rounds(pool_task, 2, executor=fh.ActorPool(num_workers=2), progress=False)[0])
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


def crashed_in(row: dict, faults: dict) -> dict[int, str]:
    """The clients that fault injection made crash in this round (the run's seed is 3)."""
    return fh.assign_faults(row["sampled"], 3, row["round"], **faults)


@pytest.mark.parametrize("executor", ["actor-pool", "ray-tasks"])
def test_a_node_that_leaves_mid_run_costs_clients_not_the_run(clusters, executor):
    out, faults = clusters["leave"][executor], clusters["leave"]["faults"]
    assert out["nodes_before"] == 2 and out["nodes_after"] == 1, out
    assert out["finite"]
    hist = out["history"]
    assert [r["round"] for r in hist] == [1, 2, 3, 4]
    for r in hist:
        sampled = set(r["sampled"])
        groups = [set(r["accepted"]), {int(k) for k in r["failed"]}, set(r["late"]), {int(k) for k in r["rejected"]}]
        assert set().union(*groups) == sampled and sum(map(len, groups)) == len(sampled), r
        assert all(str(k) in r["failed"] for k in crashed_in(r, faults)), r  # injected crashes: filed as failures
        assert math.isfinite(r["loss"])
    for r in hist[2:]:  # after the node left, the head node alone carries on and loses nobody else
        assert r["accepted"] and r["late"] == [] and set(r["failed"]) == {str(k) for k in crashed_in(r, faults)}, r
    print(executor, "node removed at", out["removed_at"], "-", out.get("removed_by"), "s; rounds ended at",
          [round(t, 2) for t in out["ended_at"]], "; round 2:", {k: hist[1][k] for k in ("accepted", "failed", "late")})


def test_cancelled_clients_do_not_break_later_runs(clusters):
    """A late client's task is cancelled, and its worker lives on: the next run on the same
    Ray must still get every client's update (the in-process bits, nobody failed). The first
    round's 1 s deadline falls while the fresh Ray's workers are still starting (each imports
    fed_helpers and torch as it starts: `ray_worker_setup`), so a cancel cannot cut an import short.
    """
    out = clusters["cancel"]
    if not out["first"][0]["late"]:
        pytest.skip("this machine trained every client of a fresh Ray within 1 s: nothing was cancelled")
    failed = {r["round"]: r["failed"] for r in out["second"]}
    assert all(r["failed"] == {} and r["accepted"] == r["sampled"] for r in out["second"]), failed
    assert out["same_bits"]
