"""The paper's embedding model: a PinSAGE-style GNN over the user-item graph.

Items start from an encoder of their attributes (a bag of attribute embeddings, averaged); users
start from one shared learned vector, so the model is inductive: it embeds users and items it
never saw, given the graph. Then ``layers`` times: SAGE(mean) -> BatchNorm -> ReLU. The last layer
has no ReLU; it keeps its BatchNorm when ``final_norm`` is set (the authors' ``pinsage.py``) and has
none otherwise (raybc's first models: ``final_norm=False``, the default here so that their
registry entries, whose specs lack the field, rebuild as they were trained).
SAGE(mean): h' = W_self h + W_neigh mean_{v in N(u)} h_v.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raybc.models.graph import BipartiteGraph


class PinSageGNN(nn.Module):
    def __init__(self, *, n_attributes: int, dim: int, layers: int = 2, final_norm: bool = False):
        super().__init__()
        if n_attributes <= 0 or dim <= 0 or layers <= 0:
            raise ValueError(f"n_attributes, dim and layers must be positive, got {n_attributes}, {dim}, {layers}")
        self.n_attributes, self.dim, self.layers, self.final_norm = n_attributes, dim, layers, bool(final_norm)
        self.item_encoder = nn.EmbeddingBag(n_attributes, dim, mode="mean")
        self.item_bias = nn.Parameter(torch.zeros(dim))  # items without attributes start here
        self.user_init = nn.Parameter(torch.randn(dim) * 0.1)
        self.self_lin = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.neigh_lin = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(dim) for _ in range(layers if self.final_norm else layers - 1))
        nn.init.normal_(self.item_encoder.weight, std=0.1)

    def spec(self) -> dict[str, Any]:
        spec = {"arch": "gnn", "n_attributes": self.n_attributes, "dim": self.dim, "layers": self.layers}
        if self.final_norm:  # absent means False: specs written before the option rebuild unchanged
            spec["final_norm"] = True
        return spec

    def forward(self, g: BipartiteGraph) -> tuple[torch.Tensor, torch.Tensor]:
        items = self.item_encoder(g.attr_indices, g.attr_offsets) + self.item_bias  # (n_items, d)
        users = self.user_init.expand(g.n_users, self.dim)
        h = torch.cat([users, items], dim=0)  # (N, d)
        for layer in range(self.layers):
            h = self.self_lin[layer](h) + self.neigh_lin[layer](g.mean_neighbours(h))
            if layer < len(self.norms):
                h = self.norms[layer](h)
            if layer < self.layers - 1:
                h = torch.relu(h)
        return g.expand(h[: g.n_users], h[g.n_users :])
