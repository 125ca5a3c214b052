"""The user-item graph a model runs on, and its sparse mean aggregation.

Users and items share one node space: users are 0..n_users-1, items n_users..n_users+n_items-1.
Edges are the version's training edges, both directions. Mean aggregation is a row-normalised
adjacency A (CSR) times the node features; its backward pass needs A^T, which is stored
explicitly as a second CSR matrix: a CSR product with a stored transpose ran ~6x faster than
``torch.sparse.mm`` on COO for forward+backward on this kind of machine (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> torch.Tensor:
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = np.zeros(n + 1, dtype=np.int64)
    np.add.at(crow, rows + 1, 1)
    crow = np.cumsum(crow)
    return torch.sparse_csr_tensor(
        torch.from_numpy(crow), torch.from_numpy(cols.astype(np.int64)), torch.from_numpy(vals.astype(np.float32)), (n, n)
    )


class _MeanAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj: torch.Tensor, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(adj_t)
        return adj @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (adj_t,) = ctx.saved_tensors
        return None, None, adj_t @ grad


@dataclass
class BipartiteGraph:
    """Nodes, item attributes and the normalised adjacency (and its transpose) of one version."""

    n_users: int
    n_items: int
    adj: torch.Tensor  # (N, N) CSR, row-normalised: mean over neighbours
    adj_t: torch.Tensor  # its transpose, CSR
    attr_indices: torch.Tensor  # int64, item attributes flattened
    attr_offsets: torch.Tensor  # int64 (n_items,), start of each item's attributes in attr_indices

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    @staticmethod
    def build(
        *,
        n_users: int,
        n_items: int,
        edge_user: np.ndarray,
        edge_item: np.ndarray,
        item_attr_indptr: np.ndarray,
        item_attr_indices: np.ndarray,
    ) -> BipartiteGraph:
        """From training edges (internal indices) and the items' attribute CSR."""
        n = n_users + n_items
        u = np.asarray(edge_user, dtype=np.int64)
        i = np.asarray(edge_item, dtype=np.int64) + n_users
        rows = np.concatenate([u, i])
        cols = np.concatenate([i, u])
        # duplicate edges (a user rating an item twice) count once
        key = np.unique(rows * n + cols)
        rows, cols = key // n, key % n
        deg = np.bincount(rows, minlength=n).astype(np.float64)
        vals = (1.0 / deg[rows]).astype(np.float32)
        adj = _csr(rows, cols, vals, n)
        adj_t = _csr(cols, rows, vals, n)
        indptr = np.asarray(item_attr_indptr, dtype=np.int64)
        if len(indptr) != n_items + 1:
            raise ValueError(f"item attribute indptr has {len(indptr)} entries, expected n_items + 1 = {n_items + 1}")
        return BipartiteGraph(
            n_users=n_users,
            n_items=n_items,
            adj=adj,
            adj_t=adj_t,
            attr_indices=torch.from_numpy(np.asarray(item_attr_indices, dtype=np.int64)),
            attr_offsets=torch.from_numpy(indptr[:-1].copy()),
        )

    def mean_neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) node features -> (N, d) mean over each node's neighbours (0 for isolated nodes)."""
        return _MeanAggregate.apply(self.adj, self.adj_t, x)

    def to(self, device: torch.device | str) -> BipartiteGraph:
        return BipartiteGraph(
            self.n_users, self.n_items, self.adj.to(device), self.adj_t.to(device),
            self.attr_indices.to(device), self.attr_offsets.to(device),
        )  # fmt: skip
