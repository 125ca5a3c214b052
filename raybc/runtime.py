"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand.

``ray job submit`` sets ``RAY_ADDRESS`` for the entry point, so jobs join their cluster. Run
directly, a job starts a local Ray with ``address="local"``: a stale ``/tmp/ray`` session file or a
leaked address must not make it wait on a cluster that is gone.
"""

from __future__ import annotations

import os
from typing import Any

import ray


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Initialise Ray once: ``address``, else ``$RAY_ADDRESS``, else a new local cluster."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": target, "log_to_driver": True}
    if target == "local":
        kwargs["include_dashboard"] = False
    else:
        # an existing cluster has its resources; Ray refuses num_cpus & co. when joining one
        init_kwargs = {k: v for k, v in init_kwargs.items() if k not in _LOCAL_ONLY}
    kwargs.update({k: v for k, v in init_kwargs.items() if v is not None})
    ray.init(**kwargs)


# ray.init arguments that only apply when starting a new local Ray.
_LOCAL_ONLY = {"num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard"}
