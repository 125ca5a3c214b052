"""Matrix factorisation: one free vector per user and item, for very large synthetic runs.

Not inductive (a node needs its own row), cheap per step, and the same interface as the GNN so
every method and the Ray Train loop treat it alike. Tables are sized for the whole data set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raybc.models.graph import BipartiteGraph


class MatrixFactorization(nn.Module):
    def __init__(self, *, n_users: int, n_items: int, dim: int):
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def spec(self) -> dict[str, Any]:
        return {"arch": "mf", "n_users": self.n_users, "n_items": self.n_items, "dim": self.dim}

    def forward(self, g: BipartiteGraph) -> tuple[torch.Tensor, torch.Tensor]:
        if g.users_out > self.n_users or g.items_out > self.n_items:
            raise ValueError(f"graph has {g.users_out} users / {g.items_out} items; this model holds {self.n_users} / {self.n_items}")
        return self.user.weight[: g.users_out], self.item.weight[: g.items_out]
