"""Bad input makes the backfill fail with an error that names the file, field or row, and
leaves every committed snapshot (what CURRENT points to) exactly as it was."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybc import cli
from raybc.backfill import BackfillOptions, backfill
from raybc.data.synthetic import build_registry
from raybc.embeddings import make_table
from raybc.errors import ConfigError, InputDataError, IntegrityError
from raybc.storage import Storage
from stamps import restamp

pytestmark = pytest.mark.cluster

DIMS = [8, 12, 16]
ROWS, PER_FILE = 3_000, 1_000


@pytest.fixture
def committed(tmp_path, ray_session):
    """A root whose v2 -> v0, v1 snapshots are committed; returns (root, CURRENT bytes, manifests)."""
    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=DIMS, rows=ROWS, entities=["items"], rows_per_file=PER_FILE)
    backfill(root, BackfillOptions(progress=False))
    return root, snapshot_state(root)


def snapshot_state(root: Storage) -> dict[str, bytes]:
    """CURRENT files and run manifests: what readers can see."""
    return {
        rel: root.read_bytes(rel)
        for rel in root.walk_files("snapshots")
        if rel.endswith("/CURRENT") or rel.endswith("/manifest.json")
    }


def input_path(root: Storage, name: str = "part-00001.parquet") -> str:
    return root.path(f"embeddings/v2/items/{name}")


def rewrite(root: Storage, table: pa.Table, name: str = "part-00001.parquet") -> str:
    """Put ``table`` in place of a published file of v2, as if v2 had been published with it: a
    plain rewrite is refused by its stamp (tests/test_backfill.py), and these tests are about rows."""
    path = input_path(root, name)
    pq.write_table(table, path)
    restamp(root, 2, "items")
    return path


def good_rows(first_id: int = PER_FILE, n: int = PER_FILE, dim: int = DIMS[-1]) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(first_id, first_id + n), np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)


def fails_cleanly(root: Storage, before: dict[str, bytes], exc_type, match: str):
    with pytest.raises(exc_type, match=match) as info:
        backfill(root, BackfillOptions(progress=False))
    # the error a part raised, as raybc worded it: not Ray's task wrapper (its message is the
    # task's traceback) nor Ray Data's advice to retry appended to it
    from ray.exceptions import RayError

    message = str(info.value)
    assert not isinstance(info.value, RayError), type(info.value)
    assert "Traceback" not in message and "ray::" not in message and "Failed to apply" not in message, message
    assert snapshot_state(root) == before, "a failed backfill must not change what readers see"


def test_wrong_dimension_names_file_and_column(committed):
    root, before = committed
    ids, _ = good_rows()
    rewrite(root, make_table(ids, np.zeros((PER_FILE, 20), np.float32)))
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet: column 'embedding' has dimension 20, but this version's embeddings have 16")


def test_nan_names_file_row_and_id(committed):
    root, before = committed
    ids, mat = good_rows()
    mat[123, 5] = np.nan
    rewrite(root, make_table(ids, mat))
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet: row 123 \(id 1123\) holds NaN")


def test_inf_is_refused(committed):
    root, before = committed
    ids, mat = good_rows()
    mat[999, 0] = -np.inf
    rewrite(root, make_table(ids, mat))
    fails_cleanly(root, before, InputDataError, r"row 999 \(id 1999\) holds Inf")


def test_missing_embedding_column(committed):
    root, before = committed
    ids, mat = good_rows()
    rewrite(root, pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), DIMS[-1])}))
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet: no 'embedding' column \(found \['id', 'vector'\]\)")


def test_duplicate_id_inside_one_file(committed):
    root, before = committed
    ids, mat = good_rows()
    ids[500] = ids[10]
    rewrite(root, make_table(ids, mat))
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet: id 1010 occurs more than once")


def test_duplicate_id_across_files_names_both(committed):
    root, before = committed
    ids, mat = good_rows()
    ids[-1] = 5  # id 5 lives in part-00000 too
    rewrite(root, make_table(ids, mat))
    fails_cleanly(root, before, InputDataError, r"id 5 occurs more than once .*part-00000.parquet and .*part-00001.parquet")


def test_null_id(committed):
    root, before = committed
    ids, mat = good_rows()
    id_arr = pa.array([None if i == 7 else int(x) for i, x in enumerate(ids)], type=pa.int64())
    t = pa.table({"id": id_arr, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), DIMS[-1])})
    rewrite(root, t)
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet: row 7 has a null id")


def test_corrupt_parquet_file(committed):
    root, before = committed
    path = input_path(root)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # truncated: no footer
    restamp(root, 2, "items")
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet is not a readable Parquet file")
    open(path, "wb").write(b"\x00" * len(data))
    restamp(root, 2, "items")
    fails_cleanly(root, before, InputDataError, r"part-00001.parquet is not a readable Parquet file")


def test_row_count_changed_after_publish(committed):
    root, before = committed
    ids, mat = good_rows(n=PER_FILE - 1)
    rewrite(root, make_table(ids, mat))
    fails_cleanly(root, before, IntegrityError, r"part-00001.parquet holds 999 rows but v2's manifest records 1000")


def test_missing_input_file(committed):
    import os

    root, before = committed
    os.remove(input_path(root))
    fails_cleanly(root, before, IntegrityError, r"part-00001.parquet is listed in v2's manifest but missing")


def test_unknown_versions_and_entities_are_listed_together(committed):
    root, before = committed
    with pytest.raises(ConfigError) as err:
        backfill(root, BackfillOptions(to_versions=[1, 7], entities=["items", "shops"], progress=False))
    text = str(err.value)
    assert "to_versions: v7 is not older than the source v2" in text
    assert "entities: v2 has no embeddings for 'shops' (it has: items)" in text
    with pytest.raises(ConfigError, match=r"from_version: v9 is not published \(published: v0, v1, v2\)"):
        backfill(root, BackfillOptions(from_version=9, progress=False))
    assert snapshot_state(root) == before


def test_unknown_config_field_names_the_field(committed, tmp_path, capsys):
    root, before = committed
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"root: {root.uri()}\nbackfill:\n  rows_per_prt: 10\n  batch_rows: -1\n")
    with pytest.raises(ConfigError) as err:
        cli.backfill_config(["--config", str(cfg)])
    text = str(err.value)
    assert str(cfg) in text
    assert "backfill.rows_per_prt: unknown field" in text
    assert "backfill.batch_rows: Input should be greater than or equal to 1" in text
    # through the command line: exit code 2 and the message, no traceback
    assert cli.main(["backfill", "--config", str(cfg)]) == cli.EXIT_CONFIG
    err_text = capsys.readouterr().err
    assert "rows_per_prt: unknown field" in err_text and "Traceback" not in err_text
    assert snapshot_state(root) == before


def test_cli_reports_bad_input_without_traceback(committed, capsys):
    root, before = committed
    ids, mat = good_rows()
    mat[3, 3] = np.nan
    rewrite(root, make_table(ids, mat))
    code = cli.main(["backfill", "--root", root.uri(), "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED
    assert "part-00001.parquet: row 3 (id 1003) holds NaN" in err and "Traceback" not in err
    assert snapshot_state(root) == before


def test_fixed_input_then_completes(committed):
    """After a failure, fixing the file and rerunning commits a complete, correct snapshot."""
    from raybc.registry import Registry
    from raybc.snapshots import verify_snapshot

    root, before = committed
    ids, mat = good_rows()
    mat[0, 0] = np.nan
    rewrite(root, make_table(ids, mat))
    with pytest.raises(InputDataError):
        backfill(root, BackfillOptions(progress=False))
    mat[0, 0] = 0.5
    rewrite(root, make_table(ids, mat))
    s = backfill(root, BackfillOptions(progress=False))
    assert sorted(s.committed) == ["as-v0/items", "as-v1/items"]
    assert snapshot_state(root) != before
    for j in (0, 1):
        assert verify_snapshot(Registry(root), j, "items").ok


def test_float16_output_refuses_values_beyond_half_range_and_commits_nothing(committed):
    root, before = committed
    ids, mat = good_rows()
    mat[77] *= 1e6  # finite float32, but v0 values of ~1e6 have no float16 (max 65504)
    rewrite(root, make_table(ids, mat))
    with pytest.raises(InputDataError, match=r"part-00001.parquet -> v\d: row 77 \(id 1077\) has a value of magnitude .* beyond float16's 65504; backfill this target with output_dtype float32"):
        backfill(root, BackfillOptions(output_dtype="float16", progress=False))
    assert snapshot_state(root) == before
    backfill(root, BackfillOptions(output_dtype="float32", progress=False))  # the same rows fit float32
    assert snapshot_state(root) != before
