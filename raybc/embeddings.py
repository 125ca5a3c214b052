"""Embedding tables: the Parquet schema of the storage contract, conversions, and validation.

A table holds two columns: ``id`` (int64 or UTF-8 string: the data set's own ids) and
``embedding`` (``fixed_size_list<float32>[d]``). Vectors move between Arrow and numpy without
copies: a fixed-size-list column's flat child buffer *is* the (n, d) matrix.

Input written by other tools is accepted in a few nearby shapes (other integer id types, float16/64
or variable-length lists of exactly d floats) and normalised; anything else is refused with an
error that names the file, the column and, for bad values, the row and its id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raybc.errors import InputDataError, RaybcError
from raybc.storage import is_transient

ID = "id"
EMBEDDING = "embedding"

# Rows per Parquet row group in the files raybc writes: ~64k rows keeps a 256-d row group near
# 64 MiB, large enough for sequential reads on object stores and small enough to split files
# into parts for parallel backfills.
ROW_GROUP_ROWS = 65_536


def embedding_type(dim: int, value_type: pa.DataType = pa.float32()) -> pa.DataType:
    return pa.list_(pa.field("item", value_type, nullable=False), dim)


def table_schema(dim: int, id_type: pa.DataType = pa.int64(), value_type: pa.DataType = pa.float32()) -> pa.Schema:
    return pa.schema([pa.field(ID, id_type, nullable=False), pa.field(EMBEDDING, embedding_type(dim, value_type), nullable=False)])


def embedding_array(mat: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.FixedSizeListArray:
    """(n, d) matrix -> fixed_size_list<value_type>[d] without copying when already C-contiguous."""
    if mat.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {mat.shape}")
    n, d = mat.shape
    flat = np.ascontiguousarray(mat).reshape(n * d)
    if pa.from_numpy_dtype(flat.dtype) != value_type:
        flat = flat.astype(value_type.to_pandas_dtype())  # e.g. float32 -> float16 output
    values = pa.array(flat)
    return pa.FixedSizeListArray.from_arrays(values, type=embedding_type(d, value_type))


def make_batch(ids: pa.Array, mat: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.RecordBatch:
    emb = embedding_array(mat, value_type)
    return pa.RecordBatch.from_arrays([ids, emb], schema=table_schema(mat.shape[1], ids.type, value_type))


def make_table(ids: np.ndarray | pa.Array | list, mat: np.ndarray) -> pa.Table:
    """A contract table from ids and an (n, d) float32 matrix."""
    id_arr = ids if isinstance(ids, pa.Array) else pa.array(ids)
    if pa.types.is_integer(id_arr.type):
        id_arr = id_arr.cast(pa.int64())
    return pa.Table.from_batches([make_batch(id_arr, np.asarray(mat, dtype=np.float32))])


@dataclass(frozen=True)
class ColumnLayout:
    """What an input file's columns hold and how to normalise them."""

    id_type: pa.DataType  # int64 or string after normalisation
    dim: int
    value_type: pa.DataType
    fixed: bool  # fixed_size_list (fast path) or variable list


def inspect_schema(schema: pa.Schema, *, source: str, expected_dim: int | None = None) -> ColumnLayout:
    """Check a file's schema against the contract; the error names the file and the column."""
    names = schema.names
    if ID not in names:
        raise InputDataError(f"{source}: no '{ID}' column (found {names}); embedding files need columns 'id' and 'embedding'")
    if EMBEDDING not in names:
        raise InputDataError(
            f"{source}: no '{EMBEDDING}' column (found {names}); write the vectors as a fixed_size_list<float32> column named 'embedding'"
        )
    id_t = schema.field(ID).type
    if pa.types.is_integer(id_t):
        id_norm = pa.int64()
    elif pa.types.is_string(id_t) or pa.types.is_large_string(id_t):
        id_norm = id_t
    else:
        raise InputDataError(
            f"{source}: column '{ID}' has type {id_t}; ids must be integers or UTF-8 strings (binary ids are not accepted)"
        )
    emb_t = schema.field(EMBEDDING).type
    if pa.types.is_fixed_size_list(emb_t):
        dim, fixed = emb_t.list_size, True
    elif pa.types.is_list(emb_t) or pa.types.is_large_list(emb_t):
        dim, fixed = -1, False
    else:
        raise InputDataError(f"{source}: column '{EMBEDDING}' has type {emb_t}; expected fixed_size_list<float32>[d]")
    value_t = emb_t.value_type
    if not pa.types.is_floating(value_t):
        raise InputDataError(f"{source}: column '{EMBEDDING}' holds {value_t} values; expected float32")
    if fixed and expected_dim is not None and dim != expected_dim:
        raise InputDataError(
            f"{source}: column '{EMBEDDING}' has dimension {dim}, but this version's embeddings have {expected_dim}; "
            "the file belongs to another version or was written wrongly"
        )
    return ColumnLayout(id_type=id_norm, dim=dim if fixed else (expected_dim or -1), value_type=value_t, fixed=fixed)


def parquet_file(f, uri: str, *, hint: str = "") -> pq.ParquetFile:
    """``pq.ParquetFile(f)``; a file that is not Parquet is bad input naming ``uri``, while storage
    faults worth retrying (and raybc's own errors) pass through unchanged."""
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, RaybcError) or is_transient(exc):
            raise
        raise InputDataError(f"{uri} is not a readable Parquet file ({exc}){hint}") from None


def batch_matrix(col: pa.Array, layout: ColumnLayout, *, source: str, row_offset: int, ids: pa.Array) -> np.ndarray:
    """The (n, d) float32 matrix of an embedding column (zero-copy for fixed_size_list<float32>)."""
    n = len(col)
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputDataError(f"{source}: row {row_offset + row} (id {id_at(ids, row)}) has a null embedding")
    if layout.fixed:
        if col.offset or col.values.offset:
            col = pa.concat_arrays([col])  # normalise slices so the flat buffer starts at row 0
        values = col.values
        d = layout.dim
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != layout.dim)
        if bad.size:
            r = int(bad[0])
            raise InputDataError(
                f"{source}: row {row_offset + r} (id {id_at(ids, r)}) has {int(lengths[r])} values, "
                f"expected {layout.dim} (dimension of this version)"
            )
        values = pc.list_flatten(col)
        d = layout.dim
    if values.null_count:
        flat_bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        r = flat_bad // d
        raise InputDataError(f"{source}: row {row_offset + r} (id {id_at(ids, r)}) has a null value inside its embedding")
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    return flat.reshape(n, d)


def normalise_ids(ids: pa.Array, layout: ColumnLayout, *, source: str, row_offset: int) -> pa.Array:
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputDataError(f"{source}: row {row_offset + row} has a null id; every row needs an id")
    if ids.type != layout.id_type:
        ids = ids.cast(layout.id_type)
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        try:
            ids.validate(full=True)  # Parquet readers do not check UTF-8; an id must be text
        except pa.ArrowInvalid:
            row = _first_bad_utf8(ids)
            raise InputDataError(
                f"{source}: row {row_offset + row} has an id that is not valid UTF-8; ids must be integers or UTF-8 strings"
            ) from None
    return ids


def _first_bad_utf8(ids: pa.Array) -> int:
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64 if pa.types.is_large_string(ids.type) else np.int32)
    data = ids.buffers()[2].to_pybytes() if ids.buffers()[2] is not None else b""
    for r in range(len(ids)):
        lo, hi = offsets[ids.offset + r], offsets[ids.offset + r + 1]
        try:
            data[lo:hi].decode("utf-8")
        except UnicodeDecodeError:
            return r
    return 0


def check_finite(mat: np.ndarray, ids: pa.Array, *, source: str, row_offset: int) -> None:
    """Refuse NaN and Inf; the error names the first bad row and its id."""
    # NaN and Inf propagate into a sum, so one float32 sum of the whole batch (pairwise, no
    # temporaries: 3x cheaper than row sums in float64) clears almost every batch. Only a batch whose
    # sum is not finite -- bad values, or finite ones that overflowed float32 -- pays for the scan.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(mat.sum()):
            return
    bad_rows = np.flatnonzero(~np.isfinite(mat).all(axis=1))
    if bad_rows.size == 0:  # finite values whose float32 sum overflowed: not an input error
        return
    r = int(bad_rows[0])
    kind = "NaN" if np.isnan(mat[r]).any() else "Inf"
    raise InputDataError(
        f"{source}: row {row_offset + r} (id {id_at(ids, r)}) holds {kind} "
        f"({bad_rows.size} bad row{'s' * (bad_rows.size != 1)} in this batch); fix or drop those rows upstream"
    )


def first_duplicate(ids: pa.Array | pa.ChunkedArray) -> object | None:
    """An id that occurs more than once, or None."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    if pa.types.is_integer(ids.type):
        a = np.sort(ids.to_numpy(zero_copy_only=False))
        dup = np.flatnonzero(a[1:] == a[:-1])
        return int(a[dup[0]]) if dup.size else None
    if len(pc.unique(ids)) == len(ids):
        return None
    counts = pc.value_counts(ids)
    mask = pc.greater(counts.field("counts"), 1)
    return counts.field("values").filter(mask)[0].as_py()


def id_at(ids: pa.Array, row: int) -> object:
    try:
        return ids[row].as_py()
    except Exception:  # noqa: BLE001 - the id is only decoration for the message
        return "?"


def read_matrix(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, d) float32) of a contract table; for tests, tools and small reads."""
    col = table.column(EMBEDDING).combine_chunks()
    if len(col) == 0:
        d = col.type.list_size if pa.types.is_fixed_size_list(col.type) else 0
        return table.column(ID).to_numpy(), np.zeros((0, d), np.float32)
    layout = inspect_schema(table.schema, source="<table>")
    if not layout.fixed:
        d = len(col[0].values)
        layout = ColumnLayout(layout.id_type, d, layout.value_type, False)
    mat = batch_matrix(col, layout, source="<table>", row_offset=0, ids=table.column(ID).combine_chunks())
    return table.column(ID).to_numpy(zero_copy_only=False), mat


# Parquet writer settings for contract tables. Dictionary encoding is off: unique ids and float
# vectors never repeat, so the writer only pays for building a dictionary it then abandons
# (measured: 2.3x slower float32 writes, 2.5x for float16). Statistics only for ids: their
# min/max let the backfill prove files hold disjoint ids without reading them.
WRITER_OPTIONS = {"use_dictionary": False, "write_statistics": [ID]}


def write_table(sink, table: pa.Table, *, compression: str = "none", row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write a contract table to an open sink (see ``Storage.open_output``)."""
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_rows, **WRITER_OPTIONS)
