"""Connecting to Ray: the cluster a job was submitted to, or a local one started on demand.

``ray job submit`` sets ``RAY_ADDRESS`` for the entry point, so jobs join their cluster. Run
directly, a job starts a local Ray with ``address="local"``: a stale ``/tmp/ray`` session file or a
leaked address must not make it wait on a cluster that is gone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray

from raybc.errors import RaybcError

# Ray's lines that mislead a raybc user, by logger: the backfill's Ray Data pipeline carries part
# keys, not rows ("2 rows and 68.0B data written" after 1.6M rows), and asks for CPUs while the
# previous step's tasks release theirs (the "will hang" warning); with --quiet raybc turns the
# progress bars off itself (Ray Data would warn how to turn them on); Ray Train logs every report.
_MUTED = {
    "ray.data.dataset": ("does not have any available CPUs", "Data sink %s finished"),
    "ray.data._internal.progress": ("Progress bars disabled",),
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
    if quiet():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if log_level() is not None:
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(log_level())


class _NoFailureLog(logging.Filter):
    """Ray Data's console lines about a failed task ("An exception was raised from a task of
    operator", the task's traceback, "Failed to apply UDF transform", "Exception occurred in Ray
    Data or Ray Core internal code ... open an issue"): the pipeline re-raises that error to the
    driver, which reports it once. Ray Data's own log file in the session folder keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not str(record.msg).startswith(("Failed to apply UDF", "\nTo change retry"))


def quiet_pipeline_failures() -> None:
    """Keep Ray Data's failure lines off the console of this process (see :class:`_NoFailureLog`);
    idempotent. Called where raybc runs a Ray Data pipeline whose errors it re-raises itself."""
    from ray.data._internal.logging import configure_logging

    logger = logging.getLogger("ray.data")
    if not logger.handlers:
        configure_logging()  # Ray Data sets its handlers up on first use; filter them now
    for h in logger.handlers:
        if h.get_name() != "file" and not any(isinstance(f, _NoFailureLog) for f in h.filters):
            h.addFilter(_NoFailureLog())


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a KeyboardInterrupt that arrives inside the block until the block has finished, then raise it.

    Ray cancels a running task (Ray Data does, for the other tasks of a pipeline that failed) by
    raising KeyboardInterrupt in the worker's main thread, wherever it is. A first ``import torch``
    cut short that way leaves torch half-registered in a worker Ray keeps: every later import there
    fails ("Trying to override a python impl ... aten::broadcast_tensors") or crashes the worker,
    so later tasks fail long after the cancelled one (seen in CI, 2026-12-04). Outside the main
    thread nothing is deferred: Python runs signal handlers only there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


@functools.cache  # once whole, later calls (every batch) are a lookup, not two signal swaps
def import_torch() -> Any:
    """``import torch`` that a task cancellation cannot cut in half (:func:`interrupts_deferred`):
    for task code that imports torch lazily. A call that ends in the deferred KeyboardInterrupt is
    not cached; the next one finds torch whole."""
    with interrupts_deferred():
        import torch
    return torch


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def quiet() -> bool:
    """``raybc --quiet`` / ``$RAYBC_QUIET=1``: no progress bars or per-part/per-epoch lines; Ray warns only."""
    return os.environ.get("RAYBC_QUIET", "") == "1"


def log_level() -> str | None:
    """``raybc --log-level`` / ``$RAYBC_LOG_LEVEL`` for Ray's own logging (WARNING when quiet); None: Ray's default."""
    v = os.environ.get("RAYBC_LOG_LEVEL", "").strip().upper()
    return v if v in LOG_LEVELS else ("WARNING" if quiet() else None)

# How long a Ray address may take to answer before we say it is wrong. A live GCS answers the
# HTTP/2 preface in milliseconds even across regions; ray.init itself would wait minutes, printing
# only its own retry warnings, on an address that accepts connections but is not a Ray cluster.
RAY_PROBE_TIMEOUT_S = 10.0
# The client preface of HTTP/2 (what gRPC speaks) and an empty SETTINGS frame: a gRPC server such as
# Ray's GCS answers with a frame of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class RayAddressError(RaybcError):
    """A Ray address with no Ray cluster behind it: refused, unreachable, or silent."""


def probe_ray_address(address: str, *, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Check within ``timeout_s`` that ``host:port`` (or ``ray://host:port``) answers like a gRPC
    server (Ray's GCS or client server); raise :class:`RayAddressError` naming the address and
    what happened. Other forms (``local``, ``auto``) are left to ``ray.init``."""
    hostport = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or "/" in hostport:
        return
    fix = "check --ray-address / $RAY_ADDRESS (the head node's GCS address, e.g. 10.0.0.5:6379), or omit it to start a local Ray"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as s:
            s.sendall(_H2_PREFACE)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            if not s.recv(9):
                raise RayAddressError(f"no Ray cluster at {address}: it closed the connection without answering; {fix}")
    except ConnectionRefusedError:
        raise RayAddressError(f"no Ray cluster at {address}: connection refused (nothing listens there); {fix}") from None
    except (socket.timeout, TimeoutError):
        raise RayAddressError(
            f"no Ray cluster at {address}: no answer within {timeout_s:g} s (it accepts connections but does not "
            f"speak Ray's protocol, or a firewall drops them); {fix}"
        ) from None
    except OSError as exc:  # unknown host, no route, reset
        raise RayAddressError(f"no Ray cluster at {address}: {exc}; {fix}") from None


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
    if target not in ("local", "auto"):
        probe_ray_address(target)
    ray.init(**kwargs)


# ray.init arguments that only apply when starting a new local Ray.
_LOCAL_ONLY = {"num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard"}
