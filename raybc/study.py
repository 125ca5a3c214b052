"""Study: a post-hoc B_1 for a model raybc did not train, measured on real data (docs/byo.md).

Two versions of an embedding model, trained independently and without any backward
compatibility (the project's ``no-bc`` method: v0 and v1 from scratch, their own dimensions), are
treated as if they came from elsewhere: their stored z_0 and z_1 are registered into a fresh root
through the real register path (:func:`raybc.intake.register_version`, z_1 with
``AlignerFitOptions``: one aligner kind, a share of the shared ids), then the published B_1 is
backfilled (Ray Data) and the five consumers -- trained once on v0, as the experiment trains them
-- are scored on the committed ``as-v0`` snapshots built from v1.

Per seed, what is measured:

- the references of the paper's protocol on the same two versions (:func:`run_experiment` with
  ``versions=2``): fix-m0 (reference, 0%), no-bc (z_1 truncated to d_0: the trivial baseline) and
  the joint bc-aligner;
- every post-hoc variant (kind, options) at every fraction of the shared ids, or its refusal
  and the message register gave;
- an untrained B: a Gaussian matrix scaled to z_0's norm, applied in memory (never registered:
  register refuses such a B, as it should);
- two alignment errors: the held-out relative error the manifest records (register's own holdout
  among the *sampled* ids), and the same error on one fixed set for every method -- the shared ids
  whose hash puts them in the held-out share (``raybc.pairs.holdout_mask``), which no fit at any
  fraction trains on.

The fraction of pairs is turned into ``fit_rows`` = round(fraction x shared ids over all
entities), a total that register splits over the entities by their rows; the pairs each entity
actually got are read back from the manifest and reported beside it.

This module computes and formats the study; ``jobs/byo_study.py`` is its command line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from raybc.aligners import KINDS, AlignerFitOptions
from raybc.consumers import ConsumerOptions, build_labels, features
from raybc.embeddings import make_table, read_matrix
from raybc.errors import InputDataError
from raybc.gate import ConsumerStore, RegisteredConsumer, read_version_embeddings
from raybc.options import Options
from raybc.pairs import holdout_mask, id_hash
from raybc.registry import Registry
from raybc.storage import Storage

ENTITIES = ("users", "items")
REFERENCE = "fix-m0"
TRUNCATION = "no-bc"  # the project's trivial baseline: z_1 truncated to d_0 ("first d_0 dims")
JOINT = "bc-aligner"
RANDOM = "random B"
STUDY_FORMAT = "raybc.byo-study/1"


class Variant(Options):
    """One post-hoc fit: an aligner kind and the AlignerFitOptions it is fitted with."""

    label: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$", description="Names the cell's root folder and its rows.")
    kind: Literal["linear", "affine", "orthogonal", "residual_mlp"]
    fit: dict[str, Any] = Field(default_factory=dict, description="AlignerFitOptions fields (not kind, fit_rows, holdout, seed).")

    @field_validator("fit")
    @classmethod
    def _fit(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted({"kind", "fit_rows", "holdout", "seed"} & set(v))
        if clash:
            raise ValueError(f"{clash} are set by the study per cell; remove them")
        AlignerFitOptions(**v)  # refuse unknown or bad fields up front
        return v


def default_variants() -> list[Variant]:
    """Every kind with register's defaults; linear with a ridge (what should rescue too few pairs);
    residual_mlp sized for small data (register's defaults, hidden 256 and 20 epochs, give 26,912
    parameters for 64 -> 32 and, with one batch per epoch here, only 20 Adam steps)."""
    return [Variant(label=k, kind=k) for k in KINDS] + [
        Variant(label="linear+ridge1e-3", kind="linear", fit={"ridge": 1e-3}),
        Variant(label="residual_mlp-h32-e300", kind="residual_mlp", fit={"hidden": 32, "epochs": 300}),
    ]


class StudyOptions(Options):
    """What the study runs (``jobs/byo_study.py`` flags map onto these fields)."""

    dataset: str = "movielens-100k"
    out: str = Field(default="runs/byo", description="Work folder: per seed the protocol's roots and one root per post-hoc cell.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    dims: list[int] = Field(default_factory=lambda: [32, 64], description="d_0 and d_1 of the two versions.")
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0], description="Shares of the shared ids fitted on.")
    variants: list[Variant] = Field(default_factory=default_variants)
    holdout: float = Field(default=0.1, gt=0, lt=0.9)
    joint: bool = Field(default=True, description="Also train the joint bc-aligner v1 (the paper's method).")
    profile: Literal["quick", "full"] = "full"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainOptions overrides (not dims, method, seed).")
    consumer: ConsumerOptions | None = None

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or any(d <= 0 for d in v):
            raise ValueError("give exactly two positive dimensions: d_0 and d_1")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not (0 < f <= 1) for f in v):
            raise ValueError("fractions lie in (0, 1]")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one seed")
        return list(dict.fromkeys(v))

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted({"dims", "method", "seed"} & set(v))
        if clash:
            raise ValueError(f"{clash} are set by the study; use --dims / --seeds")
        return v


# --------------------------------------------------------------------------- pure helpers


def fit_rows_for(fraction: float, shared_total: int) -> int | None:
    """``fit_rows`` for a share of the shared ids (None: every pair)."""
    return None if fraction >= 1 else max(1, round(fraction * shared_total))


def relative_error(mapped: np.ndarray, target: np.ndarray) -> float:
    """|mapped - target|^2 / |target|^2 over all rows (mapping to zeros scores 1)."""
    m, t = mapped.astype(np.float64), target.astype(np.float64)
    return float(((m - t) ** 2).sum() / max((t * t).sum(), 1e-30))


def relative_pct(x: float, ref: float) -> float:
    """100 (x - ref) / ref, NaN when either is not a number (report.py's convention)."""
    if not (math.isfinite(x) and math.isfinite(ref)) or ref == 0:
        return float("nan")
    return 100.0 * (x - ref) / ref


def random_b(d_in: int, d_out: int, z_in: np.ndarray, z_out: np.ndarray, *, seed: int) -> np.ndarray:
    """An untrained (d_out, d_in) Gaussian B scaled so that |B z_1| matches |z_0| on average."""
    w = np.random.default_rng(seed).standard_normal((d_out, d_in))
    scale = np.sqrt((z_out.astype(np.float64) ** 2).sum(1).mean() / max(((z_in @ w.T) ** 2).sum(1).mean(), 1e-30))
    return (w * scale).astype(np.float32)


def _nan_stats(xs: Sequence[float]) -> tuple[float, float, int]:
    ys = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return (float(np.mean(ys)), float(np.std(ys)), len(ys)) if ys else (float("nan"), float("nan"), 0)


# --------------------------------------------------------------------------- measuring


@dataclass
class SeedContext:
    """What every cell of one seed shares: the data, the v1 slice, the consumers, the stored z's."""

    seed: int
    data: Any
    slice1: Any
    recipe: ConsumerOptions
    consumers: dict[str, RegisteredConsumer]
    protocol: Storage  # <out>/seed<s>/protocol: one root per reference method
    z0: dict[str, pa.Table]  # no-bc's stored v0 (= every method's M_0 output)
    z1: dict[str, pa.Table]  # no-bc's stored v1 (the independently trained model)
    heldout: dict[str, np.ndarray]  # per entity: the fixed held-out ids (shared by v0 and v1)
    shared: dict[str, int]


def score(ctx: SeedContext, emb: Mapping[str, pa.Table], *, source: str) -> dict[str, float]:
    """Each consumer's ROC-AUC on v1's labels, fed ``emb`` (v0-compatible embeddings)."""
    out = {}
    for task, rc in ctx.consumers.items():
        labels = build_labels(ctx.data, ctx.slice1, task, min_item_ratings=ctx.recipe.min_item_ratings, split_seed=ctx.recipe.split_seed)
        out[task] = rc.consumer.score(features(labels, emb, source=source), labels.labels)["auc"]
    return out


def heldout_error(ctx: SeedContext, emb: Mapping[str, pa.Table]) -> float:
    """Relative error of ``emb`` against the stored z_0 on the fixed held-out shared ids, all entities pooled.

    In the driver, with dicts: a study-sized check (thousands of ids), not register's cluster-scale judge."""
    num = den = 0.0
    for e in ENTITIES:
        ids0, m0 = read_matrix(ctx.z0[e])
        ids, m = read_matrix(emb[e])
        pos0 = {int(i): r for r, i in enumerate(ids0)}
        pos = {int(i): r for r, i in enumerate(ids)}
        sel = [i for i in ctx.heldout[e].tolist() if i in pos]
        a = m[[pos[i] for i in sel]].astype(np.float64)
        b = m0[[pos0[i] for i in sel]].astype(np.float64)
        num += float(((a - b) ** 2).sum())
        den += float((b * b).sum())
    return num / max(den, 1e-30)


def _compatible(root: Storage) -> dict[str, pa.Table]:
    from raybc.experiment import read_compatible

    return {e: read_compatible(root, e, target=0, source=1)[0] for e in ENTITIES}


def prepare_seed(options: StudyOptions, seed: int, *, ray_address: str | None, echo: Callable[[str], None]) -> tuple[SeedContext, list[dict]]:
    """The protocol's references on two versions (trained or reused), and their rows."""
    from raybc.data import load_dataset
    from raybc.data.slicing import temporal_versions
    from raybc.experiment import ExperimentOptions, profile_consumer_options, run_experiment

    exp = ExperimentOptions(
        dataset=options.dataset, methods=[JOINT] if options.joint else [TRUNCATION], out=f"{Storage(options.out).uri()}/seed{seed}/protocol",
        profile=options.profile, versions=2, train={**options.train, "dims": list(options.dims)}, consumer=options.consumer, seed=seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = run_experiment(exp, ray_address=ray_address, echo=echo)
    protocol_seconds = time.perf_counter() - t0
    data = load_dataset(options.dataset, seed=seed)
    slice1 = temporal_versions(data)[1]
    protocol = Storage(exp.out)
    store = ConsumerStore(protocol.child(REFERENCE))
    consumers = {n: store.load(n) for n in store.names()}
    nobc = Registry(protocol.child(TRUNCATION))
    z0 = {e: read_version_embeddings(nobc, 0, e) for e in ENTITIES}
    z1 = {e: read_version_embeddings(nobc, 1, e) for e in ENTITIES}
    heldout, shared = {}, {}
    for e in ENTITIES:
        both = np.intersect1d(read_matrix(z0[e])[0], read_matrix(z1[e])[0])
        shared[e] = int(len(both))
        heldout[e] = both[holdout_mask(id_hash(pa.array(both)), options.holdout)]
    ctx = SeedContext(seed, data, slice1, profile_consumer_options(exp), consumers, protocol, z0, z1, heldout, shared)
    rows = []
    refs = [REFERENCE, TRUNCATION] + ([JOINT] if options.joint else [])
    for m in refs:
        root = protocol.child(m)
        emb = _compatible(root)
        aucs = score(ctx, emb, source=f"{m} v1 as v0")
        recorded = {t: r["auc"] for t, r in result.records[m][1]["unintended"].items()}
        for t, a in aucs.items():  # the same consumers on the same snapshot: must be the experiment's number
            assert math.isclose(a, recorded[t], rel_tol=1e-6, abs_tol=1e-9), f"{m} {t}: scored {a} here, {recorded[t]} in the experiment"
        v1 = Registry(root).get(1)
        rows.append(_row(ctx, label={TRUNCATION: "truncation (no-bc)", REFERENCE: "fix-m0 (reference)", JOINT: "bc-aligner (joint)"}[m],
                         kind=m, fraction=None, aucs=aucs, heldout_err=heldout_error(ctx, emb),
                         manifest_err=v1.metrics.get("align_err_v0"), seconds=v1.metrics.get("fit_seconds"),
                         note="manifest error: align_err_v0 (M_0 on the v1 graph, all nodes)"))  # fmt: skip
    # an untrained B, in memory
    ids1 = {e: read_matrix(ctx.z1[e]) for e in ENTITIES}
    x = np.concatenate([ids1[e][1] for e in ENTITIES])
    y = np.concatenate([read_matrix(ctx.z0[e])[1] for e in ENTITIES])
    w = random_b(x.shape[1], y.shape[1], x, y, seed=seed)
    emb = {e: make_table(ids1[e][0], ids1[e][1] @ w.T) for e in ENTITIES}
    rows.append(_row(ctx, label=RANDOM, kind="random", fraction=None, aucs=score(ctx, emb, source="random B"), heldout_err=heldout_error(ctx, emb),
                     manifest_err=None, seconds=None, note="Gaussian, scaled to |z_0|; applied in memory"))  # fmt: skip
    echo(f"[study] seed {seed}: references ready ({protocol_seconds:.1f} s): shared ids {shared}, fixed held-out {({e: len(h) for e, h in heldout.items()})}")
    return ctx, rows


def _row(ctx: SeedContext, *, label: str, kind: str, fraction: float | None, aucs: Mapping[str, float] | None, heldout_err: float | None,
         manifest_err: float | None, seconds: float | None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {"seed": ctx.seed, "label": label, "kind": kind, "fraction": fraction, "status": "ok" if aucs is not None else "refused"}
    row.update(extra)
    row.update(heldout_err=heldout_err, manifest_err=manifest_err, seconds=seconds)
    for t in ctx.consumers:
        row[f"auc:{t}"] = aucs.get(t, float("nan")) if aucs else float("nan")
    return row


def fit_cell(ctx: SeedContext, options: StudyOptions, variant: Variant, fraction: float, *, ray_address: str | None,
             echo: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Register z_0 and z_1 into a fresh root with B_1 fitted post hoc; backfill; score. A refusal is a result."""
    from raybc.backfill import BackfillOptions, backfill
    from raybc.intake import RegisterOptions

    total = sum(ctx.shared.values())
    fit_rows = fit_rows_for(fraction, total)
    name = f"{variant.label}-{fraction:g}"
    root = Storage(f"{Storage(options.out).uri()}/seed{ctx.seed}/byo/{name}")
    if root.exists(""):  # a cell is always measured afresh: v1 is immutable once published
        root.remove("", recursive=True)
    reg = Registry(root)
    nobc = Registry(ctx.protocol.child(TRUNCATION))
    quiet = lambda _m: None  # noqa: E731 - register's per-entity progress lines
    reg.register(0, embeddings={e: nobc.embeddings_storage(0, e).uri() for e in ENTITIES}, options=RegisterOptions(in_place=True),
                 ray_address=ray_address, echo=quiet)  # fmt: skip
    fit = AlignerFitOptions(kind=variant.kind, fit_rows=fit_rows, holdout=options.holdout, seed=ctx.seed, **variant.fit)
    base = dict(fit_rows=fit_rows, shared=total)
    t0 = time.perf_counter()
    try:
        v1 = reg.register(1, embeddings={e: nobc.embeddings_storage(1, e).uri() for e in ENTITIES},
                          options=RegisterOptions(in_place=True, fit=fit), ray_address=ray_address, echo=quiet)  # fmt: skip
    except InputDataError as exc:
        echo(f"[study] seed {ctx.seed} {variant.label} at {fraction:g} ({fit_rows or 'all'} fit_rows): refused")
        return _row(ctx, label=variant.label, kind=variant.kind, fraction=fraction, aucs=None, heldout_err=None, manifest_err=None,
                    seconds=time.perf_counter() - t0, message=str(exc), **base)  # fmt: skip
    register_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    backfill(root, BackfillOptions(from_version=1, progress=False), ray_address=ray_address, echo=quiet)
    backfill_s = time.perf_counter() - t1
    rep = v1.manifest["aligner_fit"]
    pairs = rep["pairs"]
    err = rep["relative_error"]
    emb = _compatible(root)
    aucs = score(ctx, emb, source=f"{variant.label} v1 as v0")
    row = _row(
        ctx, label=variant.label, kind=variant.kind, fraction=fraction, aucs=aucs, heldout_err=heldout_error(ctx, emb),
        manifest_err=err.get("all", err.get("users", {})).get("v0"), seconds=register_s, backfill_seconds=backfill_s, **base,
        pairs_train=sum(p["train"] for p in pairs.values()), pairs_holdout=sum(p["holdout"] for p in pairs.values()),
        **{f"pairs_train:{e}": p["train"] for e, p in pairs.items()}, **{f"pairs_holdout:{e}": p["holdout"] for e, p in pairs.items()},
        **{f"manifest_err:{e}": err[e]["v0"] for e in ENTITIES if e in err}, training=rep.get("training") or None,
    )  # fmt: skip
    echo(f"[study] seed {ctx.seed} {variant.label} at {fraction:g}: {row['pairs_train']} train / {row['pairs_holdout']} held-out pairs, "
         f"manifest err {row['manifest_err']:.4f}, fixed held-out err {row['heldout_err']:.4f}, register {register_s:.1f} s")  # fmt: skip
    return row


def add_relative(rows: list[dict[str, Any]], tasks: Sequence[str]) -> None:
    """Per row: ROC-AUC relative to fix-m0 of the same seed, per task and the mean over tasks (%)."""
    ref = {r["seed"]: r for r in rows if r["kind"] == REFERENCE}
    for r in rows:
        rels = [relative_pct(r[f"auc:{t}"], ref[r["seed"]][f"auc:{t}"]) for t in tasks]
        for t, x in zip(tasks, rels):
            r[f"auc_rel_pct:{t}"] = x
        r["unintended_rel_pct"] = _nan_stats(rels)[0] if r["status"] == "ok" else float("nan")


def run_study(options: StudyOptions, *, ray_address: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every seed's references and cells; returns {"rows": [...], "summary": [...], "tasks": [...], ...}."""
    from raybc.runtime import ensure_ray

    ensure_ray(ray_address)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    tasks: list[str] = []
    timing: dict[str, dict[str, float]] = {}
    for seed in options.seeds:
        t_seed = time.perf_counter()
        ctx, ref_rows = prepare_seed(options, seed, ray_address=ray_address, echo=echo)
        t_cells = time.perf_counter()
        tasks = list(ctx.consumers)
        rows += ref_rows
        for fraction in options.fractions:
            for variant in options.variants:
                rows.append(fit_cell(ctx, options, variant, fraction, ray_address=ray_address, echo=echo))
        # references: the protocol (trained here, or reused from <out>) and their scoring; cells: every register + backfill + scoring
        timing[str(seed)] = {"references_s": t_cells - t_seed, "cells_s": time.perf_counter() - t_cells}
    add_relative(rows, tasks)
    return {"format": STUDY_FORMAT, "options": options.model_dump(), "tasks": tasks, "rows": rows, "summary": summarise(rows),
            "timing": timing, "seconds": time.perf_counter() - t0}  # fmt: skip


# --------------------------------------------------------------------------- summary and formatting


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per (label, fraction): mean and std over seeds; refusals counted, their messages kept."""
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["fraction"]), []).append(r)
    out = []
    for (label, fraction), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        s: dict[str, Any] = {"label": label, "kind": rs[0]["kind"], "fraction": fraction, "seeds": len(rs), "refused": len(rs) - len(ok),
                             "fit_rows": rs[0].get("fit_rows"), "shared": rs[0].get("shared")}  # fmt: skip
        extra = [k for k in dict.fromkeys(k for r in rs for k in r) if k.startswith(("auc_rel_pct:", "pairs_train:", "pairs_holdout:", "manifest_err:"))]
        for key in ("unintended_rel_pct", "heldout_err", "manifest_err", "seconds", "pairs_train", "pairs_holdout", *extra):
            m, sd, n = _nan_stats([r.get(key) for r in ok])
            s[key], s[f"{key}_std"], s[f"{key}_n"] = m, sd, n
        s["messages"] = sorted({r["message"] for r in rs if r.get("message")})
        out.append(s)
    return out


def _pm(m: float, sd: float, n: int, fmt: str) -> str:
    if not math.isfinite(m):
        return "—"
    return f"{m:{fmt}} ± {sd:{fmt.lstrip('+')}}" if n > 1 else f"{m:{fmt}}"


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The study's table: consumers relative to fix-m0, both alignment errors, pairs, run time."""
    lines = [
        "| B_1 | share of pairs | fit_rows | pairs fitted / held out (by entity) | consumer ROC-AUC vs fix-m0 (%) | held-out error (manifest) | error on fixed held-out ids | run time s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        frac = "—" if s["fraction"] is None else f"{100 * s['fraction']:g}%"
        rows = "—" if s["fraction"] is None else ("all" if s["fit_rows"] is None else f"{s['fit_rows']:,}")
        if s["refused"] == s["seeds"] and s["fraction"] is not None:
            lines.append(f"| {s['label']} | {frac} | {rows} | — | **refused** ({s['refused']}/{s['seeds']} seeds) | — | — | — |")
            continue
        pairs = "—" if not math.isfinite(s["pairs_train"]) else f"{s['pairs_train']:.0f} / {s['pairs_holdout']:.0f}"
        per = [(e, s.get(f"pairs_train:{e}", float("nan")) + s.get(f"pairs_holdout:{e}", float("nan"))) for e in ENTITIES]
        if all(math.isfinite(n) for _, n in per):  # what each entity got (fit_rows is a total, split by rows)
            pairs += " (" + " + ".join(f"{n:.0f} {e}" for e, n in per) + ")"
        refused = f" ({s['refused']}/{s['seeds']} seeds refused)" if s["refused"] else ""
        lines.append(
            f"| {s['label']} | {frac} | {rows} | {pairs} | {_pm(s['unintended_rel_pct'], s['unintended_rel_pct_std'], s['unintended_rel_pct_n'], '+.2f')}{refused} "
            f"| {_pm(s['manifest_err'], s['manifest_err_std'], s['manifest_err_n'], '.4f')} | {_pm(s['heldout_err'], s['heldout_err_std'], s['heldout_err_n'], '.4f')} "
            f"| {_pm(s['seconds'], s['seconds_std'], s['seconds_n'], '.1f')} |"
        )
    return "\n".join(lines)


# register's messages open with the sources ("users=URI, items=URI: ..."): long local paths, the same for every cell
_SOURCES = re.compile(r"^(?:[\w.-]+=[^,:]+(?:, )?)+: ")


def refusals(summary: Sequence[Mapping[str, Any]]) -> str:
    """Each distinct refusal message (sources shortened to ``<z_1>``), with the cells it refused."""
    seen: dict[str, list[str]] = {}
    for s in summary:
        for m in s["messages"]:
            cells = seen.setdefault(_SOURCES.sub("<z_1>: ", m), [])
            cell = f"{s['label']} at {100 * s['fraction']:g}% ({s['refused']}/{s['seeds']} seeds)"
            if cell not in cells:
                cells.append(cell)
    return "\n".join(f"- {', '.join(cells)}: `{m}`" for m, cells in seen.items())


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_outputs(result: Mapping[str, Any], folder: str) -> list[str]:
    """results.json (everything), results.csv (one line per seed and cell), summary.csv, table.md."""
    store = Storage(folder)
    files = []
    here = os.getcwd().rstrip("/") + "/"

    def text(t: str) -> bytes:  # paths below the working folder written relative: no machine paths
        return t.replace(here, "").encode()

    store.write_atomic("results.json", text(json.dumps(_clean(dict(result)), indent=1, sort_keys=True, default=str)))
    files.append(store.uri("results.json"))
    for name, rows in (("results.csv", result["rows"]), ("summary.csv", result["summary"])):
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(k for k in r if k not in ("training",)))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if (isinstance(v, float) and not math.isfinite(v)) or v is None else (" | ".join(v) if isinstance(v, list) else v))
                        for k, v in r.items() if k in keys})  # fmt: skip
        store.write_atomic(name, text(buf.getvalue()))
        files.append(store.uri(name))
    store.write_atomic("table.md", text(markdown_table(result["summary"]) + "\n\nRefusals:\n\n" + refusals(result["summary"]) + "\n"))
    files.append(store.uri("table.md"))
    return files


__all__ = ["StudyOptions", "Variant", "default_variants", "fit_rows_for", "markdown_table", "random_b", "relative_error", "run_study", "summarise", "write_outputs"]
