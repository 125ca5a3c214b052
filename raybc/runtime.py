"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand.

``ray job submit`` sets ``RAY_ADDRESS`` for the entry point, so jobs join their cluster. Run
directly, a job starts a local Ray with ``address="local"``: a stale ``/tmp/ray`` session file or a
leaked address must not make it wait on a cluster that is gone.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import ray

# Ray's lines that mislead a raybc user, by logger: the backfill's Ray Data pipeline carries part
# keys, not rows ("2 rows and 68.0B data written" after 1.6M rows), and asks for CPUs while the
# previous step's tasks release theirs (the "will hang" warning); Ray Train logs every report.
_MUTED = {
    "ray.data.dataset": ("does not have any available CPUs", "Data sink %s finished"),
    "ray.train.v2._internal.execution.train_fn_utils": ("Reported metrics",),
}


class _Mute(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(t in str(record.msg) for t in self.texts)


def tame_ray_logs() -> None:
    """Drop Ray's misleading lines (above) in this process; idempotent. Workers call it too."""
    for name, texts in _MUTED.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, _Mute) for f in lg.filters):
            lg.addFilter(_Mute(texts))
    # log files get no colour codes: Ray colours worker-log prefixes unless told otherwise
    if not (sys.stderr.isatty() and sys.stdout.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def log_level() -> str | None:
    """``$RAYBC_LOG_LEVEL`` (debug, info, warning, error), for Ray's own logging; None: Ray's default."""
    v = os.environ.get("RAYBC_LOG_LEVEL", "").strip().upper()
    return v if v in ("DEBUG", "INFO", "WARNING", "ERROR") else None


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Initialise Ray once: ``address``, else ``$RAY_ADDRESS``, else a new local cluster."""
    tame_ray_logs()
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": target, "log_to_driver": True}
    if log_level() is not None:
        kwargs["logging_level"] = log_level()
    if target == "local":
        kwargs["include_dashboard"] = False
    else:
        # an existing cluster has its resources; Ray refuses num_cpus & co. when joining one
        init_kwargs = {k: v for k, v in init_kwargs.items() if k not in _LOCAL_ONLY}
    kwargs.update({k: v for k, v in init_kwargs.items() if v is not None})
    ray.init(**kwargs)


# ray.init arguments that only apply when starting a new local Ray.
_LOCAL_ONLY = {"num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard"}
