"""The experiment report: the paper's table (Markdown + CSV) and per-version plots (PNG).

Numbers, per method and version k:

- intended: Recall@50 of v<k> on its next slice (the selected epoch's, and the mean of the last
  five checks), relative to no-bc at the same version, in %;
- unintended: each consumer's ROC-AUC on the method's version-0-compatible embeddings at version
  k, relative to fix-m0 at the same version and task, in %, then averaged over the tasks;
- alignment: the relative squared error of the composed map to v0 (``align_err_v0``).

"Average" columns average the per-version relative numbers over versions 1..K: version 0 is the
same M_0 for every method, so it would only dilute the differences (raybc's basis). The paper's
basis (the authors' ``analyze_all_results.ipynb``) is a ratio of means instead: intended = mean
Recall@50 over versions 0..K relative to no-bc's mean; unintended = each task's ROC-AUC averaged
over versions 1..K, then over tasks, relative to fix-m0's same mean. Both are reported. A consumer
chosen on version j's rows (``ConsumerOptions.select_on_next_version``) counts only from version
j+1 on, in both bases (the authors score their user tasks from version 2).

Several seeds (or lambda variants): ``seeds.csv`` holds one row per (seed, method) on both bases,
``seed_summary.csv`` their mean and standard deviation over seeds (n-1 denominator), and
``tradeoff.png`` / ``tradeoff-paper.png`` plot intended against unintended, one point per method
and lambda, with the seeds' standard deviation as error bars. Plots are rendered with
matplotlib's Agg backend (no display needed).

This module formats what ``experiment`` computed; it computes no metric itself.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from raybc.results import ExperimentResult
from raybc.storage import Storage

COMPAT_REFERENCE = "fix-m0"
INTENDED_REFERENCE = "no-bc"
# Small figures: they are committed next to docs/results.md.
FIG_SIZE, FIG_DPI = (6.4, 4.0), 90
# Alignment errors span 0 (exact maps) to ~2 (unrelated spaces): log scale above this, linear below.
SYMLOG_LINEAR_BELOW = 1e-3


def _rel(x: float | None, ref: float | None) -> float:
    if x is None or ref is None or not math.isfinite(x) or not math.isfinite(ref) or ref == 0:
        return float("nan")
    return 100.0 * (x - ref) / ref


def _mean(xs: Sequence[float]) -> float:
    ys = [x for x in xs if math.isfinite(x)]
    return float(np.mean(ys)) if ys else float("nan")


def _std(xs: Sequence[float]) -> float:
    ys = [x for x in xs if math.isfinite(x)]
    return float(np.std(ys)) if ys else float("nan")


def tasks_of(records: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    seen: dict[str, None] = {}
    for per in records.values():
        for rec in per.values():
            seen.update(dict.fromkeys(rec.get("unintended", {})))
    return list(seen)


def relative_rows(records: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, version): absolute numbers and the relative ones of the paper's table."""
    tasks = tasks_of(records)
    rows = []
    for method, per in records.items():
        for k in sorted(per, key=int):
            rec = per[k]
            ref_i = records.get(INTENDED_REFERENCE, {}).get(k, {}).get("intended", {})
            ref_u = records.get(COMPAT_REFERENCE, {}).get(k, {}).get("unintended", {})
            r = {
                "method": method,
                "version": int(k),
                "dim": rec.get("dim"),
                "recall@50": rec["intended"].get("recall@50"),
                "recall50_last5_mean": rec["intended"].get("recall50_last5_mean"),
                "intended_rel_pct": _rel(rec["intended"].get("recall@50"), ref_i.get("recall@50")),
                "intended_last5_rel_pct": _rel(rec["intended"].get("recall50_last5_mean"), ref_i.get("recall50_last5_mean")),
                "align_err_v0": rec.get("align_err_v0"),
            }
            rels = []
            for t in tasks:
                u = rec.get("unintended", {}).get(t, {})
                auc = u.get("auc", float("nan"))
                # a consumer chosen on version j's rows is not scored at versions <= j (left out of every mean)
                rel = _rel(auc, ref_u.get(t, {}).get("auc")) if int(k) > int(u.get("selected_on_version", -1)) else float("nan")
                r[f"auc:{t}"] = auc
                r[f"auc_rel_pct:{t}"] = rel
                rels.append(rel)
            r["unintended_rel_pct"] = _mean(rels)
            r["auc_mean"] = _mean([r[f"auc:{t}"] for t in tasks])
            rows.append(r)
    return rows


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the relative numbers averaged over versions >= 1, with their spread over versions."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["version"] > 0]
        s: dict[str, Any] = {"method": method, "versions": len(mine)}
        for key in ("intended_rel_pct", "intended_last5_rel_pct", "unintended_rel_pct"):
            vals = [r[key] for r in mine]
            s[key], s[key + "_std"] = _mean(vals), _std(vals)
        s["align_err_v0"] = _mean([r["align_err_v0"] for r in mine if r["align_err_v0"] is not None])
        out.append(s)
    return out


def paper_basis(records: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per method, the paper's aggregation: ratios of means (see the module doc), in %."""
    tasks = tasks_of(records)

    def intended_mean(m: str) -> float:
        return _mean([float(r["intended"].get("recall@50") or float("nan")) for r in records.get(m, {}).values()])

    def unintended_mean(m: str) -> float:
        per = records.get(m, {})
        def auc(k: Any, t: str) -> float:
            u = per[k].get("unintended", {}).get(t, {})
            return float(u.get("auc", float("nan"))) if int(k) > max(0, int(u.get("selected_on_version", 0))) else float("nan")

        return _mean([_mean([auc(k, t) for k in per]) for t in tasks])

    ref_i, ref_u = intended_mean(INTENDED_REFERENCE), unintended_mean(COMPAT_REFERENCE)
    return {m: {"intended_paper_pct": _rel(intended_mean(m), ref_i), "unintended_paper_pct": _rel(unintended_mean(m), ref_u)} for m in records}


SEED_KEYS = (
    "intended_rel_pct", "intended_last5_rel_pct", "unintended_rel_pct", "intended_paper_pct", "unintended_paper_pct", "align_err_v0",
)  # fmt: skip


def seed_rows(result: ExperimentResult) -> list[dict[str, Any]]:
    """One row per (seed, method or variant): both bases' numbers (averages over versions)."""
    out = []
    for seed, records in result.seeds().items():
        rel = relative_rows(records)
        summary = {s["method"]: s for s in summary_rows(rel)}
        paper = paper_basis(records)
        for label in records:
            v = result.variants.get(label, {})
            row = {"seed": seed, "method": label, "base_method": v.get("method", label), "alignment_weight": v.get("alignment_weight")}
            row.update({k: summary[label].get(k) for k in ("intended_rel_pct", "intended_last5_rel_pct", "unintended_rel_pct", "align_err_v0")})
            row.update(paper[label])
            for t in tasks_of(records):  # each task's ROC-AUC vs fix-m0, mean over versions >= 1 (ours)
                row[f"unintended_rel_pct:{t}"] = _mean([r[f"auc_rel_pct:{t}"] for r in rel if r["method"] == label and r["version"] > 0])
            out.append(row)
    return out


def _sample_std(xs: Sequence[float]) -> float:
    ys = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.std(ys, ddof=1)) if len(ys) > 1 else float("nan")


def seed_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method or variant: mean and standard deviation (n-1) over seeds of every ``SEED_KEYS`` number."""
    out = []
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        s: dict[str, Any] = {"method": label, "base_method": mine[0]["base_method"], "alignment_weight": mine[0]["alignment_weight"], "seeds": len(mine)}
        task_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("unintended_rel_pct:")))  # seeds may skip a task
        for key in (*SEED_KEYS, *task_keys):
            vals = [float(r[key]) if r.get(key) is not None else float("nan") for r in mine]
            s[key], s[key + "_std"] = _mean(vals), _sample_std(vals)
        out.append(s)
    return out


# The trade-off plot's right panel: the compatible corner, where the aligned methods sit.
ZOOM_UNINTENDED_PCT = (-6.0, 1.0)


def tradeoff_plot(summary: Sequence[Mapping[str, Any]], *, basis: str = "ours") -> bytes:
    """Intended (y) against unintended (x), one point per method and lambda, seeds' std as error bars;
    a joint method's lambdas are joined by a line. Left: every method; right: the compatible corner
    (x in ``ZOOM_UNINTENDED_PCT``). The goal region (within -1% / -0.3%) is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xi, yi = ("unintended_rel_pct", "intended_rel_pct") if basis == "ours" else ("unintended_paper_pct", "intended_paper_pct")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in summary:
        groups.setdefault(r["base_method"], []).append(r)

    def err(r: Mapping[str, Any], key: str) -> float:
        v = float(r[key + "_std"])
        return v if math.isfinite(v) else 0.0

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.8), dpi=FIG_DPI, gridspec_kw={"width_ratios": [1, 1.3]})
    for panel, ax in enumerate(axes):
        for method, pts in groups.items():
            pts = sorted(pts, key=lambda r: float(r["alignment_weight"] or 0.0))
            xs, ys = [float(r[xi]) for r in pts], [float(r[yi]) for r in pts]
            line = ax.errorbar(xs, ys, xerr=[err(r, xi) for r in pts], yerr=[err(r, yi) for r in pts], marker="o", ms=4, capsize=2,
                               linestyle="-" if len(pts) > 1 else "none", label=method)  # fmt: skip
            if len(pts) > 1 and panel == 1:
                for r, x, y in zip(pts, xs, ys):
                    ax.annotate(f"λ={float(r['alignment_weight']):g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                                color=line[0].get_color())  # fmt: skip
        if panel == 1:
            ax.set_xlim(*ZOOM_UNINTENDED_PCT)
        ax.axhline(0, color="gray", lw=0.6)
        ax.axvline(0, color="gray", lw=0.6)
        lo_x, hi_x = ax.get_xlim()
        lo_y, hi_y = ax.get_ylim()
        ax.fill_between([-0.3, max(hi_x, 0.3)], -1.0, max(hi_y, 1.0), color="green", alpha=0.12, label="goal (≥ -1% / ≥ -0.3%)" if panel else None)
        ax.set_xlim(lo_x, hi_x)
        ax.set_ylim(lo_y, hi_y)
        ax.set_xlabel("unintended: ROC-AUC vs fix-m0 (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("intended: Recall@50 vs no-bc (%)")
    axes[0].set_title("all methods", fontsize=9)
    axes[1].set_title("the compatible corner", fontsize=9)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    what = "mean of per-version ratios over versions 1..K" if basis == "ours" else "the paper's basis: ratio of means"
    fig.suptitle(f"Trade-off ({what}): mean over seeds, error bars = std over seeds", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: Any, spec: str = "+.2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(result: ExperimentResult, rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]]) -> str:
    tasks = tasks_of(result.records)
    versions = sorted({r["version"] for r in rows})
    later = [v for v in versions if v > 0]
    lines = [
        f"# Experiment report: {result.dataset}",
        "",
        f"Methods: {', '.join(result.methods)}; versions 0..{result.versions - 1}; output `{result.out}`; "
        f"run time of this invocation {result.seconds:.0f} s (trained {len(result.trained)} versions, "
        f"evaluated {len(result.evaluated)}).",
        "",
        "## Average over versions " + ", ".join(map(str, later)),
        "",
        "Intended: Recall@50 relative to no-bc (%); unintended: ROC-AUC relative to fix-m0 (%), mean of the "
        "tasks; ± is the spread (std) over versions. align err: relative squared error of the map to v0.",
        "",
        "| method | intended R@50 (selected epoch) | intended R@50 (mean of last 5 checks) | unintended ROC-AUC | align err v0 |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {_fmt(s['intended_rel_pct'])} ± {_fmt(s['intended_rel_pct_std'], '.2f')} "
            f"| {_fmt(s['intended_last5_rel_pct'])} ± {_fmt(s['intended_last5_rel_pct_std'], '.2f')} "
            f"| {_fmt(s['unintended_rel_pct'])} ± {_fmt(s['unintended_rel_pct_std'], '.2f')} | {_fmt(s['align_err_v0'], '.4f')} |"
        )
    by = {(r["method"], r["version"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def per_version(title: str, key: str, spec: str = "+.2f") -> None:
        lines.extend(["", f"## {title}", "", "| method | " + " | ".join(f"v{v}" for v in versions) + " |", "|---|" + "---:|" * len(versions)])
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(by.get((m, v), {}).get(key), spec) for v in versions) + " |")

    per_version("Intended: Recall@50 (selected epoch) relative to no-bc, % per version", "intended_rel_pct")
    per_version("Intended: Recall@50 (mean of last 5 checks) relative to no-bc, % per version", "intended_last5_rel_pct")
    per_version("Unintended: ROC-AUC relative to fix-m0, mean of the tasks, % per version", "unintended_rel_pct")
    per_version("Recall@50 (selected epoch), absolute", "recall@50", ".4f")
    per_version("Mean consumer ROC-AUC, absolute", "auc_mean", ".4f")
    per_version("Alignment error to v0 (relative squared error)", "align_err_v0", ".4f")
    lines.extend(["", "## Unintended tasks, ROC-AUC relative to fix-m0 (%), averaged over versions " + ", ".join(map(str, later)), ""])
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---:|" * len(tasks))
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(_mean([by[(m, v)][f'auc_rel_pct:{t}'] for v in later if (m, v) in by])) for t in tasks) + " |")
    lines.extend(["", "## Consumers (trained once on fix-m0's v0)", "", "| task | hidden | dropout | seeds | val AUC | test AUC (v0) |", "|---|---:|---:|---:|---:|---:|"])
    for t, c in result.consumers.items():
        if "skipped" in c:
            lines.append(f"| {t} | skipped: {c['skipped']} | | | | |")
        else:
            lines.append(f"| {t} | {c['hidden']} | {c['dropout']} | {len(c['seeds'])} | {c['val_auc']:.4f} | {c['baseline_auc']:.4f} |")
    lines.extend(["", "Plots: `intended.png`, `unintended.png`, `alignment.png`, `unintended_tasks.png`, `tradeoff.png`.", ""])
    return "\n".join(lines)


def seeds_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """The mean ± std over seeds on both bases (appended to results.md)."""
    n = max((int(s["seeds"]) for s in summary), default=0)
    lines = [
        "## Over seeds: mean ± std (n-1) of each seed's average",
        "",
        f"Up to {n} seed(s) per row (column `seeds`). Ours: mean of per-version ratios over versions 1..K; "
        "paper's: ratio of means (intended over versions 0..K, unintended over 1..K).",
        "",
        "| method | λ | seeds | intended (ours) | intended last-5 (ours) | unintended (ours) | intended (paper's) | unintended (paper's) | align err v0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        cell = lambda k, spec="+.2f": f"{_fmt(s[k], spec)} ± {_fmt(s[k + '_std'], '.2f')}"  # noqa: E731
        lam = "" if s["alignment_weight"] is None else f"{float(s['alignment_weight']):g}"
        lines.append(
            f"| {s['method']} | {lam} | {s['seeds']} | {cell('intended_rel_pct')} | {cell('intended_last5_rel_pct')} | {cell('unintended_rel_pct')} "
            f"| {cell('intended_paper_pct')} | {cell('unintended_paper_pct')} | {cell('align_err_v0', '.4f')} |"
        )
    tasks = [k.split(":", 1)[1] for k in (summary[0] if summary else {}) if k.startswith("unintended_rel_pct:") and not k.endswith("_std")]
    if tasks:
        lines.extend(["", "Each task's ROC-AUC vs fix-m0 (%), mean over versions, then mean ± std over seeds:", "",
                      "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)])  # fmt: skip
        for s in summary:
            lines.append(f"| {s['method']} | " + " | ".join(f"{_fmt(s['unintended_rel_pct:' + t])} ± {_fmt(s['unintended_rel_pct:' + t + '_std'], '.2f')}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def plots(rows: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of the per-version plots: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = [k.split(":", 1)[1] for k in rows[0] if k.startswith("auc:")] if rows else []
    out: dict[str, bytes] = {}

    def series(m: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["version"], r.get(key)) for r in rows if r["method"] == m]
        pts = [(v, float(y)) for v, y in pts if y is not None and math.isfinite(float(y))]
        return [v for v, _ in pts], [y for _, y in pts]

    def figure(name: str, key: str, ylabel: str, title: str, *, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=FIG_SIZE, dpi=FIG_DPI)
        for m in methods:
            xs, ys = series(m, key)
            ax.plot(xs, ys, marker="o", label=m)
        ax.set_xlabel("version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:  # linear near 0 so that exact maps (fix-m0: 0) stay visible
            ax.set_yscale("symlog", linthresh=SYMLOG_LINEAR_BELOW)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out[name] = buf.getvalue()

    figure("intended.png", "recall@50", "Recall@50 (next slice)", "Intended task per version")
    figure("unintended.png", "auc_mean", "mean consumer ROC-AUC", "Unintended tasks (consumers of v0) per version")
    figure("alignment.png", "align_err_v0", "relative squared error to v0", "Alignment error of the map to v0", log=True)
    if tasks:
        cols = min(3, len(tasks))
        nrows = math.ceil(len(tasks) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 3.0 * nrows), dpi=FIG_DPI, squeeze=False)
        for ax, t in zip(axes.flat, tasks):
            for m in methods:
                xs, ys = series(m, f"auc:{t}")
                ax.plot(xs, ys, marker="o", label=m)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("version")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tasks) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle("Consumer ROC-AUC per task")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out["unintended_tasks.png"] = buf.getvalue()
    return out


def write_report(result: ExperimentResult, dest: Storage) -> list[str]:
    """results.md, results.csv (per method and version), summary.csv and the PNGs; returns their URIs."""
    rows = relative_rows(result.records)
    summary = summary_rows(rows)
    per_seed = seed_rows(result)
    over_seeds = seed_summary(per_seed)
    files = {
        "results.md": (markdown(result, rows, summary) + "\n" + seeds_markdown(over_seeds)).encode(),
        "results.csv": _csv(rows).encode(),
        "summary.csv": _csv(summary).encode(),
        "seeds.csv": _csv(per_seed).encode(),
        "seed_summary.csv": _csv(over_seeds).encode(),
        **plots(rows),
        "tradeoff.png": tradeoff_plot(over_seeds, basis="ours"),
        "tradeoff-paper.png": tradeoff_plot(over_seeds, basis="paper"),
    }
    for name, data in files.items():
        dest.write_atomic(name, data)
    return [dest.uri(n) for n in files]


__all__ = ["markdown", "paper_basis", "plots", "relative_rows", "seed_rows", "seed_summary", "seeds_markdown", "summary_rows", "tradeoff_plot", "write_report"]
