"""Bring your own model: a two-tower recommender raybc does not ship, trained in its OWN Ray Train
loop, made backward compatible with raybc's BC loss, registered, backfilled and read as v0.

    python docs/examples/byo_two_tower.py --root /tmp/byo-root            # MovieLens-100K, v0 and v1
    python docs/examples/byo_two_tower.py --root /tmp/byo-root --versions 3 --num-workers 2

The model: a user tower (id embedding -> MLP) and an item tower (id embedding + mean of its
attribute embeddings (genres, decade) -> MLP), scored by dot product and trained with BPR. Version
0 has dimension 32, version 1 dimension 48 (``--dims``). Each later version adds raybc's BC loss
to the user's own loss, in the user's own loop -- the lines marked ``# raybc`` are all it takes:

    bc = BCLoss.for_version(registry, k, new_dim)                  # B_k, frozen B_{k-1..1}
    loss = bpr + lam * bc(z_new, z_old)                            # z_old: M_{k-1}, same ids
    publish_version(registry, k, embeddings=..., aligner=bc)       # z_k + B_k, checked, gated

Then raybc backfills every older version from the newest, and the example compares the as-v0
snapshot with the stored z_0, next to the trivial answers (truncating z_k to d_0, an untrained B).
This file is a leaf: nothing in raybc imports it (the tests load it by path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from raybc.alignment import DEFAULT_ALIGNMENT_WEIGHT, BackwardAligner, BCLoss, publish_version
from raybc.data.interactions import InteractionData
from raybc.data.slicing import VersionSlice, temporal_versions
from raybc.evaluate import alignment_error, recall_at_k
from raybc.registry import Registry

STATE_FILE = "two_tower.safetensors"
META_FILE = "meta.json"


# --------------------------------------------------------------------------- the user's own model


class TwoTower(nn.Module):
    """users: id -> MLP; items: id + mean(attribute embeddings) -> MLP; score = <u, i>."""

    def __init__(self, *, n_users: int, n_items: int, n_attributes: int, dim: int, hidden: int = 64):
        super().__init__()
        self.dim = dim
        self.user_id = nn.Embedding(n_users, hidden)
        self.item_id = nn.Embedding(n_items, hidden)
        self.item_attr = nn.EmbeddingBag(max(1, n_attributes), hidden, mode="mean")
        self.user_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.item_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        for e in (self.user_id, self.item_id, self.item_attr):
            nn.init.normal_(e.weight, std=0.1)

    def users(self, u: torch.Tensor) -> torch.Tensor:
        return self.user_mlp(self.user_id(u))

    def items(self, i: torch.Tensor, attr_indices: torch.Tensor, attr_indptr: torch.Tensor) -> torch.Tensor:
        bags = self.item_attr(attr_indices, attr_indptr[:-1])  # every item's attribute bag: (n_items, hidden), cheap
        return self.item_mlp(torch.cat([self.item_id(i), bags[i]], dim=1))


def _spec(data: InteractionData, dim: int) -> dict[str, int]:
    return {"n_users": data.n_users, "n_items": data.n_items, "n_attributes": data.n_attributes, "dim": dim}


def embed_all(model: TwoTower, payload: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user's and item's embedding (eval mode, no gradient)."""
    model.eval()
    with torch.no_grad():
        u = model.users(torch.arange(payload["n_users"]))
        i = model.items(torch.arange(payload["n_items"]), payload["attr_indices"], payload["attr_indptr"])
    return u, i


# --------------------------------------------------------------------------- the user's own Ray Train loop


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (in-process with num_workers=0): BPR, plus the BC loss for k > 0."""
    import ray.train

    p, o = config["payload"], config["options"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1 if world > 1 else max(1, int(o["threads"])))
    torch.manual_seed(o["seed"])
    model = TwoTower(**p["spec"])
    bc = None
    z_old = None
    if p.get("prev") is not None:  # raybc: B_k and the frozen chain; z_old = M_{k-1} on the same nodes
        bc = BCLoss(p["spec"]["dim"], p["prev"]["spec"]["dim"], frozen=p["frozen"], loss=o["loss"], seed=o["seed"])
        prev = TwoTower(**p["prev"]["spec"])
        prev.load_state_dict(p["prev"]["state"])
        z_old = embed_all(prev, p)
    joint = nn.ModuleDict({"model": model, **({"bc": bc} if bc is not None else {})})
    optim = torch.optim.Adam(joint.parameters(), lr=o["lr"])  # the same seed on every rank: the same start
    users, items = torch.as_tensor(p["train_user"]), torch.as_tensor(p["train_item"])
    candidates = torch.as_tensor(p["candidate_items"])
    shard = torch.arange(rank, len(users), world)
    steps = max(1, len(users) // o["batch_size"])
    g = torch.Generator().manual_seed(o["seed"] * 1009 + rank)
    for epoch in range(o["epochs"]):
        model.train()
        total, total_bc = 0.0, 0.0
        for batch in torch.tensor_split(shard[torch.randperm(len(shard), generator=g)], steps):
            bu, bi = users[batch], items[batch]
            bn = candidates[torch.randint(len(candidates), (len(batch),), generator=g)]
            zu = model.users(bu)
            zi = model.items(torch.cat([bi, bn]), p["attr_indices"], p["attr_indptr"])
            zp, zn = zi[: len(bi)], zi[len(bi) :]
            loss = F.softplus((zu * zn).sum(-1) - (zu * zp).sum(-1)).mean()
            loss = loss + o["weight_decay"] * (zu.pow(2).sum(-1) + zp.pow(2).sum(-1) + zn.pow(2).sum(-1)).mean() / 2
            if bc is not None:  # raybc: one line in the loss
                align = bc((zu, zp, zn), (z_old[0][bu], z_old[1][bi], z_old[1][bn]))
                loss = loss + o["alignment_weight"] * align
                total_bc += float(align.detach())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # two towers called separately (no single forward for DDP): average gradients by hand
                import torch.distributed as dist

                for prm in joint.parameters():
                    if prm.grad is not None:
                        dist.all_reduce(prm.grad)
                        prm.grad /= world
            optim.step()
            total += float(loss.detach())
        metrics = {"epoch": epoch, "loss": total / steps, "bc_loss": total_bc / steps}
        checkpoint = None
        if rank == 0 and epoch == o["epochs"] - 1:
            d = tempfile.mkdtemp(prefix="byo-two-tower-")
            save_file({k: v.detach().contiguous() for k, v in joint.state_dict().items()}, os.path.join(d, STATE_FILE))
            with open(os.path.join(d, META_FILE), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def fit(payload: dict[str, Any], options: dict[str, Any], *, num_workers: int, storage: str, name: str) -> tuple[TwoTower, BCLoss | None, dict]:
    """TorchTrainer.fit of ``train_loop``; returns the trained towers, the BCLoss (B_k) and the last metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop, train_loop_config={"payload": payload, "options": options},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=False),
        run_config=ray.train.RunConfig(name=name, storage_path=storage),
    )  # fmt: skip
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = load_file(os.path.join(d, STATE_FILE))
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
    model = TwoTower(**payload["spec"])
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    bc = None
    if payload.get("prev") is not None:
        bc = BCLoss(payload["spec"]["dim"], payload["prev"]["spec"]["dim"], frozen=payload["frozen"], loss=options["loss"])
        bc.load_state_dict({k[len("bc.") :]: v for k, v in state.items() if k.startswith("bc.")})
    return model, bc, meta


# --------------------------------------------------------------------------- versions, published with raybc


def make_payload(data: InteractionData, sl: VersionSlice, dim: int) -> dict[str, Any]:
    return {
        "spec": _spec(data, dim), "n_users": data.n_users, "n_items": data.n_items,
        "attr_indices": torch.as_tensor(data.item_attr_indices, dtype=torch.long),
        "attr_indptr": torch.as_tensor(data.item_attr_indptr, dtype=torch.long),
        "train_user": np.asarray(sl.train_user), "train_item": np.asarray(sl.train_item), "candidate_items": np.asarray(sl.items),
    }  # fmt: skip


def recall50(model: TwoTower, payload: dict[str, Any], sl: VersionSlice, mapped: Any = None) -> float:
    u, i = embed_all(model, payload) if mapped is None else mapped
    r = recall_at_k(u, i, val_user=sl.val_user, val_item=sl.val_item, known_user=sl.train_user, known_item=sl.train_item, candidate_items=sl.items, ks=(50,))
    return r["recall@50"]


def run(
    root: str, *, data: InteractionData, dims: list[int], versions: int = 2, epochs: int = 40, lr: float = 3e-3,
    batch_size: int = 2048, weight_decay: float = 1e-4, alignment_weight: float = DEFAULT_ALIGNMENT_WEIGHT,
    loss: str = "multi", num_workers: int = 0, seed: int = 0, threads: int = 1, no_bc_baseline: bool = False, echo=print,
) -> dict[str, Any]:
    """Train, publish and backfill ``versions`` versions; returns the measured numbers."""
    from raybc.backfill import backfill
    from raybc.embeddings import read_matrix
    from raybc.runtime import ensure_ray
    from raybc.snapshots import read_snapshot

    ensure_ray(None, num_cpus=4)  # RAY_NOTES: 4 logical CPUs so Train workers and Data tasks never starve
    if len(dims) < versions:
        raise SystemExit(f"--dims gives {len(dims)} dimensions for {versions} versions; give one per version")
    registry = Registry(root)
    slices = temporal_versions(data)
    options = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "alignment_weight": alignment_weight,
               "loss": loss, "seed": seed, "threads": threads}  # fmt: skip
    storage = os.path.join(os.path.abspath(root) if "://" not in root else tempfile.mkdtemp(), "byo-train-runs")
    out: dict[str, Any] = {"dims": dims[:versions], "epochs": epochs, "versions": {}}
    models: list[TwoTower] = []
    for k in range(versions):
        t0 = time.perf_counter()
        sl = slices[k]
        payload = make_payload(data, sl, dims[k])
        if k > 0:  # raybc: the frozen chain, read (checksum-verified) from the registry
            prev_spec = _spec(data, dims[k - 1])
            bc_probe = BCLoss.for_version(registry, k, dims[k], loss=loss)
            payload["prev"] = {"spec": prev_spec, "state": models[-1].state_dict()}
            payload["frozen"] = list(bc_probe.frozen)
        model, bc, meta = fit(payload, options, num_workers=num_workers, storage=storage, name=f"byo-v{k}-{seed}")
        models.append(model)
        u, i = embed_all(model, payload)
        rec = {"dim": dims[k], "recall@50": recall50(model, payload, sl), "train_s": time.perf_counter() - t0, **meta}
        embeddings = {"users": (data.user_ids.take(sl.users), u[sl.users]), "items": (data.item_ids.take(sl.items), i[sl.items])}
        v = publish_version(registry, k, embeddings=embeddings, aligner=bc, method=f"byo-two-tower-{loss}" if k else "byo-two-tower",
                            hyperparameters={**options, "dim": dims[k]})  # fmt: skip
        if k > 0:
            check = v.manifest["aligner_check"]["relative_error"]
            rec["register_check_rel_err"] = {e: errs[f"v{k - 1}"] for e, errs in check.items()}
            # B_k's trivial alternatives, measured on the same nodes against z_{k-1}
            zp_u, zp_i = embed_all(models[-2], payload)
            zk = torch.cat([u[sl.users], i[sl.items]])
            zp = torch.cat([zp_u[sl.users], zp_i[sl.items]])
            torch.manual_seed(seed)
            untrained = BackwardAligner(dims[k], dims[k - 1])
            with torch.no_grad():
                rec["align_err_prev"] = alignment_error(bc.aligner(zk) if bc.aligner is not None else zk[:, : dims[k - 1]], zp)
                rec["untrained_b_err_prev"] = alignment_error(untrained(zk), zp)
            rec["truncation_err_prev"] = alignment_error(zk[:, : dims[k - 1]], zp)
        rec["publish_s"] = time.perf_counter() - t0 - rec["train_s"]
        if k > 0 and no_bc_baseline:  # the same model, seed and data without the BC term: what compatibility costs
            plain, _, _ = fit(payload, {**options, "alignment_weight": 0.0}, num_workers=num_workers, storage=storage, name=f"byo-v{k}-{seed}-nobc")
            rec["recall@50_without_bc"] = recall50(plain, payload, sl)
        out["versions"][k] = rec
        echo(f"[byo] v{k} (dim {dims[k]}): recall@50 {rec['recall@50']:.4f}"
             + (f", |B z_{k} - z_{k - 1}|^2/|z_{k - 1}|^2 {rec['align_err_prev']:.4f} (truncation {rec['truncation_err_prev']:.3f}, "
                f"untrained B {rec['untrained_b_err_prev']:.3f})" if k else "")
             + (f"; without the BC term recall@50 {rec['recall@50_without_bc']:.4f}" if "recall@50_without_bc" in rec else "")
             + f", trained in {rec['train_s']:.1f} s")  # fmt: skip

    # raybc: backfill every older version from the newest, then read the as-v0 snapshot like a consumer
    last = versions - 1
    if last > 0:
        t0 = time.perf_counter()
        backfill(root, echo=lambda _m: None)
        out["backfill_s"] = time.perf_counter() - t0
        sl0 = slices[0]
        z0_u, z0_i = embed_all(models[0], make_payload(data, sl0, dims[0]))
        compat: dict[str, Any] = {}
        snap_full = {}
        for entity, z0, nodes, ids in (("users", z0_u, sl0.users, data.user_ids), ("items", z0_i, sl0.items, data.item_ids)):
            snap_ids, snap = read_matrix(read_snapshot(root, entity, version=0))
            pos = {x: r for r, x in enumerate(snap_ids.tolist())}
            ext = ids.take(nodes).to_pylist()  # v0's ids: every one is still in the newest version
            mapped = torch.from_numpy(np.array(snap[[pos[x] for x in ext]]))
            compat[f"{entity}_rel_err_v0"] = alignment_error(mapped, z0[nodes])
            internal = {x: r for r, x in enumerate(ids.to_pylist())}  # the data set's id -> the model's row
            full = torch.zeros(len(ids), dims[0])
            full[torch.as_tensor([internal[x] for x in snap_ids.tolist()])] = torch.from_numpy(np.array(snap))
            snap_full[entity] = full
        # a v0 consumer keeps its index of stored z_0 users and scores items read from the as-v0 snapshot
        compat["recall@50_v0"] = recall50(models[0], None, sl0, mapped=(z0_u, z0_i))
        compat["recall@50_z0_users_x_snapshot_items"] = recall50(models[0], None, sl0, mapped=(z0_u, snap_full["items"]))
        _, zl_i = embed_all(models[-1], make_payload(data, sl0, dims[last]))
        compat["recall@50_z0_users_x_truncated_items"] = recall50(models[0], None, sl0, mapped=(z0_u, zl_i[:, : dims[0]]))
        out["as_v0"] = compat
        echo(f"[byo] as-v0 snapshot from v{last}: relative error to z_0 users {compat['users_rel_err_v0']:.4f}, items "
             f"{compat['items_rel_err_v0']:.4f}; v0 Recall@50 (stored z_0 users x items) {compat['recall@50_v0']:.4f}: "
             f"x snapshot items {compat['recall@50_z0_users_x_snapshot_items']:.4f}, "
             f"x z_{last} items truncated {compat['recall@50_z0_users_x_truncated_items']:.4f}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    from raybc.data.movielens import load_movielens_100k

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="registry root (a local folder or any fsspec URI); must not hold versions yet")
    ap.add_argument("--versions", type=int, default=2)
    ap.add_argument("--dims", default="32,48,64", help="dimension per version, comma separated")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--loss", choices=["multi", "single", "prefix"], default="multi")
    ap.add_argument("--alignment-weight", type=float, default=DEFAULT_ALIGNMENT_WEIGHT)
    ap.add_argument("--num-workers", type=int, default=0, help="Ray Train workers; 0 runs the loop in-process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bc-baseline", action="store_true", help="also train each later version without the BC term (not published)")
    ap.add_argument("--json", help="write the measured numbers here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = run(a.root, data=load_movielens_100k(), dims=[int(x) for x in a.dims.split(",")], versions=a.versions, epochs=a.epochs,
              loss=a.loss, alignment_weight=a.alignment_weight, num_workers=a.num_workers, seed=a.seed,
              no_bc_baseline=a.no_bc_baseline)  # fmt: skip
    out["total_s"] = time.perf_counter() - t0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
    print(f"[byo] done in {out['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
