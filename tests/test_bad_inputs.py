"""Bad input is refused with a clear error, nothing is published, and nothing already published or
committed changes.

Complements ``test_backfill_errors.py`` (wrong dimension, NaN/Inf, missing column, duplicates,
null ids, corrupt Parquet, changed row counts, unknown backfill fields) and ``test_registry.py``
(tampered weights and version numbers, truncated weights, concurrent publishers). Here: every job
config's fields out of range, path traversal in names, URIs, CURRENT and manifests, empty files,
schema drift between files, non-UTF-8 and binary ids, values checked on ``register``, a truncated
safetensors file whose manifest was "fixed" to match, and tampered snapshot manifests.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybc.config import BackfillJobConfig, DemoConfig, ReconcileJobConfig, RegisterConfig, RetentionJobConfig, TrainJobConfig
from raybc.data.synthetic import build_registry
from raybc.embeddings import make_table
from raybc.errors import ConfigError, InputDataError, IntegrityError, StorageError
from raybc.intake import RegisterOptions
from raybc.options import load_options, validate_options
from raybc.registry import ALIGNER_FILE, MODEL_FILE, ModelWeights, Registry
from raybc.snapshots import Snapshots
from raybc.storage import Storage
from stamps import restamp

DIMS = [8, 12, 16]


def state(root: Storage, prefix: str = "") -> dict[str, str]:
    """sha256 of every file below ``prefix``: what a failed attempt must leave exactly as it was."""
    return {rel: hashlib.sha256(root.read_bytes(rel)).hexdigest() for rel in root.walk_files(prefix)}


def visible(root: Storage) -> dict[str, str]:
    """CURRENT files and committed manifests: what snapshot readers can see."""
    return {k: v for k, v in state(root, "snapshots").items() if k.endswith(("/CURRENT", "/manifest.json"))}


# --------------------------------------------------------------------------- configs: every field out of range


def problems_of(cls, data) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate_options(cls, data, source="job.yaml")
    assert "job.yaml" in str(err.value)
    return err.value.problems


def assert_each_named(problems: list[str], fields: list[str]) -> None:
    text = "\n".join(problems)
    missing = [f for f in fields if f"{f}:" not in text]
    assert not missing, f"not reported: {missing}\n{text}"


STORAGE_BAD = {
    "endpoint_url": "ftp://x", "retries": 21, "operation_attempts": 0, "backoff_s": 0,
    "connect_timeout_s": 0, "read_timeout_s": -1, "anonymous": "perhaps", "colour": "red",
}  # fmt: skip


def test_backfill_job_config_reports_every_bad_field_at_once():
    data = {
        "root": "s3://bucket/../elsewhere",
        "storage": STORAGE_BAD,
        "backfill": {
            "from_version": -1, "to_versions": [], "entities": ["../etc"], "rows_per_part": 0, "batch_rows": 0,
            "compression": "gzip", "cpus_per_task": 0, "max_concurrency": 0, "progress": "maybe", "rows_per_prt": 1,
        },
        "summary_json": 7,
        "extra_field": 1,
    }  # fmt: skip
    problems = problems_of(BackfillJobConfig, data)
    fields = ["root", *(f"storage.{k}" for k in STORAGE_BAD), *(f"backfill.{k}" for k in data["backfill"]), "summary_json", "extra_field"]
    assert_each_named(problems, fields)
    assert len(problems) == len(fields)
    text = "\n".join(problems)
    assert "backfill.entities: Value error, invalid entity name '../etc'" in text
    assert "root: Value error, storage URI 's3://bucket/../elsewhere' contains '..'" in text
    assert "storage.colour: unknown field" in text


def test_reconcile_retention_demo_register_and_train_configs_refuse_out_of_range_fields():
    reconcile = {
        "root": "/tmp/x",
        "reconcile": {"entities": ["a/b"], "lease_ttl_s": 0, "backfill": {"rows_per_part": -5, "from_version": 1}},
        "retention": {"retention_s": -1, "grace_s": -1},
        "dry_run": "sometimes",
    }
    assert_each_named(
        problems_of(ReconcileJobConfig, reconcile),
        ["reconcile.entities", "reconcile.lease_ttl_s", "reconcile.backfill.rows_per_part",
         "retention.retention_s", "retention.grace_s", "dry_run"],  # fmt: skip
    )
    assert_each_named(
        problems_of(RetentionJobConfig, {"root": "/tmp/x", "lease_ttl_s": 0, "retention": {"retention_s": -3}, "dry_run": 2}),
        ["lease_ttl_s", "retention.retention_s", "dry_run"],
    )
    assert_each_named(
        problems_of(DemoConfig, {"rows": 0, "dims": [8], "entities": ["../x"], "rows_per_file": 0, "seed": "x"}),
        ["rows", "dims", "entities", "rows_per_file", "seed"],
    )
    assert_each_named(
        problems_of(RegisterConfig, {"root": "s3://b/../c", "version": -1, "embeddings": "items", "storage": {"retries": -1}}),
        ["root", "version", "embeddings", "storage.retries"],
    )
    # names are checked after the fields: an entity that would escape its folder
    with pytest.raises(ConfigError, match=r"invalid entity name '\.\./evil'"):
        validate_options(RegisterConfig, {"root": "/tmp/x", "version": 1, "embeddings": {"../evil": "/tmp/z"}}, source="job.yaml")
    train = {
        "method": "no-such-method", "dims": [0], "layers": 0, "epochs": 0, "lr": 0, "batch_size": 0, "weight_decay": -1,
        "alignment_weight": -1, "eval_every": 0, "selection_start": -1, "num_workers": -1, "threads_per_worker": 0,
        "checkpoint_every": 0, "max_failures": -1, "posthoc_steps": 0, "posthoc_lr": 0,
    }  # fmt: skip
    assert_each_named(
        problems_of(TrainJobConfig, {"root": "/tmp/x", "version": -1, "train": train}), ["version"] + [f"train.{k}" for k in train]
    )


def test_an_empty_config_file_says_what_is_required(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"root: required field is missing"):
        load_options(BackfillJobConfig, file=cfg)
    cfg.write_bytes(b"- a\n- list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_options(BackfillJobConfig, file=cfg)


# --------------------------------------------------------------------------- path traversal


@pytest.fixture
def published(tmp_path):
    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=DIMS, rows=200, entities=["items"], rows_per_file=100, row_group_rows=50)
    return root, reg


def test_names_and_uris_cannot_escape_the_root(published, tmp_path):
    root, reg = published
    before = state(root)
    for bad in ("../x", "..", "a/b", ".hidden", "-rf", "x\x00y", ""):
        with pytest.raises(StorageError, match="invalid entity name"):
            reg.embeddings_storage(2, bad)
        with pytest.raises(StorageError, match="invalid entity name"):
            Snapshots(root).get(0, bad)
    good = tmp_path / "z.parquet"
    pq.write_table(make_table(np.arange(5), np.ones((5, 16), np.float32)), good)
    np.save(tmp_path / "b.npy", np.ones((12, 16), np.float32))
    with pytest.raises(StorageError, match="invalid entity name '../evil'"):
        reg.register(3, embeddings={"../evil": str(good)}, aligner=str(tmp_path / "b.npy"))
    with pytest.raises(StorageError, match="contains '..'"):
        reg.register(3, embeddings={"items": "s3://bucket/a/../../b"}, aligner=str(tmp_path / "b.npy"))
    # an absolute-looking path below a root stays below it
    assert root.path("/etc/passwd") == root.path("etc/passwd") and root.path("/etc/passwd").startswith(root.root)
    assert state(root) == before and reg.versions() == [0, 1, 2]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("embeddings.items.files.0.path", "../../../../etc/passwd", "invalid embedding file name"),
        ("embeddings.evil/../../x", None, "invalid entity name"),
        ("aligner.file", "../v1/aligner.safetensors", "weight file name '../v1/aligner.safetensors' is not allowed"),
        ("dim", 17, "B_2 maps 16->12 but v2 has dim 17"),
        ("aligner.sha256", "0" * 64, "does not match the manifest"),
        ("parent", 0, "parent is 0, expected 1"),
    ],
)
def test_tampered_registry_manifest_is_refused(published, field, value, match):
    root, _ = published
    m = root.read_json("registry/v2/manifest.json")
    if field.startswith("embeddings.evil"):
        m["embeddings"][field.split(".", 1)[1]] = m["embeddings"]["items"]
    else:
        *path, last = field.split(".")
        obj = m
        for p in path:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        obj[int(last) if last.isdigit() else last] = value
    root.write_json_atomic("registry/v2/manifest.json", m)
    before = state(root)
    reg = Registry(root)
    with pytest.raises(IntegrityError, match=match):
        reg.get(2)
        reg.aligner(2)
    assert state(root) == before


@pytest.mark.cluster
def test_tampered_current_and_snapshot_manifests_are_refused_by_readers(published, ray_session):
    from raybc.backfill import BackfillOptions, backfill

    root, _ = published
    run = backfill(root, BackfillOptions(progress=False), echo=lambda _: None).run_ids["items"]
    cur = "snapshots/as-v0/items/CURRENT"
    good_current = root.read_json(cur)
    snaps = Snapshots(root)
    for ref in ("../../../../registry/v2/manifest.json", f"from-v2/{run}/../../../as-v1/items/x/manifest.json", "/etc/manifest.json"):
        root.write_json_atomic(cur, {**good_current, "manifest": ref})
        with pytest.raises(IntegrityError, match="is not of the form from-v<k>/<run>/manifest.json"):
            snaps.get(0, "items")
    root.write_json_atomic(cur, good_current)

    man_rel = f"snapshots/as-v0/items/from-v2/{run}/manifest.json"
    good = root.read_json(man_rel)
    for change, match in [
        ({"files": [{"path": "../../../../../registry/v2/aligner.safetensors", "rows": 1, "bytes": 1}]}, "invalid snapshot file name"),
        ({"files": "part-00000-00000.parquet"}, "no list of files"),
        ({"source_version": 1}, "names source v1"),
        ({"rows": "many"}, "tampered or damaged snapshot manifest"),
    ]:
        root.write_json_atomic(man_rel, {**good, **change})
        with pytest.raises(IntegrityError, match=match):
            snaps.read_table(0, "items")
    root.write_json_atomic(man_rel, {**good, "rows": good["rows"] + 1})
    with pytest.raises(IntegrityError, match="files hold 200 rows but the committed manifest records 201"):
        snaps.read_table(0, "items")
    root.write_json_atomic(man_rel, good)
    assert snaps.read_table(0, "items").num_rows == 200


# --------------------------------------------------------------------------- empty files, weights


def test_empty_files_are_refused_with_the_file_named(published, tmp_path):
    root, reg = published
    before = state(root)
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "empty.npy").write_bytes(b"")
    zero_rows = tmp_path / "zero"
    zero_rows.mkdir()
    pq.write_table(make_table(np.arange(0), np.zeros((0, 16), np.float32)), zero_rows / "z.parquet")
    np.save(tmp_path / "b.npy", np.ones((12, 16), np.float32))
    with pytest.raises(InputDataError, match="empty.parquet is not a readable Parquet file"):
        reg.register(3, embeddings={"items": str(tmp_path / "empty.parquet")}, aligner=str(tmp_path / "b.npy"))
    with pytest.raises(InputDataError, match=r"the files given for items \(.*z.parquet\) hold no rows"):
        reg.register(3, embeddings={"items": str(zero_rows)}, aligner=str(tmp_path / "b.npy"))
    pq.write_table(make_table(np.arange(5), np.ones((5, 16), np.float32)), tmp_path / "ok.parquet")
    with pytest.raises(InputDataError, match="empty.npy: not a plain .npy matrix"):
        reg.register(3, embeddings={"items": str(tmp_path / "ok.parquet")}, aligner=str(tmp_path / "empty.npy"))
    assert state(root) == before and reg.versions() == [0, 1, 2]
    # empty registry files: a damaged manifest, CURRENT or weight file names itself
    root.write_atomic("registry/v1/manifest.json", b"")
    with pytest.raises(StorageError, match=r"registry/v1/manifest.json is not valid JSON .* the file is damaged"):
        Registry(root).get(1)
    root.write_atomic("snapshots/as-v0/items/CURRENT", b"")
    with pytest.raises(StorageError, match=r"as-v0/items/CURRENT is not valid JSON"):
        Snapshots(root).pointer(0, "items")
    root.write_atomic(f"registry/v2/{ALIGNER_FILE}", b"")
    with pytest.raises(IntegrityError, match=r"aligner.safetensors has 0 bytes but the manifest records \d+"):
        Registry(root).aligner(2)


def test_truncated_safetensors_is_refused_even_when_its_manifest_was_fixed_to_match(tmp_path):
    root = Storage(str(tmp_path / "root"))
    reg = Registry(root)
    reg.publish(0, dim=4, method="m", aligner=None, embeddings={}, model=ModelWeights({"w": np.ones((4, 4), np.float32)}, {"arch": "x"}))
    build = build_registry(Storage(str(tmp_path / "r2")), dims=[4, 6], rows=10, entities=["items"])
    for reg_, ver, name, load in ((reg, 0, MODEL_FILE, lambda r: r.model(0)), (build, 1, ALIGNER_FILE, lambda r: r.aligner(1))):
        rt = reg_.root
        data = rt.read_bytes(f"registry/v{ver}/{name}")
        cut = data[: len(data) - 7]
        rt.write_atomic(f"registry/v{ver}/{name}", cut)
        m = rt.read_json(f"registry/v{ver}/manifest.json")
        key = "model" if name == MODEL_FILE else "aligner"
        m[key].update(sha256=hashlib.sha256(cut).hexdigest(), bytes=len(cut))  # checksum "fixed" by whoever cut it
        rt.write_json_atomic(f"registry/v{ver}/manifest.json", m)
        with pytest.raises(IntegrityError, match=f"{name}.* is not a readable safetensors file|not a readable safetensors"):
            load(Registry(rt))


# --------------------------------------------------------------------------- register checks every value


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", r"z-1.parquet: row 3 \(id 8\) holds NaN"),
        ("inf", r"z-0.parquet: row 0 \(id 0\) holds Inf"),
        ("null_id", r"z-1.parquet: row 2 has a null id"),
        ("dup_across_files", r"id 4 occurs more than once in the items embeddings \(.*z-0.parquet and .*z-1.parquet\)"),
        ("id_type_drift", r"z-1.parquet: ids are string but other files of items hold int64 ids"),
        ("dim_drift", r"z-1.parquet: column 'embedding' has dimension 20, but this version's embeddings have 16"),
        ("binary_ids", r"z-1.parquet: column 'id' has type binary; ids must be integers or UTF-8 strings"),
        ("bad_utf8", r"z-1.parquet: row 1 has an id that is not valid UTF-8"),
        ("aligner_inf", r"b.npy: B holds NaN or Inf"),
        ("aligner_pickle", r"b.npy: not a plain .npy matrix"),
    ],
)
@pytest.mark.cluster
def test_register_refuses_bad_values_and_publishes_nothing(ray_session, published, tmp_path, case, match):
    root, reg = published
    before = state(root)
    src = tmp_path / "z"
    src.mkdir()
    z = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    ids0, ids1 = np.arange(5), np.arange(5, 10)
    f1_ids: object = ids1
    f1_mat = z[5:]
    if case == "nan":
        f1_mat = f1_mat.copy()
        f1_mat[3, 1] = np.nan
    if case == "inf":
        z[0, 0] = np.inf
    if case == "dup_across_files":
        f1_ids = np.array([5, 6, 4, 8, 9])
    first = make_table(ids0, z[:5])
    if case in ("id_type_drift", "bad_utf8"):
        first = make_table(pa.array([f"u{i}" for i in ids0]), z[:5]) if case == "bad_utf8" else first
        f1_ids = pa.array([f"u{i}" for i in ids1])
    second = make_table(f1_ids, f1_mat) if case not in ("null_id", "binary_ids", "dim_drift", "bad_utf8") else None
    emb = pa.FixedSizeListArray.from_arrays(pa.array(f1_mat.ravel()), 16)
    if case == "null_id":
        second = pa.table({"id": pa.array([5, 6, None, 8, 9], pa.int64()), "embedding": emb})
    if case == "binary_ids":
        second = pa.table({"id": pa.array([b"\xff\x00", b"a", b"b", b"c", b"d"], pa.binary()), "embedding": emb})
    if case == "dim_drift":
        second = make_table(ids1, np.zeros((5, 20), np.float32))
    if case == "bad_utf8":
        raw = b"u5" + b"\xc3\x28" + b"u7u8u9"  # row 1 holds an invalid two-byte sequence
        offsets = pa.py_buffer(np.array([0, 2, 4, 6, 8, 10], np.int32).tobytes())
        second = pa.table({"id": pa.Array.from_buffers(pa.string(), 5, [None, offsets, pa.py_buffer(raw)]), "embedding": emb})
    pq.write_table(first, src / "z-0.parquet")
    pq.write_table(second, src / "z-1.parquet")
    b = np.ones((16, 16), np.float32)  # B_3: v3 (16-d) -> v2 (16-d)
    if case == "aligner_inf":
        b[0, 0] = np.inf
    if case == "aligner_pickle":
        np.save(tmp_path / "b.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(tmp_path / "b.npy", b)
    with pytest.raises((InputDataError, IntegrityError), match=match):
        if case == "bad_utf8":  # string ids: as a new registry's v0 (this one's ids are int64, and must stay so)
            Registry(Storage(str(tmp_path / "fresh"))).register(0, embeddings={"items": str(src)})
        else:
            reg.register(3, embeddings={"items": str(src)}, aligner=str(tmp_path / "b.npy"), options=RegisterOptions(aligner_layout="out_in"))
    assert reg.versions() == [0, 1, 2] and not Registry(Storage(str(tmp_path / "fresh"))).versions()
    assert state(root) == before, "a refused registration must write nothing"


# --------------------------------------------------------------------------- the backfill: drift and ids


@pytest.mark.cluster
def test_backfill_refuses_schema_drift_and_non_utf8_ids_and_changes_nothing(tmp_path, ray_session):
    from raybc.backfill import BackfillOptions, backfill

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=DIMS, rows=300, entities=["users"], id_kind="string", rows_per_file=100)
    backfill(root, BackfillOptions(progress=False), echo=lambda _: None)
    committed = visible(root)
    target = root.path("embeddings/v2/users/part-00001.parquet")
    original = pq.read_table(target)
    emb = original.column("embedding").combine_chunks()

    def fails(table: pa.Table, match: str) -> None:
        pq.write_table(table, target)
        restamp(root, 2, "users")  # as if v2 had been published with it: the rows are what is tested here
        with pytest.raises(InputDataError, match=match):
            backfill(root, BackfillOptions(progress=False), echo=lambda _: None)
        assert visible(root) == committed, "what readers see (CURRENT, manifests) must not change"

    # same row count, integer ids: the other files and the manifest say string
    fails(pa.table({"id": pa.array(np.arange(100, 200)), "embedding": emb}),
          r"part-00001.parquet holds int64 ids but v2's manifest records string ids for users: the schema drifted")  # fmt: skip
    fails(pa.table({"id": pa.array([f"u{i}".encode() for i in range(100)], pa.binary()), "embedding": emb}),
          r"part-00001.parquet: column 'id' has type binary; ids must be integers or UTF-8 strings")  # fmt: skip
    raw = b"".join(b"\xff\xfe" if i == 42 else f"{i:02d}".encode() for i in range(100))  # unique 2-byte ids
    offsets = pa.py_buffer(np.arange(0, 202, 2, dtype=np.int32).tobytes())
    bad = pa.Array.from_buffers(pa.string(), 100, [None, offsets, pa.py_buffer(raw)])
    fails(pa.table({"id": bad, "embedding": emb}), r"part-00001.parquet: row 42 has an id that is not valid UTF-8")
    pq.write_table(original, target)  # fixed (a new file stamp, so a new run): it commits, correct
    restamp(root, 2, "users")
    from raybc.snapshots import verify_snapshot

    assert sorted(backfill(root, BackfillOptions(progress=False), echo=lambda _: None).committed) == ["as-v0/users", "as-v1/users"]
    assert all(verify_snapshot(Registry(root), j, "users").ok for j in (0, 1))
