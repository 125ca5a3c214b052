"""Synthetic embedding tables and version registries, of any size, for demos, tests and benchmarks.

A synthetic registry has versions 0..K with growing dimensions, a random backward transform per
version (linear by default; any version can get a residual MLP instead), and embeddings only for
the newest version -- as in production, where old versions' embeddings are retired.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa

from raybc.embeddings import ROW_GROUP_ROWS, make_table
from raybc.registry import EntityFiles, Registry
from raybc.storage import Storage
from raybc.transforms import Affine, ResidualMLP, Transform

DEFAULT_DIMS = (32, 48, 64, 96, 128)
IdKind = Literal["int", "string"]


def random_aligner(in_dim: int, out_dim: int, *, seed: int, kind: str = "linear") -> Transform:
    """B: in_dim -> out_dim with unit-scale outputs for unit-scale inputs."""
    rng = np.random.default_rng(seed)
    if kind == "linear":
        return Affine((rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32))
    if kind == "affine":
        return Affine(
            (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32),
            (0.1 * rng.standard_normal(out_dim)).astype(np.float32),
        )
    if kind == "residual_mlp":
        return ResidualMLP.random(in_dim, out_dim, hidden=max(8, out_dim // 2), seed=seed)
    raise ValueError(f"unknown aligner kind {kind!r}; use linear, affine or residual_mlp")


def embedding_tables(
    rows: int, dim: int, *, rows_per_file: int, seed: int = 0, id_kind: IdKind = "int", id_prefix: str = "e"
) -> Iterator[pa.Table]:
    """Random unit-variance embeddings with ids 0..rows-1 (or "<prefix><n>"), one table per file."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        ids = np.arange(start, start + n, dtype=np.int64)
        id_arr = pa.array(ids) if id_kind == "int" else pa.array([f"{id_prefix}{i:012d}" for i in ids])
        yield make_table(id_arr, rng.standard_normal((n, dim), dtype=np.float32))


def build_registry(
    root: Storage | str,
    *,
    dims: Sequence[int] = DEFAULT_DIMS,
    rows: int = 100_000,
    entities: Sequence[str] = ("users", "items"),
    rows_per_file: int = 250_000,
    row_group_rows: int = ROW_GROUP_ROWS,
    aligner_kinds: dict[int, str] | None = None,
    id_kind: IdKind = "int",
    seed: int = 0,
    method: str = "synthetic",
) -> Registry:
    """Publish versions 0..len(dims)-1 with random aligners; embeddings for the newest only."""
    registry = Registry(root)
    kinds = aligner_kinds or {}
    newest = len(dims) - 1
    for k, d in enumerate(dims):
        aligner = None if k == 0 else random_aligner(d, dims[k - 1], seed=seed * 1000 + k, kind=kinds.get(k, "linear"))
        listing: dict[str, EntityFiles] = {}
        if k == newest:
            for e_i, entity in enumerate(entities):
                tables = embedding_tables(
                    rows, d, rows_per_file=rows_per_file, seed=seed * 1000 + 100 + e_i, id_kind=id_kind, id_prefix=entity[0]
                )
                listing[entity] = registry.write_embeddings(k, entity, tables, row_group_rows=row_group_rows)
        registry.publish(
            k, dim=d, method=method, aligner=aligner, embeddings=listing,
            hyperparameters={"seed": seed, "aligner_kind": kinds.get(k, "linear") if k else None},
        )  # fmt: skip
    return registry


# --------------------------------------------------------------------------- two versions of a model trained elsewhere


def _scramble(keys: np.ndarray) -> np.ndarray:
    x = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_normal(ids: np.ndarray, dim: int, *, salt: int) -> np.ndarray:
    """Deterministic pseudo-random (n, dim) float32 rows with unit variance, a function of each id
    alone: any file can be generated without the others, in any order (uniform on +-sqrt(3))."""
    keys = (ids.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]) ^ np.uint64(salt * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF)
    u = (_scramble(keys) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    return ((u - np.float32(0.5)) * np.float32(2 * np.sqrt(3.0))).astype(np.float32)


def _permuted_ids(rows: int, start: int, stop: int, mult: int, add: int) -> np.ndarray:
    """Positions start..stop-1 of the bijection i -> (mult * i + add) mod rows: ids scattered over
    the whole range, unsorted, with no file lining up with a file of another permutation."""
    i = np.arange(start, stop, dtype=np.int64)
    return ((i * mult + add) % rows).astype(np.int64)


def _coprime(rows: int, seed: int) -> int:
    m = int(np.random.default_rng(seed).integers(rows // 3 + 1, max(rows // 3 + 2, rows))) | 1
    while np.gcd(m, rows) != 1:
        m += 2
    return m


def planted_versions(
    old: Storage,
    new: Storage,
    *,
    rows: int,
    d_old: int,
    d_new: int,
    files_old: int,
    files_new: int,
    noise: float,
    seed: int = 0,
    bias: bool = False,
    shared: float = 1.0,
    id_scale: int = 7,
) -> Affine:
    """z_new and z_old = A z_new (+ b) + noise for the same ids, written as two folders of Parquet
    files partitioned differently, ids unsorted. Returns the planted map A (d_old, d_new) (+ b).

    ``shared`` < 1 gives the new version ids the old one lacks (the rest of z_new's ids are new).
    Streams file by file: memory is one file's rows whatever ``rows`` is.
    """
    import pyarrow.parquet as pq

    from raybc.embeddings import WRITER_OPTIONS

    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((d_old, d_new)) / np.sqrt(d_new)).astype(np.float64)
    b = (0.5 * rng.standard_normal(d_old)) if bias else None
    n_new_only = int(round(rows * (1 - shared)))

    def write(store: Storage, files: int, total: int, mult: int, add: int, make, rename=lambda ids: ids) -> None:
        per = -(-total // files)
        for f in range(files):
            lo, hi = f * per, min(total, (f + 1) * per)
            if lo >= hi:
                break
            ids = rename(_permuted_ids(total, lo, hi, mult, add))
            with store.open_output(f"part-{f:05d}.parquet") as out:
                pq.write_table(make_table(ids * id_scale, make(ids)), out, row_group_size=ROW_GROUP_ROWS, **WRITER_OPTIONS)

    def z_new(ids: np.ndarray) -> np.ndarray:
        return hashed_normal(ids, d_new, salt=seed * 2 + 1)

    def z_old(ids: np.ndarray) -> np.ndarray:
        y = z_new(ids).astype(np.float64) @ a.T
        if b is not None:
            y += b
        y += noise * hashed_normal(ids, d_old, salt=seed * 2 + 2)
        return y.astype(np.float32)

    # ids 0..rows-1 are the old version's; the new version holds the first rows - n_new_only of
    # them plus n_new_only ids the old one never had (rows .. rows + n_new_only - 1)
    write(old, files_old, rows, _coprime(rows, seed + 1), seed + 3, z_old)
    write(new, files_new, rows, _coprime(rows, seed + 2), seed + 5, z_new,
          rename=lambda ids: np.where(ids >= rows - n_new_only, ids + n_new_only, ids))  # fmt: skip
    return Affine(a, b)
