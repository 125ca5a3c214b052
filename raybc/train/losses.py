"""Losses: BPR for the intended task and the alignment losses of the paper.

Shapes: embeddings are (batch, d). Alignment is computed per node group (users, positive items,
negative items), one MSE each, summed -- as in the authors' code -- and the multi-step loss
averages that over every historical space (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def bpr_loss(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, weight_decay: float) -> torch.Tensor:
    """mean softplus(s(u,i-) - s(u,i+)) + weight_decay * L2 of the batch embeddings / 2."""
    s_pos = (u * pos).sum(-1)
    s_neg = (u * neg).sum(-1)
    reg = (u.pow(2).sum(-1) + pos.pow(2).sum(-1) + neg.pow(2).sum(-1)).mean() / 2
    return F.softplus(s_neg - s_pos).mean() + weight_decay * reg


def prefix_alignment(z_k: Sequence[torch.Tensor], z_prev: Sequence[torch.Tensor]) -> torch.Tensor:
    """BCT (joint-notrans): pull the first d_{k-1} dims of z_k onto z_{k-1}, per group, summed."""
    return sum(F.mse_loss(a[:, : b.shape[1]], b) for a, b in zip(z_k, z_prev))


def single_step_alignment(b_k: torch.nn.Module, z_k: Sequence[torch.Tensor], z_prev: Sequence[torch.Tensor]) -> torch.Tensor:
    """MSE(z_{k-1}, B_k z_k), per group, summed."""
    return sum(F.mse_loss(b_k(a), b) for a, b in zip(z_k, z_prev))


def multi_step_alignment(
    b_k: torch.nn.Module, frozen: Sequence[torch.Tensor], z_k: Sequence[torch.Tensor], z_prev: Sequence[torch.Tensor]
) -> torch.Tensor:
    """d = z_{k-1} - B_k z_k carried through frozen B_{k-1}, ..., B_1; mean over the k stages.

    ``frozen`` holds the weights [W_{k-1}, ..., W_1] (each (d_{j-1}, d_j)); the stage in space j
    is the MSE of d mapped down to j, so the loss counts misalignment in every historical space.
    """
    total = 0.0
    for a, b in zip(z_k, z_prev):
        d = b - b_k(a)
        stages = [d.pow(2).mean()]
        for w in frozen:
            d = d @ w.T
            stages.append(d.pow(2).mean())
        total = total + torch.stack(stages).mean()
    return total
