"""The BC loss for your own training loop: B_k as a torch module, the frozen older B's, the paper's
alignment losses, and publishing what you trained into a registry.

A team that trains its own embedding model (any architecture, its own Ray Train loop) adds
BC-Aligner in a few lines::

    frozen = frozen_aligners(registry, version=k)              # B_{k-1}, ..., B_1: frozen, checksummed
    bc = BCLoss(new_dim, old_dim, frozen=frozen)                # holds the trainable B_k
    optim = torch.optim.Adam([*model.parameters(), *bc.parameters()])
    loss = task_loss + 16.0 * bc(z_new, z_old)                  # z_old: M_{k-1} on the same ids
    ...
    publish_version(registry, k, embeddings={"items": (ids, z_k)}, aligner=bc)

What is here:

- :class:`BackwardAligner`: B_k (z_k, d_k -> z_{k-1}, d_{k-1}) of kind ``linear`` (the paper's, no
  bias), ``affine`` or ``residual_mlp`` (P x + W2 relu(W1 x + b1) + b2, the tensors of
  :class:`raybc.transforms.ResidualMLP`); ``to_transform()`` exports it to the registry's Transform.
- :func:`frozen_aligners`: the published B_{k-1}, ..., B_1 as non-trainable modules (buffers, no
  parameters), read through the registry's checksum-verifying safetensors loader.
- :func:`single_step_loss`, :func:`multi_step_loss`, :func:`prefix_loss`: the alignment losses of
  DESIGN.md. Each takes one tensor or a sequence of node groups (users, positives, negatives: one
  MSE per group, summed, as in the authors' code). The multi-step loss carries the residual
  z_{k-1} - B_k z_k through every frozen B and averages the MSE over the k spaces.
- :class:`BCLoss`: B_k plus the chosen loss in one module; the target z_{k-1} is always detached.
- :func:`publish_version`: writes z_k (ids + matrix) as contract Parquet and registers it with B_k
  through :func:`raybc.intake.register_version`, so the B check and the publish gate run.

raybc's own training (``raybc.train``) and the residual_mlp fit of ``raybc.aligners`` use this
module; it does not train anything itself.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raybc.errors import ConfigError, InputDataError, RegistryError
from raybc.transforms import Affine, ResidualMLP, Transform, truncation

if TYPE_CHECKING:
    from raybc.intake import RegisterOptions
    from raybc.registry import Registry, Version
    from raybc.storage import Storage

KINDS = ("linear", "affine", "residual_mlp")
LOSSES = ("single", "multi", "prefix")
# lambda of the paper (and of raybc's own training): total = task + 16 * alignment.
DEFAULT_ALIGNMENT_WEIGHT = 16.0

Groups = Union[torch.Tensor, Sequence[torch.Tensor]]
# A frozen older B: a weight matrix (d_{j-1}, d_j) or a module / function mapping d_j -> d_{j-1}.
FrozenStep = Union[torch.Tensor, nn.Module, Callable[[torch.Tensor], torch.Tensor]]


# --------------------------------------------------------------------------- B_k as a module


class BackwardAligner(nn.Module):
    """B_k: embeddings of version k (``in_dim``) -> the space of version k-1 (``out_dim``).

    ``linear`` and ``affine`` hold ``weight`` (out_dim, in_dim) and, for affine, ``bias``, named and
    initialised as ``torch.nn.Linear``'s. ``residual_mlp`` holds ``proj``, ``w1``, ``b1``, ``w2``,
    ``b2``; it starts as the linear map ``proj`` (W2 = 0), ``proj`` from ``init`` when given.
    ``init`` (a (out_dim, in_dim) matrix) also sets a linear/affine weight, e.g. a least-squares start.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, kind: Literal["linear", "affine", "residual_mlp"] = "linear",
        hidden: int = 256, init: np.ndarray | torch.Tensor | None = None, seed: int = 0,
    ):  # fmt: skip
        super().__init__()
        problems = []
        if kind not in KINDS:
            problems.append(f"kind: unknown aligner kind {kind!r}; choose one of {', '.join(KINDS)}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name}: must be a positive integer, got {v!r}")
        if problems:
            raise ConfigError(problems, source="BackwardAligner")
        self.in_dim, self.out_dim, self.kind = int(in_dim), int(out_dim), kind
        start = None
        if init is not None:
            start = torch.as_tensor(np.asarray(init, dtype=np.float32)).clone()
            if tuple(start.shape) != (out_dim, in_dim):
                raise ConfigError([f"init: B_k maps {in_dim}-d to {out_dim}-d, so init must have shape ({out_dim}, {in_dim}), got {tuple(start.shape)}"], source="BackwardAligner")  # fmt: skip
        if kind in ("linear", "affine"):
            self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
            self.bias = nn.Parameter(torch.empty(out_dim)) if kind == "affine" else None
            # exactly torch.nn.Linear's initialisation (same draws from the global generator)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(in_dim)
                nn.init.uniform_(self.bias, -bound, bound)
            if start is not None:
                with torch.no_grad():
                    self.weight.copy_(start)
        else:
            self.hidden = int(hidden)
            g = torch.Generator().manual_seed(seed)
            if start is None:
                start = torch.randn(out_dim, in_dim, generator=g) / np.sqrt(in_dim)
            self.proj = nn.Parameter(start)
            self.w1 = nn.Parameter(torch.randn(hidden, in_dim, generator=g) / np.sqrt(in_dim))
            self.b1 = nn.Parameter(torch.zeros(hidden))
            self.w2 = nn.Parameter(torch.zeros(out_dim, hidden))  # starts exactly at the linear map proj
            self.b2 = nn.Parameter(torch.zeros(out_dim))

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.in_dim} -> {self.out_dim}" + (f", hidden {self.hidden}" if self.kind == "residual_mlp" else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"B_k expects {self.in_dim}-d embeddings z_k, got shape {tuple(x.shape)}")
        if self.kind == "residual_mlp":
            return x @ self.proj.T + torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2
        return F.linear(x, self.weight, self.bias)

    @property
    def is_linear(self) -> bool:
        """Linear or affine: a residual through it is carried by the weight alone (the bias cancels)."""
        return self.kind != "residual_mlp"

    def to_transform(self) -> Transform:
        """This B as the registry's Transform (float32), ready for ``publish_version`` / ``Registry.publish``."""
        t = {k: v.detach().cpu().to(torch.float32).numpy().copy() for k, v in self.state_dict().items()}
        if self.kind == "residual_mlp":
            return ResidualMLP(**{n: t[n] for n in ("proj", "w1", "b1", "w2", "b2")})
        return Affine(t["weight"], t.get("bias"))

    @classmethod
    def from_transform(cls, t: Transform, *, trainable: bool = True) -> BackwardAligner:
        """A module holding ``t``'s weights; ``trainable=False`` keeps them as buffers (frozen)."""
        if isinstance(t, ResidualMLP):
            m = cls(t.in_dim, t.out_dim, kind="residual_mlp", hidden=t.hidden)
        elif isinstance(t, Affine):
            m = cls(t.in_dim, t.out_dim, kind="linear" if t.bias is None else "affine")
        else:
            raise ConfigError([f"transform: a {t.kind} transform has no torch module; kinds: {', '.join(KINDS)}"], source="BackwardAligner")  # fmt: skip
        with torch.no_grad():
            for name, arr in t.tensors().items():
                getattr(m, name).copy_(torch.from_numpy(np.asarray(arr, np.float32)))
        return m if trainable else _freeze(m)


def _freeze(m: BackwardAligner) -> BackwardAligner:
    """Turn every parameter into a non-persistent buffer: no optimizer, DDP or checkpoint sees it."""
    for name, p in list(m.named_parameters(recurse=False)):
        delattr(m, name)
        m.register_buffer(name, p.detach().clone(), persistent=False)
    m.eval()
    return m


def _registry(registry: Registry | Storage | str) -> Registry:
    """A Registry for a Registry, a Storage or a root URI."""
    from raybc.registry import Registry

    return registry if isinstance(registry, Registry) else Registry(registry)


def frozen_aligners(registry: Registry | Storage | str, version: int) -> list[BackwardAligner]:
    """The frozen chain for training ``version`` = k: [B_{k-1}, ..., B_1] as non-trainable modules.

    Read with the registry's loader (sha256 and size checked against the manifest, safetensors
    only: nothing is unpickled). Empty for k <= 1. Needs v<k-1> published.
    """
    reg = _registry(registry)
    if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version < 0:
        raise ConfigError([f"version: the version being trained must be an integer >= 0, got {version!r}"], source="frozen_aligners")
    if version > 0 and not reg.is_published(version - 1):
        raise RegistryError(
            f"cannot train v{version} against {reg.root.uri('registry')}: its parent v{version - 1} is not published "
            f"(published: {', '.join(f'v{v}' for v in reg.versions()) or 'none'}); publish v{version - 1} first"
        )
    return [BackwardAligner.from_transform(reg.aligner(v), trainable=False) for v in range(int(version) - 1, 0, -1)]


# --------------------------------------------------------------------------- losses


def _groups(z: Groups) -> list[torch.Tensor]:
    return [z] if isinstance(z, torch.Tensor) else list(z)


def _pairs(z_new: Groups, z_old: Groups) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a, b = _groups(z_new), _groups(z_old)
    if len(a) != len(b) or not a:
        raise ValueError(f"z_new and z_old must hold the same node groups (one tensor each, or equal sequences); got {len(a)} and {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"group {i}: z_new has {x.shape[0]} rows but z_old has {y.shape[0]}; give both for the same ids, in the same order")
    return list(zip(a, b))


def prefix_loss(z_new: Groups, z_old: Groups) -> torch.Tensor:
    """BCT (joint-notrans): MSE(z_new[:, :d_{k-1}], z_old) per group, summed."""
    out = []
    for a, b in _pairs(z_new, z_old):
        if a.shape[1] < b.shape[1]:
            raise ValueError(f"prefix loss needs d_k >= d_(k-1): z_new is {a.shape[1]}-d, z_old {b.shape[1]}-d")
        out.append(F.mse_loss(a[:, : b.shape[1]], b))
    return sum(out)  # type: ignore[return-value]


def single_step_loss(b_k: Callable[[torch.Tensor], torch.Tensor], z_new: Groups, z_old: Groups) -> torch.Tensor:
    """MSE(z_{k-1}, B_k z_k) per group, summed."""
    return sum(F.mse_loss(b_k(a), b) for a, b in _pairs(z_new, z_old))  # type: ignore[return-value]


def _linear_weight(step: FrozenStep) -> torch.Tensor | None:
    """The weight that carries a residual through ``step`` when it is linear/affine, else None."""
    if isinstance(step, torch.Tensor):
        return step
    if isinstance(step, BackwardAligner) and step.is_linear:
        return step.weight
    return None


def multi_step_loss(b_k: Callable[[torch.Tensor], torch.Tensor], z_new: Groups, z_old: Groups, frozen: Sequence[FrozenStep] = ()) -> torch.Tensor:
    """The paper's multi-step loss: misalignment in the parent's space and in every older one.

    ``frozen`` is [B_{k-1}, ..., B_1] (weight matrices (d_{j-1}, d_j), or modules/functions, e.g.
    :func:`frozen_aligners`). Per group, stage k-1 is MSE(z_{k-1} - B_k z_k); each frozen B maps
    into the next older space, where the stage is the MSE again; the group's loss is the mean over
    the k stages, and the groups' losses are summed. Through linear B's the residual itself is
    carried (their bias cancels); a non-linear B maps prediction and target separately.
    With no frozen B's this is :func:`single_step_loss`.
    """
    weights = [_linear_weight(s) for s in frozen]
    total: torch.Tensor | float = 0.0
    for a, b in _pairs(z_new, z_old):
        pred = b_k(a)
        if all(w is not None for w in weights):
            d = b - pred
            stages = [d.pow(2).mean()]
            for w in weights:
                d = d @ w.T  # type: ignore[union-attr]
                stages.append(d.pow(2).mean())
        else:
            stages = [torch.mean((pred - b) ** 2)]
            for step in frozen:
                f = (lambda x, w=step: x @ w.T) if isinstance(step, torch.Tensor) else step
                pred, b = f(pred), f(b)
                stages.append(torch.mean((pred - b) ** 2))
        total = total + torch.stack(stages).mean()
    return total  # type: ignore[return-value]


# --------------------------------------------------------------------------- the convenience module


class BCLoss(nn.Module):
    """alignment(z_new, z_old) with a trainable B_k: ``loss = task_loss + lam * bc(z_new, z_old)``.

    ``loss``: ``multi`` (BC-Aligner, through ``frozen``), ``single`` (joint-lin-sloss) or
    ``prefix`` (BCT / joint-notrans: no B_k is learned; consumers get the first d_{k-1} dims).
    ``z_old`` is the previous model's output on the same ids; it is detached here, so no gradient
    reaches M_{k-1}. Only B_k (``self.aligner``) has parameters: the frozen B's are buffers.
    """

    def __init__(
        self, new_dim: int, old_dim: int, *, loss: Literal["single", "multi", "prefix"] = "multi",
        frozen: Sequence[BackwardAligner] = (), kind: Literal["linear", "affine", "residual_mlp"] = "linear",
        hidden: int = 256, seed: int = 0,
    ):  # fmt: skip
        super().__init__()
        problems = []
        if loss not in LOSSES:
            problems.append(f"loss: unknown alignment loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if loss == "prefix" and new_dim < old_dim:
            problems.append(f"loss: prefix alignment needs new_dim >= old_dim ({new_dim} < {old_dim}); use single or multi")
        if loss != "multi" and frozen:
            problems.append(f"frozen: only the multi-step loss uses the older B's; drop them or use loss='multi' (got loss={loss!r})")
        frozen = list(frozen)
        for i, f in enumerate(frozen):
            if not isinstance(f, BackwardAligner) or any(True for _ in f.parameters()):
                problems.append(f"frozen[{i}]: expected a frozen BackwardAligner (from frozen_aligners()), got {type(f).__name__}"
                                + (" with trainable parameters" if isinstance(f, BackwardAligner) else ""))  # fmt: skip
        dims = [old_dim] + [f.out_dim for f in frozen if isinstance(f, BackwardAligner)]
        for i, f in enumerate(frozen):
            if isinstance(f, BackwardAligner) and f.in_dim != dims[i]:
                problems.append(f"frozen[{i}]: maps {f.in_dim}-d inputs but the chain reaches it with {dims[i]}-d ones; "
                                "give [B_{k-1}, ..., B_1] in that order, as frozen_aligners(registry, k) returns them")  # fmt: skip
        if problems:
            raise ConfigError(problems, source="BCLoss")
        self.new_dim, self.old_dim, self.loss = int(new_dim), int(old_dim), loss
        self.aligner = None if loss == "prefix" else BackwardAligner(new_dim, old_dim, kind=kind, hidden=hidden, seed=seed)
        self.frozen = nn.ModuleList(frozen)

    @classmethod
    def for_version(cls, registry: Registry | Storage | str, version: int, new_dim: int, **kwargs: Any) -> BCLoss:
        """BCLoss for training ``version`` against a registry: old_dim and the frozen chain read from it."""
        if not isinstance(version, (int, np.integer)) or version < 1:
            raise ConfigError([f"version: v{version!r} has no older version to align with; train v0 without BCLoss"], source="BCLoss.for_version")
        reg = _registry(registry)
        frozen = frozen_aligners(reg, version) if kwargs.get("loss", "multi") == "multi" else []
        return cls(new_dim, reg.get(version - 1).dim, frozen=frozen, **kwargs)

    def forward(self, z_new: Groups, z_old: Groups) -> torch.Tensor:
        old = [z.detach() for z in _groups(z_old)]  # the target is frozen: nothing flows into M_{k-1}
        for a, b in zip(_groups(z_new), old):
            if a.shape[-1] != self.new_dim or b.shape[-1] != self.old_dim:
                raise ValueError(f"BCLoss({self.new_dim} -> {self.old_dim}) got z_new {tuple(a.shape)} and z_old {tuple(b.shape)}")
        if self.loss == "prefix":
            return prefix_loss(z_new, old)
        if self.loss == "single":
            return single_step_loss(self.aligner, z_new, old)  # type: ignore[arg-type]
        return multi_step_loss(self.aligner, z_new, old, list(self.frozen))  # type: ignore[arg-type]

    def to_transform(self) -> Transform:
        """The B_k to publish: the learned one, or the "first d_{k-1} dims" map of the prefix loss."""
        if self.aligner is None:
            return truncation(self.new_dim, self.old_dim)
        return self.aligner.to_transform()


# --------------------------------------------------------------------------- publishing


Embeddings = Mapping[str, Any]  # entity -> (ids, (n, d) matrix) or a contract pyarrow.Table


def publish_version(
    registry: Registry | Storage | str,
    version: int,
    *,
    embeddings: Embeddings,
    aligner: BCLoss | BackwardAligner | Transform | None = None,
    method: str = "external-bc-aligner",
    metrics: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    options: RegisterOptions | None = None,
    staging_dir: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> Version:
    """Register v<version>: z_k of each entity and B_k, through :func:`raybc.intake.register_version`.

    ``embeddings`` maps an entity to ``(ids, matrix)`` (ids are the data set's own: int64 or str;
    matrix (n, d) numpy or torch) or to a contract table (``id``, ``embedding``). They are written
    as Parquet to a temporary folder (``staging_dir``, else the system's), registered (validated,
    copied into the root, B_k measured against the stored z_{k-1}, the publish gate when consumers
    are registered) and the temporary files removed. v0 takes no aligner; later versions need one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybc.embeddings import make_table
    from raybc.intake import register_version
    reg = _registry(registry)
    if options is not None and options.in_place:
        raise ConfigError(["in_place: publish_version writes z_k to temporary files and removes them afterwards, so they "
                           "cannot be registered in place; drop in_place (the files are copied into the root)"], source="publish_version")  # fmt: skip
    if not embeddings:
        raise InputDataError("publish_version: embeddings is empty; give {entity: (ids, matrix)} for at least one entity")
    b: Transform | None
    if isinstance(aligner, (BCLoss, BackwardAligner)):
        b = aligner.to_transform()
    else:
        b = aligner
    if b is not None and not isinstance(b, Transform):
        raise ConfigError([f"aligner: expected a BCLoss, BackwardAligner or raybc Transform, got {type(aligner).__name__}"], source="publish_version")  # fmt: skip
    tables: dict[str, pa.Table] = {}
    for entity, value in embeddings.items():
        if isinstance(value, pa.Table):
            tables[entity] = value
            continue
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise InputDataError(f"embeddings[{entity!r}]: give (ids, matrix) or a pyarrow Table with id and embedding columns")
        ids, mat = value
        if isinstance(mat, torch.Tensor):
            mat = mat.detach().cpu().numpy()
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu().numpy()
        mat = np.asarray(mat, dtype=np.float32)
        if mat.ndim != 2 or len(ids) != mat.shape[0]:
            raise InputDataError(f"embeddings[{entity!r}]: {len(ids)} ids for a matrix of shape {mat.shape}; give one (n, d) row per id")
        tables[entity] = make_table(np.asarray(ids) if not isinstance(ids, pa.Array) else ids, mat)
    stage = Path(tempfile.mkdtemp(prefix=f"raybc-publish-v{version}-", dir=staging_dir))
    try:
        sources = {}
        for entity, t in tables.items():
            folder = stage / entity
            folder.mkdir()
            pq.write_table(t, folder / "part-00000.parquet")
            sources[entity] = str(folder)
        return register_version(
            reg, version, embeddings=sources, aligner=b, options=options, method=method, metrics=metrics,
            hyperparameters=hyperparameters, echo=echo,
        )  # fmt: skip
    finally:
        shutil.rmtree(stage, ignore_errors=True)


__all__ = [
    "DEFAULT_ALIGNMENT_WEIGHT", "KINDS", "LOSSES", "BCLoss", "BackwardAligner", "frozen_aligners", "multi_step_loss",
    "prefix_loss", "publish_version", "single_step_loss",
]  # fmt: skip
