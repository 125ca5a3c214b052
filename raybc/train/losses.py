"""Losses: BPR for the intended task and the alignment losses of the paper.

Shapes: embeddings are (batch, d). Alignment is computed per node group (users, positive items,
negative items), one MSE each, summed -- as in the authors' code -- and the multi-step loss
averages that over every historical space (DESIGN.md). The alignment losses are those of the
public :mod:`raybc.alignment` (the same code a team uses in its own loop), under the names and
argument order raybc's training has always used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from raybc.alignment import multi_step_loss, prefix_loss, single_step_loss


def bpr_loss(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, weight_decay: float) -> torch.Tensor:
    """mean softplus(s(u,i-) - s(u,i+)) + weight_decay * L2 of the batch embeddings / 2."""
    s_pos = (u * pos).sum(-1)
    s_neg = (u * neg).sum(-1)
    reg = (u.pow(2).sum(-1) + pos.pow(2).sum(-1) + neg.pow(2).sum(-1)).mean() / 2
    return F.softplus(s_neg - s_pos).mean() + weight_decay * reg


def prefix_alignment(z_k: Sequence[torch.Tensor], z_prev: Sequence[torch.Tensor]) -> torch.Tensor:
    """BCT (joint-notrans): pull the first d_{k-1} dims of z_k onto z_{k-1}, per group, summed."""
    return prefix_loss(z_k, z_prev)


def single_step_alignment(b_k: torch.nn.Module, z_k: Sequence[torch.Tensor], z_prev: Sequence[torch.Tensor]) -> torch.Tensor:
    """MSE(z_{k-1}, B_k z_k), per group, summed."""
    return single_step_loss(b_k, z_k, z_prev)


def multi_step_alignment(
    b_k: torch.nn.Module, frozen: Sequence[torch.Tensor], z_k: Sequence[torch.Tensor], z_prev: Sequence[torch.Tensor]
) -> torch.Tensor:
    """d = z_{k-1} - B_k z_k carried through frozen B_{k-1}, ..., B_1; mean over the k stages.

    ``frozen`` holds the weights [W_{k-1}, ..., W_1] (each (d_{j-1}, d_j)) or frozen modules; see
    :func:`raybc.alignment.multi_step_loss`.
    """
    return multi_step_loss(b_k, z_k, z_prev, frozen)
