"""The Ray Data backfill: exactly-once snapshots, idempotent reruns, resume after a crash.

Planning is pure and tested without Ray; the pipeline runs on the session's real local Ray
cluster over a local folder and a real S3 server on loopback.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybc.backfill import (
    BackfillOptions,
    Part,
    backfill,
    group_parts,
    id_overlap_groups,
    part_timing,
    plan_parts,
    rows_per_task,
    run_fingerprint,
)
from raybc.data.synthetic import build_registry, random_aligner
from raybc.embeddings import read_matrix
from raybc.errors import InputDataError
from raybc.registry import Registry
from raybc.snapshots import Snapshots, verify_snapshot

DIMS = [16, 24, 32, 48, 64]


# --------------------------------------------------------------------------- pure planning


def test_plan_parts_splits_at_row_groups_and_is_deterministic():
    files = [("a.parquet", [10, 10, 10, 10, 5]), ("b.parquet", [50]), ("c.parquet", [])]
    parts = plan_parts("items", files, rows_per_part=20)
    assert [(p.file, p.rg_start, p.rg_stop, p.first_row, p.rows) for p in parts] == [
        ("a.parquet", 0, 2, 0, 20),
        ("a.parquet", 2, 4, 20, 20),
        ("a.parquet", 4, 5, 40, 5),
        ("b.parquet", 0, 1, 0, 50),  # a row group larger than a part stays whole
    ]
    assert parts == plan_parts("items", files, rows_per_part=20)
    assert len({p.name for p in parts}) == len(parts)
    assert sum(p.rows for p in parts) == 95


def test_small_parts_share_write_tasks_in_order_and_slots_stay_busy():
    files = [(f"f{i}.parquet", [125]) for i in range(16)] + [("big.parquet", [900]), ("tail.parquet", [100])]
    parts = plan_parts("items", files, rows_per_part=1_000)
    total = sum(p.rows for p in parts)
    # 2 slots: two waves of tasks -> ceil(3000 / 4) = 750 rows per task
    per_task = rows_per_task(total, BackfillOptions(rows_per_part=1_000), cluster_cpus=2)
    assert per_task == 750
    groups = group_parts(parts, per_task)
    assert [p for g in groups for p in g] == parts  # every part once, in order
    assert [sum(p.rows for p in g) for g in groups] == [750, 750, 500, 900, 100]  # the 900-row part goes alone
    assert group_parts(parts, per_task) == groups
    # many slots: one part per task; a cap from max_concurrency or cpus_per_task; rows_per_part bounds it
    assert rows_per_task(total, BackfillOptions(rows_per_part=1_000), cluster_cpus=64) == 24
    assert rows_per_task(total, BackfillOptions(rows_per_part=1_000, max_concurrency=1), cluster_cpus=64) == 1_000
    assert rows_per_task(total, BackfillOptions(rows_per_part=1_000, cpus_per_task=2), cluster_cpus=2) == 1_000
    assert rows_per_task(total, BackfillOptions(), cluster_cpus=0) == 1  # no CPUs known yet: a part per task
    assert all(len(g) == 1 for g in group_parts(parts, 1))


def test_part_timing_orders_parts_by_start_and_weighs_tenths_by_rows():
    """Parts as tasks return them (any order): percentiles of a part's rows/s; per tenth of the
    parts by start time, rows/s as total rows over total seconds."""
    results = [{"rows": 1000, "seconds": 1.0 if i < 10 else 4.0, "started": 100.0 + i, "cpu_user_s": 0.002 if i < 10 else 0.004, "cpu_system_s": 0.001} for i in range(20)]
    t = part_timing(results[::-1])
    assert t["parts"] == 20 and [x["parts"] for x in t["timeline"]] == [2] * 10
    assert [x["rows_per_s"] for x in t["timeline"]] == [1000.0] * 5 + [250.0] * 5  # the run slowed halfway
    assert [x["mean_part_seconds"] for x in t["timeline"]] == [1.0] * 5 + [4.0] * 5
    assert t["part_rows_per_s"] == [250.0, pytest.approx(625.0), 1000.0]
    assert t["cpu_us_per_row"] == {"user": pytest.approx(3.0), "system": pytest.approx(1.0)}
    # each tenth's own CPU per row: the slow half cost twice the user time per row
    assert [x["cpu_us_per_row"]["user"] for x in t["timeline"]] == [pytest.approx(2.0)] * 5 + [pytest.approx(4.0)] * 5
    uneven = part_timing([{"rows": 10, "seconds": 1.0, "started": 0}, {"rows": 30, "seconds": 1.0, "started": 1}], slices=1)
    assert uneven["timeline"] == [{"parts": 2, "rows_per_s": 20.0, "mean_part_seconds": 1.0, "cpu_us_per_row": {"user": 0.0, "system": 0.0}}]
    assert part_timing([]) == {} and len(part_timing(results[:3])["timeline"]) == 3


def test_id_overlap_groups():
    assert id_overlap_groups([(0, 9), (10, 19), (20, 29)]) == []
    assert id_overlap_groups([(0, 9), (5, 19), (20, 29), (25, 30)]) == [[0, 1], [2, 3]]
    assert id_overlap_groups([("a", "m"), ("n", "z")]) == []
    assert id_overlap_groups([(0, 9), None, (20, 29)]) == [[0, 1, 2]]  # unknown ranges: check all
    assert id_overlap_groups([None]) == []


def test_run_fingerprint_changes_with_what_determines_output():
    base = {"source": 4, "inputs": [("a", 10, "t1")], "compression": "none"}
    assert run_fingerprint(base) == run_fingerprint(dict(base))
    assert run_fingerprint(base) != run_fingerprint({**base, "inputs": [("a", 10, "t2")]})
    assert run_fingerprint(base) != run_fingerprint({**base, "compression": "zstd"})
    assert run_fingerprint(base).startswith("run-")


def test_part_names_are_stable():
    p = Part("items", "part-00003.parquet", 3, 4, 6, 100, 50)
    assert p.name == "part-00003-00004.parquet"


# --------------------------------------------------------------------------- the pipeline


def tree(storage) -> dict[str, tuple]:
    """Every file below the root: the sha256 of its bytes (any change of content, whatever its size),
    and its mtime (local) or ETag (S3), which a rewrite of the very same bytes changes too."""
    out = {}
    for rel in storage.walk_files():
        info = storage.fs.info(storage.path(rel))
        stamp = info.get("mtime") or info.get("ETag") or info.get("LastModified")
        out[rel] = (hashlib.sha256(storage.read_bytes(rel)).hexdigest(), stamp)
    return out


@pytest.mark.cluster
@pytest.mark.slow
def test_backfill_100k_rows_every_id_once_and_second_run_writes_nothing(storage_root, ray_session):
    rows = 100_000
    reg = build_registry(
        storage_root, dims=DIMS, rows=rows, entities=["items"], rows_per_file=30_000, row_group_rows=10_000, seed=5
    )
    opts = BackfillOptions(rows_per_part=20_000, progress=False)
    summary = backfill(storage_root, opts)
    assert summary.committed == [f"as-v{j}/items" for j in range(4)]
    assert summary.input_rows == rows and summary.rows_written == 4 * rows
    assert summary.parts_run == 7  # files of 30k/30k/30k/10k rows in 20k-row parts: 2+2+2+1
    assert 1 <= summary.tasks <= summary.parts_run
    timing = summary.part_timing  # every part's own timing came back from its task
    assert timing["parts"] == 7 and sum(t["parts"] for t in timing["timeline"]) == 7
    assert 0 < timing["part_rows_per_s"][0] <= timing["part_rows_per_s"][2] and "rows/s per part" in summary.table()
    assert timing["cpu_us_per_row"]["user"] > 0 and "CPU per row" in summary.table()

    snaps = Snapshots(storage_root)
    for j in range(4):
        v = verify_snapshot(reg, j, "items")
        assert v.ids_match, f"as-v{j}: ids differ from the input's"
        assert v.rows == v.input_rows == rows
        assert v.max_rel_error < 1e-5, f"as-v{j}: {v.max_rel_error}"
        snap = snaps.get(j, "items")
        assert (snap.source_version, snap.dim, snap.rows) == (4, DIMS[j], rows)
        ids, mat = read_matrix(snaps.read_table(j, "items"))
        assert np.array_equal(np.sort(ids), np.arange(rows)) and mat.shape == (rows, DIMS[j])

    before = tree(storage_root)
    again = backfill(storage_root, opts)
    assert again.nothing_to_do and again.parts_run == 0
    assert "nothing to do" in again.table()
    assert tree(storage_root) == before, "a second run must write nothing"


@pytest.mark.cluster
def test_rerun_after_crash_resumes_and_commits_each_row_once(tmp_path, ray_session):
    from raybc.storage import Storage

    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=DIMS[:3], rows=12_000, entities=["items"], rows_per_file=4_000, row_group_rows=2_000)
    opts = BackfillOptions(rows_per_part=4_000, progress=False)
    first = backfill(root, opts)
    run = first.run_ids["items"]
    # Simulate a crash after some data files, before any commit: no manifests, no CURRENT,
    # one part missing for one target, and a stray temporary from the killed writer.
    for j in (0, 1):
        root.remove(f"snapshots/as-v{j}/items/CURRENT")
        root.remove(f"snapshots/as-v{j}/items/from-v2/{run}/manifest.json")
    root.remove(f"snapshots/as-v0/items/from-v2/{run}/part-00001-00000.parquet")
    (tmp_path / f"root/snapshots/as-v0/items/from-v2/{run}/.part-00001-00000.parquet.tmp-dead").write_bytes(b"partial")
    assert Snapshots(root).pointer(0, "items") is None

    resumed = backfill(root, opts)
    assert resumed.parts_run == 1 and resumed.parts_resumed == 2
    assert sorted(resumed.committed) == ["as-v0/items", "as-v1/items"]
    for j in (0, 1):
        v = verify_snapshot(reg, j, "items")
        assert v.ok, v
        man = root.read_json(f"snapshots/as-v{j}/items/from-v2/{run}/manifest.json")
        assert [f["path"] for f in man["files"]] == [f"part-0000{i}-00000.parquet" for i in range(3)]


@pytest.mark.cluster
def test_subset_of_targets_and_entities_and_string_ids(tmp_path, ray_session):
    from raybc.storage import Storage

    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=DIMS[:4], rows=3_000, entities=["users", "items"], id_kind="string", rows_per_file=1_000)
    s = backfill(root, BackfillOptions(to_versions=[1], entities=["users"], progress=False))
    assert s.committed == ["as-v1/users"]
    assert Snapshots(root).pointer(0, "users") is None and Snapshots(root).pointer(1, "items") is None
    v = verify_snapshot(reg, 1, "users")
    assert v.ok
    t = Snapshots(root).read_table(1, "users")
    assert t.schema.field("id").type == "string" and t.column("id")[0].as_py().startswith("u")


@pytest.mark.cluster
def test_snapshot_is_readable_as_ray_dataset_and_plain_parquet(storage_root, ray_session):
    """read_snapshot / read_snapshot_dataset given the root as a URI string (and, on S3, the
    endpoint in StorageOptions): the committed rows, the same as the snapshot's own reader."""
    from raybc.snapshots import read_snapshot, read_snapshot_dataset

    root = storage_root
    build_registry(root, dims=DIMS[:3], rows=2_500, entities=["items"], rows_per_file=1_000)
    backfill(root, BackfillOptions(progress=False))
    uri, options = root.uri(), (root.options if not root.is_local else None)
    assert isinstance(uri, str) and uri.startswith("s3://" if options else "/")
    table = read_snapshot(uri, "items", 0, options=options)
    ds = read_snapshot_dataset(uri, "items", 0, options=options)
    assert ds.count() == table.num_rows == 2_500
    ids, mat = read_matrix(table)
    ref_ids, ref = read_matrix(Snapshots(root).read_table(0, "items"))
    assert np.array_equal(ids, ref_ids) and np.array_equal(mat, ref) and len(np.unique(ids)) == 2_500
    assert verify_snapshot(Registry(root), 0, "items").ok
    snap = Snapshots(root).get(0, "items")
    with root.open_input(snap.files[0]) as f:
        plain = pq.read_table(f)  # any Parquet reader, no raybc
    assert plain.schema.field("embedding").type.list_size == DIMS[0]
    assert Registry(root).get(2).embeddings["items"].rows == 2_500


@pytest.mark.cluster
def test_many_small_files_share_write_tasks_and_every_row_lands_once(tmp_path, ray_session):
    from raybc.storage import Storage

    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=DIMS[:3], rows=12_000, entities=["items"], rows_per_file=1_000)
    summary = backfill(root, BackfillOptions(max_concurrency=1, progress=False))
    assert (summary.parts_run, summary.tasks) == (12, 2)  # one slot: two waves of 6 parts
    assert "write tasks" in summary.table()
    for j in (0, 1):
        v = verify_snapshot(reg, j, "items")
        assert v.ids_match and v.rows == 12_000 and v.max_rel_error < 1e-5
        assert len(Snapshots(root).get(j, "items").manifest["files"]) == 12  # still one file per part


@pytest.mark.cluster
def test_float16_output_halves_the_bytes_within_half_precision(tmp_path, ray_session):
    from raybc.storage import Storage

    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=DIMS[:3], rows=5_000, entities=["items"], rows_per_file=5_000)
    full = backfill(root, BackfillOptions(to_versions=[0], progress=False))
    snaps = Snapshots(root)
    ref_bytes = sum(f["bytes"] for f in snaps.get(0, "items").manifest["files"])
    _, ref = read_matrix(snaps.read_table(0, "items"))
    half = backfill(root, BackfillOptions(to_versions=[0], output_dtype="float16", progress=False))
    assert half.run_ids["items"] != full.run_ids["items"]  # a different output is a different run
    snap = snaps.get(0, "items")
    assert snap.manifest["dtype"] == "float16"
    table = snaps.read_table(0, "items")
    assert table.schema.field("embedding").type.value_type == "halffloat"
    _, got = read_matrix(table)
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-3  # float16 keeps ~3 decimal digits
    assert sum(f["bytes"] for f in snap.manifest["files"]) < 0.6 * ref_bytes
    assert verify_snapshot(reg, 0, "items").max_rel_error < 1e-3


def test_half_conversion_has_numpy_bits_and_finite_check_survives_float32_overflow():
    from raybc.backfill import HALF_MAX, _to_half
    from raybc.embeddings import check_finite

    rng = np.random.default_rng(0)
    mat = (rng.standard_normal((2_000, 64)) * np.logspace(-8, 4, 64)).astype(np.float32)
    mat[0, :4] = [65519.0, -65519.0, 6e-8, 1e-9]  # rounds to max, to -max, subnormal, to zero
    out = _to_half(mat, np.empty(mat.shape, np.float16), pa.array(np.arange(2_000)), where="t", row_offset=0)
    assert np.array_equal(out.view(np.uint16), mat.astype(np.float16).view(np.uint16))
    assert out[0, 0] == HALF_MAX and out[0, 1] == -HALF_MAX
    mat[5, 9] = 65520.0  # the first float32 that float16 rounds to Inf
    with pytest.raises(InputDataError, match=r"t: row 105 \(id 5\) has a value of magnitude 6.552e\+04"):
        _to_half(mat, np.empty(mat.shape, np.float16), pa.array(np.arange(2_000)), where="t", row_offset=100)
    # finite rows whose float32 sum overflows are not bad input; a real Inf among them is
    big = np.full((10, 8), 3e38, np.float32)
    check_finite(big, pa.array(np.arange(10)), source="f", row_offset=0)
    big[7, 3] = np.inf
    with pytest.raises(InputDataError, match=r"f: row 7 \(id 7\) holds Inf \(1 bad row in this batch\)"):
        check_finite(big, pa.array(np.arange(10)), source="f", row_offset=0)


def test_a_published_embedding_file_rewritten_in_place_is_refused(storage_root, ray_session):
    """Published embeddings are immutable: every file raybc publishes (here through
    write_embeddings, as `raybc train` does) carries its size and stamp (ETag or mtime), and a later
    rewrite of one in place, same size, same ids, other values, is refused by the backfill and by
    a registration that joins with it, naming the file and the fix; nothing readers see changes."""
    from raybc.embeddings import make_table, write_table
    from raybc.errors import IntegrityError
    from raybc.intake import RegisterOptions
    from raybc.storage import file_stamp
    from stamps import wait_for_a_newer_mtime

    root = storage_root
    reg = build_registry(root, dims=[8, 12], rows=2_000, entities=["items"], rows_per_file=1_000)
    store = reg.embeddings_storage(1, "items")
    infos = {i["basename"]: i for i in store.list(detail=True)}
    files = reg.get(1).embeddings["items"].files
    assert [f.path for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(f.stamp and f.stamp == file_stamp(infos[f.path]) and f.bytes == infos[f.path]["size"] for f in files), files
    backfill(root, BackfillOptions(progress=False), echo=lambda _: None)
    seen = {rel: root.read_bytes(rel) for rel in root.walk_files("snapshots")}

    name = "part-00001.parquet"
    with store.open_input(name) as f:
        t = pq.read_table(f)
    ids, mat = t.column("id").to_numpy(), t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 12)
    if store.is_local:
        wait_for_a_newer_mtime(store.path(name))  # a local stamp is an mtime: see the helper
    with store.open_output(name) as f:
        write_table(f, make_table(ids, -mat))  # as write_embeddings wrote it, other values: the same size
    assert store.size(name) == files[1].bytes, "the rewrite must keep the size: only the stamp can tell"

    fix = r"published embeddings are immutable. Restore the file, or publish the new embeddings as a new version \(raybc register --version 2"
    with pytest.raises(IntegrityError, match=rf"{store.uri(name)} changed after v1 was .*{fix}"):
        backfill(root, BackfillOptions(progress=False, to_versions=[0]), echo=lambda _: None)
    # registering v2 joins with the stored z_1 to measure B_2 against it: refused as well
    z2 = root.child("incoming")
    with z2.open_output("z.parquet") as f:
        write_table(f, make_table(ids, mat))
    with pytest.raises(IntegrityError, match=rf"{store.uri(name)} changed after v1 was published .*immutable. Restore the file, or "
                                            r"publish the new embeddings as a new version \(raybc register --version 2"):  # fmt: skip
        reg.register(2, embeddings={"items": z2.uri("z.parquet")}, aligner=random_aligner(12, 12, seed=1),
                     options=RegisterOptions(check_rows=500), source_options=root.options)  # fmt: skip
    assert reg.versions() == [0, 1] and not root.walk_files("embeddings/v2")
    assert {rel: root.read_bytes(rel) for rel in root.walk_files("snapshots")} == seen, "a refusal must change nothing readers see"
