"""raybc: backward-compatible embeddings (BC-Aligner, KDD 2022) trained and backfilled on Ray.

The public surface, by concept:

- storage:    :class:`Storage`, :class:`StorageOptions`   (any fsspec URI; atomic writes)
- registry:   :class:`Registry`                           (versions, weights, lineage)
- transforms: :class:`FanOutPlan` and the transform kinds  (composition and fusion)
- snapshots:  :class:`Snapshots`, :func:`read_snapshot`    (commit protocol, readers)
- backfill:   :func:`backfill`, :class:`BackfillOptions`   (the Ray Data pipeline)
- alignment:  :class:`BCLoss`, :func:`publish_version`     (the BC loss in your own training loop)

Heavy modules (Ray, torch) load on first use, so ``import raybc`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Storage": "raybc.storage",
    "StorageOptions": "raybc.storage",
    "Registry": "raybc.registry",
    "BackwardTransform": "raybc.registry",
    "FanOutPlan": "raybc.transforms",
    "Affine": "raybc.transforms",
    "Linear": "raybc.transforms",
    "ResidualMLP": "raybc.transforms",
    "Snapshots": "raybc.snapshots",
    "read_snapshot": "raybc.snapshots",
    "read_snapshot_dataset": "raybc.snapshots",
    "backfill": "raybc.backfill",
    "BackfillOptions": "raybc.backfill",
    "BackfillSummary": "raybc.backfill",
    "BCLoss": "raybc.alignment",
    "BackwardAligner": "raybc.alignment",
    "frozen_aligners": "raybc.alignment",
    "publish_version": "raybc.alignment",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raybc' has no attribute {name!r}")
