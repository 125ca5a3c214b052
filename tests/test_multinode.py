"""The backfill across several Ray nodes on one machine (``ray.cluster_utils.Cluster``): its tasks run
on every node, and its snapshots equal a single-node run's (same ids, vectors within 1e-6).

The multi-node run is a subprocess that joins the cluster by address: this pytest process already
has the session's own local Ray, which must stay as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raybc.backfill import BackfillOptions, backfill
from raybc.data.synthetic import build_registry
from raybc.embeddings import read_matrix
from raybc.snapshots import Snapshots, verify_snapshot
from raybc.storage import Storage

REPO = Path(__file__).resolve().parents[1]
DIMS = [8, 12, 16]
ROWS = 2_000
ROWS_PER_PART = 250  # 8 parts: enough tasks for both single-CPU nodes to take some

# Runs the real backfill on the cluster. The sink subclass only records the node each write task
# ran on (defined in __main__, so Ray ships it to the workers by value); the pipeline's task, where
# ``on_write_complete`` runs, leaves them in a file for the driver to print.
DRIVER = """
import json, sys
import ray
import raybc.backfill as bf

root, address, rows_per_part, nodes_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

class NodeRecordingSink(bf.BackfillSink):
    def write(self, blocks, ctx):
        node = ray.get_runtime_context().get_node_id()
        return [dict(r, node=node) for r in super().write(blocks, ctx)]

    def on_write_complete(self, write_result):
        with open(nodes_file, "w") as f:
            json.dump([r["node"] for rs in write_result.write_returns for r in rs], f)
        super().on_write_complete(write_result)

bf.BackfillSink = NodeRecordingSink
ray.init(address=address, log_to_driver=False)
summary = bf.backfill(root, bf.BackfillOptions(rows_per_part=rows_per_part, progress=False))
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
nodes = json.load(open(nodes_file))
print("RESULT " + json.dumps({"committed": summary.committed, "task_nodes": nodes, "cluster_nodes": alive}))
"""


def table_by_id(root: Storage, target: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mat = read_matrix(Snapshots(root).read_table(target, "items"))
    order = np.argsort(ids, kind="stable")
    return ids[order], mat[order]


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()  # only this cluster's processes; the session's Ray is untouched


@pytest.mark.cluster
@pytest.mark.slow
def test_backfill_across_two_nodes_equals_the_single_node_run(tmp_path, two_node_cluster, ray_session):
    single = Storage(str(tmp_path / "single"))
    multi = Storage(str(tmp_path / "multi"))
    for root in (single, multi):  # the same registry twice (same seed, same data)
        build_registry(root, dims=DIMS, rows=ROWS, entities=["items"], rows_per_file=500, row_group_rows=ROWS_PER_PART, seed=11)

    one = backfill(single, BackfillOptions(rows_per_part=ROWS_PER_PART, progress=False), echo=lambda _: None)
    assert one.committed == ["as-v0/items", "as-v1/items"]

    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, multi.uri(), two_node_cluster.address, str(ROWS_PER_PART), str(tmp_path / "nodes.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["committed"] == ["as-v0/items", "as-v1/items"]
    assert len(result["cluster_nodes"]) == 2
    assert len(result["task_nodes"]) == ROWS // ROWS_PER_PART, "one write task per part"
    assert set(result["task_nodes"]) == set(result["cluster_nodes"]), "the parts must run on both nodes"

    from raybc.registry import Registry

    for j in (0, 1):
        ids_1, mat_1 = table_by_id(single, j)
        ids_n, mat_n = table_by_id(multi, j)
        assert np.array_equal(ids_1, ids_n) and np.array_equal(ids_1, np.arange(ROWS))
        assert mat_1.shape == mat_n.shape == (ROWS, DIMS[j])
        np.testing.assert_allclose(mat_n, mat_1, rtol=0, atol=1e-6)
        assert verify_snapshot(Registry(multi), j, "items").ok
