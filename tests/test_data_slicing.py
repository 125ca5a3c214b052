"""Temporal versions: the authors' split rule, checked against a plain-Python reference and by invariants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from raybc.data.interactions import build_interactions, synthetic_interactions
from raybc.data.slicing import DEFAULT_QUANTILES, cut_positions, temporal_versions
from raybc.errors import ConfigError


def reference_split(user, item, ts, quantiles):
    """The rule written edge by edge, as DESIGN.md states it (edges already in time order)."""
    n = len(ts)
    cuts = [ts[max(0, min(n - 1, int(np.ceil(q * n - 1e-9)) - 1))] for q in quantiles]
    out = []
    for k in range(len(quantiles) - 1):
        t_k, t_next = cuts[k], cuts[k + 1]
        existing = {user[e] for e in range(n) if ts[e] <= t_k}
        window = [e for e in range(n) if t_k < ts[e] <= t_next]
        new_edges: dict[int, list[int]] = {}
        for e in window:
            if user[e] not in existing:
                new_edges.setdefault(user[e], []).append(e)
        held = {edges[-1] for edges in new_edges.values() if len(edges) > 1}
        train = [e for e in range(n) if ts[e] <= t_k] + [e for e in window if user[e] not in existing and e not in held]
        val = [e for e in window if user[e] in existing or e in held]
        seen = [e for e in range(n) if ts[e] <= t_next]
        out.append(
            dict(
                train=sorted(train),
                val=sorted(val),
                users=sorted({user[e] for e in seen}),
                items=sorted({item[e] for e in seen}),
                new=sorted(new_edges),
                t=(t_k, t_next),
            )
        )
    return out


def test_hand_made_example_with_ties_at_the_cut():
    # 10 edges; quantile 0.5 -> edge 4 (t=4), but edge 5 shares t=4 and so goes with it.
    # user a: existing; user b: new in window 0 with two edges (last held back);
    # user c: new with a single edge (train only).
    rows = [
        ("a", 1, 1), ("a", 2, 2), ("x", 1, 3), ("x", 3, 3), ("a", 3, 4), ("x", 2, 4),
        ("b", 1, 5), ("a", 4, 6), ("b", 2, 6), ("c", 5, 7),
    ]
    data = build_interactions(
        name="hand",
        user=[r[0] for r in rows],
        item=[r[1] for r in rows],
        rating=np.ones(len(rows)),
        timestamp=[r[2] for r in rows],
    )
    (v0,) = temporal_versions(data, quantiles=(0.5, 1.0))
    uid = data.user_ids.to_pylist()
    assert (v0.t_end, v0.t_next) == (4, 7)
    assert v0.train_edges.tolist() == [0, 1, 2, 3, 4, 5, 6, 9]  # b's first edge and c's only edge train
    assert v0.val_edges.tolist() == [7, 8]  # a's edge at t=6 (existing) and b's held-back last edge
    assert [uid[u] for u in v0.new_users] == ["b", "c"]
    assert [uid[u] for u in v0.existing_users] == ["a", "x"]
    assert v0.users.tolist() == [0, 1, 2, 3] and v0.items.size == 5
    assert v0.val_item.tolist() == [3, 1]  # items 4 and 2 (internal 3 and 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_on_synthetic_data(seed):
    # Coarse timestamps create many ties at the cuts.
    data = synthetic_interactions(n_users=120, n_items=60, n_edges=1500, n_clusters=4, seed=seed)
    data = dataclasses.replace(data, timestamp=data.timestamp // 86_400)
    versions = temporal_versions(data)
    ref = reference_split(data.user.tolist(), data.item.tolist(), data.timestamp.tolist(), DEFAULT_QUANTILES)
    assert len(versions) == len(DEFAULT_QUANTILES) - 1 == len(ref)
    for v, r in zip(versions, ref):
        assert v.train_edges.tolist() == r["train"]
        assert v.val_edges.tolist() == r["val"]
        assert v.users.tolist() == r["users"] and v.items.tolist() == r["items"]
        assert v.new_users.tolist() == r["new"]
        assert (v.t_end, v.t_next) == r["t"]


def test_invariants_on_a_larger_synthetic_set():
    data = synthetic_interactions(n_users=3000, n_items=800, n_edges=60_000, seed=7)
    versions = temporal_versions(data)
    n = data.n_edges
    for k, v in enumerate(versions):
        train, val = set(v.train_edges.tolist()), set(v.val_edges.tolist())
        assert not train & val, "train and validation share edges"
        # Train + val is exactly every edge up to t_next.
        upto_next = int(np.searchsorted(data.timestamp, v.t_next, side="right"))
        assert len(train) + len(val) == upto_next
        # Train starts with every edge up to t_k: at least the quantile's count (ties only add).
        upto = int(np.searchsorted(data.timestamp, v.t_end, side="right"))
        assert upto >= int(np.ceil(DEFAULT_QUANTILES[k] * n - 1e-9))
        assert np.array_equal(v.train_edges[:upto], np.arange(upto))
        # Validation edges: their users and items are in the graph.
        assert np.isin(v.val_user, v.users).all() and np.isin(v.val_item, v.items).all()
        assert np.isin(v.train_user, v.users).all() and np.isin(v.train_item, v.items).all()
        # New users: each with > 1 window edge has exactly one validation edge, its last window edge.
        win_users = data.user[upto:upto_next]
        counts = np.bincount(win_users, minlength=data.n_users)
        new_val = v.val_user[np.isin(v.val_user, v.new_users)]
        assert np.array_equal(np.sort(new_val), np.flatnonzero((counts > 1) & np.isin(np.arange(data.n_users), v.new_users)))
        for u in new_val[:50]:
            last = upto + int(np.flatnonzero(win_users == u)[-1])
            assert last in val and all(e in train for e in upto + np.flatnonzero(win_users == u)[:-1])
        # New users were not there at t_k; existing users were; val users are one or the other.
        assert not np.isin(v.new_users, v.existing_users).any()
        assert np.isin(v.val_user, np.union1d(v.new_users, v.existing_users)).all()
        # The synthetic set's arrivals make the new-user rule supply validation users.
        assert new_val.size > 0.2 * np.unique(v.val_user).size
        assert v.train_user.tolist() == data.user[v.train_edges].tolist()
    assert versions[-1].t_next == data.timestamp[-1] and versions[-1].users.size == np.unique(data.user).size


def test_cut_positions_and_bad_quantiles():
    assert cut_positions(100_000, DEFAULT_QUANTILES).tolist() == [49_999, 59_999, 69_999, 79_999, 89_999, 99_999]
    assert cut_positions(3, (0.1, 1.0)).tolist() == [0, 2]
    data = synthetic_interactions(n_users=10, n_items=5, n_edges=40)
    with pytest.raises(ConfigError, match="strictly increasing"):
        temporal_versions(data, quantiles=(0.5, 0.5, 1.0))
    with pytest.raises(ConfigError, match=r"(?s)at least two.*\(0, 1\]"):
        temporal_versions(data, quantiles=(1.5,))
