"""The experiment: the quick profile end to end on tiny synthetic data (every method, every version,
snapshots kept, consumers registered, report and plots written, a rerun recomputes nothing), the
report's arithmetic on hand-made records, and the shipped config."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from raybc.config import ExperimentJobConfig
from raybc.errors import ConfigError
from raybc.experiment import ExperimentOptions, committed_run, read_compatible, run_experiment
from raybc.options import load_options
from raybc.registry import Registry
from raybc.report import relative_rows, summary_rows, write_report
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
    assert len(files) == 7
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| bc-aligner | -5.00 ± 0.00 | -20.00 ± 0.00 | -2.50 ± 0.00 | 0.0100 |" in md
    assert "skipped: few rows" in md


def test_shipped_experiment_config_validates():
    cfg = load_options(ExperimentJobConfig, file=REPO / "jobs" / "configs" / "experiment-movielens.yaml")
    assert cfg.experiment.profile == "full" and cfg.experiment.out == "runs/ml100k"
    assert set(cfg.experiment.all_methods()) == set(METHODS)
    with pytest.raises(ConfigError, match="train.method is set per method"):
        load_options(ExperimentJobConfig, overrides={"experiment": {"train": {"method": "no-bc"}}})


def test_experiment_command_line_help_and_bad_flags():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "jobs/experiment.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for flag in ("--dataset", "--methods", "--out", "--profile", "--versions"):
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
