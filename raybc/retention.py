"""Retention: remove uncommitted runs, superseded snapshots and superseded embeddings once nobody
can still need them.

A run folder ``snapshots/as-v<j>/<entity>/from-v<k>/<run>/`` is one of:

- *current*: the run CURRENT names. Never removed.
- *superseded*: committed (it has ``manifest.json``) but CURRENT names another run. A reader
  that followed CURRENT before the swap may still be reading its files, so it is removed only
  when it is older than ``retention_s`` AND it has been superseded for longer than ``grace_s``.
- *uncommitted*: no ``manifest.json`` (a crashed or running backfill). Removed when its newest
  file is older than ``retention_s`` (a running backfill keeps writing, so it stays young).

"Superseded at" needs no history file: a superseded run was replaced at the latest when the
present CURRENT was committed (CURRENT's ``committed_at``), because every swap since then would
have produced a newer CURRENT. So "CURRENT committed more than ``grace_s`` ago" proves every other
run of that snapshot was superseded more than ``grace_s`` ago. A committed run *newer* than
CURRENT (manifest written, swap not yet done, or a commit under way) is kept.

Embeddings: raybc keeps only the newest version's z_k. An older version's z_j of an entity is
removed when all of these hold (:func:`plan_embeddings`): a newer version exists and was published
more than ``grace_s`` ago (a backfill from v_j started before it may still be reading); v_j itself
is older than ``retention_s``; no CURRENT names a snapshot built from v_j (those snapshots stay
auditable against their source, and a rebuild from v_j stays possible while they are the ones
readers get); and the files are raybc's -- a version registered in place (``--in-place``) points at
the owner's files, which retention never touches. Removal first records the entity in
``registry/v<j>/embeddings-removed.json`` (the manifest stays immutable; B_j stays, the newer
versions' backfills need it), then deletes the folder: every reader refuses z_j with a message
from then on, and a crash part-way leaves the record, so the next run finishes the removal.

Decisions are pure functions (:func:`plan_retention`, :func:`plan_embeddings`); :func:`apply_retention` scans a root,
plans, and removes -- re-reading CURRENT just before each removal. It is not safe against a
hand-started backfill that commits an old run id at that very moment; scheduled runs avoid that
by running retention under the reconcile lease (``raybc reconcile --retention``).
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from raybc.options import Options
from raybc.registry import Registry
from raybc.snapshots import MANIFEST, Snapshots, snapshot_dir
from raybc.storage import Storage

# A week: long enough for someone to notice a bad swap and point CURRENT back by hand.
RETENTION_S = 7 * 86400.0
# An hour: far above how long a reader holds a manifest between reading CURRENT and its files.
GRACE_S = 3600.0

_AS_DIR = re.compile(r"^as-v(\d+)$")
_FROM_DIR = re.compile(r"^from-v(\d+)$")

Kind = Literal["current", "superseded", "uncommitted"]


class RetentionOptions(Options):
    """How long old runs stay. Seconds; e.g. 604800 is a week."""

    retention_s: float = Field(
        default=RETENTION_S, ge=0, description="Minimum age of an uncommitted or superseded run before it is removed."
    )
    grace_s: float = Field(
        default=GRACE_S, ge=0, description="How long after a CURRENT swap readers may still read the run it replaced."
    )
    embeddings: bool = Field(
        default=True, description="Also remove older versions' embeddings z_j (only the newest version's are kept)."
    )


@dataclass(frozen=True)
class RunFolder:
    """One run folder below a snapshot, with the times retention decides by (seconds since the epoch)."""

    target: int
    entity: str
    source: int
    run_id: str
    committed: bool  # has manifest.json
    created_at: float  # the manifest's created_at when committed, else the newest file's time

    @property
    def path(self) -> str:
        return f"{snapshot_dir(self.target, self.entity)}/from-v{self.source}/{self.run_id}"


@dataclass(frozen=True)
class CurrentInfo:
    """What CURRENT of one snapshot names, and when it was committed."""

    source: int
    run_id: str
    committed_at: float


@dataclass(frozen=True)
class Decision:
    run: RunFolder
    kind: Kind
    remove: bool
    reason: str


def plan_retention(
    runs: Sequence[RunFolder],
    currents: Mapping[tuple[int, str], CurrentInfo | None],
    *,
    now: float,
    options: RetentionOptions,
) -> list[Decision]:
    """Decide, for each run folder, whether to remove it, and why (see the module doc)."""
    out = []
    for r in runs:
        cur = currents.get((r.target, r.entity))
        age = now - r.created_at
        if cur is not None and (cur.source, cur.run_id) == (r.source, r.run_id):
            out.append(Decision(r, "current", False, "CURRENT names it"))
        elif not r.committed:
            if age > options.retention_s:
                out.append(Decision(r, "uncommitted", True, f"uncommitted, untouched for {age:.0f} s"))
            else:
                out.append(Decision(r, "uncommitted", False, f"uncommitted, touched {age:.0f} s ago (may be running)"))
        elif cur is None:
            out.append(Decision(r, "superseded", False, "committed but no CURRENT: a commit may be under way"))
        elif r.created_at >= cur.committed_at:
            out.append(Decision(r, "superseded", False, "committed after the present CURRENT: a swap may be under way"))
        elif now - cur.committed_at <= options.grace_s:
            out.append(
                Decision(r, "superseded", False, f"superseded {now - cur.committed_at:.0f} s ago, within the grace period")
            )
        elif age <= options.retention_s:
            out.append(Decision(r, "superseded", False, f"superseded, but only {age:.0f} s old"))
        else:
            out.append(Decision(r, "superseded", True, f"superseded over {now - cur.committed_at:.0f} s ago, {age:.0f} s old"))
    return out


@dataclass(frozen=True)
class StoredEmbeddings:
    """z_j of one entity of a published version, with what retention decides by."""

    version: int
    entity: str
    created_at: float  # the version's publication
    superseded_at: float | None  # publication of v_{j+1}; None for the newest version
    in_place: bool
    removed: bool  # retention already recorded it as removed
    has_files: bool  # anything left below embeddings/v<j>/<entity>/

    @property
    def path(self) -> str:
        return f"embeddings/v{self.version}/{self.entity}"


@dataclass(frozen=True)
class EmbeddingsDecision:
    item: StoredEmbeddings
    remove: bool
    reason: str


def plan_embeddings(
    items: Sequence[StoredEmbeddings],
    current_sources: Mapping[str, Sequence[tuple[int, int]]],
    *,
    now: float,
    options: RetentionOptions,
) -> list[EmbeddingsDecision]:
    """Decide for each stored z_j whether to remove it (see the module doc). ``current_sources``:
    entity -> [(target, source)] of every CURRENT."""
    out = []
    for it in items:
        built = sorted(t for t, src in current_sources.get(it.entity, ()) if src == it.version)
        if it.removed:
            if it.has_files:
                out.append(EmbeddingsDecision(it, True, "recorded as removed; finishing an interrupted removal"))
            continue
        if it.superseded_at is None:
            out.append(EmbeddingsDecision(it, False, "the newest version's embeddings"))
        elif it.in_place:
            out.append(EmbeddingsDecision(it, False, "registered in place: the owner's files, never removed by raybc"))
        elif built:
            out.append(EmbeddingsDecision(it, False, "CURRENT of " + ", ".join(f"as-v{t}" for t in built) + " was built from it"))
        elif now - it.superseded_at <= options.grace_s:
            out.append(EmbeddingsDecision(it, False, f"superseded {now - it.superseded_at:.0f} s ago, within the grace period"))
        elif now - it.created_at <= options.retention_s:
            out.append(EmbeddingsDecision(it, False, f"superseded, but only {now - it.created_at:.0f} s old"))
        else:
            out.append(EmbeddingsDecision(it, True, f"superseded {now - it.superseded_at:.0f} s ago by a newer version"))
    return out


# --------------------------------------------------------------------------- scanning and removing


def parse_utc(text: str) -> float | None:
    """Seconds since the epoch of a raybc UTC timestamp (``2024-01-02T03:04:05.678901Z``)."""
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, _dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return None


def scan_runs(root: Storage) -> tuple[list[RunFolder], dict[tuple[int, str], CurrentInfo | None]]:
    """Every run folder below ``<root>/snapshots`` and every CURRENT."""
    snaps = Snapshots(root)
    runs: list[RunFolder] = []
    currents: dict[tuple[int, str], CurrentInfo | None] = {}
    for as_name in root.list("snapshots"):
        m = _AS_DIR.match(as_name)
        if not m:
            continue
        target = int(m.group(1))
        for entity in root.list(f"snapshots/{as_name}"):
            p = snaps.pointer(target, entity)
            currents[(target, entity)] = (
                None if p is None else CurrentInfo(p.source_version, p.run_id, parse_utc(p.committed_at) or 0.0)
            )
            for from_name in root.list(snapshot_dir(target, entity)):
                fm = _FROM_DIR.match(from_name)
                if not fm:
                    continue
                for run_id in root.list(f"{snapshot_dir(target, entity)}/{from_name}"):
                    runs.append(_describe_run(root, target, entity, int(fm.group(1)), run_id))
    return runs, currents


def _describe_run(root: Storage, target: int, entity: str, source: int, run_id: str) -> RunFolder:
    rel = f"{snapshot_dir(target, entity)}/from-v{source}/{run_id}"
    files = root.fs.find(root.path(rel), detail=True)
    names = {p.rsplit("/", 1)[-1]: info for p, info in files.items()}
    if MANIFEST in names:
        created = parse_utc(str(root.read_json(f"{rel}/{MANIFEST}").get("created_at", "")))
        if created is None:
            created = _mtime(names[MANIFEST]) or 0.0
        return RunFolder(target, entity, source, run_id, True, created)
    times = [t for info in names.values() if (t := _mtime(info)) is not None]
    # An empty folder (possible locally) has no file times: its own time stands in.
    if not times:
        info = root.fs.info(root.path(rel))
        times = [_mtime(info) or 0.0]
    return RunFolder(target, entity, source, run_id, False, max(times))


def scan_embeddings(root: Storage) -> list[StoredEmbeddings]:
    """Every published version's stored z_j per entity (O(versions x entities) listings)."""
    reg = Registry(root)
    versions = reg.versions()
    out = []
    for i, k in enumerate(versions):
        v = reg.get(k)
        later = reg.get(versions[i + 1]) if i + 1 < len(versions) else None
        removed = reg.removed_embeddings(k)
        for entity, ef in sorted(v.embeddings.items()):
            in_place = ef.location is not None
            has_files = not in_place and bool(reg.stored_embeddings(k, entity).walk_files())
            out.append(StoredEmbeddings(
                k, entity, parse_utc(v.created_at) or 0.0, None if later is None else (parse_utc(later.created_at) or 0.0),
                in_place, entity in removed, has_files,
            ))  # fmt: skip
    return out


@dataclass
class RetentionResult:
    root: str
    decisions: list[Decision]
    removed: list[str] = field(default_factory=list)  # run folders removed (paths below the root)
    dry_run: bool = False
    embeddings: list[EmbeddingsDecision] = field(default_factory=list)
    removed_embeddings: list[str] = field(default_factory=list)  # embeddings/v<j>/<entity> folders removed

    def table(self) -> str:
        would = " (dry run: would remove)" if self.dry_run else ""
        lines = [f"retention of {self.root}: {len(self.removed)} run(s) and {len(self.removed_embeddings)} "
                 f"old embedding folder(s) removed{would}"]  # fmt: skip
        for d in self.decisions:
            mark = "remove" if d.remove else "keep  "
            lines.append(f"  {mark} {d.run.path}  ({d.reason})")
        for e in self.embeddings:
            mark = "remove" if e.remove else "keep  "
            lines.append(f"  {mark} {e.item.path}  ({e.reason})")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "dry_run": self.dry_run,
            "removed": self.removed,
            "decisions": [{"run": d.run.path, "kind": d.kind, "remove": d.remove, "reason": d.reason} for d in self.decisions],
            "removed_embeddings": self.removed_embeddings,
            "embeddings": [{"path": e.item.path, "version": e.item.version, "entity": e.item.entity, "remove": e.remove,
                            "reason": e.reason} for e in self.embeddings],  # fmt: skip
        }


def apply_retention(
    root: Storage | str,
    options: RetentionOptions | None = None,
    *,
    dry_run: bool = False,
    now: float | None = None,
    echo: Callable[[str], None] = print,
) -> RetentionResult:
    """Scan, plan and remove (unless ``dry_run``). ``now`` is injectable for tests and audits."""
    options = options or RetentionOptions()
    storage = root if isinstance(root, Storage) else Storage(root)
    Registry(storage).require_exists()
    now = time.time() if now is None else now
    runs, currents = scan_runs(storage)
    decisions = plan_retention(runs, currents, now=now, options=options)
    result = RetentionResult(storage.uri(), decisions, dry_run=dry_run)
    snaps = Snapshots(storage)
    for d in decisions:
        if not d.remove:
            continue
        if not dry_run:
            # CURRENT may have moved since the scan: never remove what it names now.
            p = snaps.pointer(d.run.target, d.run.entity)
            if p is not None and (p.source_version, p.run_id) == (d.run.source, d.run.run_id):
                continue
            storage.remove(d.run.path, recursive=True)
        result.removed.append(d.run.path)
    if options.embeddings:
        _remove_embeddings(storage, result, currents, now=now, options=options, dry_run=dry_run)
    echo(result.table())
    return result


def _remove_embeddings(
    storage: Storage,
    result: RetentionResult,
    currents: Mapping[tuple[int, str], CurrentInfo | None],
    *,
    now: float,
    options: RetentionOptions,
    dry_run: bool,
) -> None:
    """Plan and remove old z_j; ``currents`` is the scan's CURRENT of every snapshot."""
    sources: dict[str, list[tuple[int, int]]] = {}
    for (target, entity), cur in currents.items():
        if cur is not None:
            sources.setdefault(entity, []).append((target, cur.source))
    result.embeddings = plan_embeddings(scan_embeddings(storage), sources, now=now, options=options)
    snaps, reg = Snapshots(storage), Registry(storage)
    for d in result.embeddings:
        if not d.remove:
            continue
        it = d.item
        if not dry_run:
            # A CURRENT may have been committed from it since the scan: look again, just before.
            if not it.removed and any(e == it.entity and p.source_version == it.version for _, e, p in snaps.list()):
                continue
            reg.mark_embeddings_removed(it.version, it.entity)  # readers refuse it from here on
            reg.stored_embeddings(it.version, it.entity).remove("", recursive=True)
        result.removed_embeddings.append(it.path)
