"""Pairs: two versions' embeddings joined by id at cluster scale, in Ray tasks.

Fitting or checking a backward transform B_k needs pairs (z_k(id), z_{k-1}(id)) for ids present
in both versions. The two versions' files are partitioned differently and their ids are unsorted,
so no file of one lines up with a file of the other. The join is a hash shuffle:

- *map* tasks (one per group of files) read their files once, batch by batch. New input is
  validated on the way (schema, null or non-UTF-8 ids, null values, NaN/Inf) and, when asked,
  copied byte for byte into the registry. Every id goes to one of ``B`` buckets by a stable 64-bit
  hash; the rows whose hash falls below a sampling threshold also keep their vectors.
- *reduce* tasks (one per bucket) see every id of their bucket from both versions: they refuse an
  id that occurs twice anywhere in the new files, count the ids shared with the parent version,
  and join the sampled rows into pairs, which stay in Ray's object store.

The driver only plans (O(files)), sums counts and keeps object references. Sampling is by id hash,
so it is deterministic and needs no coordination: both versions keep the same ids. The low 32 bits
of the hash decide the sample, the next 16 bits the held-out share, the top 16 bits the bucket.

This module joins and validates; fitting a transform from the pairs is ``aligners``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raybc.embeddings import EMBEDDING, ID, batch_matrix, check_finite, inspect_schema, normalise_ids, parquet_file
from raybc.errors import InputDataError, RaybcError
from raybc.storage import Storage, is_transient

# Ids a reduce task holds at once: 4M int64 ids are 32 MB plus the sort; buckets grow in number,
# not in size, with the data.
BUCKET_IDS = 4_000_000
# Ray keeps objects under 100 KiB inside the owner -- the driver. Map tasks cover enough rows that
# each (task, bucket) object of ids stays above that, so ids never pile up in the driver.
MIN_OBJECT_IDS = 32_768
# Most buckets: the bucket comes from the top 16 bits of the id hash.
MAX_BUCKETS = 4096
SAMPLE_ONE = 1 << 32  # sampling threshold that keeps every row
HOLDOUT_ONE = 1 << 16
BATCH_ROWS = 65_536

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def id_hash(ids: pa.Array) -> np.ndarray:
    """A stable uint64 hash per id: splitmix64 of int64 ids, blake2b of UTF-8 string ids."""
    if pa.types.is_integer(ids.type):
        x = ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False).view(np.uint64) + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in ids.to_pylist()),
        dtype=np.uint64, count=len(ids),
    )  # fmt: skip


def sample_key(h: np.ndarray) -> np.ndarray:
    return (h & np.uint64(0xFFFFFFFF)).astype(np.int64)


def holdout_mask(h: np.ndarray, share: float) -> np.ndarray:
    return ((h >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64) < int(round(share * HOLDOUT_ONE))


def bucket_of(h: np.ndarray, buckets: int) -> np.ndarray:
    return ((h >> np.uint64(48)) % np.uint64(buckets)).astype(np.int64)


def sample_threshold(target: int | None, available: int) -> int:
    """Threshold on ``sample_key`` keeping about ``target`` of ``available`` rows (all when fewer)."""
    if target is None or available <= 0 or target >= available:
        return SAMPLE_ONE
    return max(1, min(SAMPLE_ONE, math.ceil(SAMPLE_ONE * target / available)))


def bucket_count(rows: int) -> int:
    return max(1, min(MAX_BUCKETS, -(-rows // BUCKET_IDS)))


@dataclass(frozen=True)
class SourceFiles:
    """The Parquet files of one entity of one version, as a scan sees them."""

    entity: str
    store: Storage
    names: tuple[str, ...]
    rows: tuple[int, ...]  # per file, from footers or the manifest
    dim: int

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def file_groups(rows: Sequence[int], *, min_rows: int, max_groups: int) -> list[list[int]]:
    """Consecutive files packed into map tasks of at least ``min_rows`` rows, at most
    ``max_groups`` tasks (and never fewer files than one per task). Pure and deterministic."""
    if not rows:
        return []
    total = sum(rows)
    per = max(min_rows, -(-total // max(1, max_groups)))
    groups: list[list[int]] = [[]]
    acc = 0
    for i, n in enumerate(rows):
        if groups[-1] and acc >= per:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += n
    return groups


# --------------------------------------------------------------------------- map side


def _empty_ids(id_type: pa.DataType) -> pa.Array:
    return pa.array([], type=id_type)


def scan_group(
    store: Storage,
    names: Sequence[str],
    first_index: int,
    *,
    dim: int,
    buckets: int,
    threshold: int,
    validate: bool,
    vectors: bool,
    copy_to: Storage | None = None,
    dest_names: Sequence[str] | None = None,
) -> list[Any]:
    """Map task body: ``[files meta, bucket 0, ..., bucket B-1]``.

    Each bucket payload holds every id of the group that hashes there (``ids``, ``file`` index),
    and the sampled rows (``s_ids``, ``s_hash``, ``s_vec``) when ``vectors``. With ``validate``
    the files are checked against the contract row by row; with ``copy_to`` each file, once
    validated, is copied byte for byte to ``dest_names[i]`` there.
    """
    metas: list[dict[str, Any]] = []
    per_bucket: list[dict[str, list]] = [{"ids": [], "file": [], "s_ids": [], "s_hash": [], "s_vec": []} for _ in range(buckets)]
    id_type: pa.DataType | None = None
    for i, name in enumerate(names):
        uri = store.uri(name)
        row = 0
        with store.open_input(name) as f:
            pf = parquet_file(f, uri)
            layout = inspect_schema(pf.schema_arrow, source=uri, expected_dim=dim)
            id_type = layout.id_type
            lo = hi = None
            try:
                columns = [ID, EMBEDDING] if (validate or vectors) else [ID]  # an id-only scan reads no vectors
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
                    ids = normalise_ids(batch.column(0), layout, source=uri, row_offset=row)
                    mat = None
                    if validate:
                        mat = batch_matrix(batch.column(1), layout, source=uri, row_offset=row, ids=ids)
                        check_finite(mat, ids, source=uri, row_offset=row)
                    h = id_hash(ids)
                    b = bucket_of(h, buckets)
                    sampled = sample_key(h) < threshold if vectors else None
                    if vectors and sampled.any() and mat is None:
                        mat = batch_matrix(batch.column(1), layout, source=uri, row_offset=row, ids=ids)
                    if len(ids):
                        mm = pc.min_max(ids)
                        blo, bhi = mm["min"].as_py(), mm["max"].as_py()
                        lo = blo if lo is None else min(lo, blo)
                        hi = bhi if hi is None else max(hi, bhi)
                    order = np.argsort(b, kind="stable")
                    bounds = np.searchsorted(b[order], np.arange(buckets + 1))
                    for k in range(buckets):
                        sel = order[bounds[k] : bounds[k + 1]]
                        if not sel.size:
                            continue
                        sel_arr = pa.array(sel)
                        per_bucket[k]["ids"].append(ids.take(sel_arr))
                        per_bucket[k]["file"].append(np.full(sel.size, first_index + i, np.int32))
                        if vectors:
                            s = sel[sampled[sel]]
                            if s.size:
                                per_bucket[k]["s_ids"].append(ids.take(pa.array(s)))
                                per_bucket[k]["s_hash"].append(h[s])
                                per_bucket[k]["s_vec"].append(np.ascontiguousarray(mat[s]))
                    row += len(batch)
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
                if isinstance(exc, RaybcError) or is_transient(exc):
                    raise
                raise InputDataError(f"{uri}: cannot read rows from {row} on ({exc}); the file is damaged") from None
        meta = {"name": name, "rows": row, "id_min": lo, "id_max": hi}
        if copy_to is not None:
            assert dest_names is not None
            meta["bytes"] = copy_to.copy_from(store, name, dest_names[i])
        metas.append(meta)
    out: list[Any] = [metas]
    it = id_type or pa.int64()
    for p in per_bucket:
        payload = {
            "ids": pa.concat_arrays(p["ids"]) if p["ids"] else _empty_ids(it),
            "file": np.concatenate(p["file"]) if p["file"] else np.zeros(0, np.int32),
        }
        if vectors:
            payload["s_ids"] = pa.concat_arrays(p["s_ids"]) if p["s_ids"] else _empty_ids(it)
            payload["s_hash"] = np.concatenate(p["s_hash"]) if p["s_hash"] else np.zeros(0, np.uint64)
            payload["s_vec"] = np.concatenate(p["s_vec"]) if p["s_vec"] else np.zeros((0, dim), np.float32)
        out.append(payload)
    return out


# --------------------------------------------------------------------------- reduce side


def _first_duplicate_with_files(ids: pa.Array, files: np.ndarray) -> tuple[Any, list[int]] | None:
    if len(ids) < 2:
        return None
    if pa.types.is_integer(ids.type):
        a = ids.to_numpy(zero_copy_only=False)
        order = np.argsort(a, kind="stable")
        s = a[order]
        dup = np.flatnonzero(s[1:] == s[:-1])
        if not dup.size:
            return None
        value = s[dup[0]]
        return int(value), sorted({int(x) for x in files[a == value]})
    if len(pc.unique(ids)) == len(ids):
        return None
    counts = pc.value_counts(ids)
    value = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
    mask = pc.equal(ids, value).to_numpy(zero_copy_only=False)
    return value, sorted({int(x) for x in files[mask]})


def join_bucket(n_new: int, *payloads: dict[str, Any], holdout: float, parent_dim: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reduce task body: (counts and the first duplicate id, sampled pairs) for one bucket.

    ``payloads`` are the bucket's objects from the new version's map tasks (the first ``n_new``),
    then the parent version's. Pairs: ``x`` rows of z_k, ``y`` the same ids' rows of z_{k-1},
    ``key`` their sample keys and ``hold`` whether they are held out.
    """
    new, old = payloads[:n_new], payloads[n_new:]
    ids = pa.concat_arrays([p["ids"] for p in new]) if new else pa.array([], pa.int64())
    files = np.concatenate([p["file"] for p in new]) if new else np.zeros(0, np.int32)
    meta: dict[str, Any] = {"new": len(ids), "old": 0, "shared": 0, "duplicate": _first_duplicate_with_files(ids, files)}
    pairs: dict[str, Any] = {}
    if meta["duplicate"] is not None or parent_dim is None:
        return meta, pairs
    old_ids = pa.concat_arrays([p["ids"] for p in old]) if old else pa.array([], ids.type)
    meta["old"] = len(old_ids)
    if len(ids) and len(old_ids):
        meta["shared"] = int(pc.sum(pc.is_in(ids, value_set=old_ids)).as_py() or 0)
    if "s_ids" in (new[0] if new else {}) and old and "s_ids" in old[0]:
        s_ids = pa.concat_arrays([p["s_ids"] for p in new])
        s_hash = np.concatenate([p["s_hash"] for p in new])
        s_vec = np.concatenate([p["s_vec"] for p in new])
        o_ids = pa.concat_arrays([p["s_ids"] for p in old])
        o_vec = np.concatenate([p["s_vec"] for p in old])
        if len(s_ids) and len(o_ids):
            idx = pc.index_in(s_ids, value_set=o_ids)
            found = idx.is_valid().to_numpy(zero_copy_only=False)
            where = idx.filter(idx.is_valid()).to_numpy(zero_copy_only=False).astype(np.int64)
            h = s_hash[found]
            pairs = {
                "x": np.ascontiguousarray(s_vec[found]),
                "y": np.ascontiguousarray(o_vec[where]),
                "key": sample_key(h),
                "hold": holdout_mask(h, holdout),
            }
    if not pairs:
        dk = new[0]["s_vec"].shape[1] if new and "s_vec" in new[0] else 0
        pairs = {"x": np.zeros((0, dk), np.float32), "y": np.zeros((0, parent_dim), np.float32),
                 "key": np.zeros(0, np.int64), "hold": np.zeros(0, bool)}  # fmt: skip
    return meta, pairs


# --------------------------------------------------------------------------- pair-side tasks


def select(pairs: Mapping[str, Any], threshold: int, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the pairs under ``threshold``: ``part`` is "train", "holdout" or "all"."""
    if not len(pairs.get("key", ())):
        return pairs.get("x", np.zeros((0, 0), np.float32)), pairs.get("y", np.zeros((0, 0), np.float32))
    m = pairs["key"] < threshold
    if part == "train":
        m &= ~pairs["hold"]
    elif part == "holdout":
        m &= pairs["hold"]
    return pairs["x"][m], pairs["y"][m]


def pair_stats(pairs: Mapping[str, Any], threshold: int) -> dict[str, Any]:
    """Sufficient statistics of the training pairs in float64: n, sum x, sum y, X'X, X'Y, sum |y|^2."""
    x, y = select(pairs, threshold, "train")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return {
        "n": len(x64), "sx": x64.sum(0), "sy": y64.sum(0), "xtx": x64.T @ x64, "xty": x64.T @ y64,
        "yy": float((y64 * y64).sum()),
    }  # fmt: skip


def pair_errors(pairs: Mapping[str, Any], threshold: int, part: str, transform: Any, chain: Any) -> dict[str, Any]:
    """Squared error of ``transform(x)`` against y in the parent's space and, through ``chain``
    (a FanOutPlan from the parent version, or None), in every older space; with the squared norm
    of the reference in each space (relative error = err / ref; mapping to zeros scores 1)."""
    x, y = select(pairs, threshold, part)
    out: dict[str, Any] = {"n": len(x), "err": {}, "ref": {}}
    if not len(x):
        return out
    mapped = transform.apply(x.astype(np.float64))
    ref = y.astype(np.float64)
    spaces = {"parent": (mapped, ref)}
    if chain is not None:
        a, b = chain.apply(mapped.astype(np.float32)), chain.apply(ref.astype(np.float32))
        for j in a:
            spaces[j] = (a[j].astype(np.float64), b[j].astype(np.float64))
    for j, (m, r) in spaces.items():
        out["err"][j] = float(((m - r) ** 2).sum())
        out["ref"][j] = float((r * r).sum())
    return out


def pair_rows(pairs: Mapping[str, Any], threshold: int, part: str) -> dict[str, np.ndarray]:
    x, y = select(pairs, threshold, part)
    return {"x": np.ascontiguousarray(x, dtype=np.float32), "y": np.ascontiguousarray(y, dtype=np.float32)}


# --------------------------------------------------------------------------- driver


@dataclass
class EntityScan:
    """What the scan found for one entity of the new version."""

    entity: str
    files: list[dict[str, Any]]  # per new file: name, rows, id_min, id_max (+ bytes when copied)
    rows: int
    parent_rows: int
    shared: int
    pairs: list[Any] = field(default_factory=list)  # ObjectRefs of per-bucket pairs
    sampled: int = 0  # pairs under the threshold, held-out included
    threshold: int = SAMPLE_ONE

    @property
    def missing_in_parent(self) -> int:
        return self.rows - self.shared


def _remote(fn, **options):
    import ray

    return ray.remote(**options)(fn) if options else ray.remote(fn)


def _map_refs(src: SourceFiles, *, buckets: int, threshold: int, validate: bool, vectors: bool,
              copy_to: Storage | None, dest_names: Sequence[str] | None, cpus: float) -> tuple[list[Any], list[list[Any]]]:  # fmt: skip
    """Submit the map tasks of one source: (refs of file metas, [refs per bucket] per task)."""
    import ray

    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    groups = file_groups(src.rows, min_rows=buckets * MIN_OBJECT_IDS, max_groups=2 * slots)
    task = _remote(scan_group, num_returns=buckets + 1, num_cpus=cpus, max_retries=3)
    metas, bucket_refs = [], []
    for g in groups:
        refs = task.remote(
            src.store, [src.names[i] for i in g], g[0], dim=src.dim, buckets=buckets, threshold=threshold,
            validate=validate, vectors=vectors, copy_to=copy_to,
            dest_names=None if dest_names is None else [dest_names[i] for i in g],
        )  # fmt: skip
        refs = refs if isinstance(refs, list) else [refs]
        metas.append(refs[0])
        bucket_refs.append(refs[1:])
    return metas, bucket_refs


def _unwrap(exc: BaseException) -> BaseException:
    from raybc.errors import root_cause

    return root_cause(exc)


def _get(refs: Any) -> Any:
    import ray

    try:
        return ray.get(refs)
    except Exception as exc:  # noqa: BLE001 - unwrap Ray's task wrappers to the user-facing error
        cause = _unwrap(exc)
        if cause is not exc:
            raise cause.with_traceback(None) from None
        raise


def scan_entity(
    new: SourceFiles,
    parent: SourceFiles | None,
    *,
    target_pairs: int | None,
    holdout: float,
    validate: bool = True,
    copy_to: Storage | None = None,
    dest_names: Sequence[str] | None = None,
    cpus_per_task: float = 1.0,
) -> EntityScan:
    """Validate (and copy) the new files, refuse duplicate ids, count and sample the pairs.

    ``target_pairs`` pairs (held-out share included) are kept by id hash, all when fewer exist;
    ``parent=None`` checks the new files alone (no pairs). Raises the first input error found.
    """
    with_pairs = parent is not None and target_pairs != 0
    rows = new.total_rows + (parent.total_rows if parent is not None else 0)
    buckets = bucket_count(rows)
    # Shared ids are at most the smaller side: sampling at target / smaller keeps at least the
    # target when every id of the smaller side is shared (the common case); else a second pass.
    smaller = min(new.total_rows, parent.total_rows) if parent is not None else 0
    threshold = sample_threshold(target_pairs, smaller) if with_pairs else 0
    meta_refs, new_buckets = _map_refs(
        new, buckets=buckets, threshold=threshold, validate=validate, vectors=with_pairs, copy_to=copy_to,
        dest_names=dest_names, cpus=cpus_per_task,
    )  # fmt: skip
    old_buckets: list[list[Any]] = []
    if parent is not None:
        _, old_buckets = _map_refs(
            parent, buckets=buckets, threshold=threshold, validate=False, vectors=with_pairs, copy_to=None,
            dest_names=None, cpus=cpus_per_task,
        )  # fmt: skip
    files = [m for ms in _get(meta_refs) for m in ms]  # surfaces input errors of the new files first
    metas, pair_refs = _reduce(new_buckets, old_buckets, holdout=holdout, parent_dim=parent.dim if parent else None)
    for m in metas:
        if m["duplicate"] is not None:
            value, where = m["duplicate"]
            names = " and ".join(new.store.uri(new.names[i]) for i in where)
            raise InputDataError(
                f"id {value!r} occurs more than once in the {new.entity} embeddings ({names}); every id must appear exactly once"
            )
    scan = EntityScan(
        new.entity, files, rows=sum(m["new"] for m in metas), parent_rows=sum(m["old"] for m in metas),
        shared=sum(m["shared"] for m in metas), pairs=pair_refs if with_pairs else [],
    )  # fmt: skip
    if not with_pairs or scan.shared == 0:
        return scan
    final = sample_threshold(target_pairs, scan.shared)
    if final > threshold:  # the first pass sampled too few: fewer shared ids than the smaller side holds
        _, new_buckets = _map_refs(new, buckets=buckets, threshold=final, validate=False, vectors=True, copy_to=None, dest_names=None, cpus=cpus_per_task)
        _, old_buckets = _map_refs(parent, buckets=buckets, threshold=final, validate=False, vectors=True, copy_to=None, dest_names=None, cpus=cpus_per_task)  # type: ignore[arg-type]
        _, scan.pairs = _reduce(new_buckets, old_buckets, holdout=holdout, parent_dim=parent.dim)  # type: ignore[union-attr]
    scan.threshold = min(final, SAMPLE_ONE)
    count = _remote(lambda p, t: int((p["key"] < t).sum()) if len(p["key"]) else 0)
    scan.sampled = sum(_get([count.remote(p, scan.threshold) for p in scan.pairs]))
    return scan


def _reduce(new_buckets: list[list[Any]], old_buckets: list[list[Any]], *, holdout: float, parent_dim: int | None) -> tuple[list[dict], list[Any]]:
    buckets = len(new_buckets[0]) if new_buckets else 0
    task = _remote(join_bucket, num_returns=2, max_retries=3)
    meta_refs, pair_refs = [], []
    for b in range(buckets):
        args = [t[b] for t in new_buckets] + [t[b] for t in old_buckets]
        m, p = task.remote(len(new_buckets), *args, holdout=holdout, parent_dim=parent_dim)
        meta_refs.append(m)
        pair_refs.append(p)
    return _get(meta_refs), pair_refs


def sum_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for s in parts:
        if not s["n"]:
            continue
        for k, v in s.items():
            total[k] = v if k not in total else total[k] + v
    return total


def run_on_pairs(fn, refs: Sequence[Any], *args: Any) -> list[Any]:
    """``fn(pairs, *args)`` in one Ray task per bucket of pairs; the results, in bucket order."""
    return _get(submit_on_pairs(fn, refs, *args))


def submit_on_pairs(fn, refs: Sequence[Any], *args: Any) -> list[Any]:
    """:func:`run_on_pairs` without waiting: the results' object refs, in bucket order."""
    task = _remote(fn)
    shared = [a if _is_small(a) else _put(a) for a in args]
    return [task.remote(r, *shared) for r in refs]


# Statistics summed per task when there are many buckets: each is a few d x d float64 matrices.
STATS_FAN_IN = 64


def _sum_stats_of(*parts: Mapping[str, Any]) -> dict[str, Any]:
    return sum_stats(parts)


def call_on_summed_stats(fn, refs: Sequence[Any], **kwargs: Any) -> Any:
    """``fn(sum_stats(all), **kwargs)`` in a Ray task, the per-bucket statistics summed in a tree of
    tasks on the way: the driver receives ``fn``'s result only, however many buckets there are."""
    refs = list(refs)
    summed = _remote(_sum_stats_of)
    while len(refs) > STATS_FAN_IN:
        refs = [summed.remote(*refs[i : i + STATS_FAN_IN]) for i in range(0, len(refs), STATS_FAN_IN)]
    return _get(_remote(_call_on_sum).remote(fn, kwargs, *refs))


def _call_on_sum(fn, kwargs: dict[str, Any], *parts: Mapping[str, Any]) -> Any:
    return fn(sum_stats(parts), **kwargs)


def _is_small(a: Any) -> bool:
    return a is None or isinstance(a, (int, float, str, bool))


def _put(a: Any) -> Any:
    import ray

    return ray.put(a)


__all__ = [
    "EntityScan", "SourceFiles", "bucket_count", "file_groups", "id_hash", "join_bucket", "pair_errors", "pair_rows",
    "call_on_summed_stats", "pair_stats", "run_on_pairs", "sample_threshold", "scan_entity", "scan_group", "submit_on_pairs",
    "sum_stats",
]  # fmt: skip
