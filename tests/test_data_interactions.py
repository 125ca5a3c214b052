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


def test_load_dataset_turns_each_string_form_into_its_data_and_refuses_the_rest(tmp_path, monkeypatch):
    """The names jobs accept (``--dataset``): movielens-100k (from the cache folder),
    amazon:REVIEWS[,META], synthetic[:USERS,ITEMS,EDGES]; anything else a ConfigError saying
    what is expected."""
    from test_data_amazon import META, REVIEWS, write_lines
    from test_data_movielens import GROUPLENS_DATA, GROUPLENS_ITEM, check_tiny

    from raybc.data import load_dataset
    from raybc.data.amazon import load_amazon
    from raybc.data.movielens import CACHE_ENV
    from raybc.errors import ConfigError

    ml = tmp_path / "cache" / "ml-100k"  # a cached copy: nothing is downloaded
    ml.mkdir(parents=True)
    (ml / "u.data").write_text(GROUPLENS_DATA)
    (ml / "u.item").write_bytes(GROUPLENS_ITEM.encode("latin-1"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    check_tiny(load_dataset("movielens-100k"))

    write_lines(tmp_path / "r.json.gz", REVIEWS)
    write_lines(tmp_path / "m.json.gz", META)
    both = load_dataset(f"amazon:{tmp_path / 'r.json.gz'},{tmp_path / 'm.json.gz'}")
    ref = load_amazon(tmp_path / "r.json.gz", tmp_path / "m.json.gz")
    assert both.item_ids.to_pylist() == ref.item_ids.to_pylist() == ["B001", "B002", "B003"]
    assert both.attribute_names == ref.attribute_names and "brand=Fender" in both.attribute_names
    alone = load_dataset(f"amazon:{tmp_path / 'r.json.gz'}")
    assert alone.n_edges == 4 and alone.n_attributes == 0

    small = load_dataset("synthetic:50,40,300", seed=1)  # users, items, edges asked (duplicate edges merge)
    ref = synthetic_interactions(n_users=50, n_items=40, n_edges=300, seed=1)
    assert (small.n_users, small.n_items) == (50, 40) and 0 < small.n_edges <= 300
    assert np.array_equal(small.user, ref.user) and np.array_equal(small.item, ref.item)
    assert not np.array_equal(small.item, load_dataset("synthetic:50,40,300", seed=2).item)
    default, ref = load_dataset("synthetic"), synthetic_interactions(n_users=1000, n_items=600, n_edges=20_000, seed=0)
    assert (default.n_users, default.n_items) == (1000, 600) and np.array_equal(default.item, ref.item)

    for bad in ["synthetic:1,2", "synthetic:a,b,c", "synthetic:0,5,5", "synthetic:1,2,3,4"]:
        with pytest.raises(ConfigError, match=r"expected synthetic:USERS,ITEMS,EDGES with positive integers"):
            load_dataset(bad)
    for bad in ["movielens-1m", "amazon", "movielens-100k:extra", ""]:
        with pytest.raises(ConfigError, match=r"unknown data set .*; expected movielens-100k \| amazon:"):
            load_dataset(bad)
