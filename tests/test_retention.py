"""Retention: the pure rules (never CURRENT, grace after a swap, age of uncommitted runs), and a real
root over a local folder and S3 where superseded and crashed runs go and readers keep working."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from raybc.backfill import BackfillOptions
from raybc.data.synthetic import build_registry
from raybc.embeddings import make_table, write_table
from raybc.reconcile import ReconcileOptions, reconcile
from raybc.retention import (
    CurrentInfo, RetentionOptions, RunFolder, StoredEmbeddings, apply_retention, plan_embeddings, plan_retention,
)  # fmt: skip
from raybc.errors import RegistryError
from raybc.registry import FileEntry
from raybc.snapshots import Snapshots, snapshot_dir, verify_snapshot
from raybc.storage import Storage, json_bytes

T0 = 1_700_000_000.0
DAY = 86_400.0
OPTS = RetentionOptions(retention_s=7 * DAY, grace_s=3600)


def run(run_id: str, *, committed: bool = True, created: float = T0, source: int = 2) -> RunFolder:
    return RunFolder(0, "items", source, run_id, committed, created)


def decide(runs, current, now):
    return {d.run.run_id: (d.remove, d.reason) for d in plan_retention(runs, {(0, "items"): current}, now=now, options=OPTS)}


def test_current_is_never_removed_however_old():
    cur = CurrentInfo(2, "run-cur", committed_at=T0)
    out = decide([run("run-cur", created=T0 - 400 * DAY)], cur, now=T0 + 400 * DAY)
    assert out["run-cur"] == (False, "CURRENT names it")


def test_superseded_run_waits_for_both_the_grace_period_and_its_age():
    old = run("run-old", created=T0 - 30 * DAY, source=1)
    cur = CurrentInfo(2, "run-new", committed_at=T0)
    assert decide([old], cur, now=T0 + 60)["run-old"][0] is False  # swapped a minute ago: readers may hold it
    assert "within the grace period" in decide([old], cur, now=T0 + 60)["run-old"][1]
    assert decide([old], cur, now=T0 + 3601)["run-old"][0] is True
    young = run("run-young", created=T0 - DAY)  # superseded long ago, but younger than the retention
    assert decide([young], cur, now=T0 + 2 * DAY)["run-young"] == (False, f"superseded, but only {3 * DAY:.0f} s old")
    assert decide([young], cur, now=T0 + 7 * DAY)["run-young"][0] is True


def test_committed_run_newer_than_current_or_without_current_is_kept():
    cur = CurrentInfo(2, "run-cur", committed_at=T0)
    pending = run("run-pending", created=T0 + 5)  # manifest written, CURRENT not swapped yet
    assert decide([pending], cur, now=T0 + 30 * DAY)["run-pending"][0] is False
    assert decide([run("run-x", created=T0 - 30 * DAY)], None, now=T0 + 30 * DAY)["run-x"][0] is False


def test_uncommitted_run_goes_once_untouched_longer_than_the_retention():
    crashed = run("run-crashed", committed=False, created=T0)
    cur = CurrentInfo(2, "run-cur", committed_at=T0)
    assert decide([crashed], cur, now=T0 + DAY)["run-crashed"][0] is False  # may still be running
    assert decide([crashed], cur, now=T0 + 8 * DAY)["run-crashed"][0] is True
    # and without any CURRENT too: a crashed first backfill leaves only this
    assert decide([crashed], None, now=T0 + 8 * DAY)["run-crashed"][0] is True


@pytest.mark.cluster
def emb(version, *, created=T0 - 30 * DAY, superseded=T0, in_place=False, removed=False, has_files=True):
    return StoredEmbeddings(version, "items", created, superseded, in_place, removed, has_files)


def decide_emb(items, currents, now):
    return {d.item.version: (d.remove, d.reason) for d in plan_embeddings(items, {"items": currents}, now=now, options=OPTS)}


def test_old_embeddings_go_only_when_superseded_old_unused_and_raybcs_own():
    later = T0 + 30 * DAY
    newest = emb(3, created=T0, superseded=None)
    out = decide_emb([emb(1, superseded=T0 - DAY), emb(2), newest], [(0, 3), (1, 3), (2, 3)], now=later)
    assert out[1][0] is True and out[2][0] is True
    assert out[3] == (False, "the newest version's embeddings")
    assert decide_emb([newest], [], now=T0 + 400 * DAY)[3][0] is False  # the newest stays however old
    # a CURRENT still built from v2 keeps z_2 (audits and rebuilds read it)
    assert decide_emb([emb(2)], [(0, 3), (1, 2)], now=later)[2] == (False, "CURRENT of as-v1 was built from it")
    # superseded a minute ago: a backfill from v2 may still be reading
    assert "within the grace period" in decide_emb([emb(2)], [], now=T0 + 60)[2][1]
    assert decide_emb([emb(2, created=T0 - DAY)], [], now=T0 + DAY)[2][0] is False  # younger than the retention
    # in place: the owner's files, whatever their age
    assert "registered in place" in decide_emb([emb(2, in_place=True)], [], now=later)[2][1]
    # recorded as removed with files left (a crash part-way): finished; without files: nothing to do
    assert decide_emb([emb(2, removed=True)], [(0, 2)], now=T0)[2][0] is True
    assert decide_emb([emb(2, removed=True, has_files=False)], [], now=later) == {}


def test_retention_on_a_real_root_removes_superseded_and_crashed_runs_only(storage_root, ray_session):
    from test_reconcile import publish_next

    opts = ReconcileOptions(backfill=BackfillOptions(rows_per_part=1_000, progress=False))
    reg = build_registry(storage_root, dims=[8, 12, 16], rows=1_500, entities=["items"], rows_per_file=1_000, seed=8)
    reconcile(storage_root, opts, echo=lambda _: None)
    snaps = Snapshots(storage_root)
    superseded = {j: snaps.pointer(j, "items").run_id for j in (0, 1)}
    publish_next(reg, dim=20, rows=1_500, entities=["items"], seed=9)
    reconcile(storage_root, opts, echo=lambda _: None)
    current = {j: snaps.pointer(j, "items") for j in (0, 1, 2)}
    # a crashed backfill's leftovers: a part file and no manifest
    crashed = "snapshots/as-v0/items/from-v3/run-crashed0000000"
    storage_root.write_atomic(f"{crashed}/part-00000-00000.parquet", b"partial")
    old_dirs = [f"snapshots/as-v{j}/items/from-v2/{superseded[j]}" for j in (0, 1)]
    assert all(storage_root.walk_files(d) for d in old_dirs)

    now = time.time()
    fresh = apply_retention(storage_root, OPTS, now=now, echo=lambda _: None)
    assert fresh.removed == [], "everything is younger than the retention and inside the grace period"

    later = now + 8 * DAY
    dry = apply_retention(storage_root, OPTS, now=later, dry_run=True, echo=lambda _: None)
    assert sorted(dry.removed) == sorted([*old_dirs, crashed]) and all(storage_root.walk_files(d) for d in old_dirs)

    done = apply_retention(storage_root, OPTS, now=later, echo=lambda _: None)
    assert sorted(done.removed) == sorted([*old_dirs, crashed])
    assert not any(storage_root.walk_files(d) for d in [*old_dirs, crashed])
    for j in (0, 1, 2):
        p = snaps.pointer(j, "items")
        assert p == current[j]
        assert verify_snapshot(reg, j, "items").ok
        assert snaps.read_table(j, "items").num_rows == 1_500
    # z_2 was superseded by v3 a week ago and no CURRENT is built from it: it goes; z_3 stays
    assert done.removed_embeddings == ["embeddings/v2/items"], done.to_json()["embeddings"]
    assert not storage_root.walk_files("embeddings/v2/items") and storage_root.walk_files("embeddings/v3/items")
    assert set(reg.removed_embeddings(2)) == {"items"}
    with pytest.raises(RegistryError, match=r"z_2 of 'items' was removed by retention.*as-v2 snapshot.*backfill from v3"):
        reg.embeddings_storage(2, "items")
    from raybc.backfill import backfill

    with pytest.raises(RegistryError, match="removed by retention"):
        backfill(storage_root, BackfillOptions(progress=False, from_version=2, to_versions=[0]), echo=lambda _: None)
    reg2 = type(reg)(storage_root)
    assert reg2.aligner(2).in_dim == 16 and reg2.plan(3, [0]) is not None  # B_2 stays: v3's backfills need it
    again = apply_retention(storage_root, OPTS, now=later, echo=lambda _: None)
    assert again.removed == [] and again.removed_embeddings == []


def test_grace_period_protects_a_just_superseded_run_on_a_real_root(tmp_path):
    """Retention 0 s: uncommitted leftovers go at once, the run CURRENT just replaced stays."""
    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[3, 3], rows=4, entities=["items"], rows_per_file=4)  # retention needs a registry
    snaps = Snapshots(root)
    for run_id in ("run-a", "run-b"):  # two commits of as-v0/items from v1: run-b supersedes run-a
        rel = f"{snapshot_dir(0, 'items')}/from-v1/{run_id}/part-0.parquet"
        with root.open_output(rel) as f:
            write_table(f, make_table(np.arange(4), np.ones((4, 3), np.float32)))
        snaps.commit(target=0, entity="items", source=1, run_id=run_id, dim=3, parts=[FileEntry("part-0.parquet", 4, 0)])
        time.sleep(0.01)
    root.write_atomic(f"{snapshot_dir(0, 'items')}/from-v1/run-c/part-0.parquet", json_bytes({"partial": True}))
    res = apply_retention(root, RetentionOptions(retention_s=0, grace_s=3600), now=time.time() + 1, echo=lambda _: None)
    assert res.removed == [f"{snapshot_dir(0, 'items')}/from-v1/run-c"]
    kept = {d.run.run_id: d.reason for d in res.decisions if not d.remove}
    assert kept["run-b"] == "CURRENT names it" and "within the grace period" in kept["run-a"]
    assert isinstance(snaps.read_table(0, "items"), pa.Table)


def test_retention_command_dry_run_and_busy_exit_code(tmp_path):
    import os
    import subprocess
    import sys

    from raybc.lease import Lease
    from raybc.reconcile import LEASE_NAME

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[3, 3], rows=4, entities=["items"], rows_per_file=4)  # retention needs a registry
    leftover = f"{snapshot_dir(0, 'items')}/from-v1/run-crashed/part-0.parquet"
    root.write_atomic(leftover, b"partial")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "raybc.cli", "retention", "--root", root.uri(), "--retention-s", "0", *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    dry = cli("--dry-run")
    assert dry.returncode == 0 and "remove snapshots/as-v0/items/from-v1/run-crashed" in dry.stdout
    assert root.exists(leftover)
    with Lease(root, LEASE_NAME, ttl_s=600, owner="nightly-run", heartbeat=False):
        busy = cli()
    assert busy.returncode == 3 and "held by nightly-run" in busy.stdout and root.exists(leftover)
    done = cli()
    assert done.returncode == 0 and "removed_runs=1" in done.stdout and not root.exists(leftover)


def test_snapshots_listing_says_source_age_dtype_staleness_files_and_what_is_missing(tmp_path, ray_session, capsys):
    import json

    from test_reconcile import publish_next

    from raybc.backfill import backfill
    from raybc.cli import main

    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=[8, 12, 16], rows=600, entities=["items"], rows_per_file=400, seed=3)
    backfill(root, BackfillOptions(progress=False, to_versions=[0], output_dtype="float16"), echo=lambda _: None)
    publish_next(reg, dim=20, rows=600, entities=["items"], seed=4)  # v3: as-v0 is now stale
    assert main(["snapshots", "--root", root.uri(), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["newest_version"] == 3
    (snap,) = status["snapshots"]
    assert (snap["as_version"], snap["source_version"], snap["dtype"], snap["stale"], snap["rows"]) == (0, 2, "float16", True, 600)
    assert 0 <= snap["age_s"] < 600 and len(snap["files"]) == 2
    import pyarrow.parquet as pq  # the URIs are enough to read the snapshot without raybc

    assert sum(pq.read_table(u).num_rows for u in snap["files"]) == 600
    assert status["missing"] == [{"as_version": 1, "entity": "items"}, {"as_version": 2, "entity": "items"}]
    assert main(["snapshots", "--root", root.uri()]) == 0
    text = capsys.readouterr().out
    assert "as-v0/items: from v2, 600 rows x 8 float16" in text and "STALE (built from v2, newest v3)" in text
    assert "as-v2/items: MISSING" in text
    backfill(root, BackfillOptions(progress=False), echo=lambda _: None)
    status = json.loads((main(["snapshots", "--root", root.uri(), "--json"]), capsys.readouterr().out)[1])
    assert status["missing"] == [] and not any(s["stale"] for s in status["snapshots"]) and len(status["snapshots"]) == 3


@pytest.mark.cluster
def test_retention_refuses_while_a_reconcile_holds_the_lease_so_the_run_it_resumes_survives(tmp_path, ray_session, capsys):
    """A reconcile resumes an uncommitted run (what a driver killed before its commit leaves: every
    part written, no manifest, no CURRENT) -- exactly what retention at retention_s=0 removes. A
    ``raybc retention`` started while the reconcile holds the lease (it has planned to commit those
    parts) must refuse (exit 3) and remove nothing; the reconcile then commits the run it resumed."""
    from raybc import cli
    from raybc.backfill import backfill
    from raybc.registry import Registry
    from raybc.snapshots import MANIFEST, run_dir

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[4, 6, 8], rows=2_000, entities=["items"], rows_per_file=1_000, row_group_rows=500, seed=7)
    bopts = BackfillOptions(rows_per_part=500, progress=False)
    run_id = backfill(root, bopts, echo=lambda _: None).run_ids["items"]
    for j in (0, 1):  # back to the state of a crash before the commit
        root.remove(f"{run_dir(j, 'items', 2, run_id)}/{MANIFEST}")
        root.remove(f"{snapshot_dir(j, 'items')}/CURRENT")
    parts = {j: sorted(root.list(run_dir(j, "items", 2, run_id))) for j in (0, 1)}
    assert [len(v) for v in parts.values()] == [4, 4]
    codes = []

    def echo(line: str) -> None:
        if "4 done in an earlier attempt" in line:  # planned under the lease: these parts will be committed
            codes.append(cli.main(["retention", "--root", root.uri(), "--retention-s", "0", "--grace-s", "0"]))
            assert {j: sorted(root.list(run_dir(j, "items", 2, run_id))) for j in (0, 1)} == parts

    result = reconcile(root, ReconcileOptions(backfill=bopts), echo=echo)
    assert codes == [3], capsys.readouterr().out
    assert "raybc retention: busy" in capsys.readouterr().out
    assert result.status == "done" and sorted(result.built) == ["as-v0/items", "as-v1/items"]
    assert result.backfills[0].parts_run == 0 and result.backfills[0].parts_resumed == 4
    for j in (0, 1):
        assert Snapshots(root).pointer(j, "items").run_id == run_id
        assert verify_snapshot(Registry(root), j, "items").ok
    assert cli.main(["retention", "--root", root.uri(), "--retention-s", "0", "--grace-s", "0"]) == 0  # lease free again
    assert Snapshots(root).pointer(0, "items").run_id == run_id and root.list(run_dir(0, "items", 2, run_id))
