"""Process faults during a backfill: the driver SIGKILLed at several points, a Ray worker killed
mid-part and after a part but before its result returned, a whole worker node removed mid-run.
After each, the job completes by retrying or a rerun completes it, and every row is written
exactly once (row count, id set and a checksum of the vectors equal a fault-free reference). In
the driver crashes the new run writes float16 where the committed one holds float32, so every
vector differs: a reader polling all along must read, each time, exactly the old run's content or
the new run's -- never a partial snapshot nor a mix -- and must see both.

The backfill runs as a subprocess driver (so it can be killed) that joins a running Ray cluster
by address: the session's cluster, or a two-node ``ray.cluster_utils.Cluster``. Driver crash
points come from the test-only ``RAYBC_TEST_CRASH_AT`` hook (``raybc.snapshots.crash_point``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
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
# __main__, so Ray ships it by value) drops a marker per write task when it starts and when it
# returns (JSON: pid, node, the task's part keys), so the test can find a worker mid-write and
# kill it. ``stop`` makes the first task to get there (once per run, claimed by an exclusive
# file) announce itself as the victim and wait to be killed: "mid_part" after two of its part's
# four batches went into both targets' files (their temporaries hold rows, no footer yet),
# "after_part" after its part's files were renamed in place but before the task returns its
# result. The pause patches ``raybc.backfill.make_batch`` inside the worker for one task only.
DRIVER = """
import json, os, sys, time
import ray
import raybc.backfill as bf
from ray.data.block import BlockAccessor

root, address, marker_dir, pause_s, compression, dtype, stop = sys.argv[1:8]
pause_s = float(pause_s)

def mark(kind, parts):
    name = f"{kind}-{os.getpid()}-{time.time_ns()}"
    with open(os.path.join(marker_dir, "." + name), "w") as f:
        json.dump({"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "parts": parts}, f)
    os.replace(os.path.join(marker_dir, "." + name), os.path.join(marker_dir, name))

def claim():
    try:
        os.close(os.open(os.path.join(marker_dir, ".victim"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False

def stop_here(parts):
    mark("victim", parts)
    time.sleep(300)

class MarkingSink(bf.BackfillSink):
    def write(self, blocks, ctx):
        blocks = list(blocks)
        parts = [k for b in blocks for k in BlockAccessor.for_block(b).to_arrow().column("part").to_pylist()]
        mark("start", parts)
        time.sleep(pause_s)
        make_batch, calls = bf.make_batch, []

        def pausing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5 and claim():  # batches 0 and 1 are in both targets' files
                stop_here(parts)
            return make_batch(*args, **kwargs)

        if stop == "mid_part":
            bf.make_batch = pausing
        try:
            out = super().write(blocks, ctx)
        finally:
            bf.make_batch = make_batch
        if stop == "after_part" and claim():
            stop_here(parts)
        mark("done", parts)
        return out

bf.BackfillSink = MarkingSink

class MarkingRunner(bf.PipelineRunner):  # the pipeline's actor: say where each call runs
    def run(self, *args, **kwargs):
        mark("pipeline", [])
        return super().run(*args, **kwargs)

bf.PipelineRunner = MarkingRunner
ray.init(address=address, log_to_driver=False)
opts = bf.BackfillOptions(rows_per_part=%d, compression=compression, output_dtype=dtype, progress=False,
                          max_concurrency=2, batch_rows=%d if stop == "mid_part" else 65_536)
summary = bf.backfill(root, opts, echo=lambda _: None)
print("RESULT " + json.dumps({"committed": summary.committed}), flush=True)
""" % (PER_PART, PER_PART // 4)


def start_driver(
    root: Storage, address: str, markers: Path, *, pause_s: float, compression: str, dtype: str = "float32",
    stop: str = "none", crash_at: str | None = None,
):  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CRASH_ENV)}
    if crash_at:
        env[CRASH_ENV] = crash_at
    markers.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, root.uri(), address, str(markers), str(pause_s), compression, dtype, stop],
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


def marks(d: Path, kind: str) -> list[dict]:
    """The markers of one kind ("start", "done", "victim") in time order, each with its time "t"."""
    found = [(int(p.name.split("-")[2]), p) for p in d.glob(f"{kind}-*")]
    return [{**json.loads(p.read_text()), "t": t} for t, p in sorted(found)]


def content(table) -> tuple[int, str]:
    """(rows, sha256 of the ids in order and their vectors as float32) of a snapshot's table."""
    ids, mat = read_matrix(table)
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256(np.ascontiguousarray(ids[order]).tobytes())
    h.update(np.ascontiguousarray(mat[order]).tobytes())
    return len(ids), h.hexdigest()


def checksum(root: Storage, target: int) -> tuple[int, str]:
    return content(Snapshots(root).read_table(target, "items"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session):
    """Fault-free backfills of the same registry, float32 and float16 output: {dtype: {target:
    (rows, checksum)}}. The two differ in every vector, so a reader can tell their runs apart."""
    out = {}
    for dtype in ("float32", "float16"):
        root = Storage(str(tmp_path_factory.mktemp("reference") / "root"))
        make_registry(root)
        backfill(root, BackfillOptions(rows_per_part=PER_PART, output_dtype=dtype, progress=False), echo=lambda _: None)
        out[dtype] = {j: checksum(root, j) for j in (0, 1)}
    assert all(out["float32"][j] != out["float16"][j] for j in (0, 1))
    return out


def make_registry(root: Storage) -> Registry:
    return build_registry(root, dims=DIMS, rows=ROWS, entities=["items"], rows_per_file=PER_FILE, row_group_rows=PER_PART, seed=3)


def assert_exactly_once(root: Storage, reference: dict, *, dtype: str = "float32", run_id: str | None = None) -> None:
    reg = Registry(root)
    for j in (0, 1):
        v = verify_snapshot(reg, j, "items")  # every id once; vectors against the float64 transform
        assert v.ids_match and v.rows == v.input_rows == ROWS, v
        assert v.max_rel_error < (1e-5 if dtype == "float32" else 1e-3), v
        assert checksum(root, j) == reference[dtype][j], f"as-v{j}: rows or vectors differ from the fault-free run"
        if run_id is not None:
            assert Snapshots(root).pointer(j, "items").run_id == run_id


class Reader(threading.Thread):
    """Reads every committed snapshot again and again (CURRENT -> manifest -> files, the public
    ``read_table``). Each read must equal, row for row, the old run's whole content or the new
    run's (``contents``: {target: {checksum: "old" | "new"}}); anything else -- a partial
    snapshot, or files of both runs -- is recorded as a problem. ``seen`` holds (target, "old" |
    "new") for every whole read."""

    def __init__(self, root: Storage, contents: dict[int, dict[tuple[int, str], str]]):
        super().__init__(daemon=True)
        self.root, self.contents, self.stop, self.reads, self.problems = root, contents, threading.Event(), 0, []
        self.seen: set[tuple[int, str]] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            for j in (0, 1):
                try:
                    got = content(Snapshots(self.root).read_table(j, "items"))
                    which = self.contents[j].get(got)
                    if which is None:
                        self.problems.append(f"as-v{j}: {got[0]} rows matching neither the old run nor the new one")
                    else:
                        self.seen.add((j, which))
                    self.reads += 1
                except Exception as exc:  # noqa: BLE001 - any failure to read a committed snapshot is a finding
                    self.problems.append(f"as-v{j}: {type(exc).__name__}: {exc}")
            time.sleep(0.01)

    def wait_to_see(self, which: str, timeout: float = 60) -> None:
        wait_for(lambda: {(0, which), (1, which)} <= self.seen or self.problems, timeout, what=f"the reader to see the {which} run")

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert self.problems == [], self.problems[:5]
        assert self.seen == {(0, "old"), (1, "old"), (0, "new"), (1, "new")}, self.seen


@pytest.fixture
def committed_root(tmp_path, ray_session, reference):
    """A registry whose snapshots are committed once already (float32, uncompressed): readers have
    something to read while a second backfill (a new run: float16, snappy, so every vector differs)
    is crashed and rerun."""
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
    contents = {j: {reference["float32"][j]: "old", reference["float16"][j]: "new"} for j in (0, 1)}
    reader = Reader(root, contents)
    reader.start()
    reader.wait_to_see("old")
    p = start_driver(
        root, session_address(), tmp_path / "markers", pause_s=0.3 if point == "mid_write" else 0.0,
        compression="snappy", dtype="float16", crash_at=None if point == "mid_write" else point,
    )  # fmt: skip
    if point == "mid_write":
        wait_for(lambda: len(marks(tmp_path / "markers", "start")) >= 3, what="three write tasks to start")
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

    again = backfill(
        root, BackfillOptions(rows_per_part=PER_PART, compression="snappy", output_dtype="float16", progress=False),
        echo=lambda _: None,
    )  # fmt: skip
    reader.wait_to_see("new")
    reader.finish()  # whole snapshots only, old or new, never a mix; and both were seen
    expected = ["as-v0/items", "as-v1/items"]
    if point == "between_commits":
        assert len(again.committed) == 1 and len(again.already_committed) == 1
    else:
        assert sorted(again.committed) == expected
    if point in ("before_commit", "before_current", "between_commits"):
        assert again.parts_run == 0, "every part was written before the crash: nothing is rewritten"
    if point == "mid_write":
        assert again.parts_resumed >= 1 and again.parts_run >= 1, "killed with some parts written, not all"
    assert_exactly_once(root, reference, dtype="float16", run_id=again.run_ids["items"])


# --------------------------------------------------------------------------- worker and node faults


def run_dirs(root: Storage) -> dict[int, Path]:
    """The one run folder of each target (a fresh root, one run)."""
    return {j: Path(root.path(f"snapshots/as-v{j}/items/from-v2")) for j in (0, 1)}


def temporaries(folder: Path, part: str = "") -> list[Path]:
    return sorted(folder.glob(f"*/.{part or '*'}.tmp-*"))


@pytest.mark.parametrize("stop", ["mid_part", "after_part"])
def test_worker_killed_mid_part_or_before_its_result_returns_is_retried_and_output_is_exactly_once(
    tmp_path, ray_session, reference, stop
):
    """A Ray worker SIGKILLed with half a part in its output streams (temporaries holding rows,
    no footer), or with its part's files complete and renamed in place but its result not yet
    returned: Ray runs the task again in another worker, the job completes, every row lands once."""
    root = Storage(str(tmp_path / "root"))
    make_registry(root)
    markers = tmp_path / "markers"
    p = start_driver(root, session_address(), markers, pause_s=0.0, compression="none", stop=stop)
    victim = wait_for(lambda: marks(markers, "victim"), what="the victim task to stop")[0]
    (key,) = victim["parts"]
    part = key.split("/")[1]
    dirs = run_dirs(root)
    # the kill lands where it should: say what the victim's output looks like right now
    for j, d in dirs.items():
        done = list(d.glob(f"*/{part}"))
        if stop == "mid_part":
            (tmp,) = temporaries(d, part)
            assert done == [], f"as-v{j}: {part} must not be complete yet"
            # 500 of the part's 1,000 rows are in it: ids (8 bytes) and vectors (4 bytes a value)
            assert tmp.stat().st_size >= 500 * (8 + 4 * DIMS[j]), f"as-v{j}: {tmp.stat().st_size} bytes"
        else:
            assert len(done) == 1 and temporaries(d, part) == [], f"as-v{j}: {part} must be complete, in place"
            assert pq.read_metadata(done[0]).num_rows == PER_PART
    killed_at_ns = time.time_ns()
    os.kill(victim["pid"], signal.SIGKILL)  # a Ray worker process of this test's own cluster
    code, out = finish(p)
    assert code == 0, out
    assert "RESULT" in out
    starts, dones = marks(markers, "start"), marks(markers, "done")
    # the killed task never returned; its part ran again after the kill, in another worker
    assert not [m for m in dones if m["pid"] == victim["pid"] and key in m["parts"]]
    again = [m for m in starts if key in m["parts"] and m["t"] > killed_at_ns]
    assert again and all(m["pid"] != victim["pid"] for m in again), "the killed task ran again, in another worker"
    # every part's task returned once; the kill cost exactly one more task start
    returned = sorted(k for m in dones for k in m["parts"])
    assert returned == sorted(set(returned)) and len(returned) == ROWS // PER_PART
    assert len(starts) == ROWS // PER_PART + 1, f"{len(starts)} write tasks for {ROWS // PER_PART} parts"
    assert_exactly_once(root, reference)
    for d in dirs.values():
        assert temporaries(d) == [], "the dead writer's temporary is not left in the committed run"


def test_the_pipeline_actor_killed_mid_backfill_is_replaced_and_output_is_exactly_once(tmp_path, ray_session, reference):
    """The actor that runs Ray Data's executor (raybc.backfill.PipelineRunner) SIGKILLed while
    write tasks run: the driver starts another and calls it again (raybc.backfill.run_on_runner),
    the write tasks it had started die with their owner or finish, the new call writes every part
    again under the same names, and the job completes with every row once and no dead writer's
    temporary."""
    root = Storage(str(tmp_path / "root"))
    make_registry(root)
    markers = tmp_path / "markers"
    p = start_driver(root, session_address(), markers, pause_s=0.5, compression="none")
    wait_for(lambda: len(marks(markers, "start")) >= 3, what="three write tasks to start")
    (first,) = marks(markers, "pipeline")
    killed_at_ns = time.time_ns()
    os.kill(first["pid"], signal.SIGKILL)
    code, out = finish(p, timeout=240)
    assert code == 0, out
    pipelines = marks(markers, "pipeline")
    assert len(pipelines) == 2 and pipelines[1]["pid"] != first["pid"] and pipelines[1]["t"] > killed_at_ns, pipelines
    after = [m for m in marks(markers, "start") if m["t"] > killed_at_ns]
    assert len({k for m in after for k in m["parts"]}) == ROWS // PER_PART, "the new pipeline ran every part"
    assert_exactly_once(root, reference)
    for d in run_dirs(root).values():
        assert temporaries(d) == [], "a dead writer's temporary is not left in the committed run"


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


def test_worker_node_removed_mid_backfill_loses_its_tasks_which_rerun_elsewhere_exactly_once(
    tmp_path, two_nodes, ray_session, reference
):
    cluster, worker = two_nodes
    root = Storage(str(tmp_path / "root"))
    make_registry(root)
    markers = tmp_path / "markers"
    p = start_driver(root, cluster.address, markers, pause_s=0.5, compression="none")
    wait_for(lambda: any(m["node"] == worker.node_id for m in marks(markers, "start")), what="a write task on the worker node")
    cluster.remove_node(worker)  # the node's raylet and workers die mid-write
    cluster.add_node(num_cpus=1)  # a replacement joins, as an autoscaler would
    code, out = finish(p, timeout=150)
    assert code == 0, f"the job should complete by retrying the lost tasks: {out}"
    starts, dones = marks(markers, "start"), marks(markers, "done")
    there = {k for m in starts if m["node"] == worker.node_id for k in m["parts"]}
    lost = there - {k for m in dones if m["node"] == worker.node_id for k in m["parts"]}
    assert lost, "a part that started on the removed node never returned from it"
    for k in lost:  # and ran again on another node, where it returned
        assert [m for m in dones if k in m["parts"] and m["node"] != worker.node_id], k
    assert len({k for m in dones for k in m["parts"]}) == ROWS // PER_PART, "every part returned"
    assert_exactly_once(root, reference)
