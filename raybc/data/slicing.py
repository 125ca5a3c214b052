"""Temporal versions of an interaction data set: the paper's (the authors') train/validation split.

Edges are sorted by time and cut at edge-count quantiles q_0 < q_1 < ... (0.5, 0.6, ..., 1.0 by
default). Cut k is the timestamp of the edge at quantile q_k: t_k = timestamp[ceil(q_k * n) - 1].
"Up to t_k" always means ``timestamp <= t_k``: every edge tied with the cut edge's timestamp falls
on the same side as the cut edge, so no two edges with the same time are ever split apart, and a
slice can hold a few more edges than its quantile says when there are ties at a cut.

Version k (k = 0 .. len(quantiles) - 2) looks at the window W_k = (t_k, t_{k+1}]:

- existing users: users with an edge at time <= t_k; new users: first edge inside W_k;
- train = every edge up to t_k, plus the W_k edges of new users, except the last edge (by time,
  ties by position) of each new user with more than one edge in W_k;
- validation = every W_k edge of existing users, plus those held-back last edges;
- the graph holds every user and item seen up to t_{k+1}.

Pure numpy, no Ray, no torch. This module does not load data (see ``movielens``/``amazon``) and
does not evaluate (consumers of these slices do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raybc.data.interactions import InteractionData
from raybc.errors import ConfigError, InputDataError

DEFAULT_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class VersionSlice:
    """The graph, training edges and validation edges of one version (internal indices)."""

    version: int
    t_end: int  # t_k: the cut of this version
    t_next: int  # t_{k+1}: the end of the validation window
    users: np.ndarray  # sorted internal indices of every user seen up to t_next
    items: np.ndarray  # sorted internal indices of every item seen up to t_next
    train_user: np.ndarray  # training edges, time order (also the message-passing graph)
    train_item: np.ndarray
    val_user: np.ndarray  # validation edges, time order
    val_item: np.ndarray
    new_users: np.ndarray  # sorted users whose first edge lies in (t_end, t_next]
    train_edges: np.ndarray  # positions of the training edges in the data's edge arrays (ratings, timestamps)
    val_edges: np.ndarray  # positions of the validation edges in the data's edge arrays
    existing_users: np.ndarray  # sorted users with an edge at time <= t_end

    @property
    def n_train(self) -> int:
        return int(self.train_edges.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.val_edges.shape[0])

    @property
    def val_users(self) -> np.ndarray:
        """Sorted users with at least one validation edge (the users recall is computed for)."""
        return np.unique(self.val_user)


def check_quantiles(quantiles: Sequence[float]) -> list[str]:
    """Every problem with a quantile list (empty when it is usable)."""
    q = list(quantiles)
    problems = []
    if len(q) < 2:
        problems.append(f"quantiles: need at least two cuts (one version), got {q}")
    if any(not (0.0 < x <= 1.0) for x in q):
        problems.append(f"quantiles: every value must lie in (0, 1], got {q}")
    if any(b <= a for a, b in zip(q, q[1:])):
        problems.append(f"quantiles: must be strictly increasing, got {q}")
    return problems


def cut_positions(n_edges: int, quantiles: Sequence[float]) -> np.ndarray:
    """Index of the edge at each quantile: ceil(q * n) - 1, clipped to [0, n - 1]."""
    # The small epsilon keeps 0.6 * 100000 = 60000.000000000004 from becoming 60001 edges.
    pos = np.ceil(np.asarray(quantiles, dtype=np.float64) * n_edges - 1e-9).astype(np.int64) - 1
    return np.clip(pos, 0, n_edges - 1)


def temporal_versions(data: InteractionData, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> list[VersionSlice]:
    """One :class:`VersionSlice` per consecutive pair of quantiles (versions 0..4 by default)."""
    problems = check_quantiles(quantiles)
    if problems:
        raise ConfigError(problems, source="temporal_versions")
    n = data.n_edges
    if n == 0:
        raise InputDataError(f"interaction data {data.name!r} has no edges; nothing to slice")
    ts, user, item = data.timestamp, data.user, data.item
    if n > 1 and np.any(np.diff(ts) < 0):
        raise InputDataError(f"interaction data {data.name!r}: timestamps are not sorted; build it with build_interactions")
    cuts = ts[cut_positions(n, quantiles)]
    # ends[k]: number of edges with timestamp <= t_k (ties at a cut go with the cut edge).
    ends = np.searchsorted(ts, cuts, side="right")

    # First edge position of each user (edges are in time order). Users without edges: n.
    first_pos = np.full(data.n_users, n, dtype=np.int64)
    uniq, first = np.unique(user, return_index=True)
    first_pos[uniq] = first

    out = []
    for k in range(len(quantiles) - 1):
        lo, hi = int(ends[k]), int(ends[k + 1])
        w_pos = np.arange(lo, hi, dtype=np.int64)
        w_user = user[lo:hi]
        is_new = first_pos[w_user] >= lo  # first edge inside the window (it cannot lie beyond it)
        # Last window edge of each user: the first occurrence in the reversed window.
        wu_rev = w_user[::-1]
        uniq_w, first_rev, counts = np.unique(wu_rev, return_index=True, return_counts=True)
        last_pos = np.full(data.n_users, -1, dtype=np.int64)
        last_pos[uniq_w] = hi - 1 - first_rev
        count = np.zeros(data.n_users, dtype=np.int64)
        count[uniq_w] = counts
        held = is_new & (w_pos == last_pos[w_user]) & (count[w_user] > 1)

        train_edges = np.concatenate([np.arange(lo, dtype=np.int64), w_pos[is_new & ~held]])
        val_edges = w_pos[~is_new | held]
        seen = np.arange(hi)
        out.append(
            VersionSlice(
                version=k,
                t_end=int(cuts[k]),
                t_next=int(cuts[k + 1]),
                users=np.unique(user[seen]),
                items=np.unique(item[seen]),
                train_user=user[train_edges],
                train_item=item[train_edges],
                val_user=user[val_edges],
                val_item=item[val_edges],
                new_users=np.unique(w_user[is_new]),
                train_edges=train_edges,
                val_edges=val_edges,
                existing_users=np.flatnonzero(first_pos < lo),
            )
        )
    return out
