"""Embedding models: sparse mean aggregation against a dense reference, inductive GNN, rebuild from spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raybc.models import BipartiteGraph, MatrixFactorization, PinSageGNN, build_model


def small_graph(n_users=30, n_items=20, n_edges=120, n_attr=6, seed=0) -> BipartiteGraph:
    rng = np.random.default_rng(seed)
    per_item = rng.integers(0, 3, n_items)  # some items have no attributes
    indptr = np.concatenate([[0], np.cumsum(per_item)])
    return BipartiteGraph.build(
        n_users=n_users, n_items=n_items,
        edge_user=rng.integers(0, n_users, n_edges), edge_item=rng.integers(0, n_items, n_edges),
        item_attr_indptr=indptr, item_attr_indices=rng.integers(0, n_attr, indptr[-1]),
    )  # fmt: skip


def test_mean_aggregation_and_its_gradient_match_dense():
    g = small_graph()
    dense = g.adj.to_dense()
    # rows of the normalised adjacency average neighbours: each non-isolated row sums to 1
    sums = dense.sum(1)
    assert torch.allclose(sums[sums > 0], torch.ones_like(sums[sums > 0]))
    assert torch.allclose(g.adj_t.to_dense(), dense.T)
    x = torch.randn(g.n_nodes, 5, requires_grad=True)
    g.mean_neighbours(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (dense @ x2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_gnn_is_inductive_and_rebuilds_from_spec():
    torch.manual_seed(0)
    m = PinSageGNN(n_attributes=6, dim=8, layers=2)
    g_small, g_big = small_graph(), small_graph(n_users=50, n_items=40, n_edges=300, seed=1)
    m.eval()
    u, i = m(g_small)
    assert u.shape == (30, 8) and i.shape == (20, 8)
    u2, i2 = m(g_big)  # unseen users and items: same weights, bigger graph
    assert u2.shape == (50, 8) and i2.shape == (40, 8)
    clone = build_model(m.spec())
    clone.load_state_dict(m.state_dict())
    clone.eval()
    torch.testing.assert_close(clone(g_small)[0], u)


def planted_communities(seed: int, n_users: int = 40, n_items: int = 20, per_user: int = 4):
    """Two communities: even users rate only even items (attributes 0-2), odd users odd items (3-5).
    Each user rates ``per_user`` of its community's 10 items; the other 6 are held out."""
    rng = np.random.default_rng(seed)
    group_u, group_i = np.arange(n_users) % 2, np.arange(n_items) % 2
    edges = [(u, i) for u in range(n_users) for i in rng.choice(np.flatnonzero(group_i == group_u[u]), per_user, replace=False)]
    eu, ei = (np.array(c) for c in zip(*edges))
    attrs = rng.integers(0, 3, n_items) + 3 * group_i
    g = BipartiteGraph.build(
        n_users=n_users, n_items=n_items, edge_user=eu, edge_item=ei,
        item_attr_indptr=np.arange(n_items + 1), item_attr_indices=attrs,
    )  # fmt: skip
    return g, eu, ei, group_u, group_i


def held_out_auc(m, g, eu, ei, group_u, group_i) -> float:
    """Mean over users of P(score of an unseen item of its community > score of an item of the other)."""
    m.eval()
    with torch.no_grad():
        u, i = m(g)
    s = (u @ i.T).numpy()
    seen = set(zip(eu.tolist(), ei.tolist()))
    per_user = []
    for a in range(g.n_users):
        pos = [s[a, j] for j in range(g.n_items) if group_i[j] == group_u[a] and (a, j) not in seen]
        neg = [s[a, j] for j in range(g.n_items) if group_i[j] != group_u[a]]
        per_user.append(np.mean([p > n for p in pos for n in neg]))
    return float(np.mean(per_user))


def test_gnn_learns_structure_beyond_its_initial_state():
    from raybc.train.losses import bpr_loss

    g, eu, ei, group_u, group_i = planted_communities(seed=1)
    torch.manual_seed(1)
    m = PinSageGNN(n_attributes=6, dim=8, layers=1)
    before = held_out_auc(m, g, eu, ei, group_u, group_i)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    rng = np.random.default_rng(1)
    bu, bi = torch.as_tensor(eu), torch.as_tensor(ei)
    m.train()
    for _ in range(100):  # full-batch BPR on the rated edges only, uniform negatives
        u, i = m(g)
        loss = bpr_loss(u[bu], i[bi], i[torch.as_tensor(rng.integers(0, g.n_items, len(eu)))], weight_decay=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_auc(m, g, eu, ei, group_u, group_i)
    # untrained it ranks held-out items about at chance; trained, through the graph (a user is only
    # its neighbours) and the items' attributes, it ranks its community's unseen items first
    assert before < 0.7 and after > 0.95, (before, after)


def test_mf_refuses_a_graph_bigger_than_its_tables():
    m = MatrixFactorization(n_users=10, n_items=10, dim=4)
    with pytest.raises(ValueError, match="this model holds 10 / 10"):
        m(small_graph())
    assert build_model(m.spec()).dim == 4


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown model architecture 'transformer'"):
        build_model({"arch": "transformer"})
