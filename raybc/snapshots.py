"""Snapshots: the commit protocol that makes a backfill visible all at once, and the readers.

Layout below a root (the storage contract)::

    snapshots/as-v<j>/<entity>/from-v<k>/<run>/part-*.parquet   z_k transformed into version j
    snapshots/as-v<j>/<entity>/from-v<k>/<run>/manifest.json    files, rows, dim of the run
    snapshots/as-v<j>/<entity>/CURRENT                          {"manifest": "from-v<k>/<run>/manifest.json", ...}

A run's data files are written under a folder of their own. Commit checks every file (rows and
dimension from its Parquet footer), writes the run's ``manifest.json``, and only then replaces
``CURRENT`` in one atomic write. Readers go CURRENT -> manifest -> files, so they see the previous
snapshot or the new one, never a mix, and a crashed run is invisible. Runs are never modified after
commit; superseded runs stay readable until retention removes them.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybc.embeddings import EMBEDDING, ID, read_matrix
from raybc.errors import IntegrityError, SnapshotError, StorageError
from raybc.registry import FileEntry, Registry, utc_now
from raybc.storage import IO_THREADS, Storage, StorageOptions, check_segment, is_transient, retry_transient

if TYPE_CHECKING:
    import ray.data

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = "raybc.snapshot/1"
POINTER_FORMAT = "raybc.current/1"
_MANIFEST_REF = re.compile(r"^from-v(\d+)/([A-Za-z0-9_][A-Za-z0-9_.=+-]*)/manifest\.json$")
_AS_DIR = re.compile(r"^as-v(\d+)$")

# TEST-ONLY fault injection. With RAYBC_TEST_CRASH_AT=<point> in its environment the driver
# SIGKILLs itself at that point of a backfill, so tests can check what a crash leaves behind and
# that a rerun completes it. Points: before_write (planned, nothing written), before_commit (every
# part file written, no manifest), between_commits (some targets' CURRENT swapped, not all),
# before_current (a run's manifest written, its CURRENT not). Unset, the default, it does nothing.
CRASH_ENV = "RAYBC_TEST_CRASH_AT"


def crash_point(point: str) -> None:
    """Kill this process at ``point`` when the test-only RAYBC_TEST_CRASH_AT names it; else nothing."""
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)

def snapshot_dir(target: int, entity: str) -> str:
    return f"snapshots/as-v{int(target)}/{check_segment(entity, what='entity name')}"


def run_dir(target: int, entity: str, source: int, run_id: str) -> str:
    return f"{snapshot_dir(target, entity)}/from-v{int(source)}/{check_segment(run_id, what='run id')}"


@dataclass(frozen=True)
class Pointer:
    """What CURRENT says: the committed manifest (relative to CURRENT's folder) and its source."""

    manifest: str
    source_version: int
    target_version: int
    run_id: str
    rows: int
    committed_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": POINTER_FORMAT,
            "manifest": self.manifest,
            "source_version": self.source_version,
            "target_version": self.target_version,
            "run_id": self.run_id,
            "rows": self.rows,
            "committed_at": self.committed_at,
        }


@dataclass(frozen=True)
class Snapshot:
    """A committed snapshot: its manifest and the storage paths of its files."""

    target_version: int
    entity: str
    source_version: int
    run_id: str
    dim: int
    rows: int
    files: tuple[str, ...]  # paths relative to the root
    manifest: dict[str, Any]


def check_part_file(root: Storage, rel: str, *, rows: int, dim: int) -> int:
    """Check a written part from its footer: row count and dimension. Returns its size in bytes."""
    def footer() -> pq.FileMetaData:
        with root.open_input(rel) as f:
            return pq.ParquetFile(f).metadata

    o = root.options
    try:
        md = retry_transient(footer, what=f"check {root.uri(rel)}", attempts=o.operation_attempts, base_s=o.backoff_s)
        schema = md.schema.to_arrow_schema()
    except FileNotFoundError:
        raise SnapshotError(f"{root.uri(rel)} is missing; the run is incomplete, run the backfill again") from None
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, StorageError) or is_transient(exc):
            raise
        raise SnapshotError(f"{root.uri(rel)} is not a readable Parquet file ({exc}); run the backfill again") from None
    emb = schema.field(EMBEDDING).type if EMBEDDING in schema.names else None
    if md.num_rows != rows:
        raise SnapshotError(f"{root.uri(rel)} holds {md.num_rows} rows, expected {rows}")
    if emb is None or not pa.types.is_fixed_size_list(emb) or emb.list_size != dim:
        raise SnapshotError(f"{root.uri(rel)}: embedding column is {emb}, expected fixed_size_list[{dim}]")
    return root.size(rel)


class Snapshots:
    """Committed snapshots below ``<root>/snapshots``."""

    def __init__(self, root: Storage | str, options: StorageOptions | None = None):
        self.root = root if isinstance(root, Storage) else Storage(root, options)

    # ------------------------------------------------------------------ reading

    def pointer(self, target: int, entity: str) -> Pointer | None:
        """The parsed CURRENT of (target, entity), or None when nothing is committed."""
        rel = f"{snapshot_dir(target, entity)}/{CURRENT}"
        try:
            d = self.root.read_json(rel)
        except FileNotFoundError:
            return None
        if not isinstance(d, dict):
            raise IntegrityError(f"{self.root.uri(rel)}: expected a JSON object")
        ref = str(d.get("manifest", ""))
        m = _MANIFEST_REF.match(ref)
        if not m:
            raise IntegrityError(
                f"{self.root.uri(rel)}: manifest reference {ref!r} is not of the form from-v<k>/<run>/manifest.json"
            )
        try:
            source = int(d["source_version"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{self.root.uri(rel)}: no valid source_version") from None
        if source != int(m.group(1)):
            raise IntegrityError(f"{self.root.uri(rel)}: source_version {source} disagrees with {ref}")
        return Pointer(
            manifest=ref,
            source_version=source,
            target_version=int(d.get("target_version", target)),
            run_id=m.group(2),
            rows=int(d.get("rows", -1)),
            committed_at=str(d.get("committed_at", "")),
        )

    def get(self, target: int, entity: str) -> Snapshot:
        """The committed snapshot of ``entity`` as version ``target``; SnapshotError if none."""
        p = self.pointer(target, entity)
        if p is None:
            raise SnapshotError(self._why_none(target, entity))
        base = snapshot_dir(target, entity)
        rel = f"{base}/{p.manifest}"
        try:
            man = self.root.read_json(rel)
        except FileNotFoundError:
            raise IntegrityError(f"{self.root.uri(base)}/CURRENT names {p.manifest}, which does not exist") from None
        run = rel.rsplit("/", 1)[0]
        where = self.root.uri(rel)
        try:
            if not isinstance(man, dict) or not isinstance(man.get("files"), list):
                raise ValueError("no list of files")
            files = []
            for f in man["files"]:
                path = f if isinstance(f, str) else f.get("path")
                files.append(f"{run}/{check_segment(str(path), what='snapshot file name')}")
            snap = Snapshot(
                target_version=target,
                entity=entity,
                source_version=int(man["source_version"]),
                run_id=p.run_id,
                dim=int(man["dim"]),
                rows=int(man["rows"]),
                files=tuple(files),
                manifest=man,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"{where}: tampered or damaged snapshot manifest ({exc}); run the backfill again") from None
        if snap.source_version != p.source_version or man.get("entity", entity) != entity or snap.dim <= 0:
            raise IntegrityError(
                f"{where}: tampered or damaged snapshot manifest: it names source v{snap.source_version}, "
                f"entity {man.get('entity')!r}, dim {snap.dim}, but CURRENT says v{p.source_version} and {entity!r}"
            )
        return snap

    def _why_none(self, target: int, entity: str) -> str:
        """Why (target, entity) has no committed snapshot, and the fix for that case: a root without a
        registry, an unpublished version, the newest version (never a snapshot), an unknown entity,
        or a snapshot simply not built yet."""
        from raybc.errors import CREATING_COMMANDS

        root = self.root.uri()
        what = f"no committed snapshot of {entity!r} as v{target} in {self.root.uri('snapshots')}"
        registry = Registry(self.root)
        if not self.root.isdir("registry"):
            return f"{what}: {root} holds no registry at all; check the root for a typo (a registry is created by {CREATING_COMMANDS})"
        published = registry.versions()
        listed = ", ".join(f"v{v}" for v in published) or "none"
        if target not in published:
            return f"{what}: v{target} is not a published version of {root} (published: {listed})"
        newest = registry.get(published[-1])
        if entity not in newest.embeddings:
            return f"{what}: the newest version v{newest.version} has no entity {entity!r} (it has: {', '.join(newest.entities) or 'none'})"
        if target == newest.version:
            return (
                f"{what}: v{target} is the newest version, whose embeddings are stored as they are, never as a snapshot; "
                f"read them from {registry.embeddings_storage(target, entity).uri()} (Registry.get({target}).embeddings[{entity!r}] lists the files)"
            )
        return f"{what}: it was not built yet; run `raybc reconcile --root {root}` (or `raybc backfill --root {root} --to-versions {target}`)"

    def missing_files(self, target: int, entity: str) -> list[str]:
        """Root-relative paths the committed manifest of (target, entity) lists that are not in
        storage (a damaged snapshot: reconcile rebuilds it). One listing of the run folder."""
        snap = self.get(target, entity)
        run = snap.files[0].rsplit("/", 1)[0] if snap.files else None
        present = set(self.root.list(run)) if run else set()
        return [f for f in snap.files if f.rsplit("/", 1)[1] not in present]

    def list(self) -> list[tuple[int, str, Pointer]]:
        """Every committed (target version, entity, pointer), sorted."""
        out = []
        for as_name in self.root.list("snapshots"):
            m = _AS_DIR.match(as_name)
            if not m:
                continue
            for entity in self.root.list(f"snapshots/{as_name}"):
                p = self.pointer(int(m.group(1)), entity)
                if p is not None:
                    out.append((int(m.group(1)), entity, p))
        return sorted(out, key=lambda t: (t[0], t[1]))

    def read_table(self, target: int, entity: str, *, columns: Sequence[str] | None = None) -> pa.Table:
        """The committed snapshot as one pyarrow Table (columns ``id``, ``embedding``)."""
        snap = self.get(target, entity)
        cols = list(columns) if columns is not None else [ID, EMBEDDING]
        tables = []
        for rel in snap.files:
            try:
                with self.root.open_input(rel) as f:
                    tables.append(pq.read_table(f, columns=cols))
            except FileNotFoundError:
                raise SnapshotError(
                    f"{self.root.uri(rel)} is missing: the committed snapshot of {entity!r} as v{target} lists it "
                    f"({self.root.uri(snapshot_dir(target, entity), CURRENT)} -> its manifest), so it was deleted after commit. "
                    f"Rebuild the snapshot: `raybc reconcile --root {self.root.uri()}` finds and rebuilds damaged snapshots"
                ) from None
        if sum(t.num_rows for t in tables) != snap.rows:
            raise IntegrityError(
                f"{self.root.uri(snapshot_dir(target, entity))}: files hold {sum(t.num_rows for t in tables)} rows but "
                f"the committed manifest records {snap.rows}; the snapshot was changed after commit"
            )
        if not tables:
            return pa.table({c: pa.array([]) for c in cols})
        return pa.concat_tables(tables)

    def dataset(self, target: int, entity: str, **read_kwargs: Any) -> ray.data.Dataset:
        """The committed snapshot as a Ray Dataset (streamed from storage by Ray Data)."""
        import ray.data

        snap = self.get(target, entity)
        fs = self.root.arrow_filesystem()
        return ray.data.read_parquet([self.root.path(r) for r in snap.files], filesystem=fs, **read_kwargs)

    # ------------------------------------------------------------------ committing

    def commit(
        self,
        *,
        target: int,
        entity: str,
        source: int,
        run_id: str,
        dim: int,
        parts: Sequence[FileEntry],
        extra: dict[str, Any] | None = None,
    ) -> Pointer:
        """Check every part, write the run's manifest, then swap CURRENT (the single visible step)."""
        run = run_dir(target, entity, source, run_id)

        def check(p: FileEntry) -> FileEntry:
            size = check_part_file(self.root, f"{run}/{p.path}", rows=p.rows, dim=dim)
            return FileEntry(p.path, p.rows, size)

        with ThreadPoolExecutor(IO_THREADS) as pool:
            checked = list(pool.map(check, parts))
        rows = sum(p.rows for p in checked)
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "source_version": int(source),
            "target_version": int(target),
            "entity": entity,
            "dim": int(dim),
            "rows": rows,
            "run_id": run_id,
            "files": [{"path": p.path, "rows": p.rows, "bytes": p.bytes} for p in checked],
            "created_at": utc_now(),
            **(extra or {}),
        }
        self.root.write_json_atomic(f"{run}/{MANIFEST}", manifest)
        crash_point("before_current")
        pointer = Pointer(
            manifest=f"from-v{int(source)}/{run_id}/{MANIFEST}",
            source_version=int(source),
            target_version=int(target),
            run_id=run_id,
            rows=rows,
            committed_at=utc_now(),
        )
        self.root.write_json_atomic(f"{snapshot_dir(target, entity)}/{CURRENT}", pointer.to_json())
        return pointer


def snapshot_status(root: Storage, *, now: float | None = None) -> dict[str, Any]:
    """What a scheduler and a consumer ask of a root, from CURRENTs and manifests (O(snapshots)
    small reads): per committed snapshot its source, age, dtype, staleness against the newest
    version and the file URIs to read without raybc; and the (target, entity) pairs the newest
    version should have a snapshot for but has none."""
    import time

    from raybc.retention import parse_utc

    now = time.time() if now is None else now
    reg = Registry(root)
    latest = reg.latest()
    snaps = Snapshots(root)
    rows = []
    for target, entity, p in snaps.list():
        snap = snaps.get(target, entity)
        committed = parse_utc(p.committed_at)
        rows.append({
            "as_version": target, "entity": entity, "source_version": p.source_version, "rows": snap.rows, "dim": snap.dim,
            "dtype": str(snap.manifest.get("dtype", "float32")), "committed_at": p.committed_at,
            "age_s": None if committed is None else max(0.0, now - committed),
            "stale": latest is not None and p.source_version < latest, "manifest": root.uri(f"{snapshot_dir(target, entity)}/{p.manifest}"),
            "files": [root.uri(f) for f in snap.files],
        })  # fmt: skip
    have = {(r["as_version"], r["entity"]) for r in rows}
    missing = []
    if latest is not None and latest > 0:
        entities = reg.get(latest).entities
        missing = [{"as_version": t, "entity": e} for t in range(latest) for e in entities if (t, e) not in have]
    return {"root": root.uri(), "newest_version": latest, "snapshots": rows, "missing": missing}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def status_table(status: dict[str, Any]) -> str:
    """The human reading of :func:`snapshot_status`: one line per snapshot, then what is missing."""
    lines = [f"snapshots of {status['root']} (newest version: v{status['newest_version']})"]
    for r in status["snapshots"]:
        state = f"STALE (built from v{r['source_version']}, newest v{status['newest_version']})" if r["stale"] else "up to date"
        lines.append(
            f"  as-v{r['as_version']}/{r['entity']}: from v{r['source_version']}, {r['rows']:,} rows x {r['dim']} {r['dtype']}, "
            f"{_age(r['age_s'])} old, {state}, {len(r['files'])} file(s): {r['manifest']}"
        )
    if not status["snapshots"]:
        lines.append("  no committed snapshots")
    for m in status["missing"]:
        lines.append(f"  as-v{m['as_version']}/{m['entity']}: MISSING (run `raybc reconcile --root {status['root']}`)")
    return "\n".join(lines)


def read_snapshot(root: str, entity: str, version: int, *, options: StorageOptions | None = None) -> pa.Table:
    """The committed snapshot of ``entity`` as version ``version``, as a pyarrow Table."""
    return Snapshots(root, options).read_table(version, entity)


def read_snapshot_dataset(root: str, entity: str, version: int, *, options: StorageOptions | None = None) -> ray.data.Dataset:
    """The committed snapshot of ``entity`` as version ``version``, as a Ray Dataset."""
    return Snapshots(root, options).dataset(version, entity)


# Rows whose vectors verify_snapshot compares with the float64 reference, at most. Every id is
# checked (exactly once, 8 bytes per row); vectors are checked on whole row groups spread over the
# input, so memory stays at the ids plus this many rows, whatever the snapshot's size: the demo
# verifies 10M-row snapshots within what the backfill itself needs. Tests below this size compare
# every row.
VERIFY_SAMPLE_ROWS = 1_000_000
# Rows per float64 reference computation: a few MB of temporaries at any dimension raybc uses.
_VERIFY_CHUNK = 16_384


@dataclass(frozen=True)
class Verification:
    """How a committed snapshot compares with the reference transform of its source embeddings."""

    target_version: int
    entity: str
    rows: int
    input_rows: int
    ids_match: bool  # every input id exactly once
    max_rel_error: float  # max over the compared rows of |got - ref| / |ref|, reference in float64 step by step
    compared_rows: int = 0  # rows whose vectors were compared (all of them up to ``sample_rows``)

    @property
    def ok(self) -> bool:
        return self.ids_match and self.rows == self.input_rows and self.max_rel_error < 1e-5


def _id_keys(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """uint64 keys of ids: int64 ids exactly (their bits), string ids by a 64-bit hash (pandas'
    ``hash_array``; two distinct ids collide with probability ~n^2 / 2^64, ~3e-6 at 10M rows)."""
    if pa.types.is_integer(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64).view(np.uint64)
    from pandas.util import hash_array

    return hash_array(np.asarray(col.to_numpy(zero_copy_only=False), dtype=object))


def _row_groups(store: Storage, names: Sequence[str]) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of every row group, in file order, from the footers."""
    out = []
    for name in names:
        with store.open_input(name) as fh:
            md = pq.ParquetFile(fh).metadata
        out += [(name, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    return out


def verify_snapshot(registry: Registry, target: int, entity: str, *, sample_rows: int = VERIFY_SAMPLE_ROWS) -> Verification:
    """Compare a committed snapshot with its source embeddings transformed step by step in float64.

    Streams: every id of both sides is checked (each input id exactly once in the snapshot), one
    file at a time; vectors are compared on whole input row groups spread evenly over the input,
    up to ``sample_rows`` rows (every row when the input is no larger). Memory: 8 bytes per row
    for the ids, plus the compared rows. Used by the demo, tests and audits.
    """
    from raybc.transforms import apply_steps, chain_steps

    snaps = Snapshots(registry.root)
    snap = snaps.get(target, entity)
    src = registry.embeddings_storage(snap.source_version, entity)
    src_names = [f.path for f in registry.get(snap.source_version).embeddings[entity].files]
    groups = _row_groups(src, src_names)
    total = sum(n for _, _, n in groups)
    # every stride-th row group: about sample_rows rows spread over the whole input (all when it fits)
    stride = max(1, -(-total // max(1, sample_rows)))
    picked = {(name, g) for name, g, _ in groups[::stride]}

    src_keys, ref_keys, ref_z = [], [], []
    for name in src_names:
        with src.open_input(name) as fh:
            pf = pq.ParquetFile(fh)
            for g in range(pf.metadata.num_row_groups):
                if (name, g) in picked:
                    t = pf.read_row_group(g, columns=[ID, EMBEDDING])
                    _, z = read_matrix(t)
                    k = _id_keys(t.column(ID))
                    ref_keys.append(k)
                    ref_z.append(z)
                else:
                    k = _id_keys(pf.read_row_group(g, columns=[ID]).column(ID))
                src_keys.append(k)
    src_all = np.sort(np.concatenate(src_keys)) if src_keys else np.zeros(0, np.uint64)
    del src_keys
    ref_k = np.concatenate(ref_keys) if ref_keys else np.zeros(0, np.uint64)
    order = np.argsort(ref_k, kind="stable")
    ref_k = ref_k[order]

    snap_keys, got_keys, got_z = [], [], []
    for rel in snap.files:
        with snaps.root.open_input(rel) as fh:
            pf = pq.ParquetFile(fh)
            for g in range(pf.metadata.num_row_groups):
                k = _id_keys(pf.read_row_group(g, columns=[ID]).column(ID))
                snap_keys.append(k)
                pos = np.minimum(np.searchsorted(ref_k, k), max(len(ref_k) - 1, 0))
                hit = ref_k[pos] == k if len(ref_k) else np.zeros(len(k), bool)
                if hit.any():
                    _, z = read_matrix(pf.read_row_group(g, columns=[ID, EMBEDDING]).filter(pa.array(hit)))
                    got_keys.append(k[hit])
                    got_z.append(z)
    snap_all = np.sort(np.concatenate(snap_keys)) if snap_keys else np.zeros(0, np.uint64)
    del snap_keys
    rows, input_rows = len(snap_all), len(src_all)
    ids_match = rows == input_rows and bool(np.array_equal(snap_all, src_all)) and not bool(np.any(snap_all[1:] == snap_all[:-1]))
    del snap_all, src_all
    gk = np.concatenate(got_keys) if got_keys else np.zeros(0, np.uint64)
    if not ids_match or len(gk) != len(ref_k):
        return Verification(target, entity, rows, input_rows, False, float("inf"))
    if not len(gk):
        return Verification(target, entity, rows, input_rows, True, 0.0, 0)
    z = np.concatenate(ref_z)
    del ref_z
    got = np.concatenate(got_z)
    del got_z
    got_order = np.argsort(gk, kind="stable")
    steps = chain_steps({v: registry.aligner(v) for v in range(snap.source_version, target, -1)}, snap.source_version, target)
    worst = 0.0
    for lo in range(0, len(order), _VERIFY_CHUNK):  # float64 reference a chunk at a time
        ref = apply_steps(steps, z[order[lo : lo + _VERIFY_CHUNK]])
        g = got[got_order[lo : lo + _VERIFY_CHUNK]].astype(np.float64)
        err = np.linalg.norm(g - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
        worst = max(worst, float(err.max()))
    return Verification(target, entity, rows, input_rows, True, worst, len(order))
