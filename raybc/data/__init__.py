"""Data sets: interaction data (MovieLens-100K, the paper's Amazon format, synthetic), temporal
slicing into versions, and synthetic embedding tables and registries.

:func:`load_dataset` turns the data-set names jobs accept into :class:`InteractionData`:
``movielens-100k``, ``amazon:REVIEWS[,META]`` (paths of the gzip JSON-lines files) and
``synthetic[:USERS,ITEMS,EDGES]``.
"""

from __future__ import annotations

from raybc.errors import ConfigError

DATASET_HELP = "movielens-100k | amazon:REVIEWS.json.gz[,META.json.gz] | synthetic[:USERS,ITEMS,EDGES]"


def load_dataset(spec: str, *, seed: int = 0):
    """The interaction data named by ``spec`` (see :data:`DATASET_HELP`)."""
    name, _, arg = spec.partition(":")
    if name == "movielens-100k" and not arg:
        from raybc.data.movielens import load_movielens_100k

        return load_movielens_100k()
    if name == "amazon" and arg:
        from raybc.data.amazon import load_amazon

        reviews, _, meta = arg.partition(",")
        return load_amazon(reviews, meta or None)
    if name == "synthetic":
        from raybc.data.interactions import synthetic_interactions

        sizes = (1000, 600, 20_000)
        if arg:
            try:
                sizes = tuple(int(x) for x in arg.split(","))
                assert len(sizes) == 3 and min(sizes) > 0
            except (ValueError, AssertionError):
                raise ConfigError([f"dataset: {spec!r}: expected synthetic:USERS,ITEMS,EDGES with positive integers"]) from None
        return synthetic_interactions(n_users=sizes[0], n_items=sizes[1], n_edges=sizes[2], seed=seed)
    raise ConfigError([f"dataset: unknown data set {spec!r}; expected {DATASET_HELP}"])
