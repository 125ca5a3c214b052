"""The per-worker training loop run by Ray Train's TorchTrainer (and, in-process, by its local mode).

Each worker holds the whole graph (it is small next to the embeddings it produces) and a shard of
the training edges: rank r takes edges r, r+W, r+2W, ... Every step runs the GNN over the full
graph, takes a BPR batch from the shard (plus the alignment loss of the method), and DDP averages
the gradients, so W workers step like one worker with a W-times larger batch split W ways.

Checkpoints are safetensors (tensors) + JSON (epoch, metrics, optimizer hyper-parameters); nothing
is pickled. A restarted worker resumes from the latest checkpoint: same epoch, same best state,
same optimizer moments.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raybc.alignment import BackwardAligner, multi_step_loss, prefix_loss, single_step_loss
from raybc.evaluate import alignment_error, recall_at_k
from raybc.models import BipartiteGraph, build_model
from raybc.train.losses import bpr_loss
from raybc.train.methods import get_method

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
# Recall@K that selects the epoch (DESIGN.md: Recall@50 selects epochs); with selection
# "split-half" it is measured on the selection half of the validation users only.
SELECT_METRIC = "recall@50"
SPLIT_SELECT_METRIC = "select_recall@50"
# Negatives that are known positives are drawn again at most this many rounds (the authors redraw
# until none is left). On MovieLens-100K 6.2-6.5% of user-uniform draws hit a known positive
# (measured at v0 and v3), so each round leaves ~6% of the last: 50 rounds leave none in practice.
NEGATIVE_REDRAWS = 50


class Joint(nn.Module):
    """M_k and (when learned jointly) B_k in one module, so DDP syncs both."""

    def __init__(self, model: nn.Module, aligner: nn.Module | None):
        super().__init__()
        self.model = model
        self.aligner = aligner

    def forward(self, g: BipartiteGraph) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(g)


def build_graph(payload: dict[str, Any]) -> BipartiteGraph:
    """The version's graph: every node of the data set, or (``graph_nodes: seen``, the authors')
    only the users and items seen up to the end of the version's validation window."""
    g = payload["graph"]
    seen = g.get("nodes", "all") == "seen"
    return BipartiteGraph.build(
        n_users=g["n_users"], n_items=g["n_items"], edge_user=g["train_user"], edge_item=g["train_item"],
        item_attr_indptr=g["item_attr_indptr"], item_attr_indices=g["item_attr_indices"],
        users=payload["graph_users"] if seen else None, items=payload["candidate_items"] if seen else None,
    )  # fmt: skip


def positive_weights(train_user: np.ndarray) -> np.ndarray:
    """Sampling weight of each training edge under user-uniform sampling: 1 / the user's degree
    (the authors' ``RecDatasetNegsamling``: every user is drawn about equally often)."""
    _, inverse, counts = np.unique(train_user, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def sample_positives(rng: np.random.Generator, shard: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """One epoch of training-edge positions from ``shard``: a permutation (edge-uniform, ``weights``
    None) or len(shard) draws with replacement, edge e with probability weights[e] (user-uniform)."""
    if weights is None:
        return rng.permutation(shard)
    w = weights[shard]
    return rng.choice(shard, size=len(shard), replace=True, p=w / w.sum())


def sample_negatives(rng: np.random.Generator, users: np.ndarray, items: np.ndarray, known: np.ndarray | None, n_items: int) -> np.ndarray:
    """A random candidate item per user; with ``known`` (sorted keys user * n_items + item of the
    training edges), draws that are a known positive of their user are drawn again."""
    neg = items[rng.integers(0, len(items), len(users))]
    if known is None or len(known) == 0:
        return neg
    for _ in range(NEGATIVE_REDRAWS):
        key = users * n_items + neg
        pos = np.minimum(np.searchsorted(known, key), len(known) - 1)
        hit = np.flatnonzero(known[pos] == key)
        if hit.size == 0:
            break
        neg[hit] = items[rng.integers(0, len(items), hit.size)]
    return neg


def alignment_weight_at(epoch: int, *, weight: float, ramp_epochs: int) -> float:
    """lambda at ``epoch`` (0-based): ``weight``, or a linear ramp from weight/ramp to weight over
    the first ``ramp_epochs`` epochs."""
    if ramp_epochs <= 0:
        return weight
    return weight * min(1.0, (epoch + 1) / ramp_epochs)


def embed(model: nn.Module, graph: BipartiteGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode embeddings of every node (BatchNorm uses its running statistics)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        u, i = model(graph)
    model.train(was)
    return u, i


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def _state_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def save_checkpoint(path: str, *, joint: Joint, best: dict[str, torch.Tensor] | None, optim: torch.optim.Optimizer, meta: dict) -> None:
    """Tensors to safetensors, everything else to JSON."""
    tensors = _state_tensors("current", joint)
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best.items()})
    osd = optim.state_dict()
    for idx, st in osd["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous().clone()
    save_file(tensors, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump({**meta, "param_groups": osd["param_groups"]}, f)


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict, dict]:
    """(current state, best state or None, optimizer state dict, meta)."""
    tensors = load_file(os.path.join(path, STATE_FILE))
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    best = _strip("best", tensors) or None
    return _strip("current", tensors), best, {"state": state, "param_groups": meta["param_groups"]}, meta


def evaluate_state(joint: nn.Module, graph: BipartiteGraph, payload: dict[str, Any], z_prev: tuple | None, frozen: list) -> dict[str, float]:
    """Validation Recall@K and, when there is a previous version, the alignment error to it.

    With a selection split (``payload["val"]["select_users"]``), ``recall@K`` is measured on the
    report half of the validation users, ``select_recall@K`` on the selection half (what picks the
    epoch) and ``all_recall@K`` on all of them; without one, ``recall@K`` is on all of them.
    """
    u, i = embed(joint, graph)
    g, v = payload["graph"], payload["val"]

    def recall(mask: np.ndarray | None) -> dict[str, float]:
        vu, vi = (v["val_user"], v["val_item"]) if mask is None else (v["val_user"][mask], v["val_item"][mask])
        return recall_at_k(
            u, i, val_user=vu, val_item=vi, known_user=g["train_user"], known_item=g["train_item"], candidate_items=payload["candidate_items"]
        )

    select_users = v.get("select_users")
    if select_users is None:
        metrics = recall(None)
    else:
        chosen = np.isin(v["val_user"], select_users)
        metrics = recall(~chosen)
        metrics.update({f"select_{k}": x for k, x in recall(chosen).items()})
        metrics.update({f"all_{k}": x for k, x in recall(None).items()})
    if z_prev is not None:
        method = get_method(payload["method"])
        nodes_u, nodes_i = payload["graph_users"], payload["candidate_items"]
        zk = torch.cat([u[nodes_u], i[nodes_i]])
        zp = torch.cat([z_prev[0][nodes_u], z_prev[1][nodes_i]])
        aligner = _unwrap(joint).aligner
        mapped = None
        if aligner is not None:
            with torch.no_grad():
                mapped = aligner(zk)
        elif method.backward == "truncate":
            mapped = zk[:, : zp.shape[1]]
        elif method.backward == "identity":
            mapped = zk
        if mapped is not None:  # post-hoc methods have no B_k until M_k is fitted
            metrics["align_err_prev"] = alignment_error(mapped, zp)
    return metrics


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker; in-process when num_workers=0)."""
    import ray.train
    import ray.train.torch

    from raybc.runtime import tame_ray_logs

    tame_ray_logs()  # no "Reported metrics" line per epoch
    payload, opts = config["payload"], config["options"]
    if not isinstance(payload, dict):  # an ObjectRef from the driver
        import ray

        payload = ray.get(payload)
    torch.set_num_threads(max(1, int(opts["threads_per_worker"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if opts.get("use_gpu") else torch.device("cpu")
    seed = int(opts["seed"])
    torch.manual_seed(seed)
    method = get_method(payload["method"])

    graph = build_graph(payload).to(device)
    model = build_model(payload["model_spec"])
    if payload.get("init_weights") is not None:  # finetune-m0 starts from M_{k-1}, bc-aligner-warm from it widened
        model.load_state_dict({k: torch.as_tensor(v) for k, v in payload["init_weights"].items()})
    aligner = None
    if method.trains_aligner_jointly and payload.get("prev") is not None:
        prev_dim = payload["prev"]["dim"]
        # linear, no bias; nn.Linear's init, or [I 0] (z_k's first d_{k-1} dims: a widened M_{k-1}'s exact map back)
        init = np.eye(prev_dim, model.dim, dtype=np.float32) if method.aligner_init == "truncation" else None
        aligner = BackwardAligner(model.dim, prev_dim, init=init)
    joint = Joint(model, aligner).to(device)

    # The alignment target: M_{k-1} run on the current graph, detached (computed once: it is frozen).
    z_prev = None
    if payload.get("prev") is not None:
        prev_model = build_model(payload["prev"]["spec"])
        prev_model.load_state_dict({k: torch.as_tensor(v) for k, v in payload["prev"]["weights"].items()})
        z_prev = tuple(t.to(device) for t in embed(prev_model.to(device), graph))
    frozen = [torch.as_tensor(w, device=device) for w in payload.get("frozen_aligners", [])]

    optim = torch.optim.Adam(joint.parameters(), lr=float(opts["lr"]))
    start_epoch, best, meta = 0, None, {"history": [], "best_epoch": -1, "best_value": -1.0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            current, best, osd, meta = load_checkpoint(d)
        joint.load_state_dict(current)
        optim.load_state_dict(osd)
        start_epoch = int(meta["epoch"]) + 1
        meta.pop("param_groups", None)

    joint = ray.train.torch.prepare_model(joint, move_to_device=False) if world > 1 else joint
    g = payload["graph"]
    shard = np.arange(rank, len(g["train_user"]), world)
    n_total = len(g["train_user"])
    steps = max(1, n_total // int(opts["batch_size"]))  # the same on every rank: DDP needs equal steps
    items = np.asarray(payload["candidate_items"], dtype=np.int64)
    epochs, eval_every = int(opts["epochs"]), int(opts["eval_every"])
    # joint methods trade recall against alignment while it converges: select only after the warm-up
    aligning = z_prev is not None and method.aligns_jointly
    select_from = int(opts["selection_start"]) if aligning else 0
    select_metric = SPLIT_SELECT_METRIC if payload["val"].get("select_users") is not None else SELECT_METRIC
    ckpt_every = int(opts["checkpoint_every"])
    pos_weights = positive_weights(g["train_user"]) if opts.get("positive_sampling", "edge-uniform") == "user-uniform" else None
    known = None
    n_item_keys = int(g["n_items"])
    if opts.get("negative_sampling", "uniform") == "exclude-known":
        known = np.unique(np.asarray(g["train_user"], np.int64) * n_item_keys + np.asarray(g["train_item"], np.int64))

    t_start, shown = time.perf_counter(), start_epoch * 10 // epochs
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed * 100_003 + epoch * 101 + rank)
        perm = sample_positives(rng, shard, pos_weights)
        alignment_weight = alignment_weight_at(epoch, weight=float(opts["alignment_weight"]), ramp_epochs=int(opts.get("alignment_ramp_epochs", 0)))
        joint.train()
        total = 0.0
        for batch in np.array_split(perm, steps):
            users_b = np.asarray(g["train_user"][batch], np.int64)
            bu = torch.as_tensor(users_b, device=device)
            bi = torch.as_tensor(g["train_item"][batch], device=device)
            bn = torch.as_tensor(sample_negatives(rng, users_b, items, known, n_item_keys), device=device)
            u, i = joint(graph)
            loss = bpr_loss(u[bu], i[bi], i[bn], weight_decay=float(opts["weight_decay"]))
            if z_prev is not None and method.aligns_jointly:
                zk = (u[bu], i[bi], i[bn])
                zp = (z_prev[0][bu], z_prev[1][bi], z_prev[1][bn])
                inner = _unwrap(joint)
                if method.alignment == "prefix":
                    align = prefix_loss(zk, zp)
                elif method.alignment == "single":
                    align = single_step_loss(inner.aligner, zk, zp)
                else:
                    align = multi_step_loss(inner.aligner, zk, zp, frozen)
                loss = loss + alignment_weight * align
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += float(loss.detach())
        # world_size: recorded so a fit's history shows how many workers really trained it
        metrics: dict[str, Any] = {"epoch": epoch, "loss": total / steps, "epoch_s": time.perf_counter() - t0, "world_size": world}
        last = epoch == epochs - 1
        if (epoch + 1) % eval_every == 0 or last:
            metrics.update(evaluate_state(joint, graph, payload, z_prev, frozen))
            meta["history"].append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            value = metrics[select_metric]
            if epoch >= select_from and value > meta["best_value"]:
                meta["best_value"], meta["best_epoch"] = float(value), epoch
                best = _state_tensors("m", _unwrap(joint))
                best = {k[2:]: v for k, v in best.items()}
            if rank == 0 and opts.get("progress", True) and ((epoch + 1) * 10 // epochs > shown or last):
                shown = (epoch + 1) * 10 // epochs
                spent = time.perf_counter() - t_start
                left = spent / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
                best_s = f"best {meta['best_value']:.4f} at epoch {meta['best_epoch'] + 1}" if meta["best_epoch"] >= 0 else "selection not started"
                print(f"[raybc] epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f}, {select_metric} {value:.4f} ({best_s}), "
                      f"{spent:.0f} s, about {left:.0f} s left", flush=True)  # fmt: skip
        meta["epoch"] = epoch
        checkpoint = None
        if rank == 0 and ((epoch + 1) % ckpt_every == 0 or last):
            d = tempfile.mkdtemp(prefix="raybc-ckpt-")
            save_checkpoint(d, joint=_unwrap(joint), best=best, optim=optim, meta=meta)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)  # every rank reports: it is a barrier
        if opts.get("fail_at_epoch") is not None and epoch == int(opts["fail_at_epoch"]) and rank == world - 1:
            marker = opts.get("fail_marker")
            if marker and not os.path.exists(marker):  # fault injection for tests: die once
                open(marker, "w").close()
                os._exit(1)
