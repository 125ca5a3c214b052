"""InteractionData: construction from external ids, validation, and the synthetic generator's planted structure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from raybc.data.interactions import (
    IN_CLUSTER_PROB,
    InteractionData,
    build_interactions,
    synthetic_clusters,
    synthetic_interactions,
)
from raybc.errors import InputDataError

SIZES = dict(n_users=600, n_items=300, n_edges=12_000, n_clusters=6, n_attributes=24)


@pytest.fixture(scope="module")
def synth() -> InteractionData:
    return synthetic_interactions(**SIZES, seed=3)


def test_build_interactions_maps_ids_sorts_by_time_and_builds_attributes():
    data = build_interactions(
        name="tiny",
        user=["u2", "u1", "u2", "u3"],
        item=[20, 10, 10, 30],
        rating=[5, 4, 3, 1],
        timestamp=[30, 10, 10, 5],  # the two edges at t=10 keep their given order
        item_attributes={10: ["genre=Drama", "year=1990s"], 30: ["genre=Action"], 99: ["genre=Unused"]},
    )
    assert data.user_ids.to_pylist() == ["u1", "u2", "u3"]
    assert data.item_ids.type == pa.int64() and data.item_ids.to_pylist() == [10, 20, 30]
    assert data.timestamp.tolist() == [5, 10, 10, 30]
    assert data.user.tolist() == [2, 0, 1, 1] and data.item.tolist() == [2, 0, 0, 1]
    assert data.rating.dtype == np.float32 and data.rating.tolist() == [1, 4, 3, 5]
    names = data.attribute_names
    assert names == ("genre=Action", "genre=Drama", "year=1990s")  # item 99 has no edges: its attributes are left out
    assert [names[j] for j in data.item_attributes(0)] == ["genre=Drama", "year=1990s"]
    assert data.item_attributes(1).size == 0  # item 20 has no metadata
    assert [names[j] for j in data.item_attributes(2)] == ["genre=Action"]
    assert (data.n_users, data.n_items, data.n_edges, data.n_attributes) == (3, 3, 4, 3)


def test_validate_lists_every_problem(synth):
    bad = dataclasses.replace(
        synth,
        user=synth.user.copy(),
        timestamp=synth.timestamp[::-1].copy(),
        item_attr_indptr=synth.item_attr_indptr[:-1],
    )
    bad.user[0] = synth.n_users
    with pytest.raises(InputDataError, match=r"(?s)user: indices must lie in \[0, 600\).*timestamp: not sorted.*item_attr_indptr: shape"):
        bad.validate()
    with pytest.raises(InputDataError, match="rating: 3 entries"):
        dataclasses.replace(synth, rating=np.ones(3, np.float32)).validate()


def test_synthetic_is_deterministic_and_well_formed(synth):
    again = synthetic_interactions(**SIZES, seed=3)
    other = synthetic_interactions(**SIZES, seed=4)
    assert np.array_equal(synth.user, again.user) and np.array_equal(synth.timestamp, again.timestamp)
    assert not np.array_equal(synth.item, other.item)
    synth.validate()
    assert synth.n_users == 600 and synth.n_items == 300 and synth.n_attributes == 24
    assert 0.85 * 12_000 <= synth.n_edges <= 12_000
    assert synth.user_ids.to_pylist()[:3] == [1, 2, 3]  # external ids differ from internal indices
    assert np.unique(synth.user).size == 600  # every user has an edge
    pairs = synth.user * synth.n_items + synth.item
    assert np.unique(pairs).size == synth.n_edges  # no repeated (user, item) pair


def test_synthetic_plants_measurable_structure(synth):
    user_cluster, item_cluster = synthetic_clusters(n_users=600, n_items=300, n_clusters=6, seed=3)
    same = user_cluster[synth.user] == item_cluster[synth.item]
    # In-cluster share: IN_CLUSTER_PROB plus chance (1/6) for the random rest, less dedup losses.
    assert same.mean() > IN_CLUSTER_PROB - 0.05
    assert synth.rating[same].mean() - synth.rating[~same].mean() > 1.0
    # Attributes: an item's attributes mostly belong to its cluster (attribute j -> cluster j % 6).
    rows = np.repeat(np.arange(synth.n_items), np.diff(synth.item_attr_indptr))
    own = (synth.item_attr_indices % 6) == item_cluster[rows]
    assert own.mean() > 0.75
    # New users keep arriving: the second half of time holds many users' first edges.
    first_ts = np.full(synth.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, synth.user, synth.timestamp)
    median_t = synth.timestamp[synth.n_edges // 2]
    assert (first_ts > median_t).mean() > 0.3


def test_synthetic_handles_degenerate_sizes():
    data = synthetic_interactions(n_users=5, n_items=2, n_edges=3, n_clusters=8, n_attributes=0)
    assert data.n_attributes == 0 and data.item_attr_indices.size == 0 and data.n_edges <= 3
    with pytest.raises(ValueError, match="n_users must be >= 1"):
        synthetic_interactions(n_users=0, n_items=2, n_edges=3)
