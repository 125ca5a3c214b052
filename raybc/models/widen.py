"""Widen a trained model to more embedding dimensions without changing what it computes.

The warm start of ``bc-aligner-warm``: M_k starts as M_{k-1} with its d_{k-1} dimensions copied
and the new ones near zero, so z_k = [z_{k-1}, ~0] and B_k = [I 0] maps it back exactly: the
alignment loss starts at (almost) zero instead of at an unrelated random space.

Exact zeros would be a saddle point: a score u . i gets no gradient in the new dimensions while
both sides are zero there, so they would never grow. The new entries are therefore small random
values (``noise``), except the block that feeds new inputs into old outputs (kept at zero, so the
old dimensions keep computing exactly what M_{k-1} computed until training moves them), biases
(zero) and BatchNorm running statistics (mean 0, variance 1, as fresh ones).

Works on state dicts of the same architecture (``PinSageGNN``, ``MatrixFactorization``): each
tensor is copied into the leading slice of its wider counterpart. This module does not train.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from raybc.errors import ConfigError

# Scale of the new entries: ~1% of the GNN's initial scale (0.1): small enough that z_k starts
# within ~1e-4 relative squared error of [z_{k-1}, 0], large enough to leave the saddle at zero.
WIDEN_NOISE = 1e-3


def widen_state(
    old: Mapping[str, torch.Tensor], new_template: Mapping[str, torch.Tensor], *, noise: float = WIDEN_NOISE, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A state dict shaped like ``new_template`` that holds ``old`` in its leading slices.

    ``new_template`` is the state dict of a freshly built wider model (only shapes and dtypes are
    read). Keys must match; every dimension may only grow.
    """
    problems = []
    if set(old) != set(new_template):
        only_old, only_new = sorted(set(old) - set(new_template)), sorted(set(new_template) - set(old))
        problems.append(
            f"the previous model's tensors {only_old} and the new model's {only_new} differ; warm start needs the same "
            "architecture (same layers, same final_norm) at both versions"
        )
    else:
        for k, t in new_template.items():
            if t.numel() == 1 and torch.as_tensor(old[k]).numel() == 1:
                continue  # scalars (BatchNorm's num_batches_tracked; stored as shape (1,) by the registry)
            if t.dim() != old[k].dim() or any(a < b for a, b in zip(t.shape, old[k].shape)):
                problems.append(f"{k}: shape {tuple(old[k].shape)} cannot grow into {tuple(t.shape)}; dimensions may only grow")
    if problems:
        raise ConfigError(problems, source="warm start (raybc.models.widen)")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, t in new_template.items():
        o = torch.as_tensor(old[k])
        if t.numel() == 1 and o.numel() == 1:
            out[k] = o.reshape(t.shape).clone().to(t.dtype)
            continue
        if tuple(t.shape) == tuple(o.shape):
            out[k] = o.clone().to(t.dtype)
            continue
        leaf = k.rsplit(".", 1)[-1]
        if leaf == "running_var":
            w = torch.ones(t.shape, dtype=t.dtype)
        elif leaf in ("running_mean", "bias") or k == "item_bias":
            w = torch.zeros(t.shape, dtype=t.dtype)
        else:
            w = (torch.randn(t.shape, generator=g) * noise).to(t.dtype)
        w[tuple(slice(0, n) for n in o.shape)] = o.to(t.dtype)
        if t.dim() == 2 and leaf == "weight" and "lin" in k:
            w[: o.shape[0], o.shape[1] :] = 0  # new inputs do not feed old outputs (nn.Linear: (out, in))
        out[k] = w
    return out


__all__ = ["WIDEN_NOISE", "widen_state"]
