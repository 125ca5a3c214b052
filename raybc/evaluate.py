"""Evaluation: Recall@K of the intended task and alignment errors between versions.

Recall@K (the intended task): for each validation user, score every item of the graph by the dot
product of their embeddings, exclude the user's known positives (training edges), take the top K,
and count the share of the user's validation items found there; average over validation users.

This module holds metrics only; consumer tasks and reports (issue 4) build on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS = (10, 20, 50, 100)
# Users scored per matmul: bounds the (users x items) score matrix to a few hundred MB.
_USER_CHUNK = 1024


def recall_at_k(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    *,
    val_user: np.ndarray,
    val_item: np.ndarray,
    known_user: np.ndarray,
    known_item: np.ndarray,
    candidate_items: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Mean Recall@K over users with validation edges; returns {"recall@10": ..., "val_users": n}."""
    ks = sorted(ks)
    users = np.unique(val_user)
    if users.size == 0:
        return {**{f"recall@{k}": float("nan") for k in ks}, "val_users": 0}
    cand = torch.as_tensor(np.asarray(candidate_items, dtype=np.int64))
    n_items = item_emb.shape[0]
    # map item index -> column among candidates (-1 if not a candidate)
    col = torch.full((n_items,), -1, dtype=torch.long)
    col[cand] = torch.arange(len(cand))
    items = item_emb[cand].float()
    kmax = min(ks[-1], len(cand))
    hits = {k: [] for k in ks}
    val_order = np.argsort(val_user, kind="stable")
    vu, vi = val_user[val_order], val_item[val_order]
    known_order = np.argsort(known_user, kind="stable")
    ku, ki = known_user[known_order], known_item[known_order]
    for start in range(0, len(users), _USER_CHUNK):
        chunk = users[start : start + _USER_CHUNK]
        scores = user_emb[torch.as_tensor(chunk)].float() @ items.T  # (c, n_cand)
        # exclude known positives
        lo, hi = np.searchsorted(ku, chunk, "left"), np.searchsorted(ku, chunk, "right")
        for r, (a, b) in enumerate(zip(lo, hi)):
            if b > a:
                cols = col[torch.as_tensor(ki[a:b])]
                scores[r, cols[cols >= 0]] = -torch.inf
        top = torch.topk(scores, kmax, dim=1).indices.numpy()  # (c, kmax) candidate columns
        top_items = np.asarray(cand)[top]
        lo, hi = np.searchsorted(vu, chunk, "left"), np.searchsorted(vu, chunk, "right")
        for r, (a, b) in enumerate(zip(lo, hi)):
            truth = np.unique(vi[a:b])
            for k in ks:
                hits[k].append(np.isin(truth, top_items[r, :k]).sum() / len(truth))
    return {**{f"recall@{k}": float(np.mean(hits[k])) for k in ks}, "val_users": int(len(users))}


def alignment_error(mapped: torch.Tensor, target: torch.Tensor) -> float:
    """Relative squared error ||mapped - target||^2 / ||target||^2 (0 = perfectly compatible)."""
    num = (mapped.double() - target.double()).pow(2).sum()
    den = target.double().pow(2).sum().clamp_min(1e-30)
    return float(num / den)
