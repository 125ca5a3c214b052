"""Training: losses, checkpoints, every method through fit_version (in-process Ray Train), the
registries they leave backfilled, and two Ray Train workers against one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raybc.data.interactions import synthetic_interactions
from raybc.data.slicing import temporal_versions
from raybc.errors import ConfigError, RegistryError
from raybc.registry import Registry
from raybc.storage import Storage, file_stamp
from raybc.train.fit import TrainOptions, fit_version
from raybc.train.loop import Joint, load_checkpoint, save_checkpoint
from raybc.train.losses import bpr_loss, multi_step_alignment, prefix_alignment, single_step_alignment
from raybc.train.methods import METHODS

DIMS = [8, 10, 12, 14, 16]


def untrained_recall50(data, sl, *, dim: int, seeds=range(10), layers: int = 2) -> float:
    """The best Recall@50 that untrained GNNs (fresh init, one per seed) score on ``sl``'s validation
    edges, judged exactly as a fit judges itself. On the synthetic data here random embeddings score
    0.26-0.57 (a small catalogue: 50 of ~120 items is a large share), so a trained model must beat
    this, not a fixed threshold."""
    from raybc.models import build_model
    from raybc.train.fit import _payload
    from raybc.train.loop import build_graph, evaluate_state
    from raybc.train.methods import get_method

    spec = {"arch": "gnn", "n_attributes": max(1, data.n_attributes), "dim": dim, "layers": layers}
    empty = Registry(Storage("/nonexistent-raybc-untrained"))  # version 0 reads nothing from it
    payload = _payload(data, sl, method=get_method("no-bc"), model_spec=spec, registry=empty, version=0)
    graph = build_graph(payload)
    scores = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            scores.append(evaluate_state(Joint(build_model(spec), None), graph, payload, None, [])["recall@50"])
    return max(scores)


# --------------------------------------------------------------------------- losses


def test_bpr_prefers_positive_scores():
    u = torch.tensor([[1.0, 0.0]])
    good = bpr_loss(u, torch.tensor([[2.0, 0.0]]), torch.tensor([[-2.0, 0.0]]), weight_decay=0.0)
    bad = bpr_loss(u, torch.tensor([[-2.0, 0.0]]), torch.tensor([[2.0, 0.0]]), weight_decay=0.0)
    assert good < 0.05 < 3.0 < bad
    reg = bpr_loss(u, torch.tensor([[2.0, 0.0]]), torch.tensor([[-2.0, 0.0]]), weight_decay=1.0)
    assert reg - good == pytest.approx((1 + 4 + 4) / 2)


def test_alignment_losses():
    b = nn.Linear(4, 3, bias=False)
    zk = [torch.randn(5, 4) for _ in range(3)]
    zp = [b(z).detach() for z in zk]
    assert float(single_step_alignment(b, zk, zp)) == pytest.approx(0.0, abs=1e-12)
    # with no frozen B's the multi-step loss is the single-step loss
    assert float(multi_step_alignment(b, [], zk, [p + 1 for p in zp])) == pytest.approx(
        float(single_step_alignment(b, zk, [p + 1 for p in zp]))
    )
    # a frozen projection that kills the error makes later stages zero: the mean halves
    frozen = [torch.zeros(2, 3)]
    assert float(multi_step_alignment(b, frozen, zk, [p + 1 for p in zp])) == pytest.approx(
        float(single_step_alignment(b, zk, [p + 1 for p in zp])) / 2
    )
    assert float(prefix_alignment([torch.ones(2, 4)], [torch.ones(2, 3)])) == 0.0


def test_checkpoint_round_trip_is_safetensors_and_json(tmp_path):
    from raybc.models import PinSageGNN

    joint = Joint(PinSageGNN(n_attributes=4, dim=6, layers=2), nn.Linear(6, 5, bias=False))
    opt = torch.optim.Adam(joint.parameters(), lr=0.01)
    joint(_graph()).__getitem__(0).sum().backward()
    opt.step()
    best = {k: v.clone() * 0 for k, v in joint.state_dict().items()}
    save_checkpoint(str(tmp_path), joint=joint, best=best, optim=opt, meta={"epoch": 7, "history": [{"recall@50": 0.5}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "state.safetensors"]
    current, best2, osd, meta = load_checkpoint(str(tmp_path))
    assert meta["epoch"] == 7 and meta["history"][0]["recall@50"] == 0.5
    for k, v in joint.state_dict().items():
        torch.testing.assert_close(current[k], v)
        assert float(best2[k].abs().sum()) == 0.0
    opt2 = torch.optim.Adam(joint.parameters(), lr=0.01)
    opt2.load_state_dict(osd)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def _graph():
    from raybc.models import BipartiteGraph

    return BipartiteGraph.build(
        n_users=4, n_items=3, edge_user=np.array([0, 1, 2, 3]), edge_item=np.array([0, 1, 2, 0]),
        item_attr_indptr=np.array([0, 1, 2, 3]), item_attr_indices=np.array([0, 1, 2]),
    )  # fmt: skip


# --------------------------------------------------------------------------- every method


@pytest.fixture(scope="module")
def data():
    d = synthetic_interactions(n_users=200, n_items=120, n_edges=4000, n_attributes=16, seed=3)
    return d, temporal_versions(d)


def quick(method: str, **kw) -> TrainOptions:
    base = {"dims": DIMS, "epochs": 30, "eval_every": 5, "selection_start": 10, "batch_size": 512, "posthoc_steps": 200}
    return TrainOptions(method=method, **{**base, **kw})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Every method fitted for v0..v2 (in-process Ray Train), one root each."""
    d, slices = data
    roots = {}
    for name in METHODS:
        root = Storage(str(tmp_path_factory.mktemp(name) / "root"))
        for k in range(3):
            fit_version(root, d, slices, version=k, options=quick(name), echo=lambda s: None)
        roots[name] = root
    return roots


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_publishes_versions_with_metrics_and_weights(trained, method):
    reg = Registry(trained[method])
    assert reg.versions() == [0, 1, 2]
    m = METHODS[method]
    for k in range(3):
        v = reg.get(k)
        assert v.method == method
        assert v.dim == (DIMS[0] if m.fixed_dim else DIMS[k])
        for key in ("recall@10", "recall@20", "recall@50", "recall@100", "fit_seconds"):
            assert key in v.metrics
        assert all(f"align_err_v{j}" in v.metrics for j in range(k))
        assert set(v.embeddings) == {"users", "items"}
        # every z_k file carries the size and stamp it was published with (a later rewrite is refused)
        for e, ef in v.embeddings.items():
            infos = {i["basename"]: i for i in reg.embeddings_storage(k, e).list(detail=True)}
            assert all(f.stamp and f.stamp == file_stamp(infos[f.path]) and f.bytes == infos[f.path]["size"] for f in ef.files), ef
        reg.model(k)  # checksum-verified weights load
        if k:
            b = reg.aligner(k)
            assert (b.in_dim, b.out_dim) == (v.dim, reg.get(k - 1).dim)
    # embeddings are stored under the data set's own ids, never internal indices
    from raybc.snapshots import Snapshots  # noqa: F401
    import pyarrow.parquet as pq

    f = reg.get(2).embeddings["users"].files[0]
    ids = pq.read_table(reg.embeddings_storage(2, "users").path(f.path)).column("id").to_numpy()
    assert ids.min() >= 1  # synthetic external ids are index + 1


def test_fixed_maps_are_what_the_methods_imply(trained):
    fix = Registry(trained["fix-m0"])
    np.testing.assert_allclose(fix.aligner(2).weight, np.eye(DIMS[0]))
    assert fix.get(2).metrics["align_err_v0"] == pytest.approx(0.0, abs=1e-9)
    nobc = Registry(trained["no-bc"])
    np.testing.assert_allclose(nobc.aligner(2).weight, np.eye(DIMS[1], DIMS[2]))


def test_alignment_methods_are_far_more_compatible_than_no_bc(trained):
    nobc = Registry(trained["no-bc"]).get(2).metrics["align_err_v0"]
    for name in ("bc-aligner", "bc-aligner-warm", "joint-lin-sloss", "posthoc-lin-sloss", "posthoc-lin-mloss"):
        err = Registry(trained[name]).get(2).metrics["align_err_v0"]
        assert err < 0.5 * nobc, (name, err, nobc)


@pytest.mark.cluster
def test_every_method_leaves_a_registry_the_backfill_transforms(trained, ray_session):
    from raybc.backfill import BackfillOptions, backfill
    from raybc.snapshots import verify_snapshot

    for name, root in trained.items():
        s = backfill(root, BackfillOptions(progress=False))
        assert sorted(s.committed) == sorted(f"as-v{j}/{e}" for j in (0, 1) for e in ("users", "items")), name
        for j in (0, 1):
            v = verify_snapshot(Registry(root), j, "items")
            assert v.ok, (name, j, v)


def test_fit_refuses_out_of_order_versions_and_mixed_methods(data, tmp_path):
    d, slices = data
    root = Storage(str(tmp_path / "r"))
    with pytest.raises(RegistryError, match="cannot fit v1: the registry's next version is v0"):
        fit_version(root, d, slices, version=1, options=quick("no-bc"), echo=lambda s: None)
    fit_version(root, d, slices, version=0, options=quick("no-bc", epochs=5), echo=lambda s: None)
    with pytest.raises(ConfigError, match="v0 was trained with 'no-bc'"):
        fit_version(root, d, slices, version=1, options=quick("bc-aligner", epochs=5), echo=lambda s: None)


def test_train_options_refuse_unknown_methods_and_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown method 'bc-aligner2'; choose one of: fix-m0"):
        TrainOptions(method="bc-aligner2")
    with pytest.raises(ValidationError, match="extra"):
        TrainOptions(method="no-bc", epoch=3)


def test_train_job_help_lists_every_method():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "jobs/train_version.py", "--help"], capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert p.returncode == 0
    for name in METHODS:
        assert name in p.stdout


def test_shipped_train_configs_validate():
    from pathlib import Path

    from raybc.config import TrainJobConfig
    from raybc.options import load_options

    paths = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("train*.yaml"))
    assert paths
    for p in paths:
        assert load_options(TrainJobConfig, file=p).train.method in METHODS


# --------------------------------------------------------------------------- Ray Train workers


@pytest.mark.cluster
@pytest.mark.slow
def test_two_ray_train_workers_reach_the_quality_of_one(data, tmp_path, ray_session):
    d, slices = data
    results, worlds = {}, {}
    for workers in (0, 2):
        root = Storage(str(tmp_path / f"w{workers}"))
        v = fit_version(root, d, slices, version=0, options=quick("no-bc", epochs=40, num_workers=workers, seed=1), echo=lambda s: None)
        results[workers] = v.metrics["recall@50"]
        worlds[workers] = {h["world_size"] for h in v.hyperparameters["history"]}
    # the in-process fit ran as one rank, the Ray Train fit as two DDP ranks, at every evaluation
    assert worlds == {0: {1}, 2: {2}}, worlds
    one, two = results[0], results[2]
    # untrained GNNs already score 0.26-0.57 Recall@50 here; one trained worker reaches ~0.85
    baseline = untrained_recall50(d, slices[0], dim=DIMS[0])
    assert one > baseline + 0.15 and two > baseline + 0.15, (results, baseline)
    # same data, same global batch: the DDP fit must learn as well, up to sampling noise
    assert abs(two - one) < 0.1, (results, baseline)


def test_training_shows_a_few_progress_lines_and_none_when_asked(data, tmp_path, capfd):
    d, slices = data
    fit_version(Storage(str(tmp_path / "a")), d, slices, version=0, options=quick("no-bc"), echo=lambda s: None)
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("[raybc] epoch ")]
    assert 3 <= len(lines) <= 11, lines  # about one per tenth of the epochs, never one per epoch
    assert lines[-1].startswith("[raybc] epoch 30/30: loss ") and "s left" in lines[-1] and "best " in lines[-1]
    fit_version(Storage(str(tmp_path / "b")), d, slices, version=0, options=quick("no-bc", progress=False), echo=lambda s: None)
    assert "[raybc] epoch " not in capfd.readouterr().out


# --------------------------------------------------------------------------- the authors' options, selection, bc-aligner-warm


def test_user_uniform_positives_draw_every_user_about_equally_often():
    from raybc.train.loop import positive_weights, sample_positives

    # user 0 has 90 edges, users 1..9 one each: edge-uniform draws user 0 90% of the time
    train_user = np.array([0] * 90 + list(range(1, 10)))
    rng = np.random.default_rng(0)
    shard = np.arange(len(train_user))
    draws = np.concatenate([sample_positives(rng, shard, positive_weights(train_user)) for _ in range(200)])
    share = np.bincount(train_user[draws], minlength=10) / len(draws)
    np.testing.assert_allclose(share, np.full(10, 0.1), atol=0.01)
    perm = sample_positives(rng, shard, None)  # edge-uniform: one permutation, each edge once
    assert sorted(perm.tolist()) == shard.tolist()


def test_negatives_that_are_known_positives_are_drawn_again():
    from raybc.train.loop import sample_negatives

    n_items = 10
    items = np.arange(n_items)
    users = np.repeat(np.arange(5), 200)
    known_pairs = [(u, i) for u in range(5) for i in range(8)]  # every user knows items 0..7: only 8, 9 are negatives
    known = np.unique(np.array([u * n_items + i for u, i in known_pairs]))
    neg = sample_negatives(np.random.default_rng(0), users, items, known, n_items)
    assert set(neg.tolist()) == {8, 9}
    plain = sample_negatives(np.random.default_rng(0), users, items, None, n_items)
    assert set(plain.tolist()) == set(range(10))  # uniform: known positives included


def test_alignment_weight_ramp():
    from raybc.train.loop import alignment_weight_at

    assert alignment_weight_at(0, weight=16.0, ramp_epochs=0) == 16.0
    assert [alignment_weight_at(e, weight=16.0, ramp_epochs=4) for e in range(6)] == [4.0, 8.0, 12.0, 16.0, 16.0, 16.0]


def test_selection_halves_are_disjoint_fixed_and_cover_the_validation_users():
    from raybc.train.fit import selection_users

    val_user = np.array([5, 3, 3, 9, 11, 2, 7, 7, 20])
    a = selection_users(val_user, version=1)
    assert len(a) == 4 and set(a) <= set(val_user)  # ceil(7 / 2) of the 7 distinct users
    np.testing.assert_array_equal(a, selection_users(val_user[::-1], version=1))  # a set, not an order
    assert not np.array_equal(a, selection_users(val_user, version=2)) or not np.array_equal(a, selection_users(val_user, version=3))


def test_selection_split_reports_on_users_it_did_not_select_on(data, tmp_path):
    d, slices = data
    v = fit_version(Storage(str(tmp_path / "r")), d, slices, version=0, options=quick("no-bc"), echo=lambda s: None)
    m = v.metrics
    from raybc.train.fit import selection_users

    n_val = len(np.unique(slices[0].val_user))
    assert m["select_val_users"] == len(selection_users(slices[0].val_user, version=0)) and m["val_users"] + m["select_val_users"] == n_val
    assert m["all_val_users"] == n_val
    # the epoch was picked on the selection half: the published model's selection-half recall is the
    # best selection-half check of the history, while its report half need not be its best
    hist = [h for h in v.hyperparameters["history"]]
    assert m["select_recall@50"] == pytest.approx(max(h["select_recall@50"] for h in hist))
    legacy = fit_version(Storage(str(tmp_path / "l")), d, slices, version=0, options=quick("no-bc", selection="all-users"), echo=lambda s: None)
    assert "select_recall@50" not in legacy.metrics and legacy.metrics["val_users"] == n_val


def test_least_squares_aligner_recovers_a_linear_map_and_minimises_the_multi_step_loss():
    from raybc.train.fit import least_squares_aligner

    g = torch.Generator().manual_seed(0)
    zk = torch.randn(300, 6, generator=g)
    true_b = torch.randn(4, 6, generator=g)
    zp = zk @ true_b.T + 0.05 * torch.randn(300, 4, generator=g)
    b = torch.from_numpy(least_squares_aligner(zk, zp))
    torch.testing.assert_close(b, true_b, atol=0.05, rtol=0)
    frozen = [torch.randn(3, 4, generator=g)]
    lin = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(b)
    best = float(multi_step_alignment(lin, frozen, [zk], [zp]))
    for _ in range(5):  # any other B scores worse on the multi-step loss too
        with torch.no_grad():
            lin.weight.copy_(b + 0.01 * torch.randn(4, 6, generator=g))
        assert float(multi_step_alignment(lin, frozen, [zk], [zp])) > best


def test_warm_start_begins_at_the_previous_model_and_b_at_its_exact_map(data, tmp_path):
    """With (almost) no training, bc-aligner-warm's M_1 is M_0 widened: z_1's first d_0 dimensions
    are z_0 and B_1 maps back with ~0 error; bc-aligner from scratch starts far away."""
    d, slices = data
    errs = {}
    for name in ("bc-aligner-warm", "bc-aligner"):
        root = Storage(str(tmp_path / name))
        fit_version(root, d, slices, version=0, options=quick(name), echo=lambda s: None)
        v = fit_version(root, d, slices, version=1, options=quick(name, epochs=1, lr=1e-9, selection_start=0), echo=lambda s: None)
        errs[name] = (v.metrics["align_err_v0"], v.metrics.get("truncation_err_v0"))
    # not exactly 0: the epoch's train-mode steps still move BatchNorm's running statistics (lr plays no part there)
    assert errs["bc-aligner-warm"][0] < 1e-3 and errs["bc-aligner-warm"][1] < 0.02, errs
    assert errs["bc-aligner"][0] > 0.5 and errs["bc-aligner"][1] > 0.5, errs


def test_refit_publishes_the_least_squares_b(trained, data):
    from raybc.models import build_model
    from raybc.train.fit import least_squares_aligner
    from raybc.train.loop import embed

    d, slices = data
    reg = Registry(trained["bc-aligner-warm"])
    v = reg.get(2)
    assert "joint_aligner_err_prev" in v.metrics  # the learned B_2's error, kept for the record
    graph_payload = {"graph": {"n_users": d.n_users, "n_items": d.n_items, "train_user": slices[2].train_user, "train_item": slices[2].train_item,
                               "item_attr_indptr": d.item_attr_indptr, "item_attr_indices": d.item_attr_indices, "nodes": "seen"},
                     "graph_users": slices[2].users, "candidate_items": slices[2].items}  # fmt: skip
    from raybc.train.loop import build_graph

    graph = build_graph(graph_payload)
    zs = []
    for k in (2, 1):
        m = build_model(reg.model(k).spec)
        m.load_state_dict({key: torch.as_tensor(t) for key, t in reg.model(k).tensors.items()})
        u, i = embed(m, graph)
        zs.append(torch.cat([u[slices[2].users], i[slices[2].items]]))
    np.testing.assert_allclose(reg.aligner(2).weight, least_squares_aligner(zs[0], zs[1]), rtol=1e-4, atol=1e-5)


def test_model_from_takes_only_an_identically_trained_model(trained, data, tmp_path):
    d, slices = data
    root = Storage(str(tmp_path / "p"))
    fit_version(root, d, slices, version=0, options=quick("posthoc-lin-sloss"), echo=lambda s: None, model_from=trained["no-bc"])
    v1 = fit_version(root, d, slices, version=1, options=quick("posthoc-lin-sloss"), echo=lambda s: None, model_from=trained["no-bc"])
    mine, theirs = Registry(root).model(1).tensors, Registry(trained["no-bc"]).model(1).tensors
    assert all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    assert v1.metrics["best_epoch"] == Registry(trained["no-bc"]).get(1).metrics["best_epoch"]
    other = Storage(str(tmp_path / "q"))
    fit_version(other, d, slices, version=0, options=quick("posthoc-lin-sloss"), echo=lambda s: None, model_from=trained["no-bc"])
    with pytest.raises(ConfigError, match="which does not train M_1 as posthoc-lin-sloss does"):
        fit_version(other, d, slices, version=1, options=quick("posthoc-lin-sloss"), echo=lambda s: None, model_from=trained["bc-aligner"])
    with pytest.raises(ConfigError, match="trained with other options"):
        fit_version(other, d, slices, version=1, options=quick("posthoc-lin-sloss", epochs=7), echo=lambda s: None, model_from=trained["no-bc"])


def test_manifests_without_the_new_options_read_as_the_old_behaviour():
    from raybc.experiment import _same_training

    old_manifest = quick("no-bc").model_dump(exclude={"final_norm", "positive_sampling", "negative_sampling", "graph_nodes", "selection", "alignment_ramp_epochs"})
    assert not _same_training(old_manifest, quick("no-bc"))  # not silently today's defaults
    legacy = quick("no-bc", final_norm=False, positive_sampling="edge-uniform", negative_sampling="uniform", graph_nodes="all", selection="all-users")
    assert _same_training(old_manifest, legacy)
