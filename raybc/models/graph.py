"""The user-item graph a model runs on, and its sparse mean aggregation.

Users and items share one node space: users are 0..n_users-1, items n_users..n_users+n_items-1.
Edges are the version's training edges, both directions. A graph may hold only a subset of the
data set's users and items (``users=`` / ``items=`` of :meth:`BipartiteGraph.build`: the authors'
graph holds only the nodes seen so far): the model then runs on the compact node space, and
:meth:`BipartiteGraph.expand` scatters its output back to the data set's indices, with zeros for
the nodes not in the graph, so every caller indexes embeddings by the data set's indices either way. Mean aggregation is a row-normalised
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
    # Subset graphs only: the data set's index of each graph user / item, and the data set's sizes.
    user_index: torch.Tensor | None = None
    item_index: torch.Tensor | None = None
    n_users_total: int | None = None
    n_items_total: int | None = None

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    @property
    def users_out(self) -> int:
        """Rows of the user embeddings a model returns (the data set's users)."""
        return self.n_users if self.n_users_total is None else self.n_users_total

    @property
    def items_out(self) -> int:
        return self.n_items if self.n_items_total is None else self.n_items_total

    def expand(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(graph users, d), (graph items, d) -> rows at the data set's indices (zeros elsewhere)."""
        if self.user_index is None or self.item_index is None:
            return users, items
        u = users.new_zeros((self.users_out, users.shape[1])).index_copy(0, self.user_index, users)
        i = items.new_zeros((self.items_out, items.shape[1])).index_copy(0, self.item_index, items)
        return u, i

    @staticmethod
    def build(
        *,
        n_users: int,
        n_items: int,
        edge_user: np.ndarray,
        edge_item: np.ndarray,
        item_attr_indptr: np.ndarray,
        item_attr_indices: np.ndarray,
        users: np.ndarray | None = None,
        items: np.ndarray | None = None,
    ) -> BipartiteGraph:
        """From training edges (internal indices) and the items' attribute CSR.

        ``users`` / ``items`` (sorted data-set indices, both or neither): build the graph over these
        nodes only; every edge must join two of them.
        """
        subset = None
        if (users is None) != (items is None):
            raise ValueError("give both users and items for a subset graph, or neither")
        if users is not None and items is not None:
            users = np.asarray(users, dtype=np.int64)
            items = np.asarray(items, dtype=np.int64)
            eu = np.searchsorted(users, np.asarray(edge_user, dtype=np.int64))
            ei = np.searchsorted(items, np.asarray(edge_item, dtype=np.int64))
            ok_u = (eu < len(users)) & (users[np.minimum(eu, len(users) - 1)] == edge_user)
            ok_i = (ei < len(items)) & (items[np.minimum(ei, len(items) - 1)] == edge_item)
            if not (ok_u.all() and ok_i.all()):
                raise ValueError("every training edge must join a user and an item of the subset graph")
            indptr_full = np.asarray(item_attr_indptr, dtype=np.int64)
            if len(indptr_full) != n_items + 1:
                raise ValueError(f"item attribute indptr has {len(indptr_full)} entries, expected n_items + 1 = {n_items + 1}")
            lens = indptr_full[items + 1] - indptr_full[items]
            item_attr_indptr = np.concatenate([[0], np.cumsum(lens)])
            # position of every kept attribute in the full list: its item's start + its rank within the item
            take = np.repeat(indptr_full[items] - item_attr_indptr[:-1], lens) + np.arange(item_attr_indptr[-1])
            item_attr_indices = np.asarray(item_attr_indices, dtype=np.int64)[take]
            subset = (users, items, n_users, n_items)
            n_users, n_items, edge_user, edge_item = len(users), len(items), eu, ei
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
        g = BipartiteGraph(
            n_users=n_users,
            n_items=n_items,
            adj=adj,
            adj_t=adj_t,
            attr_indices=torch.from_numpy(np.asarray(item_attr_indices, dtype=np.int64)),
            attr_offsets=torch.from_numpy(indptr[:-1].copy()),
        )
        if subset is not None:
            g.user_index, g.item_index = torch.from_numpy(subset[0]), torch.from_numpy(subset[1])
            g.n_users_total, g.n_items_total = subset[2], subset[3]
        return g

    def mean_neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) node features -> (N, d) mean over each node's neighbours (0 for isolated nodes)."""
        return _MeanAggregate.apply(self.adj, self.adj_t, x)

    def to(self, device: torch.device | str) -> BipartiteGraph:
        idx = [None if t is None else t.to(device) for t in (self.user_index, self.item_index)]
        return BipartiteGraph(
            self.n_users, self.n_items, self.adj.to(device), self.adj_t.to(device),
            self.attr_indices.to(device), self.attr_offsets.to(device), idx[0], idx[1], self.n_users_total, self.n_items_total,
        )  # fmt: skip
