"""Backfill: stream z_k from storage through the fused transforms into every older version.

One pass over the input serves every target: each Parquet part of ``embeddings/v<k>/<entity>/`` is
read once, each batch is validated (dimension, NaN/Inf, null ids, duplicate ids) and multiplied
by the stacked fused matrices of all targets (:class:`~raybc.transforms.FanOutPlan`), and one part
file per target is streamed out. Ray Data schedules the parts as write tasks of a small
:class:`~ray.data.Datasink`, its executor running in an actor of its own (:class:`PipelineRunner`)
so that the driver only plans from footers, waits, and then commits every snapshot through
:class:`~raybc.snapshots.Snapshots` (files checked, manifest, then CURRENT).

Exactly once, and resumable: a run's identity (``run_id``) is a digest of the source version,
the input files (names, sizes, modification stamps), the transform weights and the output
options. Part files have deterministic names, appear atomically, and only the parts listed in the
run's manifest are ever read. So a rerun after a crash skips the parts already written, a retried
task rewrites its own file names, and re-running a committed backfill finds every CURRENT already
pointing at this run and does nothing.

Planning (:func:`plan_parts`, :func:`id_overlap_groups`, :func:`run_fingerprint`) is pure and tested
without Ray; the worker side is :func:`process_part`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from pydantic import Field, field_validator
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raybc.embeddings import (
    EMBEDDING,
    ID,
    WRITER_OPTIONS,
    ColumnLayout,
    batch_matrix,
    check_finite,
    first_duplicate,
    id_at,
    inspect_schema,
    make_batch,
    normalise_ids,
    parquet_file,
    table_schema,
)
from raybc.errors import InputDataError, IntegrityError, RaybcError, reraise_root_cause
from raybc.options import Options
from raybc.registry import FileEntry, Registry, check_unchanged, listing, version_dir
from raybc.runtime import ensure_ray, import_torch, log_level, quiet, quiet_pipeline_failures, tame_ray_logs
from raybc.snapshots import Snapshots, crash_point, run_dir
from raybc.storage import IO_THREADS, Storage, check_segment, file_stamp, is_transient, retry_transient
from raybc.transforms import FanOutPlan, Scratch

log = logging.getLogger(__name__)

# Bump when the layout or content of part files changes: it is part of every run id.
_PART_FORMAT = 1


class BackfillOptions(Options):
    """What to backfill and how. Defaults: newest version -> every older version, every entity."""

    from_version: int | None = Field(default=None, ge=0, description="Source version k; default the newest.")
    to_versions: list[int] | None = Field(default=None, description="Target versions; default every j < k.")
    entities: list[str] | None = Field(default=None, description="Entities; default all of version k.")
    rows_per_part: int = Field(
        default=1_000_000, ge=1, le=100_000_000,
        description="Most rows per part (one output file per target). Parts are cut at the input's row-group "
        "boundaries and never span two input files, so a value below the row-group size (65,536 in files raybc "
        "writes) still gives one whole row group per file.",
    )  # fmt: skip
    batch_rows: int = Field(
        default=65_536, ge=1, le=4_194_304, description="Rows per batch inside a task; bounds a task's memory."
    )
    output_dtype: Literal["float32", "float16"] = Field(
        default="float32",
        description="Vector type of snapshot files; float16 halves the bytes written (precision: docs/benchmarks.md). "
        "The storage contract's type is float32: choose float16 only for consumers that read it.",
    )
    compression: Literal["none", "snappy", "lz4", "zstd"] = Field(
        default="none", description="Parquet compression of snapshot files (float vectors barely compress)."
    )
    cpus_per_task: float = Field(default=1.0, gt=0, le=64)
    max_concurrency: int | None = Field(default=None, ge=1, description="Most parts in flight; default: as many as CPUs allow.")
    progress: bool = Field(default=True, description="Show Ray Data progress bars and per-part lines.")

    @field_validator("to_versions")
    @classmethod
    def _targets(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one target version, or leave it unset for every older version")
        if any(t < 0 for t in v):
            raise ValueError("versions are integers >= 0")
        return sorted(set(v))

    @field_validator("entities")
    @classmethod
    def _entities(cls, v: list[str] | None) -> list[str] | None:
        return entity_list(v)


def entity_list(v: list[str] | None) -> list[str] | None:
    """An options field listing entities: None (all) or a non-empty list of valid names, sorted."""
    if v is None:
        return v
    if not v:
        raise ValueError("give at least one entity, or leave it unset for all")
    for e in v:
        check_segment(e, what="entity name")
    return sorted(set(v))


# --------------------------------------------------------------------------- planning (pure)


@dataclass(frozen=True)
class Part:
    """A contiguous range of row groups of one input file: one task, one output file per target."""

    entity: str
    file: str  # relative to embeddings/v<k>/<entity>/
    file_index: int
    rg_start: int
    rg_stop: int
    first_row: int  # row number of the part's first row within its file
    rows: int

    @property
    def name(self) -> str:
        return f"part-{self.file_index:05d}-{self.rg_start:05d}.parquet"

    @property
    def key(self) -> str:
        """Unique across the entities of one backfill: what the write tasks' rows carry."""
        return f"{self.entity}/{self.name}"


def plan_parts(entity: str, files: Sequence[tuple[str, Sequence[int]]], rows_per_part: int) -> list[Part]:
    """Split files into parts of at most ``rows_per_part`` rows, at row-group boundaries.

    ``files`` is [(name, [rows of each row group])] in input order. A row group larger than
    ``rows_per_part`` becomes a part of its own. Deterministic: same input, same parts.
    """
    parts = []
    for fi, (name, groups) in enumerate(files):
        start, rows, first = 0, 0, 0
        for g, n in enumerate(groups):
            if rows and rows + n > rows_per_part:
                parts.append(Part(entity, name, fi, start, g, first, rows))
                first += rows
                start, rows = g, 0
            rows += n
        if rows or not groups:
            parts.append(Part(entity, name, fi, start, len(groups), first, rows))
    return [p for p in parts if p.rows > 0]


def group_parts(parts: Sequence[Part], rows_per_task: int) -> list[list[Part]]:
    """Consecutive parts packed into write tasks of at most ``rows_per_task`` rows (a bigger part
    goes alone). Deterministic. Each task costs Ray Data ~20-30 ms to launch, so many small input
    files would otherwise leave the CPUs idle between parts."""
    groups: list[list[Part]] = []
    rows = 0
    for p in parts:
        if groups and rows + p.rows <= rows_per_task:
            groups[-1].append(p)
            rows += p.rows
        else:
            groups.append([p])
            rows = p.rows
    return groups


def rows_per_task(total_rows: int, options: BackfillOptions, cluster_cpus: float) -> int:
    """Rows per write task: enough for two waves of tasks over the cluster's slots (so the last
    tasks still share the CPUs), never more than ``rows_per_part``. With no CPUs known yet (an
    autoscaling cluster's empty head), one part per task."""
    slots = options.max_concurrency or int(cluster_cpus // options.cpus_per_task)
    if slots < 1:
        return 1
    return max(1, min(options.rows_per_part, -(-total_rows // (2 * slots))))


def id_overlap_groups(ranges: Sequence[tuple[Any, Any] | None]) -> list[list[int]]:
    """Indices of parts whose [min, max] id ranges overlap (groups of 2+), or whose range is unknown.

    Ids can only repeat across parts inside one group; parts alone in their range need no
    cross-part check (each task checks its own part). ``None`` ranges are conservatively
    grouped with everything unknown.
    """
    unknown = [i for i, r in enumerate(ranges) if r is None]
    known = sorted((r[0], r[1], i) for i, r in enumerate(ranges) if r is not None)
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max: Any = None
    for lo, hi, i in known:
        if cur and lo <= cur_max:
            cur.append(i)
            cur_max = max(cur_max, hi)
        else:
            if len(cur) > 1:
                groups.append(cur)
            cur, cur_max = [i], hi
    if len(cur) > 1:
        groups.append(cur)
    if unknown and len(ranges) > 1:
        # an unknown range may overlap anything: check it together with all known parts
        return [sorted(unknown + [i for _, _, i in known])]
    return [sorted(g) for g in groups]


def part_timing(results: Sequence[dict[str, Any]], *, slices: int = 10) -> dict[str, Any]:
    """How the parts' speed moved over a run, from the write tasks' results ({"rows", "seconds",
    "started"}: wall clock at the part's start): the 10th/50th/90th percentile of a part's rows/s,
    and per tenth of the parts in the order they started, its parts' rows/s and mean seconds. A
    run that slows as it goes (the page cache filling, dirty pages throttled) shows it here."""
    done = sorted((r for r in results if r.get("seconds", 0) > 0), key=lambda r: r["started"])
    if not done:
        return {}
    rates = np.array([r["rows"] / r["seconds"] for r in done])
    timeline = []
    for chunk in np.array_split(np.arange(len(done)), min(slices, len(done))):
        rows, secs = sum(done[i]["rows"] for i in chunk), sum(done[i]["seconds"] for i in chunk)
        cpu = {k: 1e6 * sum(done[i].get(f"cpu_{k}_s", 0.0) for i in chunk) / max(rows, 1) for k in ("user", "system")}
        # CPU per row beside rows/s: a slow tenth that costs the same CPU per row waited (disk, a neighbour)
        timeline.append({"parts": len(chunk), "rows_per_s": rows / secs, "mean_part_seconds": secs / len(chunk), "cpu_us_per_row": cpu})
    rows = sum(r["rows"] for r in done) or 1
    return {
        "parts": len(done),
        "part_rows_per_s": [float(np.percentile(rates, q)) for q in (10, 50, 90)],
        "timeline": timeline,
        # CPU a row costs in the write tasks (user, kernel), microseconds: unlike rows/s, what else
        # runs on the machine does not change it
        "cpu_us_per_row": {k: 1e6 * sum(r.get(f"cpu_{k}_s", 0.0) for r in done) / rows for k in ("user", "system")},
    }


def run_fingerprint(payload: dict[str, Any]) -> str:
    """A short stable id for a run from everything that determines its output."""
    blob = json.dumps({**payload, "part_format": _PART_FORMAT}, sort_keys=True, default=str).encode()
    return "run-" + hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- per-entity job


@dataclass(frozen=True)
class InputFile:
    name: str
    size: int
    stamp: str  # mtime or ETag: changes when the file is rewritten
    id_type: str  # "int64" or "string", as the registry records it
    row_groups: tuple[int, ...]
    id_ranges: tuple[tuple[Any, Any] | None, ...]  # per row group, from Parquet statistics


@dataclass
class EntityJob:
    """Everything the driver decided for one entity: what to write and what is already done."""

    entity: str
    source: int
    dim: int
    run_id: str
    plan: FanOutPlan  # source -> every pending target
    pending: list[int]  # targets to (re)commit in this run
    committed: list[int]  # targets whose CURRENT already names this run
    parts: list[Part]
    todo: list[Part]  # parts missing for at least one pending target
    id_check: bool = False  # ids may repeat across parts: check them (in Ray tasks) before writing

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


@dataclass(frozen=True)
class PartContext:
    """What a worker needs for the parts of one entity (shipped once per task)."""

    root: Storage
    entity: str
    source: int
    dim: int
    run_id: str
    plan: FanOutPlan
    batch_rows: int
    compression: str
    progress: bool = True  # print one line per finished part (reaches the driver's log)
    output_dtype: str = "float32"  # or "float16" (half the bytes written)
    source_store: Storage | None = None  # where z_source lives when not below the root (registered in place)


@dataclass
class BackfillSummary:
    """What a backfill did; ``table()`` renders it for people, ``asdict`` for machines."""

    root: str
    source_version: int
    targets: list[int]
    entities: list[str]
    run_ids: dict[str, str]
    committed: list[str] = field(default_factory=list)  # "as-v<j>/<entity>" committed now
    already_committed: list[str] = field(default_factory=list)
    input_rows: int = 0  # rows read in this run
    rows_written: int = 0  # rows written (input rows x targets)
    parts_run: int = 0
    parts_resumed: int = 0  # parts found complete from an earlier attempt
    tasks: int = 0  # Ray write tasks the parts run in (small parts share a task)
    seconds: float = 0.0
    part_timing: dict[str, Any] = field(default_factory=dict)  # see :func:`part_timing`

    @property
    def rows_per_s(self) -> float:
        return self.input_rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_to_do(self) -> bool:
        return not self.committed

    def table(self) -> str:
        lines = [
            f"backfill of {self.root}: v{self.source_version} -> "
            + ", ".join(f"v{t}" for t in self.targets)
            + f" for {', '.join(self.entities)}",
        ]
        if self.nothing_to_do:
            lines.append(
                "nothing to do: every snapshot is already committed from this input "
                f"({', '.join(self.already_committed)})"
            )
            return "\n".join(lines)
        rows = [
            ("snapshots committed", str(len(self.committed))),
            ("already committed", str(len(self.already_committed))),
            ("input rows read", f"{self.input_rows:,}"),
            ("rows written (all targets)", f"{self.rows_written:,}"),
            ("parts run / resumed", f"{self.parts_run} / {self.parts_resumed}"),
            ("write tasks", str(self.tasks)),
            ("seconds", f"{self.seconds:.2f}"),
            ("input rows/s", f"{self.rows_per_s:,.0f}"),
        ]
        if self.part_timing:
            t = self.part_timing
            rows.append(("rows/s per part (p10/p50/p90)", " / ".join(f"{r:,.0f}" for r in t["part_rows_per_s"])))
            rows.append(("CPU per row, user / kernel", " / ".join(f"{t['cpu_us_per_row'][k]:.2f} us" for k in ("user", "system"))))
        w = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{w}}  {v}" for k, v in rows]
        lines.append("  committed: " + ", ".join(self.committed))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": self.rows_per_s, "nothing_to_do": self.nothing_to_do}


def _read_footer(store: Storage, name: str) -> pq.FileMetaData:
    """A Parquet footer; a transient storage fault while reading it is retried (bounded)."""
    o = store.options

    def read() -> pq.FileMetaData:
        with store.open_input(name) as f:
            return pq.ParquetFile(f).metadata

    return retry_transient(read, what=f"read the footer of {store.uri(name)}", attempts=o.operation_attempts, base_s=o.backoff_s)


def _read_input_file(store: Storage, name: str, info: dict[str, Any], dim: int) -> InputFile:
    uri = store.uri(name)
    try:
        md = _read_footer(store, name)
    except FileNotFoundError:
        raise IntegrityError(f"{uri} is listed in the version's manifest but missing; restore it") from None
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, RaybcError) or is_transient(exc):
            raise
        raise InputDataError(f"{uri} is not a readable Parquet file ({exc}); rewrite it from the embedding job") from None
    layout = inspect_schema(md.schema.to_arrow_schema(), source=uri, expected_dim=dim)
    id_col = md.schema.names.index(ID) if ID in md.schema.names else None
    groups, ranges = [], []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        groups.append(rg.num_rows)
        rng = None
        if id_col is not None and layout.fixed:
            st = rg.column(id_col).statistics
            if st is not None and st.has_min_max:
                try:
                    lo, hi = st.min, st.max
                except UnicodeDecodeError:  # non-UTF-8 ids: no usable range; the tasks refuse them
                    lo = hi = None
                if isinstance(lo, bytes):  # older writers store string stats as bytes
                    lo, hi = lo.decode("utf-8", "replace"), hi.decode("utf-8", "replace")
                rng = (lo, hi) if lo is not None else None
        ranges.append(rng)
    id_type = "int64" if pa.types.is_integer(layout.id_type) else "string"
    return InputFile(name, int(info.get("size") or store.size(name)), file_stamp(info), id_type, tuple(groups), tuple(ranges))


def _part_range(f: InputFile, p: Part) -> tuple[Any, Any] | None:
    rs = f.id_ranges[p.rg_start : p.rg_stop]
    if not rs or any(r is None for r in rs):
        return None
    return min(r[0] for r in rs), max(r[1] for r in rs)


def plan_entity(
    registry: Registry,
    *,
    entity: str,
    source: int,
    targets: Sequence[int],
    options: BackfillOptions,
) -> EntityJob:
    """Decide what to do for one entity: run id, parts, targets already committed, parts done."""
    version = registry.get(source)
    ef = version.embeddings[entity]
    store = registry.embeddings_storage(source, entity)
    infos = listing(store)
    check_unchanged(store, ef.files, version=source, infos=infos)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        files = list(pool.map(lambda f: _read_input_file(store, f.path, infos[f.path], ef.dim), ef.files))
    for entry, f in zip(ef.files, files):
        if f.id_type != ef.id_type:
            raise InputDataError(
                f"{store.uri(f.name)} holds {f.id_type} ids but v{source}'s manifest records {ef.id_type} ids for "
                f"{entity}: the schema drifted between files; rewrite the file with {ef.id_type} ids"
            )
        if sum(f.row_groups) != entry.rows:
            raise IntegrityError(
                f"{store.uri(f.name)} holds {sum(f.row_groups)} rows but v{source}'s manifest records {entry.rows}: "
                "the file changed after publishing"
            )
    by_name = {f.name: f for f in files}
    parts = plan_parts(entity, [(f.name, f.row_groups) for f in files], options.rows_per_part)
    # Ids can repeat only across parts whose id ranges overlap. The registry read every id of a
    # verified version at registration (and the stamps above prove the files unchanged since);
    # anything else is checked by a distributed id shuffle before the write (``pairs``).
    verified = ef.verified and all(e.stamp is not None for e in ef.files)
    id_check = not verified and bool(id_overlap_groups([_part_range(by_name[p.file], p) for p in parts]))

    run_id = run_fingerprint(
        {
            "source": source,
            "entity": entity,
            "inputs": [(f.name, f.size, f.stamp) for f in files],
            "aligners": [registry.get(v).aligner.sha256 for v in range(source, min(targets), -1)],  # type: ignore[union-attr]
            "rows_per_part": options.rows_per_part,
            "compression": options.compression,
            "output_dtype": options.output_dtype,
        }
    )
    snaps = Snapshots(registry.root)
    committed, pending = [], []
    for t in targets:
        p = snaps.pointer(t, entity)
        ours = p is not None and p.source_version == source and p.run_id == run_id
        # a committed run whose files were deleted since is rebuilt: its missing parts run again
        (committed if ours and not snaps.missing_files(t, entity) else pending).append(t)
    todo: list[Part] = []
    if pending:
        done_by_target = [set(registry.root.list(run_dir(t, entity, source, run_id))) for t in pending]
        todo = [p for p in parts if not all(p.name in done for done in done_by_target)]
    plan = registry.plan(source, pending or targets)  # loads and checksums every B_k involved
    return EntityJob(entity, source, ef.dim, run_id, plan, pending, committed, parts, todo, id_check)


# --------------------------------------------------------------------------- worker side


def check_unique_ids(registry: Registry, source: int, job: EntityJob) -> None:
    """Refuse an id that occurs twice anywhere in an entity's files: an id shuffle in Ray tasks
    (``pairs.scan_entity``), so the driver reads no id whatever the rows."""
    from raybc.pairs import SourceFiles, scan_entity

    ef = registry.get(source).embeddings[job.entity]
    files = SourceFiles(job.entity, registry.embeddings_storage(source, job.entity), tuple(f.path for f in ef.files),
                        tuple(f.rows for f in ef.files), ef.dim)  # fmt: skip
    scan_entity(files, None, target_pairs=0, holdout=0.0, validate=False)


def process_part(ctx: PartContext, part: Part) -> dict[str, Any]:
    """Read one part, validate each batch, write one file per target. Runs inside a Ray task.

    A transient storage fault (throttling, 5xx, timeout, reset) anywhere in the part runs the whole
    part again, at most ``storage.operation_attempts`` times with backoff: a part is idempotent
    (deterministic file names; outputs appear atomically, an aborted one leaves nothing). Bad input
    and permanent storage errors fail at once."""
    o = ctx.root.options
    return retry_transient(
        lambda: _process_part_once(ctx, part), what=f"backfill part {ctx.entity}/{part.name} of {ctx.run_id}",
        attempts=o.operation_attempts, base_s=o.backoff_s,
    )  # fmt: skip


def _process_part_once(ctx: PartContext, part: Part) -> dict[str, Any]:
    started, t0, cpu0 = time.time(), time.perf_counter(), os.times()
    src = ctx.source_store or ctx.root.child("embeddings", version_dir(ctx.source), ctx.entity)
    uri = src.uri(part.file)
    targets = ctx.plan.targets
    value_type = pa.float16() if ctx.output_dtype == "float16" else pa.float32()
    with src.open_input(part.file, memory_map=True) as fin:
        pf = parquet_file(fin, uri)
        layout: ColumnLayout = inspect_schema(pf.schema_arrow, source=uri, expected_dim=ctx.dim)
        with contextlib.ExitStack() as stack:
            writers = {}
            for j in targets:
                rel = f"{run_dir(j, ctx.entity, ctx.source, ctx.run_id)}/{part.name}"
                sink = stack.enter_context(ctx.root.open_output(rel))
                schema = table_schema(ctx.plan.out_dims[j], layout.id_type, value_type)
                writers[j] = stack.enter_context(
                    pq.ParquetWriter(sink, schema, compression=ctx.compression, **WRITER_OPTIONS)
                )
            row = part.first_row
            ids_seen = []
            scratch = Scratch()  # output buffers reused batch after batch
            half = ctx.output_dtype == "float16"
            try:
                batches = pf.iter_batches(
                    batch_size=ctx.batch_rows, row_groups=range(part.rg_start, part.rg_stop), columns=[ID, EMBEDDING],
                    use_threads=False,
                )  # fmt: skip
                for batch in batches:
                    ids = normalise_ids(batch.column(0), layout, source=uri, row_offset=row)
                    mat = batch_matrix(batch.column(1), layout, source=uri, row_offset=row, ids=ids)
                    check_finite(mat, ids, source=uri, row_offset=row)
                    outs = ctx.plan.apply(mat, scratch=scratch)
                    for j, w in writers.items():
                        out = outs[j]
                        if half:
                            out = _to_half(out, scratch.get(("f16", j), *out.shape, np.float16), ids, where=f"{uri} -> v{j}", row_offset=row)
                        w.write_batch(make_batch(ids, out, value_type))  # encodes now: the buffers are free again
                    ids_seen.append(ids)
                    row += len(batch)
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
                if isinstance(exc, RaybcError) or is_transient(exc):
                    raise
                raise InputDataError(f"{uri}: cannot read rows from {row} on ({exc}); the file is damaged") from None
            if row - part.first_row != part.rows:
                raise IntegrityError(f"{uri}: read {row - part.first_row} rows of part {part.name}, expected {part.rows}")
            dup = first_duplicate(pa.chunked_array(ids_seen, type=layout.id_type)) if ids_seen else None
            if dup is not None:
                raise InputDataError(f"{uri}: id {dup!r} occurs more than once; every id must appear exactly once")
    seconds, cpu1 = time.perf_counter() - t0, os.times()
    return {
        "entity": part.entity, "part": part.name, "rows": part.rows, "seconds": seconds, "started": started,
        # the worker's CPU (user, kernel) for this part: how much work a row is, whatever else runs
        "cpu_user_s": cpu1.user - cpu0.user, "cpu_system_s": cpu1.system - cpu0.system,
    }  # fmt: skip


HALF_MAX = float(np.finfo(np.float16).max)  # 65504; from 65520 on, float16 rounds to Inf


def _to_half(mat: np.ndarray, out: np.ndarray, ids: pa.Array, *, where: str, row_offset: int) -> np.ndarray:
    """float32 -> float16 (round to nearest even) into ``out``: torch's vectorised conversion is
    about 10x numpy's ``astype`` here, with the same bits. A value too large for float16 would
    silently become Inf: refused, naming the row."""
    torch = import_torch()  # the first import in a worker must not be cut short by a cancellation

    torch.from_numpy(out).copy_(torch.from_numpy(mat))
    if mat.max() >= HALF_MAX or mat.min() <= -HALF_MAX:  # two cheap passes; the scan only when near the edge
        bad = np.flatnonzero(np.isinf(out).any(axis=1))
        if bad.size:
            r = int(bad[0])
            raise InputDataError(
                f"{where}: row {row_offset + r} (id {id_at(ids, r)}) has a value of magnitude "
                f"{float(np.abs(mat[r]).max()):.4g} after the transform, beyond float16's {HALF_MAX:.0f}; "
                "backfill this target with output_dtype float32"
            )
    return out


# --------------------------------------------------------------------------- the Ray Data sink


class BackfillSink(Datasink):
    """A Datasink whose input rows name parts: ``write`` runs them; ``on_write_complete`` hands
    every task's results to ``on_complete`` where the pipeline runs (:func:`run_pipeline`).

    The callback is never shipped to the write tasks: it is dropped when the sink is pickled.
    """

    def __init__(self, ctxs: dict[str, PartContext], parts: dict[str, Part]):
        self.ctxs = ctxs
        self.parts = parts
        self.on_complete: Callable[[list[dict]], None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_complete": None}

    def get_name(self) -> str:
        return "BackfillSnapshots"

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[dict[str, Any]]:
        out = []
        for block in blocks:
            for key in BlockAccessor.for_block(block).to_arrow().column("part").to_pylist():
                part = self.parts[key]
                ctx_ = self.ctxs[part.entity]
                res = process_part(ctx_, part)
                if ctx_.progress:
                    print(
                        f"[raybc] {part.entity} {part.name}: {res['rows']:,} rows -> "
                        f"{len(ctx_.plan.targets)} targets in {res['seconds']:.2f} s",
                        flush=True,
                    )
                out.append(res)
        return out

    def on_write_complete(self, write_result: Any) -> None:
        assert self.on_complete is not None, "on_write_complete runs where the pipeline runs, which set the callback"
        self.on_complete([r for rs in write_result.write_returns for r in rs])


def run_pipeline(
    sink: BackfillSink, tasks: list[list[str]], options: BackfillOptions, *, level: str | None = None, bar: bool = False
) -> list[dict[str, Any]]:
    """Run the write tasks (each a list of part keys) through Ray Data; return every part's result.

    Called inside :class:`PipelineRunner`, never on the driver: Ray Data's streaming executor polls
    its operators for as long as the backfill runs (about 0.03-0.08 of a core here), so run on the
    driver its CPU would grow with the rows. In a task, the driver only waits on one object ref.
    ``level`` is the driver's log level for Ray (``--log-level``/``--quiet``); ``bar`` says the
    driver can draw a progress bar (a terminal, tqdm installed), else progress goes out as log lines.
    """
    tame_ray_logs()
    if level is not None:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(level)
    results: list[dict[str, Any]] = []
    sink.on_complete = results.extend
    ds = ray.data.from_arrow([pa.table({"part": keys}) for keys in tasks])
    # Settings of this dataset only (the caller's DataContext stays as it was). The pipeline is
    # one operator that reads and writes storage itself, so Ray Data's per-operator resource
    # reservation only holds CPUs back: with it, a 2-CPU cluster ran the first three parts one
    # at a time (docs/benchmarks.md).
    ds.context.enable_progress_bars = options.progress
    ds.context.use_ray_tqdm = bar  # drawn by the driver; else Ray Data logs progress, forwarded as lines
    ds.context.op_resource_reservation_enabled = False
    quiet_pipeline_failures()  # a part's error reaches the driver whole (its Ray wrappers carry it); no need to log it here
    ds.write_datasink(sink, ray_remote_args={"num_cpus": options.cpus_per_task}, concurrency=options.max_concurrency)
    return results


class PipelineRunner:
    """The Ray actor that runs :func:`run_pipeline` for one driver, backfill after backfill.

    An actor, not a task: a task's worker would later run other tasks beside the threads Ray
    Data's executor leaves behind (a write task importing torch there failed with "SystemError:
    bad call flags"), and a fresh worker per backfill (``max_calls=1``) cost 2-3 s of start-up CPU
    per backfill on 2 cores. The actor takes no CPU slot (its write tasks take theirs), lives on
    the driver's node (soft) and dies with the driver. When it dies mid-call (its process killed,
    its node lost), :func:`run_on_runner` starts another and calls it again: parts are idempotent,
    so the new call rewrites the same files."""

    def run(self, sink: BackfillSink, tasks: list[list[str]], options: BackfillOptions, **kwargs: Any) -> list[dict[str, Any]]:
        return run_pipeline(sink, tasks, options, **kwargs)


# No restarts or task retries of Ray's own: the driver replaces a dead runner (RUNNER_ATTEMPTS
# calls in all), so a runner killed on purpose (Ctrl-C) is not retried and prints nothing.
RUNNER_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0}
RUNNER_ATTEMPTS = 4
_runner: tuple[tuple[str, str], Any] | None = None  # ((Ray job id, driver's node id), actor handle) of this process


def pipeline_runner() -> Any:
    """This driver's :class:`PipelineRunner` actor, started on first use (again after Ray restarts:
    job ids repeat across clusters, node ids do not)."""
    global _runner
    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), ctx.get_node_id())
    if _runner is None or _runner[0] != key:
        here = NodeAffinitySchedulingStrategy(key[1], soft=True)
        _runner = (key, ray.remote(**RUNNER_OPTIONS)(PipelineRunner).options(scheduling_strategy=here).remote())
    return _runner[1]


def _stop_runner() -> None:
    """Kill this driver's runner; its write tasks die with their owner."""
    global _runner
    if _runner is not None:
        with contextlib.suppress(Exception):
            ray.kill(_runner[1], no_restart=True)
        _runner = None


def run_on_runner(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """:meth:`PipelineRunner.run` on this driver's runner; a runner that dies during the call is
    replaced and the call made again, RUNNER_ATTEMPTS calls in all. Errors the pipeline raised
    reach the caller as raybc worded them; Ctrl-C kills the runner, which stops its write tasks."""
    for attempt in range(1, RUNNER_ATTEMPTS + 1):
        try:
            return ray.get(pipeline_runner().run.remote(*args, **kwargs))
        except ray.exceptions.RayActorError as exc:  # the runner's process or node died: a system failure
            _stop_runner()
            if attempt == RUNNER_ATTEMPTS:
                raise RaybcError(f"the backfill's pipeline actor died on each of its {attempt} attempts; last: {str(exc).splitlines()[0]}") from exc
            log.warning("the backfill's pipeline actor died (%s); starting another, attempt %d of %d", type(exc).__name__, attempt + 1, RUNNER_ATTEMPTS)
        except Exception as exc:  # noqa: BLE001 - unwrap Ray's task wrappers to the user-facing error
            reraise_root_cause(exc)
            raise
        except KeyboardInterrupt:  # stop the pipeline and its write tasks now, not at exit
            _stop_runner()
            raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- driver


def resolve_targets(registry: Registry, options: BackfillOptions) -> tuple[int, list[int], list[str]]:
    """Source version, targets and entities, checked against the registry (all problems at once)."""
    from raybc.errors import ConfigError, RegistryError

    published = registry.versions()
    if not published:
        raise RegistryError(f"no published versions in {registry.root.uri('registry')}; publish or register v0 first")
    source = options.from_version if options.from_version is not None else published[-1]
    problems = []
    if source not in published:
        problems.append(f"from_version: v{source} is not published (published: {', '.join(f'v{v}' for v in published)})")
        raise ConfigError(problems, source=registry.root.uri())
    if source == 0:
        raise ConfigError(["from_version: v0 has no older version to backfill into"], source=registry.root.uri())
    targets = options.to_versions if options.to_versions is not None else list(range(source))
    for t in targets:
        if t >= source:
            problems.append(f"to_versions: v{t} is not older than the source v{source}; choose versions 0..{source - 1}")
        elif t not in published:
            problems.append(f"to_versions: v{t} is not published")
    version = registry.get(source)
    entities = options.entities if options.entities is not None else version.entities
    for e in entities:
        if e not in version.embeddings:
            problems.append(
                f"entities: v{source} has no embeddings for {e!r} (it has: {', '.join(version.entities) or 'none'})"
            )
    if not entities:
        problems.append(f"entities: v{source} lists no embeddings to backfill")
    if problems:
        raise ConfigError(problems, source=registry.root.uri())
    return source, sorted(targets), list(entities)


def backfill(
    root: Storage | str,
    options: BackfillOptions | None = None,
    *,
    ray_address: str | None = None,
    echo: Callable[[str], None] = print,
) -> BackfillSummary:
    """Backfill snapshots of every target version from the source version; see the module doc.

    Uses the running Ray cluster, else ``ray_address`` / ``$RAY_ADDRESS``, else starts a local
    Ray -- only when there is work to do. Raises a RaybcError subclass with the
    file, field or row at fault; nothing is committed for any target then.
    """
    options = options or BackfillOptions()
    if quiet():
        options = options.model_copy(update={"progress": False})
    registry = Registry(root).require_exists()
    t0 = time.perf_counter()
    source, targets, entities = resolve_targets(registry, options)
    jobs = [plan_entity(registry, entity=e, source=source, targets=targets, options=options) for e in entities]
    summary = BackfillSummary(
        root=registry.root.uri(), source_version=source, targets=targets, entities=entities,
        run_ids={j.entity: j.run_id for j in jobs},
    )  # fmt: skip
    for j in jobs:
        summary.already_committed += [f"as-v{t}/{j.entity}" for t in j.committed]
    active = [j for j in jobs if j.pending]
    if not active:
        summary.seconds = time.perf_counter() - t0
        return summary

    for j in active:
        resumed = len(j.parts) - len(j.todo)
        echo(
            f"[raybc] {j.entity}: v{source} -> {', '.join(f'v{t}' for t in j.pending)} "
            f"({j.rows:,} rows, {len(j.parts)} parts, {len(j.todo)} to run"
            + (f", {resumed} done in an earlier attempt" if resumed else "")
            + f", run {j.run_id})"
        )
    todo = [p for j in active for p in j.todo]
    summary.parts_run = len(todo)
    summary.parts_resumed = sum(len(j.parts) - len(j.todo) for j in active)
    summary.input_rows = sum(p.rows for p in todo)

    def commit(results: list[dict[str, Any]]) -> None:
        done = {(r["entity"], r["part"]) for r in results}
        missing = [p.name for p in todo if (p.entity, p.name) not in done]
        if missing:
            raise IntegrityError(f"the write finished without parts {missing[:5]}; run the backfill again")
        crash_point("before_commit")
        snaps = Snapshots(registry.root)
        for n, (j, t) in enumerate((j, t) for j in active for t in j.pending):
            if n:
                crash_point("between_commits")
            # every part of this run is written, so a temporary left in its folder is a dead
            # writer's (a worker killed by Ctrl-C or a crash): never part of a committed run
            registry.root.remove_temporaries(run_dir(t, j.entity, source, j.run_id))
            snaps.commit(
                target=t, entity=j.entity, source=source, run_id=j.run_id, dim=j.plan.out_dims[t],
                parts=[FileEntry(p.name, p.rows, 0) for p in j.parts],
                extra={
                        "transform": {"steps": list(range(source, t, -1))},
                        "compression": options.compression,
                        "dtype": options.output_dtype,
                    },
            )  # fmt: skip
            summary.committed.append(f"as-v{t}/{j.entity}")
            summary.rows_written += j.rows

    if todo:
        ctxs = {
            j.entity: PartContext(
                registry.root, j.entity, source, j.dim, j.run_id, j.plan, options.batch_rows, options.compression,
                options.progress, options.output_dtype, registry.embeddings_storage(source, j.entity),
            )
            for j in active
        }
        sink = BackfillSink(ctxs, {p.key: p for p in todo})
        ensure_ray(ray_address)
        for j in active:
            if j.id_check:
                check_unique_ids(registry, source, j)
        crash_point("before_write")
        tasks = group_parts(todo, rows_per_task(summary.input_rows, options, ray.cluster_resources().get("CPU", 0)))
        summary.tasks = len(tasks)
        bar = options.progress and sys.stdout.isatty() and importlib.util.find_spec("tqdm") is not None
        results = run_on_runner(sink, [[p.key for p in g] for g in tasks], options, level=log_level(), bar=bar)
        summary.part_timing = part_timing(results)
        commit(results)
    else:
        commit([])
    summary.seconds = time.perf_counter() - t0
    return summary
