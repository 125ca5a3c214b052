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
# Recall@K that selects the epoch (DESIGN.md: Recall@50 selects epochs).
SELECT_METRIC = "recall@50"


class Joint(nn.Module):
    """M_k and (when learned jointly) B_k in one module, so DDP syncs both."""

    def __init__(self, model: nn.Module, aligner: nn.Module | None):
        super().__init__()
        self.model = model
        self.aligner = aligner

    def forward(self, g: BipartiteGraph) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(g)


def build_graph(payload: dict[str, Any]) -> BipartiteGraph:
    g = payload["graph"]
    return BipartiteGraph.build(
        n_users=g["n_users"], n_items=g["n_items"], edge_user=g["train_user"], edge_item=g["train_item"],
        item_attr_indptr=g["item_attr_indptr"], item_attr_indices=g["item_attr_indices"],
    )  # fmt: skip


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
    """Validation Recall@K and, when there is a previous version, the alignment error to it."""
    u, i = embed(joint, graph)
    g, v = payload["graph"], payload["val"]
    metrics = recall_at_k(
        u, i, val_user=v["val_user"], val_item=v["val_item"], known_user=g["train_user"], known_item=g["train_item"],
        candidate_items=payload["candidate_items"],
    )  # fmt: skip
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
    if payload.get("init_weights") is not None:  # finetune-m0 starts from M_{k-1}
        model.load_state_dict({k: torch.as_tensor(v) for k, v in payload["init_weights"].items()})
    aligner = None
    if method.trains_aligner_jointly and payload.get("prev") is not None:
        aligner = BackwardAligner(model.dim, payload["prev"]["dim"])  # linear, no bias; nn.Linear's init
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
    alignment_weight = float(opts["alignment_weight"])
    epochs, eval_every = int(opts["epochs"]), int(opts["eval_every"])
    # joint methods trade recall against alignment while it converges: select only after the warm-up
    aligning = z_prev is not None and method.joint and method.alignment != "none"
    select_from = int(opts["selection_start"]) if aligning else 0
    ckpt_every = int(opts["checkpoint_every"])

    t_start, shown = time.perf_counter(), start_epoch * 10 // epochs
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed * 100_003 + epoch * 101 + rank)
        perm = rng.permutation(shard)
        joint.train()
        total = 0.0
        for batch in np.array_split(perm, steps):
            bu = torch.as_tensor(g["train_user"][batch], device=device)
            bi = torch.as_tensor(g["train_item"][batch], device=device)
            bn = torch.as_tensor(items[rng.integers(0, len(items), len(batch))], device=device)
            u, i = joint(graph)
            loss = bpr_loss(u[bu], i[bi], i[bn], weight_decay=float(opts["weight_decay"]))
            if z_prev is not None and method.joint and method.alignment != "none":
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
            value = metrics[SELECT_METRIC]
            if epoch >= select_from and value > meta["best_value"]:
                meta["best_value"], meta["best_epoch"] = float(value), epoch
                best = _state_tensors("m", _unwrap(joint))
                best = {k[2:]: v for k, v in best.items()}
            if rank == 0 and opts.get("progress", True) and ((epoch + 1) * 10 // epochs > shown or last):
                shown = (epoch + 1) * 10 // epochs
                spent = time.perf_counter() - t_start
                left = spent / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
                best_s = f"best {meta['best_value']:.4f} at epoch {meta['best_epoch'] + 1}" if meta["best_epoch"] >= 0 else "selection not started"
                print(f"[raybc] epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f}, {SELECT_METRIC} {value:.4f} ({best_s}), "
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
