"""The extra numbers of docs/results.md that the experiment report does not print, derived from a
finished run's registries and evaluation records (nothing is trained; read-only).

    python docs/results/analysis.py optimism   runs/ml100k-seeds   # §2: selection half vs report half
    python docs/results/analysis.py checks     runs/ml100k-seeds   # §3: Recall@50 averaged over every check from epoch 50
    python docs/results/analysis.py noise      runs/ml100k-seeds   # §2: check-to-check sd of the selection half's Recall@50
    python docs/results/analysis.py refit      runs/ml100k-seeds   # §5: alignment error to v0 with least-squares B's
    python docs/results/analysis.py single-step runs/ml100k-seeds  # §5: learned B_k against least squares, one step
    python docs/results/analysis.py posthoc    runs/ml100k-seeds   # §1: post-hoc B's error against the least-squares optimum
    python docs/results/analysis.py fit-times  runs/ml100k-seeds   # §6: fit seconds per method and version

A documentation script, not part of raybc: it reads ``<run>/seed<s>/<method>/`` as the
experiment writes them (versions 1-3, the selection split of ``TrainOptions.selection``).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch

from raybc.data import load_dataset
from raybc.data.slicing import temporal_versions
from raybc.evaluate import alignment_error
from raybc.models import build_model
from raybc.registry import Registry
from raybc.train.fit import least_squares_aligner
from raybc.train.loop import build_graph, embed

VERSIONS = (1, 2, 3)
# Checks from this epoch on count in "checks" and "noise": the joint methods' selection start.
FROM_EPOCH = 50


def records(run: str) -> dict[str, list[tuple[int, dict]]]:
    out: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for f in sorted(glob.glob(f"{run}/seed*/*/eval/v*.json")):
        seed, method = int(f.split("/")[-4][4:]), f.split("/")[-3]
        out[method].append((seed, json.load(open(f))))
    return out


def seeds_and_methods(run: str) -> tuple[list[int], list[str]]:
    seeds = sorted(int(d.rsplit("seed", 1)[1]) for d in glob.glob(f"{run}/seed*"))
    methods = sorted({os.path.basename(d) for s in seeds for d in glob.glob(f"{run}/seed{s}/*") if os.path.isdir(f"{d}/registry")})
    return seeds, methods


def optimism(run: str) -> None:
    print("Selection half's Recall@50 over the report half's, at the selected epoch (%, versions 1-3, every seed):")
    for m, recs in sorted(records(run).items()):
        d = [100 * (r["intended"]["select_recall@50"] / r["intended"]["recall@50"] - 1) for _, r in recs if r["version"] in VERSIONS]
        print(f"  {m:26} {np.mean(d):+6.1f}  (n={len(d)})")


def history(run: str, seed: int, method: str, k: int) -> list[dict]:
    """The validation checks of v<k> from FROM_EPOCH on; LookupError when it was not trained (fix-m0)."""
    h = [h for h in Registry(f"{run}/seed{seed}/{method}").get(k).hyperparameters["history"] if h["epoch"] >= FROM_EPOCH and "recall@50" in h]
    if not h:
        raise LookupError(f"{method} v{k} at seed {seed} has no checks from epoch {FROM_EPOCH}")
    return h


def checks(run: str) -> None:
    print(f"Report-half Recall@50 averaged over every check from epoch {FROM_EPOCH} (no selection), vs no-bc's same average (%):")
    seeds, methods = seeds_and_methods(run)
    for m in methods:
        per = []
        for s in seeds:
            try:
                ratios = [np.mean([h["recall@50"] for h in history(run, s, m, k)]) / np.mean([h["recall@50"] for h in history(run, s, "no-bc", k)]) for k in VERSIONS]
            except Exception:  # noqa: BLE001 -- a method not run at this seed, or not trained (fix-m0)
                continue
            per.append(float(np.mean([100 * (x - 1) for x in ratios])))  # mean over versions of the per-version ratio (ours)
        if per:
            sd = np.std(per, ddof=1) if len(per) > 1 else float("nan")
            print(f"  {m:26} {np.mean(per):+6.2f} ± {sd:.2f}  (seeds {len(per)})")


def noise(run: str) -> None:
    print(f"Check-to-check sd of the selection half's Recall@50 from epoch {FROM_EPOCH} (sd of differences / sqrt 2), versions 1-3:")
    seeds, methods = seeds_and_methods(run)
    for m in methods:
        sds, lvl = [], []
        for s in seeds:
            for k in VERSIONS:
                try:
                    r = np.array([h["select_recall@50"] for h in history(run, s, m, k)])
                except Exception:  # noqa: BLE001
                    continue
                if len(r) > 2:
                    sds.append(np.std(np.diff(r)) / np.sqrt(2))
                    lvl.append(r.mean())
        if sds:
            print(f"  {m:26} sd {np.mean(sds):.4f} at a level of {np.mean(lvl):.3f}")


def _model(reg: Registry, k: int) -> torch.nn.Module:
    m = build_model(reg.model(k).spec)
    m.load_state_dict({a: torch.as_tensor(b) for a, b in reg.model(k).tensors.items()})
    return m


def _embeddings(reg: Registry, k: int, data, sl) -> list[torch.Tensor]:
    """z_0 .. z_k of the root's models, all on version k's graph (users and items of the graph)."""
    g = build_graph({
        "graph": {"n_users": data.n_users, "n_items": data.n_items, "train_user": sl.train_user, "train_item": sl.train_item,
                  "item_attr_indptr": data.item_attr_indptr, "item_attr_indices": data.item_attr_indices, "nodes": "seen"},
        "graph_users": sl.users, "candidate_items": sl.items,
    })  # fmt: skip
    return [torch.cat([t[idx] for t, idx in zip(embed(_model(reg, j), g), (sl.users, sl.items))]) for j in range(k + 1)]


def refit(run: str) -> None:
    print("Alignment error to v0 of the published chain B_1..B_k and of least-squares B's refitted step by step on version k's graph:")
    data = load_dataset("movielens-100k")
    slices = temporal_versions(data)
    seeds, methods = seeds_and_methods(run)
    for s in seeds:
        for m in [x for x in methods if "." not in x and x not in ("fix-m0",)]:
            reg = Registry(f"{run}/seed{s}/{m}")
            cells = []
            for k in VERSIONS:
                z = _embeddings(reg, k, data, slices[k])
                pub = ls = z[k].double().numpy()
                for j in range(k, 0, -1):
                    pub = pub @ np.asarray(reg.aligner(j).weight, np.float64).T
                    ls = ls @ least_squares_aligner(torch.from_numpy(ls).float(), z[j - 1]).astype(np.float64).T
                cells.append(f"v{k} {alignment_error(torch.from_numpy(pub), z[0]):.4f} / {alignment_error(torch.from_numpy(ls), z[0]):.4f}")
            print(f"  seed {s} {m:22} published / least squares: " + " | ".join(cells))


def _step_error(zk: torch.Tensor, zp: torch.Tensor, b: np.ndarray) -> float:
    """Relative squared error of z_{k-1} ~ B z_k."""
    return alignment_error(torch.from_numpy(zk.numpy() @ np.asarray(b, np.float32).T), zp)


def single_step(run: str) -> None:
    print("Single-step error to v<k-1> on version k's graph: the jointly learned B_k / least squares on the same M_k, M_{k-1}:")
    data = load_dataset("movielens-100k")
    slices = temporal_versions(data)
    seeds, _ = seeds_and_methods(run)
    for m in ("bc-aligner", "bc-aligner-warm"):
        for s in seeds:
            reg = Registry(f"{run}/seed{s}/{m}")
            cells = []
            for k in VERSIONS:
                z = _embeddings(reg, k, data, slices[k])
                e_ls = _step_error(z[k], z[k - 1], least_squares_aligner(z[k], z[k - 1]))
                learned = reg.get(k).metrics.get("joint_aligner_err_prev")  # bc-aligner-warm publishes the refit, records the learned one
                if learned is None:
                    learned = _step_error(z[k], z[k - 1], reg.aligner(k).weight)
                cells.append(f"v{k} {learned:.4f} / {e_ls:.4f}")
            print(f"  {m:16} seed {s}: " + " | ".join(cells))


def posthoc(run: str) -> None:
    print("Post-hoc B_k (500 Adam steps) against the least-squares B_k: single-step error to v<k-1> on version k's graph:")
    data = load_dataset("movielens-100k")
    slices = temporal_versions(data)
    seeds, _ = seeds_and_methods(run)
    for s in seeds:
        nobc, post = Registry(f"{run}/seed{s}/no-bc"), Registry(f"{run}/seed{s}/posthoc-lin-sloss")
        cells = []
        for k in VERSIONS:
            z = _embeddings(nobc, k, data, slices[k])
            e_ls = _step_error(z[k], z[k - 1], least_squares_aligner(z[k], z[k - 1]))
            e_adam = _step_error(z[k], z[k - 1], post.aligner(k).weight)
            cells.append(f"v{k} {e_adam:.4f} / {e_ls:.4f}")
        print(f"  seed {s} adam / least squares: " + " | ".join(cells))


def fit_times(run: str) -> None:
    print("Fit seconds per version (the manifests' fit_seconds; mean over seeds, min-max); a shared model costs ~0:")
    t: dict[tuple[str, int], list[float]] = defaultdict(list)
    for m, recs in records(run).items():
        for _, r in recs:
            if r.get("fit_seconds") is not None:
                t[(m, r["version"])].append(r["fit_seconds"])
    for m in sorted({m for m, _ in t}):
        print(f"  {m:26} " + " | ".join(f"v{k}: {np.mean(t[(m, k)]):.0f} ({min(t[(m, k)]):.0f}-{max(t[(m, k)]):.0f})" for k in range(4) if t[(m, k)]))


if __name__ == "__main__":
    commands = {"optimism": optimism, "checks": checks, "noise": noise, "refit": refit, "single-step": single_step, "posthoc": posthoc, "fit-times": fit_times}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit(f"usage: python docs/results/analysis.py {{{'|'.join(commands)}}} RUN_FOLDER")
    commands[sys.argv[1]](sys.argv[2])
