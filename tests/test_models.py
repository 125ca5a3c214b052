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


# --------------------------------------------------------------------------- the authors' options, widening


def test_subset_graph_embeds_its_nodes_like_the_full_graph_and_zeros_the_rest():
    """A graph of the seen nodes only (graph_nodes: seen): in eval mode a node's embedding depends on
    its neighbourhood alone, so the nodes present get exactly the full graph's embeddings, the others
    zeros; in train mode BatchNorm's statistics see only the present nodes (the point of the option)."""
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 20
    users, items = np.arange(0, 30, 2), np.arange(0, 20, 2)  # every other node present
    eu, ei = rng.choice(users, 80), rng.choice(items, 80)
    per_item = rng.integers(0, 3, n_items)
    indptr = np.concatenate([[0], np.cumsum(per_item)])
    attrs = rng.integers(0, 6, indptr[-1])
    common = dict(n_users=n_users, n_items=n_items, edge_user=eu, edge_item=ei, item_attr_indptr=indptr, item_attr_indices=attrs)
    full, sub = BipartiteGraph.build(**common), BipartiteGraph.build(**common, users=users, items=items)
    assert (sub.n_users, sub.n_items, sub.users_out, sub.items_out) == (15, 10, 30, 20)
    torch.manual_seed(0)
    m = PinSageGNN(n_attributes=6, dim=8, layers=2, final_norm=True)
    m.train()
    m(full)  # move the running statistics away from their initial values
    m.eval()
    uf, i_f = m(full)
    us, i_s = m(sub)
    assert us.shape == (30, 8) and i_s.shape == (20, 8)
    torch.testing.assert_close(us[users], uf[users])
    torch.testing.assert_close(i_s[items], i_f[items])
    absent_u, absent_i = np.setdiff1d(np.arange(30), users), np.setdiff1d(np.arange(20), items)
    assert float(us[absent_u].abs().max()) == 0.0 and float(i_s[absent_i].abs().max()) == 0.0
    m.train()  # train mode: the final BatchNorm normalises over the graph's nodes only
    us_t, is_t = m(sub)
    h = torch.cat([us_t[users], is_t[items]])
    torch.testing.assert_close(h.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="every training edge must join"):
        BipartiteGraph.build(**{**common, "edge_user": np.array([1]), "edge_item": np.array([0])}, users=users, items=items)


def test_final_norm_is_in_the_spec_and_old_specs_rebuild_without_it():
    with_norm = PinSageGNN(n_attributes=4, dim=6, layers=2, final_norm=True)
    without = build_model({"arch": "gnn", "n_attributes": 4, "dim": 6, "layers": 2})  # a spec written before the option
    assert with_norm.spec()["final_norm"] is True and "final_norm" not in without.spec()
    assert len(with_norm.norms) == 2 and len(without.norms) == 1
    assert build_model(with_norm.spec()).final_norm is True


@pytest.mark.parametrize("final_norm", [False, True])
def test_widened_model_computes_the_old_embeddings_padded_with_near_zeros(final_norm):
    from raybc.errors import ConfigError
    from raybc.models.widen import widen_state

    g = small_graph()
    torch.manual_seed(0)
    old = PinSageGNN(n_attributes=6, dim=8, layers=2, final_norm=final_norm)
    old.train()
    old(g)  # running statistics away from their initial values
    old.eval()
    new = PinSageGNN(n_attributes=6, dim=11, layers=2, final_norm=final_norm)
    new.load_state_dict(widen_state(old.state_dict(), new.state_dict(), seed=1))
    new.eval()
    with torch.no_grad():
        (u0, i0), (u1, i1) = old(g), new(g)
    z0, z1 = torch.cat([u0, i0]), torch.cat([u1, i1])
    torch.testing.assert_close(z1[:, :8], z0, rtol=0, atol=1e-6)  # the old dimensions: exactly M_{k-1}
    new_part = z1[:, 8:].pow(2).sum() / z0.pow(2).sum()
    assert 0 < float(new_part) < 1e-4, float(new_part)  # the new ones: near zero, but not the zero saddle
    with pytest.raises(ConfigError, match="same architecture"):
        widen_state(old.state_dict(), PinSageGNN(n_attributes=6, dim=11, layers=3, final_norm=final_norm).state_dict())
    with pytest.raises(ConfigError, match="dimensions may only grow"):
        widen_state(new.state_dict(), old.state_dict())
