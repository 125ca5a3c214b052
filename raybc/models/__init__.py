"""Embedding models: the paper's PinSAGE-style GNN and a matrix-factorisation baseline.

Both take a :class:`~raybc.models.graph.BipartiteGraph` and return (user, item) embeddings for
every node of it. Each model carries its constructor arguments (``spec()``) so a version can be
rebuilt from its registry entry alone (:func:`build_model`).
"""

from raybc.models.gnn import PinSageGNN
from raybc.models.graph import BipartiteGraph
from raybc.models.mf import MatrixFactorization

MODELS = {"gnn": PinSageGNN, "mf": MatrixFactorization}


def build_model(spec: dict):
    """A model from its spec (``model.spec()``); the inverse of saving it with its weights."""
    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch not in MODELS:
        raise ValueError(f"unknown model architecture {arch!r}; expected one of {sorted(MODELS)}")
    return MODELS[arch](**spec)


__all__ = ["BipartiteGraph", "MODELS", "MatrixFactorization", "PinSageGNN", "build_model"]
