"""Reconcile: the pure plan, idempotent runs, a new version rebuilt for every older one with atomic
swaps under a reading loop, overlapping runs (one works, the other says why), and the job's
command line with its exit codes -- on the session's real Ray, over a local folder and real S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from raybc.backfill import BackfillOptions, backfill
from raybc.config import ReconcileJobConfig
from raybc.data.synthetic import build_registry, embedding_tables, random_aligner
from raybc.embeddings import read_matrix
from raybc.errors import ConfigError
from raybc.lease import Lease
from raybc.options import load_options, validate_options
from raybc.reconcile import LEASE_NAME, ReconcileOptions, plan_reconcile, reconcile
from raybc.registry import Registry
from raybc.snapshots import Snapshots, verify_snapshot
from raybc.storage import Storage

REPO = Path(__file__).resolve().parents[1]
DIMS = [8, 12, 16]
ROWS = 2_000
OPTS = ReconcileOptions(backfill=BackfillOptions(rows_per_part=500, progress=False))


# --------------------------------------------------------------------------- pure planning


def test_plan_marks_missing_stale_current_and_groups_by_targets():
    plan = plan_reconcile(
        versions=[0, 1, 2, 3],
        entities=["users", "items"],
        current_sources={(0, "items"): 3, (1, "items"): 2, (2, "items"): None, (0, "users"): 3, (1, "users"): 3, (2, "users"): 3},
    )
    assert plan.source == 3
    states = {i.key: i.state for i in plan.items}
    assert states == {
        "as-v0/items": "current", "as-v1/items": "stale", "as-v2/items": "missing",
        "as-v0/users": "current", "as-v1/users": "current", "as-v2/users": "current",
    }  # fmt: skip
    assert plan.backfill_groups() == [([1, 2], ["items"])]
    assert "rebuild" in plan.describe() and "up to date" in plan.describe()


def test_plan_reads_each_entity_once_even_when_targets_differ():
    plan = plan_reconcile(versions=[0, 1, 2], entities=["a", "b", "c"], current_sources={(0, "a"): 2, (1, "b"): 2})
    assert plan.backfill_groups() == [([0], ["b"]), ([0, 1], ["c"]), ([1], ["a"])]
    assert sorted(e for _, ents in plan.backfill_groups() for e in ents) == ["a", "b", "c"]


def test_plan_with_no_or_one_version_has_nothing_to_do_and_never_touches_newer_sources():
    assert plan_reconcile(versions=[], entities=["a"], current_sources={}).todo == []
    assert plan_reconcile(versions=[0], entities=["a"], current_sources={}).items == ()
    newer = plan_reconcile(versions=[0, 1], entities=["a"], current_sources={(0, "a"): 5})
    assert [i.state for i in newer.items] == ["newer"] and newer.todo == []


def test_options_refuse_backfill_targets_with_the_fix():
    with pytest.raises(ConfigError, match=r"backfill: Value error, to_versions set: reconcile decides .* \(use reconcile\.entities"):
        validate_options(ReconcileOptions, {"backfill": {"to_versions": [0]}}, source="test")


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("reconcile*.yaml")), ids=lambda p: p.name)
def test_shipped_reconcile_configs_validate(path):
    cfg = load_options(ReconcileJobConfig, file=path)
    assert cfg.root and cfg.retention is not None and cfg.reconcile.lease_ttl_s > 0


# --------------------------------------------------------------------------- running


def publish_next(reg: Registry, *, dim: int, rows: int, entities: list[str], seed: int) -> int:
    """Publish the next version with fresh embeddings, as the embedding team would."""
    k = reg.latest() + 1
    listing = {
        e: reg.write_embeddings(k, e, embedding_tables(rows, dim, rows_per_file=rows // 2 + 1, seed=seed + i))
        for i, e in enumerate(entities)
    }
    reg.publish(k, dim=dim, method="synthetic", aligner=random_aligner(dim, reg.get(k - 1).dim, seed=seed), embeddings=listing)
    return k


def snapshot_tree(root: Storage) -> dict[str, str]:
    """Every file under snapshots/ with the sha256 of its bytes: a rewrite to other bytes of the same
    length (a CURRENT pointer with a new timestamp, parts in another order) changes it."""
    return {rel: hashlib.sha256(root.read_bytes(rel)).hexdigest() for rel in root.walk_files("snapshots")}


def digest(table) -> str:
    ids, mat = read_matrix(table)
    order = np.argsort(ids, kind="stable")
    return hashlib.sha256(ids[order].tobytes() + np.ascontiguousarray(mat[order]).tobytes()).hexdigest()


@pytest.mark.cluster
@pytest.mark.slow
def test_reconcile_is_idempotent_and_swaps_every_current_atomically_for_a_new_version(storage_root, ray_session):
    reg = build_registry(storage_root, dims=DIMS, rows=ROWS, entities=["items", "users"], rows_per_file=1_000, seed=3)
    first = reconcile(storage_root, OPTS, echo=lambda _: None)
    assert first.status == "done"
    assert sorted(first.built) == ["as-v0/items", "as-v0/users", "as-v1/items", "as-v1/users"]
    assert len(first.backfills) == 1, "one pass over the newest embeddings for all targets"

    before = snapshot_tree(storage_root)
    second = reconcile(storage_root, OPTS, echo=lambda _: None)
    assert second.status == "nothing_to_do" and second.built == [] and second.backfills == []
    assert "nothing to do" in second.one_line() and "already built from v2" in second.one_line()
    assert snapshot_tree(storage_root) == before, "a second reconcile must write nothing"

    snaps = Snapshots(storage_root)
    old = digest(snaps.read_table(0, "items"))
    new_rows = ROWS + 500  # a different row count: a mixed read could not pass as either snapshot
    publish_next(reg, dim=20, rows=new_rows, entities=["items", "users"], seed=77)

    dry = reconcile(storage_root, OPTS, dry_run=True, echo=lambda _: None)
    assert dry.status == "dry_run" and len(dry.plan.todo) == 6 and snapshot_tree(storage_root) == before

    reads: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                t = Snapshots(storage_root).read_table(0, "items")
                reads.append((digest(t), t.num_rows, t.schema.field("embedding").type.list_size))
            except BaseException as exc:  # noqa: BLE001 - any failed read is a finding
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        while len(reads) < 2:  # the loop is reading the old snapshot before the swap
            threading.Event().wait(0.02)
        third = reconcile(storage_root, OPTS, echo=lambda _: None)
        n_after = len(reads)
        while len(reads) < n_after + 2:  # and the new one after it
            threading.Event().wait(0.02)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, f"a read during the swap failed: {errors[0]!r}"
    assert third.status == "done"
    assert sorted(third.built) == [f"as-v{j}/{e}" for j in range(3) for e in ("items", "users")]
    new = digest(Snapshots(storage_root).read_table(0, "items"))
    assert new != old
    seen = {d for d, _, _ in reads}
    assert seen <= {old, new}, "a read saw a mix of the old and the new snapshot"
    assert {old, new} <= seen
    assert all((n, dim) in {(ROWS, DIMS[0]), (new_rows, DIMS[0])} for _, n, dim in reads)

    for j in range(3):
        for e in ("items", "users"):
            assert snaps.pointer(j, e).source_version == 3
            assert verify_snapshot(reg, j, e).ok
    assert reconcile(storage_root, OPTS, echo=lambda _: None).status == "nothing_to_do"


@pytest.mark.cluster
def test_two_reconciles_started_together_one_works_the_other_says_why(tmp_path, ray_session):
    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=DIMS, rows=ROWS, entities=["items"], rows_per_file=1_000, seed=4)
    barrier = threading.Barrier(2)
    results = []

    def run() -> None:
        barrier.wait()
        results.append(reconcile(root, OPTS, echo=lambda _: None))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    statuses = sorted(r.status for r in results)
    assert statuses == ["busy", "done"]
    done = next(r for r in results if r.status == "done")
    busy = next(r for r in results if r.status == "busy")
    assert sorted(done.built) == ["as-v0/items", "as-v1/items"]
    assert busy.backfills == [] and busy.built == []
    assert "another run" in busy.reason and "does nothing" in busy.one_line()
    assert Lease(root, LEASE_NAME, ttl_s=1).current().released  # the winner gave it back


# --------------------------------------------------------------------------- the job


def job(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "jobs/reconcile.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.cluster
@pytest.mark.slow
def test_reconcile_job_exit_codes_and_one_line_summaries(tmp_path, ray_session):
    root = tmp_path / "root"
    build_registry(str(root), dims=DIMS, rows=ROWS, entities=["items"], rows_per_file=1_000, seed=5)
    address = ray_session.get_runtime_context().gcs_address  # join the session's Ray, not a new one
    base = ["--root", str(root), "--ray-address", address, "--rows-per-part", "1000"]

    dry = job([*base, "--dry-run"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "as-v0/items" in dry.stdout and "-> build" in dry.stdout
    assert dry.stdout.strip().splitlines()[-1].startswith("raybc reconcile: dry run")
    assert not (root / "snapshots").exists()

    held = Lease(Storage(str(root)), LEASE_NAME, ttl_s=600, owner="nightly-run", heartbeat=False)
    held.acquire()
    busy = job(base)
    held.release()
    assert busy.returncode == 3, busy.stdout + busy.stderr[-2000:]
    last = busy.stdout.strip().splitlines()[-1]
    assert last.startswith("raybc reconcile: busy") and "held by nightly-run" in last
    assert not (root / "snapshots").exists()

    summary = tmp_path / "summary.json"
    ok = job([*base, "--summary-json", str(summary)])
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("raybc reconcile: done") and "built=2" in last
    assert json.loads(summary.read_text())["built"] == ["as-v0/items", "as-v1/items"]

    again = job(base)
    assert again.returncode == 0
    assert again.stdout.strip().splitlines()[-1].startswith("raybc reconcile: nothing to do")

    bad = job(["--root", str(root), "--entity", "nope"])
    assert bad.returncode == 2 and "reconcile.entities: v2 has no embeddings for 'nope'" in bad.stderr


# --------------------------------------------------------------------------- losing the lease


@pytest.mark.cluster
@pytest.mark.parametrize("during", ["items", "users"], ids=["first-of-two-backfills", "last-backfill"])
def test_a_reconcile_that_loses_its_lease_stops_at_its_next_check_and_leaves_the_new_holder_alone(tmp_path, ray_session, during):
    """Another runner takes the lease over while a backfill of this reconcile is under way (to
    its clock the lease expired: this holder froze past its expiry). The backfill under way
    finishes -- the lease fences no storage write (raybc/lease.py), and what it commits is the run
    the new holder would build -- but nothing after it starts: no further backfill, no retention.
    The new holder's lease file is left as it wrote it."""
    from raybc.lease import LeaseLostError
    from raybc.reconcile import read_plan
    from raybc.retention import RetentionOptions
    from raybc.snapshots import snapshot_dir

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=DIMS, rows=ROWS, entities=["items", "users"], rows_per_file=1_000, seed=6)
    backfill(root, BackfillOptions(to_versions=[0], entities=["users"], rows_per_part=500, progress=False), echo=lambda _: None)
    assert read_plan(root).backfill_groups() == [([0, 1], ["items"]), ([1], ["users"])]  # two backfills, in this order
    leftover = f"{snapshot_dir(0, 'items')}/from-v1/run-crashed/part-0.parquet"
    root.write_atomic(leftover, b"partial")  # what retention removes at retention_s=0
    retention = RetentionOptions(retention_s=0, grace_s=0)
    taker = Lease(root, LEASE_NAME, ttl_s=600, owner="next-run", heartbeat=False, clock=lambda: time.time() + 120)
    taken = []

    def echo(line: str) -> None:
        if line.startswith(f"[raybc] {during}:") and not taken:  # that backfill is planned, about to write
            taken.append(taker.acquire())

    opts = ReconcileOptions(lease_ttl_s=60, backfill=BackfillOptions(rows_per_part=500, progress=False))
    with pytest.raises(LeaseLostError, match=r"taken over \(generation 2\)"):
        reconcile(root, opts, retention=retention, echo=echo)
    assert taken, "the take-over happened during the run"
    snaps = Snapshots(root)
    in_flight = ["as-v0/items", "as-v1/items"] if during == "items" else ["as-v1/users"]
    for key in ["as-v0/items", "as-v1/items", "as-v1/users"]:
        j, e = int(key[4]), key.split("/")[1]
        if key in in_flight or during == "users":  # the backfill under way, and those before it, committed
            assert snaps.pointer(j, e) is not None and snaps.pointer(j, e).source_version == 2, key
        else:
            assert snaps.pointer(j, e) is None, f"{key}: a backfill started after the lease was lost"
    assert root.exists(leftover), "retention ran after the lease was lost"
    cur = Lease(root, LEASE_NAME, ttl_s=1).current()
    assert (cur.generation, cur.owner, cur.released, cur.expires_at) == (2, "next-run", False, taken[0].expires_at)

    taker.release()  # the new holder is done: a reconcile now finishes what was left, and only that
    final = reconcile(root, opts, retention=retention, echo=lambda _: None)
    assert final.built == ([] if during == "users" else ["as-v1/users"])
    assert not root.exists(leftover)
    for j, e in [(0, "items"), (1, "items"), (0, "users"), (1, "users")]:
        assert verify_snapshot(Registry(root), j, e).ok
