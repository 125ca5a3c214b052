"""Consumer tasks: rank ROC-AUC against the pairwise definition, label builders on hand-made edges,
the consumer MLP learning a planted signal and surviving a safetensors round trip."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raybc.consumers import TASKS, Consumer, ConsumerOptions, build_all_labels, build_labels, features, roc_auc, window_edges
from raybc.data.interactions import build_interactions, synthetic_interactions
from raybc.data.slicing import temporal_versions
from raybc.embeddings import make_table
from raybc.errors import ConfigError, InputDataError


def pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


def test_roc_auc_edges():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2]))


@pytest.fixture
def tiny():
    # t: users 10, 20 rate before the cut (t <= 4); window (4, 8]: user 10 rates twice, user 30 is new.
    edges = [
        (10, "a", 5, 1), (20, "a", 2, 2), (10, "b", 3, 3), (20, "c", 4, 4),
        (10, "c", 2, 5), (10, "d", 5, 6), (30, "a", 1, 7), (30, "b", 4, 8),
    ]  # fmt: skip
    u, i, r, t = zip(*edges)
    data = build_interactions(name="tiny", user=list(u), item=list(i), rating=list(r), timestamp=list(t))
    sl = temporal_versions(data, quantiles=(0.5, 1.0))[0]
    return data, sl


def test_labels_follow_the_next_window(tiny):
    data, sl = tiny
    assert list(window_edges(data, sl)) == [4, 5, 6, 7]
    edge = build_labels(data, sl, "binary-edge-rating").table
    assert edge.column("user_id").to_pylist() == [10, 10, 30, 30]
    assert edge.column("item_id").to_pylist() == ["c", "d", "a", "b"]
    assert edge.column("label").to_pylist() == [0, 1, 0, 1]
    act = build_labels(data, sl, "user-activity").table
    assert act.column("id").to_pylist() == [10, 20] and act.column("label").to_pylist() == [1, 0]
    posact = build_labels(data, sl, "user-positive-activity").table
    assert posact.column("label").to_pylist() == [1, 0]  # user 10's best window rating is 5
    avg = build_labels(data, sl, "binary-item-rating-avg", min_item_ratings=1).table
    # window means: a 1, b 4, c 2, d 5 -> median 3 -> a 0, b 1, c 0, d 1
    assert avg.column("id").to_pylist() == ["a", "b", "c", "d"] and avg.column("label").to_pylist() == [0, 1, 0, 1]
    std = build_labels(data, sl, "binary-item-rating-std", min_item_ratings=1).table
    assert std.column("label").to_pylist() == [0, 0, 0, 0]  # one rating each: std 0
    assert build_labels(data, sl, "binary-item-rating-avg", min_item_ratings=2).rows == 0
    with pytest.raises(ConfigError, match="unknown consumer task 'nope'"):
        build_labels(data, sl, "nope")


def test_every_task_has_both_classes_on_synthetic_data():
    data = synthetic_interactions(n_users=400, n_items=200, n_edges=8000, seed=0)
    sl = temporal_versions(data)[0]
    labels = build_all_labels(data, sl, min_item_ratings=5)
    assert set(labels) == set(TASKS)
    for task, lab in labels.items():
        y = lab.labels
        assert lab.rows > 20 and 0 < y.mean() < 1, (task, lab.rows, y.mean())
        assert set(lab.table.column("split").to_pylist()) == {"train", "val", "test"}


@pytest.mark.slow
def test_consumer_learns_a_planted_signal_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 600, 8
    z = rng.normal(size=(n, d)).astype(np.float32) * 5 + 3  # off-centre, large scale: standardisation matters
    y = (z[:, 0] - 3 + 0.5 * rng.normal(size=n) > 0).astype(np.int8)
    ids = np.arange(n) + 100
    split = np.where(np.arange(n) % 5 == 0, "test", np.where(np.arange(n) % 5 == 1, "val", "train"))
    from raybc.consumers import TaskLabels

    labels = TaskLabels("user-activity", 0, pa.table({"id": ids, "label": y, "split": split}))
    x = features(labels, {"users": make_table(ids[::-1].copy(), z[::-1].copy())})  # joined by id, not by position
    np.testing.assert_array_equal(x, z)
    opts = ConsumerOptions(hidden=[8, 16], dropout=[0.0], seeds=[0, 1], epochs=80)
    c = Consumer.fit(labels, x, options=opts)
    assert c.spec["hidden"] in (8, 16) and c.spec["test_auc"] > 0.85
    assert set(c.spec["grid"]) == {"hidden=8,dropout=0.0", "hidden=16,dropout=0.0"}
    assert c.score(x, y)["auc"] > 0.85
    # a space the consumer was not trained on (a rotation) costs it dearly
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    assert c.score((z - 3) @ q.astype(np.float32) + 3, y)["auc"] < 0.75
    # persistence without pickle
    from safetensors.numpy import load, save

    back = Consumer.from_tensors(dict(c.spec), load(save(c.tensors())))
    np.testing.assert_allclose(back.predict(x), c.predict(x), rtol=0, atol=0)
    with pytest.raises(InputDataError, match="takes 8-dim inputs"):
        c.predict(x[:, :4])
    with pytest.raises(InputDataError, match="user id.*first: 100"):
        features(labels, {"users": make_table(ids[1:], z[1:])})


def _planted(n=400, d=6, seed=0):
    from raybc.consumers import TaskLabels

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d)).astype(np.float32)
    y = (z[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.int8)
    split = np.where(np.arange(n) % 5 == 0, "test", np.where(np.arange(n) % 5 == 1, "val", "train"))
    return TaskLabels("user-activity", 0, pa.table({"id": np.arange(n), "label": y, "split": split})), z, y


def test_the_authors_deeper_mlp_with_batchnorm_learns_and_round_trips():
    from safetensors.numpy import load, save

    labels, z, y = _planted()
    opts = ConsumerOptions(hidden=[16], dropout=[0.25], seeds=[0, 1], epochs=60, layers=2, batch_norm=True)
    c = Consumer.fit(labels, z, options=opts)
    assert c.spec["layers"] == 2 and c.spec["batch_norm"] is True and c.spec["test_auc"] > 0.85
    assert len(c.models[0].more) == 1 and len(c.models[0].norms) == 2
    back = Consumer.from_tensors(dict(c.spec), load(save(c.tensors())))
    np.testing.assert_allclose(back.predict(z), c.predict(z), rtol=0, atol=0)
    before = back.predict(z)
    with torch.no_grad():
        back.models[0].norms[0].running_mean += 5.0  # the BatchNorm statistics take part in the prediction
    assert np.abs(back.predict(z)[0] - before[0]).max() > 1e-3 and np.array_equal(back.predict(z)[1], before[1])
    one = Consumer.fit(labels, z, options=ConsumerOptions(hidden=[16], dropout=[0.0], seeds=[0], epochs=20))
    assert sorted(k.split(".", 1)[1] for k in one.tensors()) == sorted(["mean", "std", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])


def test_a_consumer_chosen_on_another_versions_rows_trains_on_every_row():
    from raybc.consumers import TaskLabels

    labels, z, y = _planted()
    # splits of one class each (train: the positives, val and test: the negatives): the ordinary fit cannot train ...
    split = np.where(y == 1, "train", np.where(np.arange(len(y)) % 2 == 0, "val", "test"))
    t = labels.table
    odd = TaskLabels("user-activity", 0, t.set_column(t.schema.get_field_index("split"), "split", pa.array(split)))
    opts = ConsumerOptions(hidden=[8, 16], dropout=[0.0], seeds=[0], epochs=40)
    with pytest.raises(InputDataError, match="the train split has .* rows of a single class"):
        Consumer.fit(odd, z, options=opts)
    # ... chosen on other rows (version 1's), it trains on every row, both classes, and records where it was chosen
    _, z1, y1 = _planted(seed=1)
    c = Consumer.fit(odd, z, options=opts, validation=(z1, y1, 1))
    assert c.spec["selected_on_version"] == 1 and c.spec["test_auc"] is None
    assert c.spec["val_auc"] == pytest.approx(max(c.spec["grid"].values())) and c.score(z1, y1)["auc"] > 0.85
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        ConsumerOptions(select_on_next_version=["nope"])
