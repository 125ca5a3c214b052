"""Backward transforms B_k (version k -> k-1), their composition, and fusion into one pass.

A backward transform maps embeddings of version k (dimension d_k) into the space of version k-1
(dimension d_{k-1}). Three kinds exist:

- ``linear``: y = W x, W of shape (d_{k-1}, d_k) -- the paper's BC-Aligner transform.
- ``affine``: y = W x + b.
- ``residual_mlp``: y = P x + W2 relu(W1 x + b1) + b2, a small non-linear transform whose linear
  path P carries the change of dimension.

Getting from version k to an older version j means applying B_k, then B_{k-1}, ..., then B_{j+1}.
Consecutive linear and affine steps compose into ONE affine map, computed in float64 and applied in
float32, so reaching v0 costs one matmul however far back it lies. A :class:`FanOutPlan` serves many
targets from one input batch: all targets reachable from the same (input or non-linear) base share
one stacked matmul; a non-linear step materialises its input once and starts a new base.

This module is pure numpy: no Ray, no storage. Weights travel as safetensors (see ``to_bytes`` /
``from_bytes``); a transform's constructor arguments travel beside them in the file's metadata.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from raybc.errors import IntegrityError

# Metadata key in aligner.safetensors holding the transform's constructor arguments as JSON.
SPEC_METADATA_KEY = "raybc.transform"


class Transform(ABC):
    """One backward step: embeddings of dimension ``in_dim`` -> ``out_dim``."""

    kind: ClassVar[str]
    in_dim: int
    out_dim: int

    @abstractmethod
    def apply(self, x: np.ndarray) -> np.ndarray:
        """Map rows of ``x`` (n, in_dim) to (n, out_dim), in ``x``'s floating dtype."""

    @abstractmethod
    def tensors(self) -> dict[str, np.ndarray]:
        """The weights, named as stored in the safetensors file."""

    def spec(self) -> dict[str, Any]:
        """Constructor arguments other than weights: enough to rebuild from the file alone."""
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim}

    @property
    def is_affine(self) -> bool:
        return False

    def _check_input(self, x: np.ndarray) -> None:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{self.kind} transform expects (n, {self.in_dim}) inputs, got {x.shape}")


@dataclass(eq=False)
class Affine(Transform):
    """y = W x (+ b). ``bias=None`` is the paper's linear transform without bias."""

    weight: np.ndarray  # (out_dim, in_dim), torch.nn.Linear layout
    bias: np.ndarray | None = None  # (out_dim,)

    kind: ClassVar[str] = "affine"

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight)
        if self.weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (out_dim, in_dim), got shape {self.weight.shape}")
        if self.bias is not None:
            self.bias = np.asarray(self.bias)
            if self.bias.shape != (self.weight.shape[0],):
                raise ValueError(f"bias must have shape ({self.weight.shape[0]},), got {self.bias.shape}")

    @property
    def in_dim(self) -> int:  # type: ignore[override]
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:  # type: ignore[override]
        return int(self.weight.shape[0])

    @property
    def is_affine(self) -> bool:
        return True

    def spec(self) -> dict[str, Any]:
        return {"kind": "linear" if self.bias is None else "affine", "in_dim": self.in_dim, "out_dim": self.out_dim}

    def apply(self, x: np.ndarray) -> np.ndarray:
        self._check_input(x)
        w = self.weight.astype(x.dtype, copy=False)
        y = x @ w.T
        if self.bias is not None:
            y += self.bias.astype(x.dtype, copy=False)
        return y

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"weight": np.ascontiguousarray(self.weight, dtype=np.float32)}
        if self.bias is not None:
            out["bias"] = np.ascontiguousarray(self.bias, dtype=np.float32)
        return out

    def then(self, outer: Affine) -> Affine:
        """outer ∘ self, in float64: x -> outer(self(x))."""
        w_in, w_out = self.weight.astype(np.float64), outer.weight.astype(np.float64)
        if w_out.shape[1] != w_in.shape[0]:
            raise ValueError(f"cannot compose: {w_in.shape[0]}-d output into {w_out.shape[1]}-d input")
        w = w_out @ w_in
        bias = None
        if self.bias is not None:
            bias = w_out @ self.bias.astype(np.float64)
        if outer.bias is not None:
            bias = outer.bias.astype(np.float64) if bias is None else bias + outer.bias.astype(np.float64)
        return Affine(w, bias)

    @staticmethod
    def identity(dim: int) -> Affine:
        return Affine(np.eye(dim, dtype=np.float64))


def Linear(weight: np.ndarray) -> Affine:  # noqa: N802 - reads like the class it builds
    """The paper's B_k: y = W x, no bias."""
    return Affine(weight, None)


def truncation(in_dim: int, out_dim: int) -> Affine:
    """The fixed map "first ``out_dim`` dimensions" (no-bc, joint-notrans)."""
    if out_dim > in_dim:
        raise ValueError(f"cannot truncate {in_dim} dimensions to {out_dim}")
    return Affine(np.eye(out_dim, in_dim, dtype=np.float32))


@dataclass(eq=False)
class ResidualMLP(Transform):
    """y = P x + W2 relu(W1 x + b1) + b2: a linear path plus a small non-linear correction."""

    proj: np.ndarray  # (out_dim, in_dim)
    w1: np.ndarray  # (hidden, in_dim)
    b1: np.ndarray  # (hidden,)
    w2: np.ndarray  # (out_dim, hidden)
    b2: np.ndarray  # (out_dim,)

    kind: ClassVar[str] = "residual_mlp"

    def __post_init__(self) -> None:
        out_dim, in_dim = np.shape(self.proj)
        hidden = np.shape(self.w1)[0]
        expected = {
            "proj": (out_dim, in_dim), "w1": (hidden, in_dim), "b1": (hidden,),
            "w2": (out_dim, hidden), "b2": (out_dim,),
        }  # fmt: skip
        for name, shape in expected.items():
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape:
                raise ValueError(f"residual_mlp {name} must have shape {shape}, got {arr.shape}")
            setattr(self, name, arr)

    @property
    def in_dim(self) -> int:  # type: ignore[override]
        return int(self.proj.shape[1])

    @property
    def out_dim(self) -> int:  # type: ignore[override]
        return int(self.proj.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[0])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "hidden": self.hidden}

    def apply(self, x: np.ndarray) -> np.ndarray:
        self._check_input(x)
        dt = x.dtype
        h = x @ self.w1.astype(dt, copy=False).T
        h += self.b1.astype(dt, copy=False)
        np.maximum(h, 0, out=h)
        y = x @ self.proj.astype(dt, copy=False).T
        y += h @ self.w2.astype(dt, copy=False).T
        y += self.b2.astype(dt, copy=False)
        return y

    def tensors(self) -> dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(getattr(self, n), dtype=np.float32) for n in ("proj", "w1", "b1", "w2", "b2")}

    @staticmethod
    def random(in_dim: int, out_dim: int, hidden: int, *, seed: int = 0, scale: float = 0.1) -> ResidualMLP:
        """A well-conditioned random instance (tests, synthetic registries)."""
        rng = np.random.default_rng(seed)
        return ResidualMLP(
            proj=rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim),
            w1=rng.standard_normal((hidden, in_dim)) / np.sqrt(in_dim),
            b1=scale * rng.standard_normal(hidden),
            w2=scale * rng.standard_normal((out_dim, hidden)) / np.sqrt(hidden),
            b2=scale * rng.standard_normal(out_dim),
        )


# --------------------------------------------------------------------------- serialisation


def to_bytes(t: Transform) -> bytes:
    """safetensors bytes of ``t``: its weights, and its spec as JSON metadata."""
    return st_save(t.tensors(), metadata={SPEC_METADATA_KEY: json.dumps(t.spec(), sort_keys=True)})


def from_bytes(data: bytes, *, source: str = "<bytes>") -> Transform:
    """Rebuild a transform from safetensors bytes. Never unpickles; errors name ``source``."""
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise IntegrityError(f"{source} is not a readable safetensors file ({exc}); re-publish or restore it") from None
    spec = _read_spec(data, tensors, source)
    kind = spec.get("kind")
    try:
        if kind in ("linear", "affine"):
            t: Transform = Affine(tensors["weight"], tensors.get("bias") if kind == "affine" else None)
        elif kind == "residual_mlp":
            t = ResidualMLP(**{n: tensors[n] for n in ("proj", "w1", "b1", "w2", "b2")})
        else:
            raise IntegrityError(f"{source}: unknown transform kind {kind!r}; expected linear, affine or residual_mlp")
    except KeyError as exc:
        raise IntegrityError(f"{source}: {kind} transform lacks tensor {exc}") from None
    except ValueError as exc:
        raise IntegrityError(f"{source}: {exc}") from None
    if (t.in_dim, t.out_dim) != (spec.get("in_dim", t.in_dim), spec.get("out_dim", t.out_dim)):
        raise IntegrityError(
            f"{source}: weights map {t.in_dim}->{t.out_dim} but the metadata says {spec.get('in_dim')}->{spec.get('out_dim')}"
        )
    for name, arr in t.tensors().items():
        if not np.all(np.isfinite(arr)):
            raise IntegrityError(f"{source}: tensor {name!r} holds NaN or Inf")
    return t


def _read_spec(data: bytes, tensors: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    # safetensors header: 8-byte little-endian length, then JSON with "__metadata__".
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        if SPEC_METADATA_KEY in meta:
            return json.loads(meta[SPEC_METADATA_KEY])
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{source}: unreadable safetensors header ({exc})") from None
    # A file from elsewhere: one 2-D tensor (plus maybe a 1-D bias) is a linear/affine map.
    mats = [a for a in tensors.values() if a.ndim == 2]
    vecs = [a for a in tensors.values() if a.ndim == 1]
    if len(mats) == 1 and len(vecs) <= 1:
        w = mats[0]
        return {"kind": "affine" if vecs else "linear", "in_dim": int(w.shape[1]), "out_dim": int(w.shape[0])}
    raise IntegrityError(f"{source}: no raybc transform metadata and not a single weight matrix ({sorted(tensors)})")


def from_matrix(
    matrix: np.ndarray, *, in_dim: int, out_dim: int, bias: np.ndarray | None = None, source: str, layout: str | None = None
) -> Affine:
    """A user-supplied B_k matrix as an Affine transform.

    ``layout`` says how the matrix is laid out: ``"out_in"`` is (d_{k-1}, d_k) with y = B z
    (torch.nn.Linear's weight), ``"in_out"`` is (d_k, d_{k-1}) with y = z @ B (numpy's right
    multiplication). Without it the shape decides, which it cannot for a square B: then the layout
    must be given, since reading it the wrong way round silently transposes the map.
    """
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise IntegrityError(f"{source}: B must be a 2-D matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise IntegrityError(f"{source}: B holds NaN or Inf")
    need = {"out_in": (out_dim, in_dim), "in_out": (in_dim, out_dim)}
    if layout is not None and layout not in need:
        raise IntegrityError(f"{source}: unknown layout {layout!r}; use out_in (y = B z) or in_out (y = z @ B)")
    if layout is None and in_dim == out_dim:
        if m.shape != (in_dim, in_dim):
            raise IntegrityError(f"{source}: B has shape {m.shape}, but mapping {in_dim}-d embeddings to {out_dim}-d needs ({out_dim}, {in_dim})")
        raise IntegrityError(
            f"{source}: B is square ({in_dim} x {in_dim}), so its shape cannot tell which way it maps; say how it is laid "
            "out with --aligner-layout out_in (y = B z, torch.nn.Linear's weight) or --aligner-layout in_out (y = z @ B)"
        )
    if layout is None:
        layout = "out_in" if m.shape == need["out_in"] else "in_out" if m.shape == need["in_out"] else None
        if layout is None:
            raise IntegrityError(
                f"{source}: B has shape {m.shape}, but mapping {in_dim}-d embeddings to {out_dim}-d needs "
                f"({out_dim}, {in_dim}) or ({in_dim}, {out_dim})"
            )
    if m.shape != need[layout]:
        raise IntegrityError(
            f"{source}: B has shape {m.shape}, but layout {layout} mapping {in_dim}-d embeddings to {out_dim}-d needs {need[layout]}"
        )
    w = m if layout == "out_in" else m.T
    return Affine(np.ascontiguousarray(w, dtype=np.float32), None if bias is None else np.asarray(bias, np.float32))


def has_spec(data: bytes) -> bool:
    """Whether safetensors bytes carry raybc's transform metadata (then the layout is known)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return SPEC_METADATA_KEY in (json.loads(data[8 : 8 + n]).get("__metadata__") or {})
    except (ValueError, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------- composition


def compose_steps(steps: Sequence[Transform]) -> list[Transform]:
    """Fuse every run of consecutive affine steps into one (float64); keep non-linear steps.

    ``steps`` are in application order (B_k first). Dimensions must chain.
    """
    out: list[Transform] = []
    for i, s in enumerate(steps):
        if i and steps[i - 1].out_dim != s.in_dim:
            raise ValueError(f"step {i} expects {s.in_dim}-d input but step {i - 1} outputs {steps[i - 1].out_dim}-d")
        if s.is_affine and out and out[-1].is_affine:
            out[-1] = out[-1].then(s)  # type: ignore[union-attr]
        elif s.is_affine:
            out.append(Affine(np.asarray(s.weight, np.float64), None if s.bias is None else np.asarray(s.bias, np.float64)))  # type: ignore[attr-defined]
        else:
            out.append(s)
    return out


def apply_steps(steps: Sequence[Transform], x: np.ndarray, *, dtype: Any = np.float64) -> np.ndarray:
    """Reference: apply each step in turn, in ``dtype`` (float64: the parity reference)."""
    y = np.asarray(x, dtype=dtype)
    for s in steps:
        y = s.apply(y)
    return y


class Scratch:
    """Buffers reused batch after batch by a streaming loop (``FanOutPlan.apply(..., scratch=)``).

    A fresh (65536, 192) float32 result is 50 MB: above glibc's mmap threshold, so every batch
    would map new pages and fault them in, which costs about as much as a tenth of the matmul here.
    """

    def __init__(self) -> None:
        self._bufs: dict[Any, np.ndarray] = {}

    def get(self, key: Any, rows: int, cols: int, dtype: Any = np.float32) -> np.ndarray:
        """A C-contiguous (rows, cols) array; its contents are whatever the last user left."""
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._bufs[key] = np.empty((rows, cols), dtype=dtype)
        return buf[:rows]


@dataclass
class _Base:
    """Outputs computed from one base tensor with one stacked matmul."""

    in_dim: int
    # (name, affine from base) for each output; name is a target version or "next" (input to a non-linear step)
    outputs: list[tuple[Any, Affine]] = field(default_factory=list)
    nonlinear: Transform | None = None  # applied to the "next" output to form the following base
    # Filled by finalize(): stacked float32 weights (in_dim, sum out) and per-output slices/biases
    stacked: np.ndarray | None = None
    slices: list[tuple[Any, slice, np.ndarray | None]] = field(default_factory=list)

    def finalize(self) -> None:
        mats, col = [], 0
        for name, a in self.outputs:
            mats.append(a.weight.astype(np.float64))
            bias = None if a.bias is None else a.bias.astype(np.float32)
            self.slices.append((name, slice(col, col + a.out_dim), bias))
            col += a.out_dim
        if mats:
            self.stacked = np.ascontiguousarray(np.concatenate(mats, axis=0).T.astype(np.float32))


class FanOutPlan:
    """Everything needed to turn a batch of z_k into every requested version j < k in one pass.

    ``steps`` maps each version v in (min target, k] to B_v (v -> v-1). ``apply`` returns
    ``{j: array (n, d_j) float32}``; each array is a separate, C-contiguous buffer.
    """

    def __init__(self, source_version: int, targets: Sequence[int], steps: Mapping[int, Transform]):
        targets = sorted(set(int(t) for t in targets), reverse=True)
        if not targets:
            raise ValueError("a plan needs at least one target version")
        if targets[0] >= source_version or targets[-1] < 0:
            raise ValueError(f"targets must lie in [0, {source_version}), got {sorted(targets)}")
        missing = [v for v in range(source_version, targets[-1], -1) if v not in steps]
        if missing:
            raise ValueError(f"no backward transform for version(s) {missing}")
        self.source_version = source_version
        self.targets = sorted(targets)
        self.in_dim = steps[source_version].in_dim
        self.out_dims: dict[int, int] = {}
        self._bases: list[_Base] = []

        base = _Base(in_dim=self.in_dim)
        acc: Affine | None = None  # affine map from the current base to the current version; None = identity
        dim = self.in_dim
        wanted = set(targets)
        for v in range(source_version, targets[-1], -1):
            step = steps[v]
            if step.in_dim != dim:
                raise ValueError(f"B_{v} expects {step.in_dim}-d input, but version {v} has {dim}-d embeddings")
            if step.is_affine:
                acc = step if acc is None else acc.then(step)  # type: ignore[arg-type]
            else:
                base.outputs.append(("next", acc if acc is not None else Affine.identity(dim)))
                base.nonlinear = step
                self._bases.append(base)
                base, acc = _Base(in_dim=step.out_dim), None
            dim = step.out_dim
            if v - 1 in wanted:
                self.out_dims[v - 1] = dim
                base.outputs.append((v - 1, acc if acc is not None else Affine.identity(dim)))
        self._bases.append(base)
        for b in self._bases:
            b.finalize()

    @property
    def matmul_count(self) -> int:
        """Number of matmuls per batch outside non-linear steps (1 for an all-linear chain)."""
        return sum(1 for b in self._bases if b.stacked is not None)

    def apply(self, z: np.ndarray, *, scratch: Scratch | None = None) -> dict[int, np.ndarray]:
        """``{j: (n, d_j) float32}``. With ``scratch``, the arrays live in its reused buffers and are
        overwritten by the next call with the same scratch (a streaming loop writes them first)."""
        if z.ndim != 2 or z.shape[1] != self.in_dim:
            raise ValueError(f"expected a (n, {self.in_dim}) batch of v{self.source_version} embeddings, got {z.shape}")
        x = np.asarray(z, dtype=np.float32)
        n = x.shape[0]
        out: dict[int, np.ndarray] = {}
        for i, b in enumerate(self._bases):
            nxt = None
            if b.stacked is not None:
                # one GEMM for every output of this base
                y = x @ b.stacked if scratch is None else np.matmul(x, b.stacked, out=scratch.get((i, "y"), n, b.stacked.shape[1]))
                for name, sl, bias in b.slices:
                    if len(b.slices) == 1:
                        part = y  # the one output is all of y
                    elif scratch is None:
                        part = np.ascontiguousarray(y[:, sl])
                    else:
                        part = scratch.get((i, name), n, sl.stop - sl.start)
                        np.copyto(part, y[:, sl])
                    if bias is not None:
                        part += bias
                    if name == "next":
                        nxt = part
                    else:
                        out[name] = part
            if b.nonlinear is not None:
                x = b.nonlinear.apply(nxt if nxt is not None else x)
        return out

    def __call__(self, z: np.ndarray) -> dict[int, np.ndarray]:
        return self.apply(z)


def chain_steps(steps: Mapping[int, Transform], source_version: int, target_version: int) -> list[Transform]:
    """[B_k, B_{k-1}, ..., B_{j+1}] in application order."""
    return [steps[v] for v in range(source_version, target_version, -1)]
