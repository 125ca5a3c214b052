"""Fit one version of one method with Ray Train, then publish it and write z_k.

``fit_version`` is the only training path: ``jobs/train_version.py``, the experiment and the tests
all call it. It runs a TorchTrainer (``num_workers=0`` runs the same loop in-process), selects the
epoch by validation Recall@50, derives B_k as the method says (learned jointly, learned post hoc
with M_k frozen, or the fixed map the method implies), measures the alignment error to every
earlier version on the current graph, writes z_k for users and items under their own ids, and
publishes the version (model weights + spec, B_k, hyper-parameters, metrics) in the registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from raybc.alignment import BackwardAligner, multi_step_loss, single_step_loss
from raybc.data.interactions import InteractionData
from raybc.data.slicing import VersionSlice
from raybc.embeddings import make_table
from raybc.errors import ConfigError, InputDataError, RegistryError
from raybc.evaluate import alignment_error
from raybc.models import build_model
from raybc.options import Options
from raybc.registry import ModelWeights, Registry, Version
from raybc.storage import Storage
from raybc.train.loop import Joint, build_graph, embed, evaluate_state, load_checkpoint, train_loop
from raybc.train.methods import METHODS, Method, get_method
from raybc.transforms import Affine, truncation

if TYPE_CHECKING:
    from raybc.gate import PublishGate

# Rows per embedding file written for a version: keeps files near 64-256 MB at paper dimensions.
_ROWS_PER_FILE = 1_000_000
# The seed of the validation users' selection/report split: fixed (not the model's seed), so every
# method and every seed selects on the same users of a version and is scored on the same others.
SELECTION_SPLIT_SEED = 12_345

# What a manifest written before an option existed was trained with: missing hyper-parameters read
# as these (raybc's earlier behaviour), never as today's defaults, so a run is not reused as if
# trained with options it never saw.
LEGACY_VALUES: dict[str, Any] = {
    "final_norm": False,
    "positive_sampling": "edge-uniform",
    "negative_sampling": "uniform",
    "graph_nodes": "all",
    "selection": "all-users",
    "alignment_ramp_epochs": 0,
}


class TrainOptions(Options):
    """How to fit a version. CPU defaults are scaled down from the paper's 256..512 dimensions."""

    method: str = Field(description="One of: " + ", ".join(METHODS))
    model: Literal["gnn", "mf"] = "gnn"
    dims: list[int] = Field(default=[32, 40, 48, 56, 64], description="Embedding dimension per version (grows).")
    layers: int = Field(default=2, ge=1, le=8)
    epochs: int = Field(default=200, ge=1, le=100_000)
    lr: float = Field(default=1e-3, gt=0, le=1)
    batch_size: int = Field(default=4096, ge=1)
    weight_decay: float = Field(default=1e-2, ge=0, description="On the batch embeddings' L2 (the authors' 1e-2; raybc's first runs 1e-4).")
    alignment_weight: float = Field(default=16.0, ge=0, description="lambda of the paper")
    alignment_ramp_epochs: int = Field(default=0, ge=0, description="Joint methods: lambda grows linearly over these first epochs (0: constant).")
    final_norm: bool = Field(default=True, description="GNN: BatchNorm after the last layer (the authors' pinsage.py); false: none.")
    positive_sampling: Literal["user-uniform", "edge-uniform"] = Field(
        default="user-uniform", description="user-uniform: edges drawn with weight 1/user degree (the authors'); edge-uniform: a permutation."
    )
    negative_sampling: Literal["exclude-known", "uniform"] = Field(
        default="exclude-known", description="exclude-known: negatives that are known positives are drawn again (the authors')."
    )
    graph_nodes: Literal["seen", "all"] = Field(
        default="seen", description="seen: the graph holds only the users/items seen up to the version's window end (the authors'); all: every node."
    )
    selection: Literal["split-half", "all-users"] = Field(
        default="split-half",
        description="split-half: select the epoch on one half of the validation users, report on the other; all-users: both on all.",
    )
    eval_every: int = Field(default=5, ge=1)
    selection_start: int = Field(default=50, ge=0, description="Joint methods select epochs only from here on.")
    seed: int = 0
    num_workers: int = Field(default=0, ge=0, le=1024, description="Ray Train workers; 0 runs in-process.")
    use_gpu: bool = False
    threads_per_worker: int = Field(default=1, ge=1, le=256)
    checkpoint_every: int = Field(default=10, ge=1)
    max_failures: int = Field(default=2, ge=0, le=100, description="Worker failures survived by resuming.")
    posthoc_steps: int = Field(default=500, ge=1)
    posthoc_lr: float = Field(default=0.01, gt=0)
    progress: bool = Field(default=True, description="One line per tenth of the epochs: loss, validation metric, time left.")
    fail_at_epoch: int | None = Field(default=None, description="Tests only: the last worker dies once there.")
    fail_marker: str | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        get_method(v)
        return v

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if not v or any(d <= 0 for d in v):
            raise ValueError("dimensions must be positive, one per version")
        return v

    def fingerprint(self, *, ignore: frozenset[str] = frozenset()) -> str:
        """What the fit depends on, hashed (execution details and ``ignore`` left out)."""
        skip = {"num_workers", "use_gpu", "threads_per_worker", "checkpoint_every", "max_failures", "fail_at_epoch", "fail_marker", "progress", *ignore}
        blob = json.dumps({k: v for k, v in self.model_dump().items() if k not in skip}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# Options that cannot change an M_k trained without a joint alignment loss (any M_0; no-bc's and the
# post-hoc methods' M_k): a donor for ``fit_version(model_from=...)`` may differ in these.
NOT_IN_UNALIGNED_TRAINING = frozenset({"method", "alignment_weight", "alignment_ramp_epochs", "posthoc_steps", "posthoc_lr", "selection_start"})


def version_dim(method: Method, options: TrainOptions, version: int) -> int:
    if method.fixed_dim:
        return options.dims[0]
    if version >= len(options.dims):
        raise ConfigError([f"dims: version {version} has no dimension; give one per version ({len(options.dims)} given)"])
    return options.dims[version]


def model_spec(options: TrainOptions, data: InteractionData, dim: int) -> dict[str, Any]:
    """The constructor arguments of M_k (what the registry stores beside its weights)."""
    if options.model == "mf":
        return {"arch": "mf", "n_users": data.n_users, "n_items": data.n_items, "dim": dim}
    spec = {"arch": "gnn", "n_attributes": max(1, data.n_attributes), "dim": dim, "layers": options.layers}
    if options.final_norm:
        spec["final_norm"] = True
    return spec


def selection_users(val_user: np.ndarray, *, version: int) -> np.ndarray:
    """The selection half of a version's validation users (sorted): a seeded shuffle of the unique
    users, first ceil(n/2); the rest are the report half. Independent of method and model seed."""
    users = np.unique(val_user)
    rng = np.random.default_rng(SELECTION_SPLIT_SEED + version)
    return np.sort(rng.permutation(users)[: (len(users) + 1) // 2])


def _payload(
    data: InteractionData, sl: VersionSlice, *, method: Method, model_spec: dict, registry: Registry, version: int, options: TrainOptions | None = None
) -> dict[str, Any]:
    prev = None
    if version > 0:
        pw = registry.model(version - 1)
        prev = {"spec": pw.spec, "weights": {k: np.asarray(v) for k, v in pw.tensors.items()}, "dim": registry.get(version - 1).dim}
    frozen = []
    if method.alignment == "multi" and version > 1:
        for v in range(version - 1, 0, -1):
            b = registry.aligner(v)
            if not b.is_affine:
                raise RegistryError(f"multi-step alignment needs linear B's; B_{v} is {b.kind}")
            frozen.append(np.asarray(b.weight, dtype=np.float32))  # type: ignore[attr-defined]
    init = None
    if method.model == "finetune_m0" and version > 0:
        init = {k: np.asarray(v) for k, v in registry.model(version - 1).tensors.items()}
    if method.model == "warm_start" and version > 0:
        from raybc.models.widen import widen_state

        prev_model = registry.model(version - 1)
        if {k: v for k, v in prev_model.spec.items() if k != "dim"} != {k: v for k, v in model_spec.items() if k != "dim"}:
            raise ConfigError([
                f"method: {method.name} widens M_{version - 1} into M_{version}, so both need the same architecture; "
                f"v{version - 1} is {prev_model.spec}, v{version} would be {model_spec} (keep layers and final_norm fixed)"
            ])  # fmt: skip
        template = build_model(model_spec).state_dict()
        old = {k: torch.as_tensor(np.asarray(v)) for k, v in prev_model.tensors.items()}
        seed = 0 if options is None else options.seed
        init = {k: v.numpy() for k, v in widen_state(old, template, seed=seed * 1_000 + version).items()}
    select = None
    if options is not None and options.selection == "split-half":
        select = selection_users(sl.val_user, version=version)
    return {
        "method": method.name,
        "graph": {
            "n_users": data.n_users, "n_items": data.n_items, "train_user": sl.train_user, "train_item": sl.train_item,
            "item_attr_indptr": data.item_attr_indptr, "item_attr_indices": data.item_attr_indices,
            "nodes": "all" if options is None else options.graph_nodes,
        },
        "val": {"val_user": sl.val_user, "val_item": sl.val_item, "select_users": select},
        "candidate_items": sl.items,
        "graph_users": sl.users,
        "model_spec": model_spec,
        "init_weights": init,
        "prev": prev,
        "frozen_aligners": frozen,
    }  # fmt: skip


def least_squares_aligner(zk: torch.Tensor, zp: torch.Tensor) -> np.ndarray:
    """The B (d_{k-1}, d_k) minimising ||z_{k-1} - B z_k||^2 over the given nodes, in closed form:
    :func:`raybc.aligners.solve_least_squares` (float64 normal equations), which also minimises the
    multi-step loss over the same nodes (see :mod:`raybc.aligners`). A rank-deficient z_k (dead
    dimensions) gets the minimum-norm solution instead of an error: training already happened."""
    from raybc.aligners import solve_least_squares

    x, y = zk.double().numpy(), zp.double().numpy()
    try:
        b = solve_least_squares({"n": len(x), "xtx": x.T @ x, "xty": x.T @ y}, affine=False, ridge=0.0, source="B_k refit").weight
    except InputDataError:
        b = np.linalg.lstsq(x, y, rcond=None)[0].T
    return np.ascontiguousarray(b, dtype=np.float32)


def fit_posthoc_aligner(zk: torch.Tensor, zp: torch.Tensor, frozen: list[torch.Tensor], *, multi: bool, steps: int, lr: float, seed: int) -> BackwardAligner:
    """B_k alone, M_k frozen: full-batch Adam on the single- or multi-step loss over every node."""
    torch.manual_seed(seed)
    b = BackwardAligner(zk.shape[1], zp.shape[1])  # linear, no bias
    opt = torch.optim.Adam(b.parameters(), lr=lr)
    for _ in range(steps):
        loss = multi_step_loss(b, [zk], [zp], frozen) if multi else single_step_loss(b, [zk], [zp])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return b


def _run_trainer(payload: dict, options: TrainOptions, *, registry: Registry, run_name: str) -> tuple[dict, dict | None, dict]:
    """TorchTrainer.fit; returns (final state, best state, meta) read from the last checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    opts = options.model_dump()
    config: dict[str, Any] = {"options": opts, "payload": payload}
    if options.num_workers > 0:
        config["payload"] = ray.put(payload)  # one copy in the object store, not one per worker config
    scaling = ray.train.ScalingConfig(
        num_workers=options.num_workers,
        use_gpu=options.use_gpu,
        resources_per_worker={"CPU": options.threads_per_worker} if options.num_workers > 0 else None,
    )
    root = registry.root
    run = ray.train.RunConfig(
        name=run_name,
        storage_path=root.path("train-runs"),
        storage_filesystem=root.arrow_filesystem(),
        failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
    )
    result = TorchTrainer(train_loop, train_loop_config=config, scaling_config=scaling, run_config=run).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        current, best, _, meta = load_checkpoint(d)
    if options.num_workers == 0 and result.checkpoint.path.startswith("/tmp/raybc-ckpt-"):
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)  # local mode keeps the worker's temp dir
    return current, best, meta


def fit_version(
    root: Storage | str,
    data: InteractionData,
    slices: list[VersionSlice],
    *,
    version: int,
    options: TrainOptions,
    echo: Callable[[str], None] = print,
    gate: PublishGate | None = None,
    model_from: Storage | str | None = None,
) -> Version:
    """Fit ``version`` with ``options.method``, publish it with B_k and metrics, write z_k.

    With ``gate``, the consumers registered with the root score the candidate first; a refusal
    (:class:`~raybc.gate.GateRefused`) leaves the registry and the embeddings untouched.

    ``model_from``: a root whose v<version> is this very M_k: trained by a method that trains M_k
    the same way (no-bc for the post-hoc methods, which align no-bc's models; any method at v0,
    where every method trains the same M_0) with the same options (up to those that cannot act on
    it, ``NOT_IN_UNALIGNED_TRAINING``) and data. Its weights are taken instead of training them again; B_k is still derived here.
    Refused (ConfigError) when the donor is not such a version.
    """
    registry = Registry(root)
    method = get_method(options.method)
    from raybc.runtime import quiet

    if quiet():
        options = options.model_copy(update={"progress": False})
    latest = registry.latest()
    expected = 0 if latest is None else latest + 1
    if version != expected:
        raise RegistryError(
            f"cannot fit v{version}: the registry's next version is v{expected}"
            + (f" (v{latest} is published)" if latest is not None else "")
        )
    if version >= len(slices):
        raise ConfigError([f"version: the data set has {len(slices)} versions (0..{len(slices) - 1}), not v{version}"])
    if version > 0 and registry.get(version - 1).method != method.name:
        raise ConfigError([f"method: v{version - 1} was trained with {registry.get(version - 1).method!r}; a root holds one method"])
    t0 = time.perf_counter()
    sl = slices[version]
    dim = version_dim(method, options, version)
    spec = model_spec(options, data, dim)
    payload = _payload(data, sl, method=method, model_spec=spec, registry=registry, version=version, options=options)
    graph = build_graph(payload)

    best_epoch, history = -1, []
    donor_root = None if model_from is None else (model_from if isinstance(model_from, Storage) else Storage(model_from))
    donor = _model_donor(donor_root, method, options, version, data_name=data.name) if donor_root is not None else None
    if method.model == "reuse_m0" and version > 0:
        echo(f"[raybc] {method.name} v{version}: reusing M_0 on the new graph (no training)")
        weights = {k: torch.as_tensor(v) for k, v in registry.model(0).tensors.items()}
        spec = registry.model(0).spec
        aligner_state = None
    elif donor is not None:
        echo(f"[raybc] {method.name} v{version}: M_{version} is {donor.method}'s v{version} in {donor_root.uri()} (same options, same training)")
        donated = Registry(donor_root).model(version)
        weights = {k: torch.as_tensor(np.asarray(v)) for k, v in donated.tensors.items()}
        spec = donated.spec
        best_epoch, history = int(donor.metrics.get("best_epoch", -1)), list(donor.hyperparameters.get("history", []))
        aligner_state = None
    else:
        run_name = f"v{version}-{method.name}-{options.fingerprint()}"
        echo(f"[raybc] {method.name} v{version}: fitting dim {dim} with {options.num_workers or 'in-process'} worker(s), run {run_name}")
        current, best, meta = _run_trainer(payload, options, registry=registry, run_name=run_name)
        state = best if best is not None else current  # keys "model.*" and "aligner.*" either way
        best_epoch, history = int(meta.get("best_epoch", -1)), list(meta.get("history", []))
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        aligner_state = {k[len("aligner.") :]: v for k, v in state.items() if k.startswith("aligner.")} or None

    model = build_model(spec)
    model.load_state_dict(weights)
    u, i = embed(model, graph)

    # B_k, as the method says
    aligner_t = None
    z_prev = None
    refit_note: dict[str, float] = {}
    if version > 0:
        prev_dim = registry.get(version - 1).dim
        z_prev = embed(_load(registry, version - 1), graph)
        if method.backward == "identity":
            aligner_t = Affine(np.eye(prev_dim, dim, dtype=np.float32))
        elif method.backward == "truncate":
            aligner_t = truncation(dim, prev_dim)
        elif method.refit_aligner:
            zk = torch.cat([u[sl.users], i[sl.items]])
            zp = torch.cat([z_prev[0][sl.users], z_prev[1][sl.items]])
            if aligner_state is not None:  # what the jointly learned B_k would have scored, for the record
                learned = Affine(aligner_state["weight"].numpy().astype(np.float32))
                refit_note = {"joint_aligner_err_prev": alignment_error(torch.from_numpy(learned.apply(zk.double().numpy())), zp)}
            aligner_t = Affine(least_squares_aligner(zk, zp))
        elif method.joint:
            assert aligner_state is not None, "a jointly learned B_k must be in the checkpoint"
            aligner_t = Affine(aligner_state["weight"].numpy().astype(np.float32))
        else:
            zk = torch.cat([u[sl.users], i[sl.items]])
            zp = torch.cat([z_prev[0][sl.users], z_prev[1][sl.items]])
            frozen = [torch.as_tensor(w) for w in payload["frozen_aligners"]]
            b = fit_posthoc_aligner(zk, zp, frozen, multi=method.alignment == "multi", steps=options.posthoc_steps, lr=options.posthoc_lr, seed=options.seed)
            aligner_t = Affine(b.weight.detach().numpy().astype(np.float32))

    # metrics: Recall@K of the selected state and the alignment error to every earlier version
    metrics: dict[str, Any] = evaluate_state(Joint(model, None), graph, payload, None, [])
    zk_nodes = torch.cat([u[sl.users], i[sl.items]]).double().numpy()
    mapped = zk_nodes
    for j in range(version - 1, -1, -1):
        mapped = (aligner_t if j == version - 1 else registry.aligner(j + 1)).apply(mapped)
        uj, ij = embed(_load(registry, j), graph)
        zj = torch.cat([uj[sl.users], ij[sl.items]])
        metrics[f"align_err_v{j}"] = alignment_error(torch.from_numpy(mapped), zj)
        if j == 0 and zk_nodes.shape[1] >= zj.shape[1]:
            # what consumers of v0 would get with no transform at all: z_k truncated to d_0
            metrics["truncation_err_v0"] = alignment_error(torch.from_numpy(zk_nodes[:, : zj.shape[1]]), zj)
    recalls = [h["recall@50"] for h in history if "recall@50" in h]
    metrics.update(refit_note)
    metrics.update(
        best_epoch=best_epoch,
        recall50_last5_mean=float(np.mean(recalls[-5:])) if recalls else metrics.get("recall@50"),
        fit_seconds=time.perf_counter() - t0,
        train_edges=int(len(sl.train_user)),
        val_edges=int(len(sl.val_user)),
        graph_users=int(len(sl.users)),
        graph_items=int(len(sl.items)),
    )

    if gate is not None:  # registered consumers must accept v<k> before anything of it is written
        candidate = {"users": make_table(data.user_ids.take(sl.users), u[sl.users].numpy()), "items": make_table(data.item_ids.take(sl.items), i[sl.items].numpy())}
        gate.check(version, aligner=aligner_t, embeddings=candidate, echo=echo)
    listing = {}
    for entity, emb, nodes, ids in (("users", u, sl.users, data.user_ids), ("items", i, sl.items, data.item_ids)):
        z = emb[nodes].numpy().astype(np.float32)
        ext = ids.take(nodes)
        tables = (make_table(ext.slice(s, _ROWS_PER_FILE), z[s : s + _ROWS_PER_FILE]) for s in range(0, len(nodes), _ROWS_PER_FILE))
        listing[entity] = registry.write_embeddings(version, entity, tables)
    hyper = {**options.model_dump(exclude={"fail_at_epoch", "fail_marker"}), "data_set": data.name, "history": history}
    v = registry.publish(
        version, dim=dim, method=method.name, aligner=aligner_t, embeddings=listing,
        model=ModelWeights({k: t.detach().cpu().numpy() for k, t in model.state_dict().items()}, spec),
        hyperparameters=hyper, metrics=metrics,
    )  # fmt: skip
    echo(
        f"[raybc] published v{version} ({method.name}, dim {dim}): recall@50 {metrics.get('recall@50', float('nan')):.4f}"
        + (f", align err to v0 {metrics['align_err_v0']:.4f}" if "align_err_v0" in metrics else "")
        + f", {metrics['fit_seconds']:.1f} s"
    )
    return v


def same_model_training(a: Method, b: Method, version: int) -> bool:
    """Whether methods ``a`` and ``b`` train the same M_k at ``version`` from the same options.

    v0: every method trains M_0 the same way (no earlier version to align to or start from).
    Later: both train from scratch without a joint loss (no-bc and the post-hoc methods).
    """
    if version == 0:
        return True
    scratch_only = lambda m: m.model == "scratch" and not m.aligns_jointly  # noqa: E731
    return scratch_only(a) and scratch_only(b)


def _model_donor(model_from: Storage, method: Method, options: TrainOptions, version: int, *, data_name: str) -> Version:
    """The donor version of ``fit_version(model_from=...)``, checked; ConfigError names the problem."""
    reg = Registry(model_from)
    where = reg.root.uri()
    if not reg.is_published(version):
        raise ConfigError([f"model_from: {where} has no v{version}; fit it there first or drop model_from"])
    donor = reg.get(version)
    problems = []
    dm = get_method(donor.method)
    if not same_model_training(dm, method, version):
        problems.append(f"model_from: v{version} in {where} is {donor.method}'s, which does not train M_{version} as {method.name} does")
    if donor.hyperparameters.get("data_set") != data_name:
        problems.append(f"model_from: v{version} in {where} was trained on {donor.hyperparameters.get('data_set')!r}, not {data_name!r}")
    known = {k: v for k, v in donor.hyperparameters.items() if k in TrainOptions.model_fields}
    try:
        theirs = TrainOptions(**{**LEGACY_VALUES, **known, "method": method.name})
    except ValueError:
        theirs = None
    if theirs is None or theirs.fingerprint(ignore=NOT_IN_UNALIGNED_TRAINING) != options.fingerprint(ignore=NOT_IN_UNALIGNED_TRAINING):
        problems.append(f"model_from: v{version} in {where} was trained with other options; take M_k only from a run with the same options")
    if version > 0 and dm.fixed_dim != method.fixed_dim:
        problems.append(f"model_from: {donor.method} and {method.name} give v{version} different dimensions")
    if problems:
        raise ConfigError(problems)
    return donor


def _load(registry: Registry, k: int) -> nn.Module:
    m = build_model(registry.model(k).spec)
    m.load_state_dict({key: torch.as_tensor(v) for key, v in registry.model(k).tensors.items()})
    return m
