"""Registering versions trained elsewhere: B_k fitted from stored pairs or given and measured,
the storage contract enforced, registration in place -- on a real local Ray, local and S3 roots."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybc.aligners import AlignerFitOptions
from raybc.backfill import backfill
from raybc.cli import main
from raybc.data.synthetic import planted_versions
from raybc.embeddings import make_table, read_matrix
from raybc.errors import ConfigError, InputDataError, IntegrityError
from raybc.intake import RegisterOptions
from raybc.registry import Registry
from raybc.snapshots import read_snapshot
from raybc.storage import Storage

pytestmark = pytest.mark.cluster

D_OLD, D_NEW, NOISE = 12, 16, 0.05


def _root_flags(root: Storage) -> list[str]:
    flags = ["--root", root.uri()]
    if root.options.endpoint_url:
        flags += ["--endpoint-url", root.options.endpoint_url]
    return flags


def _planted(tmp_path, *, rows=6000, bias=False, shared=1.0, seed=0):
    old, new = Storage(str(tmp_path / "z0")), Storage(str(tmp_path / "z1"))
    true = planted_versions(old, new, rows=rows, d_old=D_OLD, d_new=D_NEW, files_old=3, files_new=5, noise=NOISE, seed=seed, bias=bias, shared=shared)
    return old, new, true


def _by_id(table: pa.Table) -> dict[int, np.ndarray]:
    ids, mat = read_matrix(table)
    return dict(zip(ids.tolist(), mat))


def _files_table(store: Storage) -> pa.Table:
    return pa.concat_tables(pq.read_table(store.path(n)) for n in store.list() if n.endswith(".parquet"))


def test_fit_linear_recovers_a_planted_map_within_the_noise_floor(ray_session, storage_root, tmp_path):
    old, new, true = _planted(tmp_path)
    flags = _root_flags(storage_root)
    assert main(["register", *flags, "--version", "0", "--embeddings", f"items={old.uri()}"]) == 0
    assert main(["register", *flags, "--version", "1", "--embeddings", f"items={new.uri()}", "--fit-aligner", "linear"]) == 0
    reg = Registry(storage_root)
    fit = reg.get(1).manifest["aligner_fit"]
    assert fit["kind"] == "linear" and fit["pairs"]["items"]["shared"] == 6000
    assert fit["pairs"]["items"]["train"] + fit["pairs"]["items"]["holdout"] == 6000
    # the backfilled as-v0 snapshot against the stored z_0, id by id: within 1.5x the noise floor
    backfill(storage_root)
    snap = _by_id(read_snapshot(storage_root, "items", version=0))
    z0 = _by_id(_files_table(old))
    assert set(snap) == set(z0)
    ids = sorted(z0)
    err = np.mean([np.sum((snap[i].astype(np.float64) - z0[i]) ** 2) for i in ids])
    noise_floor = NOISE**2 * D_OLD
    assert err <= 1.5 * noise_floor, (err, noise_floor)
    # the held-out relative error in the manifest is the same noise floor, relative to |z_0|^2
    rel_floor = noise_floor / np.mean([np.sum(z0[i].astype(np.float64) ** 2) for i in ids])
    assert fit["relative_error"]["items"]["v0"] <= 1.5 * rel_floor
    # the truncation a no-bc method would publish instead is far off
    assert np.mean([np.sum((_new_row(new, i)[:D_OLD] - z0[i]) ** 2) for i in ids[:200]]) > 10 * noise_floor


_NEW_CACHE: dict[str, dict[int, np.ndarray]] = {}


def _new_row(new: Storage, i: int) -> np.ndarray:
    if new.uri() not in _NEW_CACHE:
        _NEW_CACHE[new.uri()] = _by_id(_files_table(new))
    return _NEW_CACHE[new.uri()][i]


@pytest.mark.parametrize("kind", ["affine", "orthogonal", "residual_mlp"])
def test_each_kind_fits_and_is_judged_in_every_space(ray_session, tmp_path, kind):
    old, new, true = _planted(tmp_path, bias=kind == "affine", seed=1)
    reg = Registry(str(tmp_path / "root"))
    reg.register(0, embeddings={"items": old.uri()})
    # v1 is the planted version; v2 its copy under another name, so v2's B is judged in v1 AND v0
    reg.register(1, embeddings={"items": new.uri()}, options=RegisterOptions(fit=AlignerFitOptions(kind="linear")))
    opts = AlignerFitOptions(kind=kind, epochs=3, hidden=16, batch_size=512, min_steps=0)
    v2 = reg.register(2, embeddings={"items": new.uri()}, options=RegisterOptions(fit=opts))
    err = v2.manifest["aligner_fit"]["relative_error"]["items"]
    assert set(err) == {"v1", "v0"}
    assert reg.aligner(2).kind == ("residual_mlp" if kind == "residual_mlp" else "affine")
    if kind == "orthogonal":
        w = reg.aligner(2).weight.astype(np.float64)
        np.testing.assert_allclose(w @ w.T, np.eye(D_NEW), atol=1e-5)  # z_1 -> z_1: exactly orthogonal
    # z_2 equals z_1, so the identity is the answer: every kind must find it (mapping to zeros scores 1)
    assert err["v1"] < 1e-3 and err["v0"] < 1e-2, err
    if kind == "residual_mlp":
        assert v2.manifest["aligner_fit"]["training"]["epochs"] == 3
        # few pairs: hidden sized to the data and epochs raised to min_steps optimiser steps
        v3 = reg.register(3, embeddings={"items": new.uri()}, options=RegisterOptions(fit=AlignerFitOptions(kind=kind, batch_size=4096)))
        fit3 = v3.manifest["aligner_fit"]
        train = fit3["pairs"]["items"]["train"]
        assert fit3["options"]["hidden"] == min(256, max(8, (train * D_NEW // 4 - D_NEW * D_NEW - D_NEW) // (2 * D_NEW + 1)))
        per_epoch = -(-train // 4096)
        assert fit3["training"]["epochs"] == -(-300 // per_epoch) and fit3["training"]["steps"] >= 300


def test_given_square_b_needs_its_layout_and_a_transposed_one_is_refused(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.permutation(4000)
    z0 = rng.standard_normal((4000, 8)).astype(np.float32)
    a = rng.standard_normal((8, 8))
    z1 = (z0 @ a).astype(np.float32)  # the user's model: z1 = z0 @ A, so B = inv(A) maps z1 @ B = z0
    pq.write_table(make_table(ids, z0), tmp_path / "z0.parquet")
    pq.write_table(make_table(ids, z1), tmp_path / "z1.parquet")
    np.save(tmp_path / "b.npy", np.linalg.inv(a).astype(np.float32))
    reg = Registry(str(tmp_path / "root"))
    reg.register(0, embeddings={"items": str(tmp_path / "z0.parquet")})
    z1_uri, b_uri = str(tmp_path / "z1.parquet"), str(tmp_path / "b.npy")
    with pytest.raises(IntegrityError, match=r"B is square \(8 x 8\).*--aligner-layout"):
        reg.register(1, embeddings={"items": z1_uri}, aligner=b_uri)
    with pytest.raises(InputDataError, match=r"further from the stored z_0 than mapping every vector to zeros.*--aligner-layout"):
        reg.register(1, embeddings={"items": z1_uri}, aligner=b_uri, options=RegisterOptions(aligner_layout="out_in"))
    assert reg.versions() == [0] and not (tmp_path / "root" / "embeddings" / "v1").exists()
    v = reg.register(1, embeddings={"items": z1_uri}, aligner=b_uri, options=RegisterOptions(aligner_layout="in_out"))
    assert v.manifest["aligner_check"]["relative_error"]["items"]["v0"] < 1e-8
    np.testing.assert_allclose(reg.transform(1, 0)(z1[:50]), z0[:50], atol=1e-3)


def _two_files(tmp_path, name, tables):
    d = tmp_path / name
    d.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, d / f"f{i}.parquet")
    return str(d)


def test_contract_breaks_are_refused_and_nothing_is_published(ray_session, tmp_path):
    rng = np.random.default_rng(4)
    reg = Registry(str(tmp_path / "root"))
    z0 = rng.standard_normal((500, 8)).astype(np.float32)
    reg.register(0, embeddings={"items": _two_files(tmp_path, "v0", [make_table(np.arange(500), z0)])})
    emb64 = pa.FixedSizeListArray.from_arrays(pa.array(z0.reshape(-1).astype(np.float64)), 8)
    t64 = pa.table({"id": pa.array(np.arange(500)), "embedding": emb64})
    with pytest.raises(InputDataError, match=r"f0.parquet: column 'embedding' holds double values; the storage contract stores float32"):
        reg.register(1, embeddings={"items": _two_files(tmp_path, "f64", [t64])}, aligner=_eye(tmp_path, 8, 8), options=RegisterOptions(aligner_layout="out_in"))
    t32 = make_table(np.arange(500), z0).set_column(0, "id", pa.array(np.arange(500), pa.int32()))
    with pytest.raises(InputDataError, match=r"f0.parquet: column 'id' is int32; the storage contract's ids are int64"):
        reg.register(1, embeddings={"items": _two_files(tmp_path, "i32", [t32])}, aligner=_eye(tmp_path, 8, 8), options=RegisterOptions(aligner_layout="out_in"))
    ts = make_table(pa.array([f"x{i}" for i in range(500)]), z0)
    with pytest.raises(InputDataError, match=r"items ids are string but v0's items ids are int64"):
        reg.register(1, embeddings={"items": _two_files(tmp_path, "str", [ts])}, aligner=_eye(tmp_path, 8, 8), options=RegisterOptions(aligner_layout="out_in"))
    # an id in two files (different files, shuffled): named with both files
    dup = _two_files(tmp_path, "dup", [make_table(np.arange(0, 300), z0[:300]), make_table(np.arange(299, 500), z0[299:])])
    with pytest.raises(InputDataError, match=r"id 299 occurs more than once in the items embeddings \(.*dup/f0.parquet and .*dup/f1.parquet\)"):
        reg.register(1, embeddings={"items": dup}, options=RegisterOptions(fit=AlignerFitOptions()))
    bad = z0.copy()
    bad[123, 4] = np.nan
    with pytest.raises(InputDataError, match=r"nan/f0.parquet: row 123 \(id 123\) holds NaN"):
        reg.register(1, embeddings={"items": _two_files(tmp_path, "nan", [make_table(np.arange(500), bad)])}, options=RegisterOptions(fit=AlignerFitOptions()))
    assert reg.versions() == [0]
    assert not (tmp_path / "root" / "embeddings" / "v1").exists(), "a refused registration leaves no copied file behind"


def _eye(tmp_path, d_in, d_out):
    p = tmp_path / f"eye{d_in}x{d_out}.npy"
    np.save(p, np.eye(d_out, d_in, dtype=np.float32))
    return str(p)


def test_fit_refuses_what_cannot_be_fitted(ray_session, tmp_path):
    rng = np.random.default_rng(5)
    reg = Registry(str(tmp_path / "root"))
    z0 = rng.standard_normal((400, 6)).astype(np.float32)
    v0_files = _two_files(tmp_path, "v0", [make_table(np.arange(400), z0)])
    reg.register(0, embeddings={"items": v0_files})
    fit = RegisterOptions(fit=AlignerFitOptions(kind="linear"))
    # no overlap at all
    none = _two_files(tmp_path, "none", [make_table(np.arange(1000, 1400), rng.standard_normal((400, 10)).astype(np.float32))])
    with pytest.raises(InputDataError, match=r"no id of the new embeddings occurs in v0 \(items: 400 rows\)"):
        reg.register(1, embeddings={"items": none}, options=fit)
    # fewer pairs than parameters: 6 shared ids for a 10 -> 6 linear map
    few = _two_files(tmp_path, "few", [make_table(np.r_[0:6, 2000:2300], rng.standard_normal((306, 10)).astype(np.float32))])
    with pytest.raises(InputDataError, match=r"training pairs and \d+ held-out \(6 shared ids.*a linear B of 10 -> 6 dimensions needs at least 10.*add --ridge"):
        reg.register(1, embeddings={"items": few}, options=fit)
    # ridge makes least squares well-posed for any number of pairs, and Procrustes needs no minimum:
    # 9 shared ids, half held out, are enough for both (the scratch root keeps the test's own intact)
    q = np.linalg.qr(rng.standard_normal((10, 10)))[0][:6]  # z_1 = z_0 q: B = q^T maps it back exactly
    nine_z = np.vstack([z0[:9] @ q, rng.standard_normal((300, 10))]).astype(np.float32)
    nine = _two_files(tmp_path, "nine", [make_table(np.r_[0:9, 3000:3300], nine_z)])
    for kind, ridge in (("linear", 1e-3), ("orthogonal", 0.0)):
        scratch = Registry(str(tmp_path / f"scratch-{kind}"))
        scratch.register(0, embeddings={"items": v0_files})
        v = scratch.register(1, embeddings={"items": nine}, options=RegisterOptions(fit=AlignerFitOptions(kind=kind, ridge=ridge, holdout=0.5)))
        assert v.manifest["aligner_fit"]["pairs"]["items"]["train"] < 10
        assert v.manifest["aligner_fit"]["relative_error"]["items"]["v0"] < 0.5
    # a rank-deficient z_1: 10 dimensions, all linear combinations of z_0's 6
    z1 = (z0 @ rng.standard_normal((6, 10))).astype(np.float32)
    flat = _two_files(tmp_path, "flat", [make_table(np.arange(400), z1)])
    with pytest.raises(InputDataError, match=r"span only 6 of their 10 dimensions.*--ridge"):
        reg.register(1, embeddings={"items": flat}, options=fit)
    assert reg.versions() == [0]
    # the same with ridge: accepted
    ok = reg.register(1, embeddings={"items": flat}, options=RegisterOptions(fit=AlignerFitOptions(kind="linear", ridge=1e-3)))
    assert ok.manifest["aligner_fit"]["options"]["ridge"] == 1e-3
    assert ok.manifest["aligner_fit"]["relative_error"]["items"]["v0"] < 1e-2


def test_ids_missing_from_the_parent_fit_on_the_overlap_and_say_how_many(ray_session, tmp_path):
    old, new, _ = _planted(tmp_path, shared=0.75, seed=2)
    reg = Registry(str(tmp_path / "root"))
    reg.register(0, embeddings={"items": old.uri()})
    lines: list[str] = []
    v = reg.register(1, embeddings={"items": new.uri()}, options=RegisterOptions(fit=AlignerFitOptions(fit_rows=2000)), echo=lines.append)
    p = v.manifest["aligner_fit"]["pairs"]["items"]
    assert (p["rows"], p["shared"], p["missing_in_parent"]) == (6000, 4500, 1500)
    assert 1700 <= p["train"] + p["holdout"] <= 2300, p  # about fit_rows pairs, sampled by id hash
    assert any("4,500 shared with the parent (1,500 not in it)" in line for line in lines)
    # deterministic: the same sample again
    reg2 = Registry(str(tmp_path / "root2"))
    reg2.register(0, embeddings={"items": old.uri()})
    v2 = reg2.register(1, embeddings={"items": new.uri()}, options=RegisterOptions(fit=AlignerFitOptions(fit_rows=2000)))
    assert v2.manifest["aligner_fit"]["pairs"] == v.manifest["aligner_fit"]["pairs"]
    np.testing.assert_array_equal(reg2.aligner(1).weight, reg.aligner(1).weight)


def test_in_place_registration_is_read_where_it_lies_and_a_later_change_is_refused(ray_session, tmp_path):
    old, new, _ = _planted(tmp_path, seed=3)
    root = Storage(str(tmp_path / "root"))
    flags = _root_flags(root)
    assert main(["register", *flags, "--version", "0", "--embeddings", f"items={old.uri()}", "--in-place"]) == 0
    assert main(["register", *flags, "--version", "1", "--embeddings", f"items={new.uri()}", "--in-place", "--fit-aligner", "affine"]) == 0
    reg = Registry(root)
    ef = reg.get(1).embeddings["items"]
    assert ef.location == new.uri() and ef.verified and all(f.stamp for f in ef.files)
    assert not (tmp_path / "root" / "embeddings").exists(), "in place: nothing copied"
    summary = backfill(root)
    assert summary.committed == ["as-v0/items"]
    # rewrite one registered file: the backfill refuses, naming it
    t = pq.read_table(new.path("part-00002.parquet"))
    pq.write_table(t.slice(0, t.num_rows - 1), new.path("part-00002.parquet"))
    from raybc.backfill import BackfillOptions

    with pytest.raises(IntegrityError, match=r"part-00002.parquet changed after v1 was published"):
        backfill(root, BackfillOptions(compression="zstd"))


def test_register_command_line_refuses_a_repeated_entity(tmp_path, capsys):
    code = main(["register", "--root", str(tmp_path / "root"), "--version", "0", "--embeddings", "items=/a", "--embeddings", "items=/b"])
    assert code == 2
    err = capsys.readouterr().err
    assert "entity 'items' given twice (/a and /b)" in err
    assert not (tmp_path / "root").exists()


def test_register_summary_json_and_config_file(ray_session, tmp_path, capsys):
    old, new, _ = _planted(tmp_path, rows=3000, seed=4)
    cfg = tmp_path / "reg.yaml"
    cfg.write_text(
        f"root: {tmp_path / 'root'}\nversion: 1\nembeddings: {{items: {new.uri()}}}\n"
        "register:\n  fit: {kind: linear, fit_rows: 1000, holdout: 0.2}\n"
    )
    assert main(["register", "--root", str(tmp_path / "root"), "--version", "0", "--embeddings", f"items={old.uri()}"]) == 0
    capsys.readouterr()
    assert main(["register", "--config", str(cfg), "--summary-json", "-"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(out[out.index("{") :])
    assert manifest["aligner_fit"]["options"]["holdout"] == 0.2
    with pytest.raises(ConfigError, match="unknown|extra|not permitted"):
        from raybc.cli import register_config

        bad = tmp_path / "bad.yaml"
        bad.write_text(cfg.read_text() + "  colour: blue\n")
        register_config(["--config", str(bad)])


def test_fit_rows_is_a_total_over_entities_and_a_tiny_entity_is_judged_through_the_pool(ray_session, tmp_path):
    """--fit-rows samples N pairs in all, every entity at the same rate; an entity with a handful
    of held-out ids cannot refuse a B on its own (its error is noise), the pooled error can."""
    users_old, users_new = Storage(str(tmp_path / "u0")), Storage(str(tmp_path / "u1"))
    items_old, items_new = Storage(str(tmp_path / "i0")), Storage(str(tmp_path / "i1"))
    # the same seed plants the same map for both entities
    planted_versions(users_old, users_new, rows=1000, d_old=D_OLD, d_new=D_NEW, files_old=1, files_new=2, noise=NOISE, seed=5)
    planted_versions(items_old, items_new, rows=9000, d_old=D_OLD, d_new=D_NEW, files_old=3, files_new=4, noise=NOISE, seed=5)
    rng = np.random.default_rng(6)  # tags: 400 ids whose v0 has nothing to do with v1 (error ~2 on them)
    tags = np.arange(400) * 7
    pq.write_table(make_table(tags, rng.standard_normal((400, D_OLD)).astype(np.float32)), tmp_path / "t0.parquet")
    pq.write_table(make_table(tags, rng.standard_normal((400, D_NEW)).astype(np.float32)), tmp_path / "t1.parquet")
    reg = Registry(str(tmp_path / "root"))
    reg.register(0, embeddings={"users": users_old.uri(), "items": items_old.uri(), "tags": str(tmp_path / "t0.parquet")})
    lines: list[str] = []
    v = reg.register(
        1, embeddings={"users": users_new.uri(), "items": items_new.uri(), "tags": str(tmp_path / "t1.parquet")},
        options=RegisterOptions(fit=AlignerFitOptions(fit_rows=2000, holdout=0.1)), echo=lines.append,
    )  # fmt: skip
    fit = v.manifest["aligner_fit"]
    sampled = {e: p["train"] + p["holdout"] for e, p in fit["pairs"].items()}
    assert 1700 <= sum(sampled.values()) <= 2300, sampled  # ~2,000 in all, not ~2,000 per entity
    assert 130 <= sampled["users"] <= 260 and 1450 <= sampled["items"] <= 2050, sampled  # 1,000 : 9,000 rows
    assert 0 < fit["pairs"]["tags"]["holdout"] < 100
    err = fit["relative_error"]
    assert err["tags"]["v0"] > 1.0 and err["all"]["v0"] < 0.5, err
    assert any("warning: tags" in line and "judged through the pooled error" in line for line in lines)
