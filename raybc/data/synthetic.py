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
