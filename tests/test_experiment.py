"""The experiment: the quick profile end to end on tiny synthetic data (every method, every version,
snapshots kept, consumers registered, report and plots written, a rerun recomputes nothing), the
report's arithmetic on hand-made records, and the shipped config."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from raybc.config import ExperimentJobConfig
from raybc.consumers import ConsumerOptions
from raybc.errors import ConfigError
from raybc.experiment import ExperimentOptions, committed_run, read_compatible, run_experiment
from raybc.options import load_options
from raybc.registry import Registry
from raybc.report import paper_basis, relative_rows, seed_rows, seed_summary, seeds_markdown, summary_rows, write_report
from raybc.results import ExperimentResult
from raybc.snapshots import Snapshots
from raybc.storage import Storage
from raybc.train.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERSIONS = 3


@pytest.mark.slow
@pytest.mark.cluster
def test_quick_profile_runs_every_method_and_version_and_resumes(tmp_path, ray_session):
    out = tmp_path / "exp"
    opts = ExperimentOptions(dataset="synthetic:300,150,6000", out=str(out), profile="quick", methods=list(METHODS))
    lines: list[str] = []
    r = run_experiment(opts, echo=lines.append)
    assert r.versions == VERSIONS and set(r.methods) == set(METHODS)
    assert len(r.trained) == len(METHODS) * VERSIONS
    for m in METHODS:
        assert sorted(r.records[m]) == list(range(VERSIONS)), m
        root = Storage(str(out / m))
        assert Registry(root).versions() == list(range(VERSIONS)) and Registry(root).get(1).method == m
        # every version's snapshots are kept; CURRENT ends on the newest
        for k in range(1, VERSIONS):
            for e in ("users", "items"):
                assert all(committed_run(root, j, e, k) for j in range(k)), (m, k, e)
        assert Snapshots(root).pointer(0, "users").source_version == VERSIONS - 1
        for k in range(VERSIONS):
            rec = json.loads((out / m / "eval" / f"v{k}.json").read_text())
            assert rec["method"] == m and rec["version"] == k and rec["unintended"]
        assert r.records[m][0]["v0_max_abs_diff_vs_fix_m0"] < 1e-5  # every method shares fix-m0's M_0
    # consumers: trained once on fix-m0's v0, registered in the gate's format
    registered = sorted(p.name for p in (out / "fix-m0" / "consumers").iterdir() if (p / "consumer.json").exists())
    assert registered and registered == sorted(t for t, c in r.consumers.items() if "skipped" not in c)
    # alignment: the jointly aligned method is far closer to v0 than no-bc at every later version
    for k in range(1, VERSIONS):
        assert r.records["bc-aligner"][k]["align_err_v0"] < 0.5 * r.records["no-bc"][k]["align_err_v0"]
    # the report: every method and version in the CSV, the table in Markdown, four PNGs
    report = out / "report"
    rows = list(csv.DictReader(io.StringIO((report / "results.csv").read_text())))
    assert {(row["method"], int(row["version"])) for row in rows} == {(m, k) for m in METHODS for k in range(VERSIONS)}
    md = (report / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in md
    assert "| method | v0 | v1 | v2 |" in md
    for name in ("intended.png", "unintended.png", "alignment.png", "unintended_tasks.png"):
        assert (report / name).read_bytes().startswith(PNG_MAGIC), name
    fix = next(row for row in rows if row["method"] == "fix-m0" and row["version"] == "2")
    assert float(fix["unintended_rel_pct"]) == 0.0
    # the consumer path: v1's run (no longer CURRENT) read back equals B_1 applied to z_1
    root = Storage(str(out / "bc-aligner"))
    table, rel = read_compatible(root, "items", target=0, source=1)
    assert "/from-v1/" in rel
    from raybc.embeddings import read_matrix
    from raybc.gate import read_version_embeddings

    reg = Registry(root)
    ids, got = read_matrix(table)
    z_ids, z1 = read_matrix(read_version_embeddings(reg, 1, "items"))
    np.testing.assert_array_equal(ids, z_ids)
    np.testing.assert_allclose(got, reg.transform(1, 0)(z1), rtol=1e-5, atol=1e-6)
    # resumable: a rerun trains, backfills and evaluates nothing
    again = run_experiment(opts, echo=lines.append)
    assert again.trained == [] and again.backfilled == [] and again.evaluated == []
    assert again.records["bc-aligner"][2] == r.records["bc-aligner"][2]
    # versions trained otherwise are never silently reused
    with pytest.raises(ConfigError, match="was trained with other options than the 'quick' profile's"):
        run_experiment(opts.model_copy(update={"train": {"epochs": 5}}), echo=lines.append)


def test_experiment_refuses_a_root_of_another_method(tmp_path):
    from raybc.embeddings import make_table

    root = Storage(str(tmp_path / "exp" / "no-bc"))
    reg = Registry(root)
    listing = {"users": reg.write_embeddings(0, "users", [make_table(np.arange(3), np.ones((3, 4)))])}
    reg.publish(0, dim=4, method="bc-aligner", aligner=None, embeddings=listing)
    with pytest.raises(ConfigError, match="holds v0 of 'bc-aligner', not 'no-bc'"):
        run_experiment(ExperimentOptions(dataset="synthetic:50,30,500", out=str(tmp_path / "exp"), profile="quick", methods=["no-bc"]))
    with pytest.raises(ConfigError, match="experiment.train"):
        run_experiment(ExperimentOptions(dataset="synthetic:50,30,500", out=str(tmp_path / "other"), profile="quick", train={"epochs": -1}))


def _rec(m, k, r50, last5, aucs, align):
    return {
        "method": m, "version": k, "dim": 8, "intended": {"recall@50": r50, "recall50_last5_mean": last5},
        "align_err_v0": align, "unintended": {t: {"auc": a} for t, a in aucs.items()},
    }  # fmt: skip


def test_report_arithmetic_on_hand_made_records(tmp_path):
    records = {
        "fix-m0": {0: _rec("fix-m0", 0, 0.2, 0.2, {"a": 0.8, "b": 0.6}, 0.0), 1: _rec("fix-m0", 1, 0.1, 0.1, {"a": 0.8, "b": 0.5}, 0.0)},
        "no-bc": {0: _rec("no-bc", 0, 0.2, 0.2, {"a": 0.8, "b": 0.6}, 0.0), 1: _rec("no-bc", 1, 0.2, 0.25, {"a": 0.4, "b": 0.5}, 1.5)},
        "bc-aligner": {0: _rec("bc-aligner", 0, 0.2, 0.2, {"a": 0.8, "b": 0.6}, 0.0), 1: _rec("bc-aligner", 1, 0.19, 0.2, {"a": 0.76, "b": 0.5}, 0.01)},
    }
    rows = relative_rows(records)
    by = {(r["method"], r["version"]): r for r in rows}
    assert by[("fix-m0", 1)]["intended_rel_pct"] == pytest.approx(-50.0)
    assert by[("bc-aligner", 1)]["intended_rel_pct"] == pytest.approx(-5.0)
    assert by[("bc-aligner", 1)]["intended_last5_rel_pct"] == pytest.approx(-20.0)
    assert by[("no-bc", 1)]["unintended_rel_pct"] == pytest.approx((-50.0 + 0.0) / 2)
    assert by[("bc-aligner", 1)]["unintended_rel_pct"] == pytest.approx((-5.0 + 0.0) / 2)
    summary = {s["method"]: s for s in summary_rows(rows)}
    assert summary["no-bc"]["versions"] == 1  # v0 is left out of the averages
    assert summary["bc-aligner"]["unintended_rel_pct"] == pytest.approx(-2.5)
    result = ExperimentResult(out="x", dataset="hand", methods=list(records), versions=2, records=records, consumers={"a": {"skipped": "few rows"}})
    files = write_report(result, Storage(str(tmp_path / "report")))
    assert sorted(f.rsplit("/", 1)[1] for f in files) == sorted([
        "results.md", "results.csv", "summary.csv", "seeds.csv", "seed_summary.csv", "intended.png", "unintended.png",
        "alignment.png", "unintended_tasks.png", "tradeoff.png", "tradeoff-paper.png",
    ])  # fmt: skip
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| bc-aligner | -5.00 ± 0.00 | -20.00 ± 0.00 | -2.50 ± 0.00 | 0.0100 |" in md
    assert "skipped: few rows" in md
    # the paper's basis: ratios of means. Intended over v0..v1: bc-aligner (0.2 + 0.19) / 2 against
    # no-bc (0.2 + 0.2) / 2; unintended over v1: mean AUC of the tasks (0.76 + 0.5) / 2 against fix-m0's (0.8 + 0.5) / 2
    paper = paper_basis(records)
    assert paper["bc-aligner"]["intended_paper_pct"] == pytest.approx(100 * (0.195 / 0.2 - 1))
    assert paper["bc-aligner"]["unintended_paper_pct"] == pytest.approx(100 * (0.63 / 0.65 - 1))
    assert paper["fix-m0"]["intended_paper_pct"] == pytest.approx(100 * (0.15 / 0.2 - 1))  # ours: -50 at v1
    assert (tmp_path / "report" / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)


def test_a_consumer_chosen_on_version_1_counts_from_version_2_in_both_bases():
    def rec(m, k, aucs):
        r = _rec(m, k, 0.2, 0.2, aucs, 0.0)
        r["unintended"]["u"]["selected_on_version"] = 1
        return r

    records = {
        m: {0: rec(m, 0, {"a": 0.8, "u": 0.9}), 1: rec(m, 1, {"a": 0.8, "u": a1}), 2: rec(m, 2, {"a": 0.8, "u": a2})}
        for m, a1, a2 in (("fix-m0", 0.9, 0.8), ("no-bc", 0.9, 0.8), ("bc-aligner", 0.45, 0.6))
    }
    by = {(r["method"], r["version"]): r for r in relative_rows(records)}
    assert math.isnan(by[("bc-aligner", 1)]["auc_rel_pct:u"]) and by[("bc-aligner", 1)]["auc:u"] == 0.45  # shown, not averaged
    assert by[("bc-aligner", 1)]["unintended_rel_pct"] == pytest.approx(0.0)  # task a only
    assert by[("bc-aligner", 2)]["unintended_rel_pct"] == pytest.approx((0.0 - 25.0) / 2)
    paper = paper_basis(records)  # u over v2 only: 0.6 against 0.8; a over v1-v2
    assert paper["bc-aligner"]["unintended_paper_pct"] == pytest.approx(100 * ((0.8 + 0.6) / 2 / ((0.8 + 0.8) / 2) - 1))


def test_seed_summary_is_the_mean_and_sample_std_of_the_seeds():
    records = lambda r50: {  # noqa: E731
        "fix-m0": {0: _rec("fix-m0", 0, 0.2, 0.2, {"a": 0.8}, 0.0), 1: _rec("fix-m0", 1, 0.1, 0.1, {"a": 0.8}, 0.0)},
        "no-bc": {0: _rec("no-bc", 0, 0.2, 0.2, {"a": 0.8}, 0.0), 1: _rec("no-bc", 1, 0.2, 0.2, {"a": 0.4}, 1.5)},
        "bc-aligner": {0: _rec("bc-aligner", 0, 0.2, 0.2, {"a": 0.8}, 0.0), 1: _rec("bc-aligner", 1, r50, 0.2, {"a": 0.8}, 0.01)},
    }
    per_seed = {0: records(0.19), 1: records(0.17), 2: records(0.18)}
    variants = {"bc-aligner": {"method": "bc-aligner", "alignment_weight": 16.0}}
    result = ExperimentResult(out="x", dataset="hand", methods=["fix-m0", "no-bc", "bc-aligner"], versions=2, records=per_seed[0],
                              consumers={}, per_seed=per_seed, variants=variants)  # fmt: skip
    rows = seed_rows(result)
    assert len(rows) == 9 and {r["seed"] for r in rows} == {0, 1, 2}
    mine = {r["seed"]: r for r in rows if r["method"] == "bc-aligner"}
    assert [mine[s]["intended_rel_pct"] for s in (0, 1, 2)] == pytest.approx([-5.0, -15.0, -10.0])
    summary = {s["method"]: s for s in seed_summary(rows)}
    assert summary["bc-aligner"]["seeds"] == 3 and summary["bc-aligner"]["alignment_weight"] == 16.0
    assert summary["bc-aligner"]["intended_rel_pct"] == pytest.approx(-10.0)
    assert summary["bc-aligner"]["intended_rel_pct_std"] == pytest.approx(5.0)  # n-1: sqrt((25 + 25 + 0) / 2)
    assert summary["no-bc"]["intended_rel_pct_std"] == 0.0 and summary["no-bc"]["alignment_weight"] is None
    md = seeds_markdown(seed_summary(rows))
    assert "| bc-aligner | 16 | 3 | -10.00 ± 5.00 |" in md
    assert summary["no-bc"]["unintended_rel_pct:a"] == pytest.approx(-50.0) and "| no-bc | -50.00 ± 0.00 |" in md  # per task


def test_shipped_experiment_config_validates():
    cfg = load_options(ExperimentJobConfig, file=REPO / "jobs" / "configs" / "experiment-movielens.yaml")
    assert cfg.experiment.profile == "full" and cfg.experiment.out == "runs/ml100k-seeds"
    assert set(cfg.experiment.all_methods()) == set(METHODS)
    assert len(cfg.experiment.seeds) >= 3 and cfg.experiment.sweeps
    with pytest.raises(ConfigError, match="train.method is set per method"):
        load_options(ExperimentJobConfig, overrides={"experiment": {"train": {"method": "no-bc"}}})
    paths = sorted((REPO / "jobs" / "configs").glob("experiment*.yaml"))
    assert len(paths) >= 2
    paths += sorted((REPO / "docs" / "results" / "configs").glob("*.yaml"))  # the stages docs/results.md ran
    for p in paths:  # every shipped experiment config
        assert set(load_options(ExperimentJobConfig, file=p).experiment.methods) <= set(METHODS), p


def test_experiment_command_line_help_and_bad_flags():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "jobs/experiment.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for flag in ("--dataset", "--methods", "--out", "--profile", "--versions", "--seeds", "--alignment-weights"):
        assert flag in p.stdout
    bad = subprocess.run([sys.executable, "jobs/experiment.py", "--methods", "bc-aligner,nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown method(s) ['nope']" in bad.stderr


def _raybc_imports(module: str) -> set[str]:
    """The raybc modules ``module`` imports anywhere in its source: top level, inside functions,
    under ``TYPE_CHECKING`` (a type-only import still ties the two modules together)."""
    import ast

    path = REPO / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("raybc."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("raybc.")}
    return {m for m in found if (REPO / (m.replace(".", "/") + ".py")).exists()}


def test_the_report_depends_on_the_result_type_not_on_the_experiment_runner():
    seen, todo = set(), ["raybc.report"]
    while todo:  # everything the report reaches, transitively
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_raybc_imports(m))
    assert "raybc.experiment" not in seen, "raybc.report reaches raybc.experiment: the two import each other"
    assert "raybc.results" in _raybc_imports("raybc.report") and "raybc.results" in _raybc_imports("raybc.experiment")
    assert _raybc_imports("raybc.results") == set(), "the result type depends on nothing of raybc"
    import raybc.experiment

    assert raybc.experiment.ExperimentResult is ExperimentResult  # the old import path still works


def test_experiment_options_seeds_sweep_and_variants():
    from pydantic import ValidationError

    from raybc.cli import experiment_config

    assert ExperimentOptions(seed=3).seeds == [3]  # the single-seed spelling of earlier configs
    with pytest.raises(ValidationError, match="give seeds or seed, not both"):
        ExperimentOptions(seed=3, seeds=[1, 2])
    with pytest.raises(ValidationError, match="distinct seeds"):
        ExperimentOptions(seeds=[1, 1])
    with pytest.raises(ValidationError, match=r"sweeps\[0\].seeds \[5\] must be among seeds"):
        ExperimentOptions(seeds=[0, 1], sweeps=[{"alignment_weights": [4], "seeds": [5]}])
    with pytest.raises(ValidationError, match="extra"):
        ExperimentOptions(sweeps=[{"alignment_weights": [4], "seed": [0]}])
    with pytest.raises(ValidationError, match="extra"):
        ExperimentOptions(seeeds=[0])
    o = ExperimentOptions(methods=["bc-aligner", "posthoc-lin-sloss", "bc-aligner-warm"], seeds=[0, 1], sweeps=[{"alignment_weights": [1, 16, 64], "seeds": [1]}])
    assert list(o.variants(0)) == ["fix-m0", "no-bc", "bc-aligner", "posthoc-lin-sloss", "bc-aligner-warm"]
    sweep = {k: v for k, v in o.variants(1).items() if v.alignment_weight is not None}
    # every joint method at every extra lambda; 16 (the profile's) is the method itself; post-hoc has no lambda
    assert sorted(sweep) == sorted(f"{m}.lambda{w}" for m in ("bc-aligner", "bc-aligner-warm") for w in (1, 64))
    assert sweep["bc-aligner.lambda64"].method == "bc-aligner" and sweep["bc-aligner.lambda64"].alignment_weight == 64.0
    only = ExperimentOptions(methods=["bc-aligner", "bc-aligner-warm"], seeds=[0, 1], sweeps=[
        {"alignment_weights": [4], "methods": ["bc-aligner-warm"]}, {"alignment_weights": [1], "methods": ["bc-aligner"], "seeds": [1]}])  # fmt: skip
    assert [k for k, v in only.variants(0).items() if v.alignment_weight is not None] == ["bc-aligner-warm.lambda4"]
    assert [k for k, v in only.variants(1).items() if v.alignment_weight is not None] == ["bc-aligner-warm.lambda4", "bc-aligner.lambda1"]
    with pytest.raises(ValidationError, match=r"sweeps\[0\].methods \['no-bc'\]: a lambda sweep needs a joint method"):
        ExperimentOptions(methods=["bc-aligner"], sweeps=[{"alignment_weights": [4], "methods": ["no-bc"]}])
    cfg = experiment_config(["--seeds", "0,1,2", "--alignment-weights", "1,4", "--methods", "bc-aligner-warm"])
    assert cfg.experiment.seeds == [0, 1, 2] and cfg.experiment.alignment_weights == [1.0, 4.0] and cfg.experiment.methods == ["bc-aligner-warm"]
    with pytest.raises(ConfigError, match="--alignment-weights: 'a,b' is not a comma-separated list"):
        experiment_config(["--alignment-weights", "a,b"])


@pytest.mark.slow
@pytest.mark.cluster
def test_several_seeds_and_a_lambda_sweep_share_models_and_report_both_bases(tmp_path, ray_session):
    out = tmp_path / "exp"
    recipe = ConsumerOptions(hidden=[16], dropout=[0.0], seeds=[0, 1], epochs=60, min_item_ratings=3, select_on_next_version=["user-activity"])
    opts = ExperimentOptions(
        dataset="synthetic:300,150,6000", out=str(out), profile="quick", methods=["posthoc-lin-sloss", "bc-aligner-warm"],
        seeds=[0, 1], sweeps=[{"alignment_weights": [4], "seeds": [1]}], consumer=recipe,
    )  # fmt: skip
    r = run_experiment(opts, echo=lambda s: None)
    # the user-activity consumer was chosen on v1 through fix-m0's v1: its v1 scores stay out of the averages
    assert r.consumers_per_seed[1]["user-activity"]["selected_on_version"] == 1
    assert "selected_on_version" not in r.consumers_per_seed[1]["binary-edge-rating"]
    rows = {(x["method"], x["version"]): x for x in relative_rows(r.per_seed[1])}
    assert math.isnan(rows[("bc-aligner-warm", 1)]["auc_rel_pct:user-activity"]) and math.isfinite(rows[("bc-aligner-warm", 2)]["auc_rel_pct:user-activity"])
    labels = ["fix-m0", "no-bc", "posthoc-lin-sloss", "bc-aligner-warm"]
    assert sorted(r.per_seed) == [0, 1] and list(r.per_seed[0]) == labels and list(r.per_seed[1]) == [*labels, "bc-aligner-warm.lambda4"]
    for s in (0, 1):
        base = out / f"seed{s}"
        ref = Registry(Storage(str(base / "fix-m0")))
        for m in r.per_seed[s]:
            reg = Registry(Storage(str(base / m)))
            assert reg.versions() == [0, 1, 2], (s, m)
            # one M_0 per seed, published under every method
            assert all(np.array_equal(reg.model(0).tensors[k], ref.model(0).tensors[k]) for k in ref.model(0).tensors), (s, m)
        # the post-hoc method aligns no-bc's very M_k
        nobc, post = Registry(Storage(str(base / "no-bc"))), Registry(Storage(str(base / "posthoc-lin-sloss")))
        assert all(np.array_equal(post.model(2).tensors[k], nobc.model(2).tensors[k]) for k in nobc.model(2).tensors)
        assert (base / "report" / "results.md").exists()
    # different seeds train different models
    m0 = [Registry(Storage(str(out / f"seed{s}" / "fix-m0"))).model(0).tensors for s in (0, 1)]
    assert not all(np.array_equal(m0[0][k], m0[1][k]) for k in m0[0])
    assert r.variants["bc-aligner-warm.lambda4"] == {"method": "bc-aligner-warm", "alignment_weight": 4.0}
    assert r.variants["bc-aligner-warm"]["alignment_weight"] == 16.0 and r.variants["posthoc-lin-sloss"]["alignment_weight"] is None
    report = out / "report"
    seeds = list(csv.DictReader(io.StringIO((report / "seeds.csv").read_text())))
    assert len(seeds) == 2 * len(labels) + 1
    summary = {row["method"]: row for row in csv.DictReader(io.StringIO((report / "seed_summary.csv").read_text()))}
    for m in labels:
        vals = [float(row["unintended_rel_pct"]) for row in seeds if row["method"] == m]
        assert float(summary[m]["unintended_rel_pct"]) == pytest.approx(np.mean(vals)), m
        assert float(summary[m]["unintended_rel_pct_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-9), m
        assert summary[m]["seeds"] == "2"
    assert summary["bc-aligner-warm.lambda4"]["seeds"] == "1"
    assert "## Over seeds" in (report / "results.md").read_text()
    for name in ("tradeoff.png", "tradeoff-paper.png"):
        assert (report / name).read_bytes().startswith(PNG_MAGIC)
    again = run_experiment(opts, echo=lambda s: None)
    assert again.trained == [] and again.evaluated == []
    # one seed of a several-seed output, in its seed folder: nothing to redo
    one = run_experiment(opts.model_copy(update={"seeds": [1], "seed_folders": True}), echo=lambda s: None)
    assert one.trained == [] and one.evaluated == [] and list(one.per_seed) == [1]
    # consumers trained with another recipe are never silently reused
    with pytest.raises(ConfigError, match="was trained with another recipe than this run's"):
        run_experiment(opts.model_copy(update={"consumer": recipe.model_copy(update={"select_on_next_version": []})}), echo=lambda s: None)


def test_recipe_fields_added_later_keep_earlier_caches_and_consumers_valid():
    from raybc.experiment import RECIPE_FIELDS_ADDED, recipe_key

    old_dump = {k: v for k, v in ConsumerOptions().model_dump().items() if k not in RECIPE_FIELDS_ADDED}  # a consumer trained before them
    assert recipe_key(ConsumerOptions.model_validate(old_dump)) == recipe_key(ConsumerOptions()) == old_dump
    assert recipe_key(ConsumerOptions(select_on_next_version=["user-activity"])) != old_dump
