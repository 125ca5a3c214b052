"""Reconcile: the scheduled job that brings every snapshot up to the newest published version.

It reads the registry and every CURRENT, plans (:func:`plan_reconcile`, pure) which
(target version, entity) snapshots are missing or built from an older source version, and
backfills them from the newest embeddings -- one pass over each entity's input for all of its
targets (:func:`raybc.backfill.backfill` does the work and the atomic CURRENT swaps). Running it
again finds nothing to do and says so without starting Ray.

Two schedules that overlap never both write: a run first takes the ``reconcile`` lease
(:class:`raybc.lease.Lease`, a create-exclusive file with an expiry); a run that finds it held
returns status ``busy`` and touches nothing. Retention (:mod:`raybc.retention`) can run under the
same lease right after the backfill.

This module is not the backfill pipeline, and it never reads argv (see ``raybc reconcile`` and
``jobs/reconcile.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from raybc.backfill import BackfillOptions, BackfillSummary, backfill, entity_list
from raybc.lease import Lease, LeaseHeldError
from raybc.options import Options
from raybc.registry import Registry
from raybc.snapshots import Snapshots
from raybc.storage import Storage

# Name of the lease folder below <root>/locks/: one lease for every reconcile schedule of a root.
LEASE_NAME = "reconcile"
# Default expiry of the lease: a heartbeat renews it every third of this, so a live run never
# loses it; a crashed run blocks its successors for at most this long. An hour is a fraction of
# a typical daily/hourly schedule and far above clock skew between machines.
LEASE_TTL_S = 3600.0

State = Literal["missing", "stale", "damaged", "current", "newer"]
Status = Literal["done", "nothing_to_do", "busy", "dry_run", "interrupted"]


class ReconcileInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a reconcile, carrying what it did until then (``result``, status
    ``interrupted``) so that the command can still end with its summary line."""

    def __init__(self, result: ReconcileResult):
        super().__init__(result.one_line())
        self.result = result


class ReconcileOptions(Options):
    """What a reconcile covers and how it runs. The source and targets are decided from the registry."""

    entities: list[str] | None = Field(default=None, description="Entities to reconcile; default every entity of the newest version.")
    lease_ttl_s: float = Field(
        default=LEASE_TTL_S, gt=0, le=7 * 86400,
        description="Expiry of the reconcile lease (renewed by a heartbeat); a crashed run blocks others this long.",
    )  # fmt: skip
    backfill: BackfillOptions = Field(
        default_factory=lambda: BackfillOptions(progress=False),
        description="Tuning of the backfill (rows_per_part, batch_rows, compression, ...).",
    )

    @field_validator("entities")
    @classmethod
    def _entities(cls, v: list[str] | None) -> list[str] | None:
        return entity_list(v)

    @field_validator("backfill")
    @classmethod
    def _backfill_tuning_only(cls, b: BackfillOptions) -> BackfillOptions:
        set_here = [n for n in ("from_version", "to_versions", "entities") if getattr(b, n) is not None]
        if set_here:
            raise ValueError(
                f"{', '.join(set_here)} set: reconcile decides the source and targets from the "
                "registry; remove them (use reconcile.entities to limit the entities)"
            )
        return b


# --------------------------------------------------------------------------- planning (pure)


@dataclass(frozen=True)
class PlanItem:
    """One snapshot (as version ``target``, of ``entity``) and what CURRENT says about it now."""

    target: int
    entity: str
    state: State
    current_source: int | None  # source version CURRENT names, None when missing

    @property
    def key(self) -> str:
        return f"as-v{self.target}/{self.entity}"


@dataclass(frozen=True)
class ReconcilePlan:
    """Every snapshot of the newest version's entities, and which of them to build."""

    source: int | None  # the newest published version; None when there is none
    items: tuple[PlanItem, ...]

    @property
    def todo(self) -> list[PlanItem]:
        return [i for i in self.items if i.state in ("missing", "stale", "damaged")]

    @property
    def up_to_date(self) -> list[PlanItem]:
        return [i for i in self.items if i.state in ("current", "newer")]

    def backfill_groups(self) -> list[tuple[list[int], list[str]]]:
        """(targets, entities) per backfill call: entities needing the same targets share one call.

        Each entity appears in exactly one group, so each entity's input is read once.
        """
        per_entity: dict[str, list[int]] = {}
        for i in self.todo:
            per_entity.setdefault(i.entity, []).append(i.target)
        groups: dict[tuple[int, ...], list[str]] = {}
        for entity, targets in sorted(per_entity.items()):
            groups.setdefault(tuple(sorted(targets)), []).append(entity)
        return [(list(t), ents) for t, ents in sorted(groups.items())]

    def describe(self) -> str:
        if self.source is None:
            return "no published versions: nothing to reconcile"
        lines = [f"reconcile plan: newest version v{self.source}"]
        if not self.items:
            lines.append("  no older versions: nothing to reconcile")
        for i in self.items:
            was = "no CURRENT" if i.current_source is None else f"CURRENT from v{i.current_source}"
            action = {
                "missing": "build", "stale": "rebuild", "damaged": "rebuild (committed files missing)",
                "current": "up to date", "newer": "left alone (newer source)",
            }[i.state]  # fmt: skip
            lines.append(f"  {i.key:<24} {was:<20} -> {action}")
        return "\n".join(lines)


def plan_reconcile(
    *,
    versions: Sequence[int],
    entities: Sequence[str],
    current_sources: Mapping[tuple[int, str], int | None],
    damaged: Sequence[tuple[int, str]] = (),
) -> ReconcilePlan:
    """Which snapshots to (re)build so that every older version reads the newest embeddings.

    ``versions``: the published versions; ``entities``: those of the newest version to cover;
    ``current_sources[(target, entity)]``: the source version the CURRENT of that snapshot names,
    or None when nothing is committed. A snapshot is *missing* without CURRENT, *stale* when its
    CURRENT was built from an older source, and *current* when built from the newest -- unless it
    is in ``damaged`` (a file its committed manifest lists is gone): then it is rebuilt.
    """
    if not versions:
        return ReconcilePlan(None, ())
    newest = max(versions)
    items = []
    for target in sorted(v for v in versions if v < newest):
        for entity in sorted(entities):
            src = current_sources.get((target, entity))
            if src is None:
                state: State = "missing"
            elif src < newest:
                state = "stale"
            elif src == newest:
                state = "damaged" if (target, entity) in damaged else "current"
            else:  # only if a version was un-published by hand; never overwrite newer work
                state = "newer"
            items.append(PlanItem(target, entity, state, src))
    return ReconcilePlan(newest, tuple(items))


def read_plan(root: Storage, entities: Sequence[str] | None = None) -> ReconcilePlan:
    """The plan for a root as it is now (reads the registry and every relevant CURRENT)."""
    from raybc.errors import ConfigError

    registry = Registry(root)
    versions = registry.versions()
    if not versions:
        return ReconcilePlan(None, ())
    newest = registry.get(versions[-1])
    names = list(entities) if entities is not None else newest.entities
    unknown = [e for e in names if e not in newest.embeddings]
    if unknown:
        raise ConfigError(
            [f"reconcile.entities: v{newest.version} has no embeddings for {e!r} (it has: {', '.join(newest.entities) or 'none'})" for e in unknown],
            source=root.uri(),
        )
    snaps = Snapshots(root)
    current, damaged = {}, []
    for t in versions[:-1]:
        for e in names:
            p = snaps.pointer(t, e)
            current[(t, e)] = None if p is None else p.source_version
            if p is not None and p.source_version == newest.version and snaps.missing_files(t, e):
                damaged.append((t, e))
    return plan_reconcile(versions=versions, entities=names, current_sources=current, damaged=damaged)


# --------------------------------------------------------------------------- running


@dataclass
class ReconcileResult:
    """What a reconcile did; :meth:`one_line` is the line for cron logs and schedulers."""

    root: str
    status: Status
    plan: ReconcilePlan
    backfills: list[BackfillSummary] = field(default_factory=list)
    built: list[str] = field(default_factory=list)  # "as-v<j>/<entity>" committed by this run
    reason: str = ""  # why busy, or why there was nothing to do
    retention: Any = None  # a raybc.retention.RetentionResult when retention ran
    seconds: float = 0.0

    def one_line(self) -> str:
        src = f"v{self.plan.source}" if self.plan.source is not None else "none"
        head = f"raybc reconcile: {self.status.replace('_', ' ')} root={self.root} newest={src}"
        if self.status == "busy":
            return f"{head} -- {self.reason}"
        if self.status == "dry_run":
            return f"{head} would_build={len(self.plan.todo)} up_to_date={len(self.plan.up_to_date)}"
        tail = f" built={len(self.built)} up_to_date={len(self.plan.up_to_date)}"
        if self.retention is not None:
            tail += f" removed_runs={len(self.retention.removed)} removed_embeddings={len(self.retention.removed_embeddings)}"
        tail += f" seconds={self.seconds:.1f}"
        if self.status in ("nothing_to_do", "interrupted") and self.reason:
            tail += f" -- {self.reason}"
        return head + tail

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "status": self.status,
            "newest_version": self.plan.source,
            "built": self.built,
            "up_to_date": [i.key for i in self.plan.up_to_date],
            "plan": [{"snapshot": i.key, "state": i.state, "current_source": i.current_source} for i in self.plan.items],
            "backfills": [b.to_json() for b in self.backfills],
            "reason": self.reason,
            "retention": None if self.retention is None else self.retention.to_json(),
            "seconds": self.seconds,
        }


def reconcile(
    root: Storage | str,
    options: ReconcileOptions | None = None,
    *,
    dry_run: bool = False,
    retention: Any = None,
    ray_address: str | None = None,
    echo: Callable[[str], None] = print,
) -> ReconcileResult:
    """Backfill every missing or stale snapshot from the newest version, under the reconcile lease.

    ``dry_run`` only plans (no lease, no writes, no Ray). ``retention`` (a
    :class:`raybc.retention.RetentionOptions`) also removes old runs, under the same lease.
    Returns status ``busy`` -- having touched nothing -- when another run holds the lease.
    Raises a RaybcError subclass when the backfill fails; CURRENTs committed before it stay valid.
    Ctrl-C raises :class:`ReconcileInterrupted` (a KeyboardInterrupt) holding the result so far.
    """
    options = options or ReconcileOptions()
    storage = root if isinstance(root, Storage) else Storage(root)
    Registry(storage).require_exists()  # before the lease: a typo'd root gets no locks/ folder
    t0 = time.perf_counter()
    if dry_run:
        plan = read_plan(storage, options.entities)
        echo(plan.describe())
        return ReconcileResult(storage.uri(), "dry_run", plan, seconds=time.perf_counter() - t0)

    lease = Lease(storage, LEASE_NAME, ttl_s=options.lease_ttl_s)
    try:
        lease.acquire()
    except LeaseHeldError as exc:
        return ReconcileResult(storage.uri(), "busy", ReconcilePlan(None, ()), reason=str(exc), seconds=time.perf_counter() - t0)
    try:
        # Plan only once the lease is ours: the previous holder may just have built everything.
        result = ReconcileResult(storage.uri(), "nothing_to_do", ReconcilePlan(None, ()))
        try:
            return _reconcile_held(storage, options, lease, result, retention=retention, ray_address=ray_address, echo=echo, t0=t0)
        except KeyboardInterrupt:
            result.status, result.seconds = "interrupted", time.perf_counter() - t0
            result.reason = "interrupted (Ctrl-C): committed snapshots are unchanged, a rerun resumes"
            raise ReconcileInterrupted(result) from None
    finally:
        lease.release()


def _reconcile_held(
    storage: Storage, options: ReconcileOptions, lease: Lease, result: ReconcileResult, *,
    retention: Any, ray_address: str | None, echo: Callable[[str], None], t0: float,
) -> ReconcileResult:  # fmt: skip
    """The part of :func:`reconcile` that runs under the lease; fills ``result`` as it goes."""
    plan = read_plan(storage, options.entities)
    echo(plan.describe())
    result.plan = plan
    if plan.source is None or not plan.items:
        result.reason = "fewer than two published versions"
    elif not plan.todo:
        result.reason = f"every snapshot is already built from v{plan.source}"
    for targets, entities in plan.backfill_groups():
        lease.ensure_held()
        opts = options.backfill.model_copy(update={"from_version": plan.source, "to_versions": targets, "entities": entities})
        summary = backfill(storage, opts, ray_address=ray_address, echo=echo)
        result.backfills.append(summary)
        result.built += summary.committed
    if result.built:
        result.status = "done"
    if retention is not None:
        from raybc.retention import apply_retention

        lease.ensure_held()
        result.retention = apply_retention(storage, retention, echo=echo)
    result.seconds = time.perf_counter() - t0
    return result
