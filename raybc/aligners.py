"""Aligners: a backward transform B_k fitted post hoc from pairs of stored embeddings.

For a model raybc did not train, B_k (z_k -> z_{k-1}) is fitted from the ids both versions hold
(``pairs`` joins and samples them in Ray tasks). Four kinds:

- ``linear`` / ``affine``: exact least squares, optionally with ridge, from float64 sufficient
  statistics (X'X, X'Y, sums) summed over the reduce buckets -- no pair ever reaches the driver.
- ``orthogonal``: Procrustes, W = U V' from the SVD of Y'X; semi-orthogonal (orthonormal rows or
  columns) when the dimensions differ. Keeps norms and angles; cannot rescale.
- ``residual_mlp``: P x + W2 relu(W1 x + b1) + b2, started at the least-squares P and trained with
  Ray Train (a TorchTrainer; ``num_workers=0`` runs in-process) on the sampled pairs, with the
  paper's multi-step loss through the frozen older B's; checkpoints are safetensors and a rerun of
  the same fit resumes from the last one (as Drift-Adapter, EMNLP 2025, trains its adapters).

Every B is judged on held-out pairs (a share of the ids, by hash) in the parent's space and, through
the published B_{k-1}, ..., B_1, in every older space: relative error |B(z_k) - z_{k-1}|^2 /
|z_{k-1}|^2 there, so mapping to zeros scores 1. For an unconstrained linear or affine B the
multi-step loss has the same minimiser as the single-step one (a positive-definite weighting of
the outputs does not move a least-squares optimum), so the closed forms serve both.

This module fits and judges; registering the version is ``intake``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raybc.errors import InputDataError
from raybc.options import Options
from raybc.pairs import EntityScan, call_on_summed_stats, pair_errors, pair_stats, run_on_pairs, select, submit_on_pairs
from raybc.transforms import Affine, FanOutPlan, ResidualMLP, Transform

KINDS = ("linear", "affine", "orthogonal", "residual_mlp")
# Smallest eigenvalue of X'X/n relative to its largest below which z_k is treated as rank-deficient
# (float64 normal equations lose about twice the digits of the data; 1e-10 leaves a margin over
# float32 inputs' ~1e-7 relative precision squared).
RANK_TOL = 1e-10
# residual_mlp's hidden layer when sized to the data: at most the first, at least the second.
MAX_HIDDEN, MIN_HIDDEN = 256, 8


class AlignerFitOptions(Options):
    """How B_k is fitted from the pairs (``raybc register --fit-aligner KIND``)."""

    kind: Literal["linear", "affine", "orthogonal", "residual_mlp"] = "linear"
    fit_rows: int | None = Field(
        default=1_000_000, ge=1,
        description="Pairs sampled by id hash in total over all entities, each at the same rate (held-out share included); all pairs when fewer exist; null: all pairs.",
    )  # fmt: skip
    holdout: float = Field(default=0.1, gt=0, lt=0.9, description="Share of the sampled ids held out to report the error.")
    ridge: float = Field(default=0.0, ge=0, description="lambda in mean |y - W x|^2 + lambda |W|^2 (linear, affine).")
    hidden: int | None = Field(
        default=None, ge=1, le=65_536,
        description="residual_mlp: hidden units; null: sized to the data (at most 256, at most a quarter as many "
        "parameters as the training pairs give equations).",
    )  # fmt: skip
    epochs: int = Field(default=20, ge=1, le=10_000, description="residual_mlp: passes over the training pairs.")
    min_steps: int = Field(
        default=300, ge=0, le=10_000_000,
        description="residual_mlp: at least this many optimiser steps in all (epochs are added when the pairs are few).",
    )  # fmt: skip
    batch_size: int = Field(default=4096, ge=1, description="residual_mlp: pairs per step (per worker).")
    lr: float = Field(default=1e-3, gt=0, le=1.0, description="residual_mlp: Adam learning rate.")
    num_workers: int = Field(default=0, ge=0, le=1024, description="residual_mlp: Ray Train workers (0: in-process).")
    use_gpu: bool = Field(default=False, description="residual_mlp: train on GPU workers.")
    seed: int = 0

    def n_params(self, d_in: int, d_out: int) -> int:
        if self.kind == "residual_mlp":
            h = self.hidden or 1
            return d_out * d_in + h * (d_in + 1) + d_out * (h + 1)
        return d_out * (d_in + (self.kind == "affine"))

    def sized(self, train_pairs: int, d_in: int, d_out: int) -> AlignerFitOptions:
        """These options with ``hidden`` resolved: the largest <= 256 whose parameters stay within a
        quarter of the equations (pairs x outputs) the training pairs give, at least 8."""
        if self.kind != "residual_mlp" or self.hidden is not None:
            return self
        budget = train_pairs * d_out // 4 - d_out * d_in - d_out
        return self.model_copy(update={"hidden": int(min(MAX_HIDDEN, max(MIN_HIDDEN, budget // (d_in + 1 + d_out))))})

    def steps_per_epoch(self, train_pairs: int) -> int:
        """Optimiser steps of one pass over each worker's share of ``train_pairs``."""
        per_worker = -(-train_pairs // max(1, self.num_workers))
        return max(1, -(-per_worker // self.batch_size))

    def epochs_for(self, train_pairs: int) -> int:
        """``epochs``, raised so that at least ``min_steps`` optimiser steps are taken."""
        return max(self.epochs, -(-self.min_steps // self.steps_per_epoch(train_pairs)))


@dataclass
class AlignerReport:
    """How a B was fitted or checked, as the version manifest records it."""

    kind: str
    fitted: bool
    pairs: dict[str, dict[str, int]]  # entity -> rows, parent_rows, shared, missing_in_parent, train, holdout
    error: dict[str, dict[str, float]]  # entity (and "all") -> space ("v<j>") -> relative error
    options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "fitted": self.fitted, "pairs": self.pairs, "relative_error": self.error,
                "options": self.options, **({"training": self.training} if self.training else {})}  # fmt: skip

    def table(self) -> str:
        spaces = list(next(iter(self.error.values()), {}))
        head = f"B ({self.kind}, {'fitted' if self.fitted else 'given'}): relative error |B z - z_parent|^2 / |z_parent|^2 on held-out shared ids"
        lines = [head, "  " + f"{'entity':<12}" + "".join(f"{s:>10}" for s in spaces)]
        for e, errs in self.error.items():
            lines.append("  " + f"{e:<12}" + "".join(f"{errs[s]:>10.4g}" for s in spaces))
        for e, p in self.pairs.items():
            lines.append(
                f"  {e}: {p['rows']:,} rows, {p['shared']:,} shared with the parent ({p['missing_in_parent']:,} not in it), "
                f"{p['train']:,} pairs fitted, {p['holdout']:,} held out"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- closed forms (pure)


def solve_least_squares(stats: Mapping[str, Any], *, affine: bool, ridge: float, source: str) -> Affine:
    """W (and b) minimising mean |y - (W x + b)|^2 + ridge |W|^2 from summed statistics."""
    n = int(stats["n"])
    xtx, xty = np.asarray(stats["xtx"]) / n, np.asarray(stats["xty"]) / n
    mx = my = None
    if affine:
        mx, my = np.asarray(stats["sx"]) / n, np.asarray(stats["sy"]) / n
        xtx = xtx - np.outer(mx, mx)
        xty = xty - np.outer(mx, my)
    d = xtx.shape[0]
    eig = np.linalg.eigvalsh(xtx)
    top = max(float(eig[-1]), 0.0)
    rank = int((eig > RANK_TOL * top).sum()) if top > 0 else 0
    if ridge == 0 and rank < d:
        raise InputDataError(
            f"{source}: the sampled z_k span only {rank} of their {d} dimensions{' (after centring)' if affine else ''} -- "
            "some dimensions are constant or linear combinations of others, so least squares has no unique B. "
            "Fit with a ridge penalty (--ridge 1e-3), or the orthogonal kind, or drop the dead dimensions"
        )
    wt = np.linalg.solve(xtx + ridge * np.eye(d), xty)  # (d_in, d_out)
    w = np.ascontiguousarray(wt.T)
    bias = None if not affine else my - w @ mx  # type: ignore[operator]
    return Affine(w, bias)


def solve_procrustes(stats: Mapping[str, Any]) -> Affine:
    """The (semi-)orthogonal W maximising tr(W X'Y)', i.e. minimising |Y - X W'|^2."""
    m = np.asarray(stats["xty"]).T  # (d_out, d_in) = sum y x'
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return Affine(np.ascontiguousarray(u @ vt))


# --------------------------------------------------------------------------- judging


def older_chain(registry: Any, parent: int) -> FanOutPlan | None:
    """The published B_{parent}, ..., B_1 as one plan from the parent to every older version."""
    return registry.plan(parent, range(parent)) if parent > 0 else None


def judge(scans: Sequence[EntityScan], transform: Transform, chain: FanOutPlan | None, parent: int, part: str) -> dict[str, dict[str, float]]:
    """Relative error per entity (and over all entities) in the parent's space and every older one."""
    out: dict[str, dict[str, float]] = {}
    totals: dict[str, list[float]] = {}
    for s in scans:
        if not s.pairs:
            continue
        sums: dict[str, list[float]] = {}
        for r in run_on_pairs(pair_errors, s.pairs, s.threshold, part, transform, chain):
            for j, e in r["err"].items():
                name = f"v{parent}" if j == "parent" else f"v{j}"
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += e
                acc[1] += r["ref"][j]
        if sums:
            out[s.entity] = {j: (e / ref if ref > 0 else float("nan")) for j, (e, ref) in sums.items()}
        else:  # no pair of this entity in ``part`` (a tiny entity's sample): nothing measured
            out[s.entity] = {f"v{j}": float("nan") for j in [parent, *(range(parent) if chain is not None else [])]}
        for j, (e, ref) in sums.items():
            t = totals.setdefault(j, [0.0, 0.0])
            t[0] += e
            t[1] += ref
    if len(out) > 1:
        out["all"] = {j: (e / ref if ref > 0 else float("nan")) for j, (e, ref) in totals.items()}
    return out


def pair_counts(scans: Sequence[EntityScan]) -> dict[str, dict[str, int]]:
    counts = {}
    for s in scans:
        hold = sum(run_on_pairs(_count, s.pairs, s.threshold, "holdout")) if s.pairs else 0
        counts[s.entity] = {
            "rows": s.rows, "parent_rows": s.parent_rows, "shared": s.shared, "missing_in_parent": s.missing_in_parent,
            "train": s.sampled - hold, "holdout": hold,
        }  # fmt: skip
    return counts


def _count(pairs: Mapping[str, Any], threshold: int, part: str) -> int:
    return len(select(pairs, threshold, part)[0])


# --------------------------------------------------------------------------- fitting


def fit_from_scans(
    scans: Sequence[EntityScan],
    options: AlignerFitOptions,
    *,
    d_in: int,
    d_out: int,
    registry: Any,
    version: int,
    source: str,
) -> tuple[Transform, AlignerReport]:
    """Fit B_version from the scanned pairs; refuse what cannot be fitted; judge on held-out pairs."""
    counts = pair_counts(scans)
    shared = sum(c["shared"] for c in counts.values())
    if shared == 0:
        sizes = ", ".join(f"{e}: {c['rows']:,} rows" for e, c in counts.items())
        raise InputDataError(
            f"{source}: no id of the new embeddings occurs in v{version - 1} ({sizes}); B_{version} is fitted "
            f"on ids both versions hold. Check that the ids are the same kind of id as v{version - 1}'s, or give B_{version} with --aligner"
        )
    train = sum(c["train"] for c in counts.values())
    held = sum(c["holdout"] for c in counts.values())
    options = options.sized(train, d_in, d_out)
    # What makes the fit well-posed: least squares needs as many pairs as unknowns per output unless
    # ridge regularises it; Procrustes (an SVD of Y'X) is defined for any number of pairs; the
    # residual MLP needs as many equations (pairs x outputs) as parameters.
    if options.kind == "residual_mlp":
        need, have, unit = options.n_params(d_in, d_out), train * d_out, "equations (pairs x output dimensions)"
    elif options.kind == "orthogonal" or options.ridge > 0:
        need, have, unit = 1, train, "pairs"
    else:
        need, have, unit = d_in + (options.kind == "affine"), train, "pairs"
    if have < need or held == 0:
        article = "an" if options.kind[0] in "aeiou" else "a"
        fixes = ["Give more shared ids", "raise --fit-rows (or 'all')"]
        if options.kind in ("linear", "affine") and options.ridge == 0:
            fixes.append("add --ridge (well-posed for any number of pairs)")
        if options.kind == "residual_mlp" and have >= options.model_copy(update={"hidden": MIN_HIDDEN}).n_params(d_in, d_out):
            fixes.append("lower --hidden")  # only where a smaller hidden layer would fit
        fixes.append("or fit a simpler kind")
        raise InputDataError(
            f"{source}: {train:,} training pairs and {held:,} held-out ({shared:,} shared ids, {options.holdout:.0%} "
            f"held out) give {have:,} {unit}; {article} {options.kind} B of {d_in} -> {d_out} dimensions needs at least "
            f"{need:,}, and at least one held-out pair. " + ", ".join(fixes[:-1]) + " " + fixes[-1]
        )
    # Sufficient statistics per bucket, summed and solved in Ray tasks: the driver gets B alone, however
    # many buckets (a few d x d matrices each) the rows make, and runs no linear algebra itself.
    stats = [r for s in scans for r in submit_on_pairs(pair_stats, s.pairs, s.threshold)]
    training: dict[str, Any] = {}
    if options.kind in ("linear", "affine"):
        b: Transform = call_on_summed_stats(solve_least_squares, stats, affine=options.kind == "affine", ridge=options.ridge, source=source)
    elif options.kind == "orthogonal":
        b = call_on_summed_stats(solve_procrustes, stats)
    else:
        start = call_on_summed_stats(solve_least_squares, stats, affine=False, ridge=max(options.ridge, 1e-6), source=source)
        b, training = train_residual(scans, options, start=start, registry=registry, version=version, train_pairs=train)
    b = _as_float32(b)
    chain = older_chain(registry, version - 1)
    report = AlignerReport(
        kind=options.kind, fitted=True, pairs=counts, error=judge(scans, b, chain, version - 1, "holdout"),
        options=options.model_dump(), training=training,
    )  # fmt: skip
    return b, report


def check_given(scans: Sequence[EntityScan], b: Transform, *, registry: Any, version: int) -> AlignerReport:
    """Judge a given B on every sampled shared id (nothing of it was fitted on them)."""
    counts = pair_counts(scans)
    for c in counts.values():
        c["train"], c["holdout"] = 0, c["train"] + c["holdout"]
    return AlignerReport(kind=b.spec()["kind"], fitted=False, pairs=counts, error=judge(scans, b, older_chain(registry, version - 1), version - 1, "all"))


def _as_float32(t: Transform) -> Transform:
    if isinstance(t, Affine):
        return Affine(t.weight.astype(np.float32), None if t.bias is None else t.bias.astype(np.float32))
    return t


# --------------------------------------------------------------------------- residual_mlp with Ray Train


def residual_loop(config: dict[str, Any]) -> None:
    """The Ray Train loop: rank r trains on buckets r, r+W, ... of the pairs; DDP averages."""
    import ray
    import ray.train
    import torch

    from raybc.alignment import BackwardAligner, multi_step_loss
    from raybc.runtime import tame_ray_logs
    from raybc.train.loop import load_checkpoint, save_checkpoint

    tame_ray_logs()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    if world > 1:
        torch.set_num_threads(1)
    xs, ys = [], []
    for ref, thr in config["pairs"][rank::world]:
        rows = ray.get(ref)
        x, y = select(rows, thr, "train")
        xs.append(x)
        ys.append(y)
    x = torch.from_numpy(np.concatenate(xs) if xs else np.zeros((0, config["d_in"]), np.float32))
    y = torch.from_numpy(np.concatenate(ys) if ys else np.zeros((0, config["d_out"]), np.float32))
    # B starts at the least-squares map (W2 = 0); the published older B's are frozen buffers
    model = BackwardAligner(config["d_in"], config["d_out"], kind="residual_mlp", hidden=config["hidden"], init=config["start"], seed=config["seed"])
    chain = [BackwardAligner.from_transform(t, trainable=False) for t in config["chain"]]
    optim = torch.optim.Adam(model.parameters(), lr=config["lr"])
    first = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            current, _, osd, meta = load_checkpoint(d)
        model.load_state_dict(current)
        optim.load_state_dict(osd)
        first = int(meta["epoch"]) + 1
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    n, bs = len(x), int(config["batch_size"])
    for epoch in range(first, int(config["epochs"])):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config["seed"] * 1000 + epoch + rank))
        total, steps = 0.0, 0
        for i in range(0, max(n, 1), bs):
            idx = perm[i : i + bs]
            if not len(idx):
                break
            loss = multi_step_loss(model, x[idx], y[idx], chain)
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += float(loss.detach())
            steps += 1
        metrics = {"epoch": epoch, "loss": total / max(steps, 1)}
        checkpoint = None
        if rank == 0:
            d = tempfile.mkdtemp(prefix="raybc-aligner-ckpt-")
            inner = model.module if hasattr(model, "module") else model
            save_checkpoint(d, joint=inner, best=None, optim=optim, meta=metrics)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_residual(
    scans: Sequence[EntityScan], options: AlignerFitOptions, *, start: Affine, registry: Any, version: int, train_pairs: int
) -> tuple[ResidualMLP, dict[str, Any]]:
    """residual_mlp with a TorchTrainer; a rerun of the same fit (same pairs and options) resumes."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raybc.train.loop import load_checkpoint

    chain = [registry.aligner(v) for v in range(version - 1, 0, -1)]
    pairs = [(ref, s.threshold) for s in scans for ref in s.pairs]
    d_out, d_in = start.weight.shape
    fingerprint = hashlib.sha256(
        json.dumps({"options": options.model_dump(), "start": hashlib.sha256(start.weight.tobytes()).hexdigest(),
                    "pairs": [[s.entity, s.rows, s.shared, s.threshold] for s in scans]}, sort_keys=True).encode()  # fmt: skip
    ).hexdigest()[:12]
    config = {
        "pairs": pairs, "d_in": d_in, "d_out": d_out, "hidden": options.hidden, "start": start.weight, "chain": chain,
        "lr": options.lr, "epochs": options.epochs_for(train_pairs),
        "batch_size": options.batch_size, "seed": options.seed,
    }  # fmt: skip
    root = registry.root
    run = ray.train.RunConfig(
        name=f"aligner-v{version}-{fingerprint}", storage_path=root.path("train-runs"), storage_filesystem=root.arrow_filesystem(),
        failure_config=ray.train.FailureConfig(max_failures=2),
    )  # fmt: skip
    scaling = ray.train.ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu)
    result = TorchTrainer(residual_loop, train_loop_config=config, scaling_config=scaling, run_config=run).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"aligner training run {run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        current, _, _, meta = load_checkpoint(d)
    if options.num_workers == 0 and os.path.basename(result.checkpoint.path).startswith("raybc-aligner-ckpt-"):
        import shutil

        shutil.rmtree(result.checkpoint.path, ignore_errors=True)  # local mode keeps the worker's temp dir
    t = ResidualMLP(**{k: current[k].numpy() for k in ("proj", "w1", "b1", "w2", "b2")})
    steps = (int(meta["epoch"]) + 1) * options.steps_per_epoch(train_pairs)
    return t, {"run": run.name, "epochs": int(meta["epoch"]) + 1, "steps": steps, "hidden": options.hidden, "final_loss": float(meta["loss"])}


__all__ = ["KINDS", "AlignerFitOptions", "AlignerReport", "check_given", "fit_from_scans", "judge", "solve_least_squares", "solve_procrustes"]
