"""User-item interaction data: one in-memory container every data set loads into, and a synthetic one.

:class:`InteractionData` holds the edges (user, item, rating, timestamp) sorted by time, with
internal indices 0..n-1 for users and items, the data set's own external ids beside them (so
embeddings can be written under MovieLens user_id / Amazon reviewerID, never internal indices),
and item attributes as a CSR over an attribute vocabulary ("genre=Action", "brand=Fender").

:func:`build_interactions` turns edges with external ids into that container (loaders use it);
:func:`synthetic_interactions` plants cluster structure of any size for tests and benchmarks.

This module is not a loader of real files (see ``movielens`` and ``amazon``) and does not split
data into versions (see ``slicing``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raybc.errors import InputDataError


@dataclass(frozen=True)
class InteractionData:
    """User-item interactions with item attributes; internal indices 0..n-1, external ids kept.

    Edges are sorted by timestamp (stable: ties keep the order in which they were given).
    """

    name: str
    user_ids: pa.Array  # external id of internal user index u (int64 or string)
    item_ids: pa.Array  # external id of internal item index i (int64 or string)
    user: np.ndarray  # (n_edges,) int64 internal user index per edge
    item: np.ndarray  # (n_edges,) int64 internal item index per edge
    rating: np.ndarray  # (n_edges,) float32
    timestamp: np.ndarray  # (n_edges,) int64 seconds, non-decreasing
    item_attr_indptr: np.ndarray  # (n_items + 1,) int64 CSR row pointer
    item_attr_indices: np.ndarray  # (nnz,) int64 indices into attribute_names
    attribute_names: tuple[str, ...]

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_edges(self) -> int:
        return int(self.user.shape[0])

    @property
    def n_attributes(self) -> int:
        return len(self.attribute_names)

    def item_attributes(self, item: int) -> np.ndarray:
        """Attribute indices of internal item ``item``."""
        return self.item_attr_indices[self.item_attr_indptr[item] : self.item_attr_indptr[item + 1]]

    def validate(self) -> InteractionData:
        """Check shapes, dtypes, ranges and order; raise one InputDataError listing every problem."""
        problems: list[str] = []
        n = self.n_edges
        for field, dtype in (("user", np.int64), ("item", np.int64), ("rating", np.float32), ("timestamp", np.int64)):
            arr = getattr(self, field)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1:
                problems.append(f"{field}: must be a 1-d numpy array")
                continue
            if arr.dtype != dtype:
                problems.append(f"{field}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
            if arr.shape[0] != n:
                problems.append(f"{field}: {arr.shape[0]} entries, expected one per edge ({n})")
        if problems:
            raise InputDataError(_problems_message(self.name, problems))
        for field, ids in (("user_ids", self.user_ids), ("item_ids", self.item_ids)):
            if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
                problems.append(f"{field}: type {ids.type}; ids must be int64 or string")
            if ids.null_count:
                problems.append(f"{field}: {ids.null_count} null ids")
            if pc.count_distinct(ids).as_py() != len(ids):
                problems.append(f"{field}: ids are not unique; one internal index per external id")
        for field, bound in (("user", self.n_users), ("item", self.n_items)):
            arr = getattr(self, field)
            if n and (arr.min() < 0 or arr.max() >= bound):
                problems.append(f"{field}: indices must lie in [0, {bound}); found [{arr.min()}, {arr.max()}]")
        if n and not np.all(np.isfinite(self.rating)):
            problems.append("rating: non-finite values")
        if n > 1 and np.any(np.diff(self.timestamp) < 0):
            first = int(np.argmax(np.diff(self.timestamp) < 0))
            problems.append(f"timestamp: not sorted (edge {first + 1} is earlier than edge {first})")
        indptr, indices = self.item_attr_indptr, self.item_attr_indices
        if indptr.dtype != np.int64 or indices.dtype != np.int64:
            problems.append("item_attr_indptr/item_attr_indices: dtype must be int64")
        if indptr.shape != (self.n_items + 1,):
            problems.append(f"item_attr_indptr: shape {indptr.shape}, expected ({self.n_items + 1},)")
        elif indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
            problems.append("item_attr_indptr: must start at 0, never decrease and end at len(item_attr_indices)")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_attributes):
            problems.append(f"item_attr_indices: must lie in [0, {self.n_attributes})")
        if len(set(self.attribute_names)) != self.n_attributes:
            problems.append("attribute_names: duplicates in the vocabulary")
        if problems:
            raise InputDataError(_problems_message(self.name, problems))
        return self


def _problems_message(name: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"interaction data {name!r} is inconsistent ({len(problems)} problem(s)); fix the loader or the input:\n{lines}"


def _id_array(ids: np.ndarray) -> pa.Array:
    """Sorted unique external ids as an int64 or string Arrow array."""
    if ids.dtype.kind in "iu":
        return pa.array(ids.astype(np.int64), type=pa.int64())
    return pa.array([str(x) for x in ids], type=pa.string())


def build_interactions(
    *,
    name: str,
    user: Sequence[Any] | np.ndarray,
    item: Sequence[Any] | np.ndarray,
    rating: Sequence[float] | np.ndarray,
    timestamp: Sequence[int] | np.ndarray,
    item_attributes: Mapping[Any, Sequence[str]] | None = None,
) -> InteractionData:
    """Edges given by external ids -> :class:`InteractionData`.

    Internal indices follow the sorted order of the external ids (MovieLens user_id 1 -> 0).
    Edges are sorted by timestamp, stably. ``item_attributes`` maps an external item id to its
    attribute strings; items absent from it get none. The vocabulary is sorted and holds only
    attributes of items that have edges (metadata of items nobody interacted with is ignored).
    """
    user_arr, item_arr = np.asarray(user), np.asarray(item)
    rating_arr = np.asarray(rating, dtype=np.float32)
    ts_arr = np.asarray(timestamp, dtype=np.int64)
    if not (len(user_arr) == len(item_arr) == len(rating_arr) == len(ts_arr)):
        raise InputDataError(
            f"interaction data {name!r}: user, item, rating and timestamp must have one entry per edge; "
            f"got {len(user_arr)}, {len(item_arr)}, {len(rating_arr)}, {len(ts_arr)}"
        )
    user_ids, user_idx = np.unique(user_arr, return_inverse=True)
    item_ids, item_idx = np.unique(item_arr, return_inverse=True)
    order = np.argsort(ts_arr, kind="stable")
    item_id_arr = _id_array(item_ids)

    attrs = item_attributes or {}
    per_item = [attrs.get(ext, ()) for ext in item_id_arr.to_pylist()]
    vocab = sorted({a for values in per_item for a in values})  # only attributes of items with edges
    code = {a: j for j, a in enumerate(vocab)}
    indptr = np.zeros(len(item_ids) + 1, dtype=np.int64)
    indices: list[int] = []
    for i, values in enumerate(per_item):
        mine = sorted({code[a] for a in values})
        indices.extend(mine)
        indptr[i + 1] = len(indices)
    return InteractionData(
        name=name,
        user_ids=_id_array(user_ids),
        item_ids=item_id_arr,
        user=user_idx.reshape(-1)[order].astype(np.int64),
        item=item_idx.reshape(-1)[order].astype(np.int64),
        rating=rating_arr[order],
        timestamp=ts_arr[order],
        item_attr_indptr=indptr,
        item_attr_indices=np.asarray(indices, dtype=np.int64),
        attribute_names=tuple(vocab),
    ).validate()


# --- synthetic interactions -------------------------------------------------------------------

# Probability that an edge goes to an item of the user's own cluster: high enough that the
# planted structure is easy to measure (and learn), low enough that cross-cluster edges exist.
IN_CLUSTER_PROB = 0.8
# Probability that an item attribute is one of its cluster's attributes (else any attribute).
ATTR_IN_CLUSTER_PROB = 0.8
# Attributes drawn per item (duplicates merge, so an item has 1..3).
ATTRS_PER_ITEM = 3
# Mean rating inside / outside the cluster; noise 0.8 keeps the two distributions overlapping.
RATING_IN, RATING_OUT, RATING_NOISE = 4.2, 2.4, 0.8
# Time span of the synthetic data (about 7 months, like MovieLens-100K) and its start (2001-09-09).
SPAN_SECONDS = 200 * 86_400
START_SECONDS = 1_000_000_000
# Users arrive uniformly over the first ARRIVAL_FRACTION of the span and then rate in a burst of
# mean BURST_FRACTION of the span: most users are "new" in the slice where they arrive, as in
# MovieLens, so the temporal new-user rule matters.
ARRIVAL_FRACTION = 0.95
BURST_FRACTION = 0.03
# External ids are internal index + ID_OFFSET, so code that confuses the two fails in tests.
ID_OFFSET = 1


def synthetic_interactions(
    *,
    n_users: int,
    n_items: int,
    n_edges: int,
    n_clusters: int = 8,
    n_attributes: int = 32,
    seed: int = 0,
    name: str = "synthetic",
) -> InteractionData:
    """Interactions with planted cluster structure, deterministic per seed.

    - Users and items belong to latent clusters (``user_cluster``/``item_cluster`` from
      :func:`synthetic_clusters` with the same arguments); an edge goes to an item of the user's
      cluster with probability IN_CLUSTER_PROB, else to any item.
    - Item attributes ("attr=07") correlate with the item's cluster; ratings (1..5) are higher
      inside the cluster.
    - Users arrive over time and rate in a burst after arriving, so new users appear in every slice.
    - Every user has at least one edge when ``n_edges >= n_users``. A repeated (user, item) pair
      keeps only its earliest edge, so the result can hold slightly fewer than ``n_edges`` edges.
    - External ids are int64, internal index + 1.
    """
    problems = [
        f"{k} must be >= 1 (got {v})" for k, v in (("n_users", n_users), ("n_items", n_items), ("n_edges", n_edges), ("n_clusters", n_clusters)) if v < 1
    ]
    if n_attributes < 0:
        problems.append(f"n_attributes must be >= 0 (got {n_attributes})")
    if problems:
        raise ValueError("synthetic_interactions: " + "; ".join(problems))
    rng = np.random.default_rng(seed)
    user_cluster, item_cluster = _clusters(rng, n_users=n_users, n_items=n_items, n_clusters=n_clusters)
    k = int(item_cluster.max()) + 1  # clusters that own at least one item

    # Users per edge: each user once (while edges last), the rest uniform.
    cover = min(n_users, n_edges)
    user = np.concatenate([rng.permutation(n_users)[:cover], rng.integers(0, n_users, n_edges - cover)])
    # Items: in the user's cluster with IN_CLUSTER_PROB (items grouped by cluster, pick an offset).
    by_cluster = np.argsort(item_cluster, kind="stable")
    starts = np.searchsorted(item_cluster[by_cluster], np.arange(k + 1))
    uc = user_cluster[user]
    in_cluster = rng.random(n_edges) < IN_CLUSTER_PROB
    offset = (rng.random(n_edges) * (starts[uc + 1] - starts[uc])).astype(np.int64)
    item = np.where(in_cluster, by_cluster[starts[uc] + offset], rng.integers(0, n_items, n_edges))
    same = item_cluster[item] == uc

    mean = np.where(same, RATING_IN, RATING_OUT)
    rating = np.clip(np.rint(mean + RATING_NOISE * rng.standard_normal(n_edges)), 1, 5).astype(np.float32)

    arrival = rng.random(n_users) * ARRIVAL_FRACTION * SPAN_SECONDS
    t = arrival[user] + rng.exponential(BURST_FRACTION * SPAN_SECONDS, n_edges)
    timestamp = START_SECONDS + np.minimum(t, SPAN_SECONDS).astype(np.int64)

    # Sort by time, then keep the earliest edge of each (user, item) pair.
    order = np.argsort(timestamp, kind="stable")
    user, item, rating, timestamp = user[order], item[order], rating[order], timestamp[order]
    _, first = np.unique(user * np.int64(n_items) + item, return_index=True)
    keep = np.sort(first)
    user, item, rating, timestamp = user[keep], item[keep], rating[keep], timestamp[keep]

    indptr, indices = _synthetic_attributes(rng, item_cluster, n_clusters=k, n_attributes=n_attributes)
    width = len(str(max(n_attributes - 1, 0)))
    return InteractionData(
        name=name,
        user_ids=pa.array(np.arange(n_users, dtype=np.int64) + ID_OFFSET),
        item_ids=pa.array(np.arange(n_items, dtype=np.int64) + ID_OFFSET),
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        rating=rating,
        timestamp=timestamp,
        item_attr_indptr=indptr,
        item_attr_indices=indices,
        attribute_names=tuple(f"attr={j:0{width}d}" for j in range(n_attributes)),
    ).validate()


def synthetic_clusters(*, n_users: int, n_items: int, n_clusters: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The planted (user_cluster, item_cluster) of ``synthetic_interactions`` with the same arguments."""
    return _clusters(np.random.default_rng(seed), n_users=n_users, n_items=n_items, n_clusters=n_clusters)


def _clusters(rng: np.random.Generator, *, n_users: int, n_items: int, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    # Items round-robin over the clusters (every cluster non-empty while n_items >= n_clusters);
    # users only join clusters that own items. Drawn first, so synthetic_clusters can replay them.
    k = min(n_clusters, n_items)
    item_cluster = rng.permutation(np.arange(n_items, dtype=np.int64) % k)
    user_cluster = rng.integers(0, k, n_users).astype(np.int64)
    return user_cluster, item_cluster


def _synthetic_attributes(
    rng: np.random.Generator, item_cluster: np.ndarray, *, n_clusters: int, n_attributes: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR of item attributes: attribute j belongs to cluster j % m (m = min(clusters, attributes))."""
    n_items = len(item_cluster)
    if n_attributes == 0:
        return np.zeros(n_items + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    m = min(n_clusters, n_attributes)
    r = np.repeat(item_cluster % m, ATTRS_PER_ITEM)
    count = (n_attributes - 1 - r) // m + 1  # attributes j < n_attributes with j % m == r
    own = r + m * (rng.random(len(r)) * count).astype(np.int64)
    anyone = rng.integers(0, n_attributes, len(r))
    attr = np.where(rng.random(len(r)) < ATTR_IN_CLUSTER_PROB, own, anyone)
    rows = np.repeat(np.arange(n_items, dtype=np.int64), ATTRS_PER_ITEM)
    pairs = np.unique(rows * n_attributes + attr)  # sorted by item, then attribute; duplicates merged
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // n_attributes, minlength=n_items), out=indptr[1:])
    return indptr, (pairs % n_attributes).astype(np.int64)
