"""Process faults during a backfill: the driver SIGKILLed at several points, a Ray worker killed
mid-write, a whole worker node removed mid-run. After each, the job completes by retrying or a
rerun completes it, every row is written exactly once (row count, id set and a checksum of the
vectors equal a fault-free reference), and a reader polling all along never sees a partial
snapshot.

The backfill runs as a subprocess driver (so it can be killed) that joins a running Ray cluster
by address: the session's cluster, or a two-node ``ray.cluster_utils.Cluster``. Driver crash
points come from the test-only ``RAYBC_TEST_CRASH_AT`` hook (``raybc.snapshots.crash_point``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from raybc.backfill import BackfillOptions, backfill
from raybc.data.synthetic import build_registry
from raybc.embeddings import read_matrix
from raybc.registry import Registry
from raybc.snapshots import CRASH_ENV, Snapshots, verify_snapshot
from raybc.storage import Storage

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DIMS = [8, 12, 16]
ROWS, PER_FILE, PER_PART = 20_000, 5_000, 1_000  # 20 parts: a write takes a few seconds with the pauses below

# The real backfill, as a separate driver joining a running cluster. The sink subclass (defined in
# __main__, so Ray ships it by value) drops a marker per write task -- pid and node -- and pauses,
# so the test can find a worker mid-write and kill it.
DRIVER = """
import json, os, sys, time
import ray
import raybc.backfill as bf

root, address, marker_dir, pause_s, compression = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]

class MarkingSink(bf.BackfillSink):
    def write(self, blocks, ctx):
        name = f"{os.getpid()}-{time.time_ns()}"
        with open(os.path.join(marker_dir, name + ".tmp"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        os.replace(os.path.join(marker_dir, name + ".tmp"), os.path.join(marker_dir, name))
        time.sleep(pause_s)
        return super().write(blocks, ctx)

bf.BackfillSink = MarkingSink
ray.init(address=address, log_to_driver=False)
opts = bf.BackfillOptions(rows_per_part=%d, compression=compression, progress=False, max_concurrency=2)
summary = bf.backfill(root, opts, echo=lambda _: None)
print("RESULT " + json.dumps({"committed": summary.committed}), flush=True)
""" % PER_PART


def start_driver(root: Storage, address: str, markers: Path, *, pause_s: float, compression: str, crash_at: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CRASH_ENV)}
    if crash_at:
        env[CRASH_ENV] = crash_at
    markers.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, root.uri(), address, str(markers), str(pause_s), compression],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(p: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return -999, out + err
    return p.returncode, out + err[-4000:]


def wait_for(cond, timeout: float = 120, what: str = "condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def markers_of(d: Path) -> list[Path]:
    return sorted((p for p in d.glob("*") if not p.name.endswith(".tmp")), key=lambda p: int(p.name.split("-")[1]))


def checksum(root: Storage, target: int) -> tuple[int, str]:
    """(rows, sha256 of the ids in order and their vectors) of the committed snapshot."""
    ids, mat = read_matrix(Snapshots(root).read_table(target, "items"))
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256(np.ascontiguousarray(ids[order]).tobytes())
    h.update(np.ascontiguousarray(mat[order]).tobytes())
    return len(ids), h.hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session):
    """A fault-free backfill of the same registry: (rows, checksum) per target."""
    root = Storage(str(tmp_path_factory.mktemp("reference") / "root"))
    make_registry(root)
    backfill(root, BackfillOptions(rows_per_part=PER_PART, progress=False), echo=lambda _: None)
    return {j: checksum(root, j) for j in (0, 1)}


def make_registry(root: Storage) -> Registry:
    return build_registry(root, dims=DIMS, rows=ROWS, entities=["items"], rows_per_file=PER_FILE, row_group_rows=PER_PART, seed=3)


def assert_exactly_once(root: Storage, reference: dict, *, run_id: str | None = None) -> None:
    reg = Registry(root)
    for j in (0, 1):
        v = verify_snapshot(reg, j, "items")
        assert v.ok, v
        assert checksum(root, j) == reference[j], f"as-v{j}: rows or vectors differ from the fault-free run"
        if run_id is not None:
            assert Snapshots(root).pointer(j, "items").run_id == run_id


class Reader(threading.Thread):
    """Reads every committed snapshot again and again (CURRENT -> manifest -> files): each read must
    be whole and consistent. Records any partial or inconsistent view it ever sees."""

    def __init__(self, root: Storage):
        super().__init__(daemon=True)
        self.root, self.stop, self.reads, self.problems = root, threading.Event(), 0, []
        self.runs: set[tuple[int, str]] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            for j in (0, 1):
                try:
                    snaps = Snapshots(self.root)
                    snap = snaps.get(j, "items")
                    ids, mat = read_matrix(snaps.read_table(j, "items"))
                    if not (len(ids) == snap.rows == ROWS and len(np.unique(ids)) == ROWS and mat.shape[1] == DIMS[j]):
                        self.problems.append(f"as-v{j} run {snap.run_id}: {len(ids)} rows, manifest {snap.rows}")
                    self.runs.add((j, snap.run_id))
                    self.reads += 1
                except Exception as exc:  # noqa: BLE001 - any failure to read a committed snapshot is a finding
                    self.problems.append(f"as-v{j}: {type(exc).__name__}: {exc}")
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert self.problems == [], self.problems[:5]
        assert self.reads > 0


@pytest.fixture
def committed_root(tmp_path, ray_session, reference):
    """A registry whose snapshots are committed once already (uncompressed run): readers have
    something to read while a second backfill (a new run: snappy) is crashed and rerun."""
    root = Storage(str(tmp_path / "root"))
    make_registry(root)
    first = backfill(root, BackfillOptions(rows_per_part=PER_PART, progress=False), echo=lambda _: None)
    return root, first.run_ids["items"]


def session_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def run_files(root: Storage, run: str, target: int) -> list[str]:
    return [n for n in root.list(f"snapshots/as-v{target}/items/from-v2/{run}") if not n.startswith(".")]


# --------------------------------------------------------------------------- driver crash


@pytest.mark.parametrize("point", ["before_write", "mid_write", "before_commit", "before_current", "between_commits"])
def test_driver_killed_then_rerun_commits_exactly_once_and_readers_never_see_a_partial_snapshot(
    committed_root, reference, tmp_path, point
):
    root, old_run = committed_root
    reader = Reader(root)
    reader.start()
    p = start_driver(
        root, session_address(), tmp_path / "markers", pause_s=0.3 if point == "mid_write" else 0.0,
        compression="snappy", crash_at=None if point == "mid_write" else point,
    )  # fmt: skip
    if point == "mid_write":
        wait_for(lambda: len(markers_of(tmp_path / "markers")) >= 3, what="three write tasks to start")
        os.kill(p.pid, signal.SIGKILL)
    code, out = finish(p)
    assert code == -signal.SIGKILL, f"the driver should have been killed at {point}: {out}"

    # what the crash left: every committed snapshot is still whole; which ones moved depends on the point
    new_run = [r for r in root.list("snapshots/as-v0/items/from-v2") if r != old_run]
    pointers = [Snapshots(root).pointer(j, "items").run_id for j in (0, 1)]
    if point == "between_commits":
        assert sorted(pointers) == sorted([old_run, new_run[0]]), "one target committed, the other not yet"
    else:
        assert pointers == [old_run, old_run], f"nothing may be committed by a crash at {point}"
    if point == "before_write":
        assert new_run == [] or run_files(root, new_run[0], 0) == []
    if point in ("before_commit", "before_current"):
        assert len([f for f in run_files(root, new_run[0], 0) if f.endswith(".parquet")]) == ROWS // PER_PART
    if point == "before_current":
        assert "manifest.json" in run_files(root, new_run[0], 0) + run_files(root, new_run[0], 1)

    again = backfill(root, BackfillOptions(rows_per_part=PER_PART, compression="snappy", progress=False), echo=lambda _: None)
    reader.finish()
    expected = ["as-v0/items", "as-v1/items"]
    if point == "between_commits":
        assert len(again.committed) == 1 and len(again.already_committed) == 1
    else:
        assert sorted(again.committed) == expected
    if point in ("before_commit", "before_current", "between_commits"):
        assert again.parts_run == 0, "every part was written before the crash: nothing is rewritten"
    if point == "mid_write":
        assert again.parts_resumed >= 1 and again.parts_run >= 1, "killed with some parts written, not all"
    assert_exactly_once(root, reference, run_id=again.run_ids["items"])
    assert {r for _, r in reader.runs} <= {old_run, again.run_ids["items"]}


# --------------------------------------------------------------------------- worker and node faults


def test_worker_killed_mid_write_is_retried_and_output_is_exactly_once(tmp_path, ray_session, reference):
    root = Storage(str(tmp_path / "root"))
    make_registry(root)
    markers = tmp_path / "markers"
    p = start_driver(root, session_address(), markers, pause_s=0.5, compression="none")
    victim = wait_for(lambda: markers_of(markers), what="a write task to start")[0]
    pid = int(victim.name.split("-")[0])
    killed_at_ns = time.time_ns()
    os.kill(pid, signal.SIGKILL)  # a Ray worker process of this test's own cluster, mid-write
    code, out = finish(p)
    assert code == 0, out
    assert "RESULT" in out
    started = [(int(m.name.split("-")[0]), int(m.name.split("-")[1])) for m in markers_of(markers)]
    # one marker per write task started: every part once, and the killed task exactly once more
    assert len(started) == ROWS // PER_PART + 1, f"{len(started)} write tasks for {ROWS // PER_PART} parts"
    rerun = [q for q, t in started if t > killed_at_ns]
    assert rerun and pid not in rerun, "the killed task ran again, in another worker"
    assert_exactly_once(root, reference)


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        cluster.shutdown()  # only this cluster's processes


def test_worker_node_removed_mid_backfill_then_job_or_rerun_completes_exactly_once(tmp_path, two_nodes, ray_session, reference):
    cluster, worker = two_nodes
    root = Storage(str(tmp_path / "root"))
    make_registry(root)
    markers = tmp_path / "markers"
    p = start_driver(root, cluster.address, markers, pause_s=0.5, compression="none")
    wait_for(lambda: any(m.read_text() == worker.node_id for m in markers_of(markers)), what="a write task on the worker node")
    cluster.remove_node(worker)  # the node's raylet and workers die mid-write
    cluster.add_node(num_cpus=1)  # a replacement joins, as an autoscaler would
    code, out = finish(p, timeout=150)
    outcome = "completed by retrying" if code == 0 else f"driver failed ({code}); rerun"
    if code != 0:
        rerun = backfill(root, BackfillOptions(rows_per_part=PER_PART, progress=False), echo=lambda _: None)
        assert sorted(rerun.committed + rerun.already_committed) == ["as-v0/items", "as-v1/items"]
    print(f"node removal: {outcome}")
    assert_exactly_once(root, reference)
