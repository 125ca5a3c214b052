"""The publish gate: registered consumers must accept a new version before it is published.

Consumers register their task with a root: the labelled rows (by the data set's own ids), and
either their trained consumer model or its recipe (then the gate trains it on the registered
version's embeddings). Layout below the root::

    consumers/<name>/labels.parquet      id (or user_id + item_id), label, split
    consumers/<name>/model.safetensors   the consumer's tensors (one MLP per seed)
    consumers/<name>/consumer.json       spec + recipe, the version it was trained on, its
                                         baseline ROC-AUC there, sha256 of both files

:class:`PublishGate` scores every consumer registered on a version j < k on a *candidate* v<k>
before it is published: the candidate's z_k, mapped by its own B_k and then by the registry's
published B_{k-1} ... B_{j+1} (one fused matmul, :meth:`Registry.transform`), joined with the
consumer's held-out labels. A consumer whose ROC-AUC falls by more than ``max_degradation``
(relative to its baseline) refuses the version: :class:`GateRefused` names every such consumer and
by how much, and nothing is published. ``fit_version(..., gate=...)`` runs it right before publishing.

A candidate too large for memory (10^9 rows) is checked from its Parquet files:
:meth:`PublishGate.evaluate_files` ships the held-out label ids to Ray tasks, one per group of
files, which keep only the rows those ids name; the driver sees file names and label rows only.
``raybc gate`` and ``raybc consumers`` are the command line of this module.

This module does not train embeddings and does not define the tasks (see ``consumers``).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from raybc.consumers import Consumer, ConsumerOptions, TaskLabels, features, id_columns
from raybc.embeddings import (
    EMBEDDING, ID, ColumnLayout, batch_matrix, first_duplicate, id_at, inspect_schema, make_table, normalise_ids, parquet_file,
    read_matrix,
)  # fmt: skip
from raybc.errors import AlreadyExistsError, ConfigError, InputDataError, IntegrityError, RaybcError, RegistryError, StorageError
from raybc.options import Options
from raybc.registry import Registry
from raybc.storage import Storage, StorageOptions, check_segment, json_bytes
from raybc.transforms import Transform

CONSUMERS_DIR = "consumers"
LABELS_FILE = "labels.parquet"
MODEL_FILE = "model.safetensors"
SPEC_FILE = "consumer.json"
CONSUMER_FORMAT = "raybc.consumer/1"
# Relative ROC-AUC drop a consumer tolerates by default. The paper's BC-Aligner costs consumers
# under 1%, an incompatible version 10-30%; 2% leaves room for the noise of a few hundred labels.
DEFAULT_MAX_DEGRADATION = 0.02
# The split a consumer is scored on: rows it was neither trained nor selected on.
EVAL_SPLIT = "test"
# Filter tasks per cluster CPU when the gate reads candidate files: two waves, so the last tasks
# still share the CPUs while the first ones finish (as backfill sizes its write tasks).
FILTER_TASKS_PER_CPU = 2
# Rows per batch while a filter task scans a file: bounds its memory (64 MiB of 256-d float32)
# whatever the file's row groups hold.
SCAN_BATCH_ROWS = 65_536
# Integer label-id sets larger than this are matched by binary search in a sorted copy made once
# per task: pyarrow's is_in rebuilds its hash set on every batch, which measured 14 ms vs 29 ms per
# 65k-row batch at 10^5 ids (is_in wins) but 258 ms vs 37 ms at 10^6 ids (search wins).
SORTED_MATCH_MIN_IDS = 262_144


class GateRefused(RaybcError):
    """A candidate version degrades at least one registered consumer beyond the threshold."""

    def __init__(self, report: GateReport):
        self.report = report
        bad = [r for r in report.rows if not r.ok]
        lines = "\n".join(
            f"  - consumer {r.name!r} ({r.task}, trained on v{r.consumer_version}): ROC-AUC {r.baseline_auc:.4f} -> "
            f"{r.candidate_auc:.4f}, degradation {100 * r.degradation:.2f}% > allowed {100 * report.max_degradation:.2f}%"
            for r in bad
        )
        super().__init__(
            f"publish gate refused v{report.version}: {len(bad)} of {len(report.rows)} consumer(s) degrade too much\n{lines}\n"
            f"nothing was published. Train v{report.version} with a backward-compatible method (e.g. bc-aligner) or a "
            "stronger alignment weight, or raise max_degradation if the drop is acceptable."
        )


class GateOptions(Options):
    """How strict the gate is and which consumers it asks (default: all registered)."""

    max_degradation: float = Field(default=DEFAULT_MAX_DEGRADATION, ge=0, le=1, description="Relative ROC-AUC drop allowed.")
    consumers: list[str] | None = Field(default=None, description="Names to check; default every registered consumer.")


@dataclass(frozen=True)
class RegisteredConsumer:
    name: str
    consumer: Consumer
    labels: TaskLabels
    baseline_auc: float


@dataclass(frozen=True)
class GateRow:
    name: str
    task: str
    consumer_version: int
    baseline_auc: float
    candidate_auc: float
    degradation: float  # (baseline - candidate) / baseline; negative = improvement
    rows: int
    ok: bool


@dataclass(frozen=True)
class GateReport:
    version: int
    max_degradation: float
    rows: tuple[GateRow, ...]
    # evaluate_files only: per entity, the files and rows its Ray tasks scanned and the label rows they kept
    scanned: Mapping[str, Mapping[str, int]] | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values (a NaN score becomes null)."""

        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "version": self.version, "max_degradation": self.max_degradation, "ok": self.ok,
            "consumers": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows],
            "scanned": None if self.scanned is None else {e: dict(v) for e, v in self.scanned.items()},
        }  # fmt: skip

    def table(self) -> str:
        head = f"publish gate for v{self.version} (max degradation {100 * self.max_degradation:.2f}%): " + ("accepted" if self.ok else "REFUSED")
        lines = [head] + [
            f"  {'ok ' if r.ok else 'BAD'} {r.name:<28} v{r.consumer_version} {r.task:<24} AUC {r.baseline_auc:.4f} -> {r.candidate_auc:.4f} ({-100 * r.degradation:+.2f}%)"
            for r in self.rows
        ]
        return "\n".join(lines)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_version_embeddings(registry: Registry, k: int, entity: str) -> pa.Table:
    """z_k of ``entity`` as published (columns id, embedding)."""
    v = registry.get(k)
    if entity not in v.embeddings:
        raise RegistryError(f"v{k} has no embeddings for {entity!r} (it has: {', '.join(v.entities) or 'none'})")
    store = registry.embeddings_storage(k, entity)
    tables = []
    for f in v.embeddings[entity].files:
        with store.open_input(f.path) as fh:
            tables.append(pq.read_table(fh, columns=[ID, EMBEDDING]))
    return pa.concat_tables(tables)


def _entities_of(labels: TaskLabels) -> tuple[str, ...]:
    return ("users", "items") if labels.kind == "edge" else ("users",) if labels.kind == "user" else ("items",)


def _eval_rows(labels: TaskLabels) -> TaskLabels:
    held = labels.split(EVAL_SPLIT)
    return held if held.rows else labels


class ConsumerStore:
    """Consumers registered below ``<root>/consumers``."""

    def __init__(self, root: Storage | str):
        self.root = root if isinstance(root, Storage) else Storage(root)

    def names(self) -> list[str]:
        return sorted(n for n in self.root.list(CONSUMERS_DIR) if self.root.exists(f"{CONSUMERS_DIR}/{n}/{SPEC_FILE}"))

    def _dir(self, name: str) -> str:
        return f"{CONSUMERS_DIR}/{check_segment(name, what='consumer name')}"

    def register(
        self,
        name: str,
        labels: TaskLabels,
        *,
        version: int,
        consumer: Consumer | None = None,
        recipe: ConsumerOptions | None = None,
        embeddings: Mapping[str, pa.Table] | None = None,
    ) -> RegisteredConsumer:
        """Register a consumer of version ``version``: its labels and its model (given, or trained by ``recipe``).

        ``embeddings`` are version-``version`` tables the consumer sees; default the registry's z_version.
        The baseline ROC-AUC is measured on the labels' held-out split with those embeddings.
        """
        d = self._dir(name)
        if self.root.exists(f"{d}/{SPEC_FILE}"):
            raise AlreadyExistsError(f"consumer {name!r} is already registered at {self.root.uri(d)}; choose another name")
        registry = Registry(self.root)
        if embeddings is None:
            embeddings = {e: read_version_embeddings(registry, version, e) for e in _entities_of(labels)}
        x = features(labels, embeddings, source=f"v{version} embeddings")
        if consumer is None:
            consumer = Consumer.fit(labels, x, options=recipe or ConsumerOptions())
        if consumer.task != labels.task:
            raise RegistryError(f"consumer {name!r}: its model was trained for {consumer.task!r}, its labels are {labels.task!r}")
        held = _eval_rows(labels)
        baseline = consumer.score(features(held, embeddings), held.labels)["auc"]
        if not math.isfinite(baseline) or baseline <= 0.5:
            raise RegistryError(
                f"consumer {name!r}: ROC-AUC {baseline:.4f} on its {held.rows} held-out rows of v{version} is no better than chance "
                "(or they hold a single class); a gate on it would mean nothing: register more labelled rows or a better model"
            )
        from safetensors.numpy import save

        model_bytes = save(consumer.tensors())
        buf = io.BytesIO()
        pq.write_table(labels.table, buf)
        label_bytes = buf.getvalue()
        spec = {
            "format": CONSUMER_FORMAT, "name": name, "task": labels.task, "labels_version": labels.version,
            "version": int(version), "baseline_auc": baseline, "eval_split": EVAL_SPLIT, "consumer": consumer.spec,
            "files": {LABELS_FILE: _sha(label_bytes), MODEL_FILE: _sha(model_bytes)},
        }  # fmt: skip
        self.root.write_atomic(f"{d}/{LABELS_FILE}", label_bytes)
        self.root.write_atomic(f"{d}/{MODEL_FILE}", model_bytes)
        self.root.create_exclusive(f"{d}/{SPEC_FILE}", json_bytes(spec))  # written last: registration is visible at once
        return RegisteredConsumer(name, consumer, labels, baseline)

    def remove(self, name: str) -> list[str]:
        """Remove a registered consumer; returns the URIs removed.

        The spec goes first: from then on the consumer is no longer registered (:meth:`names` lists
        only consumers with a spec), so a removal cut short leaves unlisted leftovers, never a
        consumer without its labels or model. Removing such leftovers again finishes the job.
        """
        d = self._dir(name)
        leftovers = self.root.walk_files(d)
        if not leftovers:
            raise RegistryError(
                f"no consumer {name!r} registered at {self.root.uri(CONSUMERS_DIR)} (registered: {', '.join(self.names()) or 'none'}); "
                "check the name with `raybc consumers list`"
            )
        spec = f"{d}/{SPEC_FILE}"
        ordered = ([spec] if spec in leftovers else []) + [f for f in leftovers if f != spec]
        for rel in ordered:
            self.root.remove(rel)
        self.root.remove(d, recursive=True)  # the empty folder (local storage)
        return [self.root.uri(rel) for rel in ordered]

    def summary(self, name: str) -> dict[str, Any]:
        """What ``raybc consumers list`` shows, from the spec and the labels' Parquet footer (no model load)."""
        d = self._dir(name)
        spec = self.root.read_json(f"{d}/{SPEC_FILE}")
        with self.root.open_input(f"{d}/{LABELS_FILE}") as f:
            label_rows = pq.ParquetFile(f).metadata.num_rows
        return {
            "name": name, "task": spec.get("task"), "version": spec.get("version"), "baseline_auc": spec.get("baseline_auc"),
            "label_rows": label_rows, "eval_split": spec.get("eval_split"),
        }  # fmt: skip

    def load(self, name: str) -> RegisteredConsumer:
        from safetensors.numpy import load

        d = self._dir(name)
        try:
            spec = self.root.read_json(f"{d}/{SPEC_FILE}")
        except FileNotFoundError:
            raise RegistryError(f"no consumer {name!r} registered at {self.root.uri(CONSUMERS_DIR)} (registered: {', '.join(self.names()) or 'none'})") from None
        blobs = {}
        for f in (LABELS_FILE, MODEL_FILE):
            data = self.root.read_bytes(f"{d}/{f}")
            if _sha(data) != spec.get("files", {}).get(f):
                raise IntegrityError(f"{self.root.uri(d, f)} does not match the sha256 in {SPEC_FILE}; re-register consumer {name!r}")
            blobs[f] = data
        table = pq.read_table(io.BytesIO(blobs[LABELS_FILE]))
        consumer = Consumer.from_tensors(spec["consumer"], load(blobs[MODEL_FILE]))
        return RegisteredConsumer(name, consumer, TaskLabels(spec["task"], int(spec["labels_version"]), table), float(spec["baseline_auc"]))


class PublishGate:
    """Scores registered consumers on a candidate version; refuses it past ``max_degradation``."""

    def __init__(self, root: Storage | str, *, options: GateOptions | None = None):
        self.root = root if isinstance(root, Storage) else Storage(root)
        self.options = options or GateOptions()

    def consumers_of_older(self, version: int) -> list[RegisteredConsumer]:
        """The consumers asked about ``version``: those of an older version (a consumer of this
        version or a newer one has nothing to fear from it)."""
        store = ConsumerStore(self.root)
        names = self.options.consumers if self.options.consumers is not None else store.names()
        return [rc for rc in (store.load(n) for n in names) if rc.consumer.version < version]

    def evaluate(self, version: int, *, aligner: Transform | None, embeddings: Mapping[str, pa.Table]) -> GateReport:
        """ROC-AUC of every consumer of an older version on the candidate's mapped embeddings."""
        return self._score(version, aligner, self.consumers_of_older(version), embeddings)

    def evaluate_files(
        self, version: int, *, aligner: Transform | None, files: Mapping[str, tuple[Storage, Sequence[str]]], ray_address: str | None = None
    ) -> GateReport:
        """:meth:`evaluate` for candidates too large for memory: ``files`` maps entity -> (storage,
        Parquet file names below it). Ray tasks keep only the rows whose ids the consumers' held-out
        labels name (:func:`read_label_rows`); the driver handles file names and label rows only."""
        consumers = self.consumers_of_older(version)
        if consumers and aligner is None:
            raise RegistryError(f"candidate v{version} has no backward transform; consumer {consumers[0].name!r} of v{consumers[0].consumer.version} cannot be served")
        wanted = label_ids([_eval_rows(rc.labels) for rc in consumers])  # the rows the consumers are scored on
        missing = [
            f"files: no {e!r} embeddings for candidate v{version}, but consumer(s) {', '.join(repr(rc.name) for rc in consumers if e in _entities_of(rc.labels))} "
            f"need them; give the {e} files"
            for e in wanted if e not in files
        ]  # fmt: skip
        if missing:
            raise ConfigError(missing)
        if not wanted:
            return GateReport(version, self.options.max_degradation, (), scanned={})
        rows = read_label_rows({e: files[e] for e in wanted}, wanted, expected_dim=aligner.in_dim if aligner else None, ray_address=ray_address)
        report = self._score(version, aligner, consumers, rows.tables)
        return GateReport(report.version, report.max_degradation, report.rows, scanned=rows.scanned)

    def _score(self, version: int, aligner: Transform | None, consumers: Sequence[RegisteredConsumer], embeddings: Mapping[str, pa.Table]) -> GateReport:
        registry = Registry(self.root)
        rows = []
        for rc in consumers:
            name, j = rc.name, rc.consumer.version
            if aligner is None:
                raise RegistryError(f"candidate v{version} has no backward transform; consumer {name!r} of v{j} cannot be served")
            mapped = {}
            for e in _entities_of(rc.labels):
                if e not in embeddings:
                    raise RegistryError(f"candidate v{version} has no {e!r} embeddings; consumer {name!r} needs them")
                ids, z = read_matrix(embeddings[e])
                x = aligner.apply(z.astype(np.float64))
                if j < version - 1:
                    x = registry.transform(version - 1, j)(x)
                mapped[e] = make_table(embeddings[e].column(ID).combine_chunks(), np.asarray(x, dtype=np.float32))
            held = _eval_rows(rc.labels)
            auc = rc.consumer.score(features(held, mapped, source=f"candidate v{version} mapped to v{j}"), held.labels)["auc"]
            deg = (rc.baseline_auc - auc) / rc.baseline_auc if math.isfinite(auc) else 1.0
            rows.append(GateRow(name, rc.labels.task, j, rc.baseline_auc, auc, deg, held.rows, deg <= self.options.max_degradation))
        return GateReport(version, self.options.max_degradation, tuple(rows))

    def check(self, version: int, *, aligner: Transform | None, embeddings: Mapping[str, pa.Table], echo=print) -> GateReport:
        """:meth:`evaluate`, then raise :class:`GateRefused` if any consumer degrades too much."""
        return self._verdict(self.evaluate(version, aligner=aligner, embeddings=embeddings), echo)

    def check_files(
        self, version: int, *, aligner: Transform | None, files: Mapping[str, tuple[Storage, Sequence[str]]],
        ray_address: str | None = None, echo=print,
    ) -> GateReport:  # fmt: skip
        """:meth:`evaluate_files`, then raise :class:`GateRefused` if any consumer degrades too much."""
        return self._verdict(self.evaluate_files(version, aligner=aligner, files=files, ray_address=ray_address), echo)

    @staticmethod
    def _verdict(report: GateReport, echo) -> GateReport:
        echo(report.table())
        if not report.ok:
            raise GateRefused(report)
        return report


# --------------------------------------------------------------------------- reading label rows from files


def label_ids(labels: Sequence[TaskLabels]) -> dict[str, pa.Array]:
    """Per entity, the distinct ids that ``labels`` name (the gate passes the consumers' held-out rows)."""
    chunks: dict[str, list[pa.Array]] = {}
    for lab in labels:
        for e, c in zip(_entities_of(lab), id_columns(lab.task)):  # (users, user_id), (items, item_id) or one of them
            a = lab.table.column(c).combine_chunks()
            chunks.setdefault(e, []).append(a.cast(pa.int64()) if pa.types.is_integer(a.type) else a.cast(pa.string()))
    out = {}
    for e, arrs in chunks.items():
        if len({a.type for a in arrs}) > 1:
            raise RegistryError(f"the consumers' labels name {e} by both integer and string ids; re-register them with the data set's own ids")
        out[e] = pc.unique(pa.concat_arrays(arrs))
    return out


def group_files(names: Sequence[str], groups: int) -> list[list[str]]:
    """``names`` cut into at most ``groups`` consecutive runs of near-equal length. Deterministic."""
    n = len(names)
    g = max(1, min(groups, n))
    bounds = [round(i * n / g) for i in range(g + 1)]
    return [list(names[bounds[i] : bounds[i + 1]]) for i in range(g) if bounds[i] < bounds[i + 1]]


@dataclass(frozen=True)
class LabelRows:
    """The candidate's rows for the label ids (per entity, a contract table) and what was scanned."""

    tables: dict[str, pa.Table]
    scanned: dict[str, dict[str, int]]  # entity -> files, rows (scanned), matched, tasks


def read_label_rows(
    files: Mapping[str, tuple[Storage, Sequence[str]]], ids: Mapping[str, pa.Array], *, expected_dim: int | None = None,
    ray_address: str | None = None,
) -> LabelRows:  # fmt: skip
    """Rows of ``files`` whose id is in ``ids`` (per entity), filtered by Ray tasks.

    Each entity's id set is shipped once (``ray.put``); each task scans a group of files in bounded
    batches and returns only matching rows, so the driver's work is O(files + label rows), never
    O(embedding rows). Every file is checked against the contract (schema, dimension, null ids or
    vectors) and an id may occur once; NaN/Inf refuse a labelled row. Errors name the file and row.
    """
    import ray

    from raybc.runtime import ensure_ray

    ensure_ray(ray_address)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: list[tuple[str, list[str], Any]] = []
    for e, (store, names) in files.items():
        if not names:
            raise InputDataError(f"no Parquet files given for {e} at {store.uri()}")
        ref = ray.put(ids[e])  # one copy in the object store, shared by every task of this entity
        for group in group_files(list(names), FILTER_TASKS_PER_CPU * slots):
            pending.append((e, group, _filter_task().remote(store, group, ref, expected_dim)))
    try:
        results = ray.get([r for _, _, r in pending])
    except Exception as exc:  # noqa: BLE001 - unwrap Ray's task wrappers to the user-facing error
        from raybc.errors import reraise_root_cause

        reraise_root_cause(exc)
        raise
    tables: dict[str, pa.Table] = {}
    scanned: dict[str, dict[str, int]] = {}
    for e in files:
        store = files[e][0]
        parts = [(group, res) for (ent, group, _), res in zip(pending, results) if ent == e]
        dims = {res["dim"] for _, res in parts if res["dim"] is not None}
        if len(dims) > 1:
            shown = ", ".join(f"{store.uri(group[0])}: {res['dim']}" for group, res in parts if res["dim"] is not None)
            raise InputDataError(f"the {e} files have different dimensions ({shown}); every file of a version has one dimension")
        dim = dims.pop() if dims else (expected_dim or 0)
        table = pa.concat_tables([res["table"] for _, res in parts if res["table"] is not None] or [make_table(ids[e][:0], np.zeros((0, dim), np.float32))])
        dup = first_duplicate(table.column(ID)) if table.num_rows else None
        if dup is not None:
            raise InputDataError(f"id {dup!r} occurs more than once in the {e} files at {store.uri()}; every id must appear once")
        tables[e] = table
        scanned[e] = {
            "files": sum(len(g) for g, _ in parts), "rows": sum(r["rows"] for _, r in parts), "matched": table.num_rows, "tasks": len(parts),
        }  # fmt: skip
    return LabelRows(tables, scanned)


_FILTER_TASK = None


def _filter_task():
    """The Ray task, built on first use (importing this module does not need Ray)."""
    global _FILTER_TASK
    if _FILTER_TASK is None:
        import ray

        _FILTER_TASK = ray.remote(num_cpus=1)(filter_files)
    return _FILTER_TASK


def filter_files(store: Storage, names: Sequence[str], ids: pa.Array, expected_dim: int | None) -> dict[str, Any]:
    """The body of a filter task: rows of ``names`` whose id is in ``ids``, as one contract table."""
    keep_ids: list[pa.Array] = []
    keep_mat: list[np.ndarray] = []
    dim, rows = expected_dim, 0
    cache: dict[str, np.ndarray] = {}
    for name in names:
        src = store.uri(name)
        with store.open_input(name) as f:
            pf = parquet_file(f, src)
            layout = inspect_schema(pf.schema_arrow, source=src, expected_dim=dim)
            match = _matcher(_ids_as(ids, layout.id_type, source=src), cache)
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=[ID, EMBEDDING]):
                    bids = normalise_ids(batch.column(0), layout, source=src, row_offset=row)
                    if layout.dim < 0 and len(batch):  # variable-length lists: the first row sets d
                        layout = ColumnLayout(layout.id_type, int(pc.list_value_length(batch.column(1))[0].as_py() or 0), layout.value_type, False)
                    mat = batch_matrix(batch.column(1), layout, source=src, row_offset=row, ids=bids)
                    hit = match(bids)
                    if hit.size:
                        sel = mat[hit]
                        bad = np.flatnonzero(~np.isfinite(sel).all(axis=1))
                        if bad.size:
                            r = int(hit[bad[0]])
                            raise InputDataError(f"{src}: row {row + r} (id {id_at(bids, r)}) holds NaN or Inf; fix or drop those rows upstream")
                        keep_ids.append(bids.take(pa.array(hit)))
                        keep_mat.append(sel)
                    row += len(batch)
            except (pa.ArrowInvalid, OSError) as exc:
                if isinstance(exc, (InputDataError, StorageError)):
                    raise
                raise InputDataError(f"{src}: cannot read rows from {row} on ({exc}); the file is damaged") from None
            if layout.dim >= 0:
                dim = layout.dim
        rows += row
    if not keep_ids:
        return {"table": None, "dim": dim, "rows": rows}
    kept = pa.concat_arrays([a.cast(pa.string()) if pa.types.is_large_string(a.type) else a for a in keep_ids])  # the labels' id type
    return {"table": make_table(kept, np.concatenate(keep_mat)), "dim": dim, "rows": rows}


def _matcher(ids: pa.Array, cache: dict[str, np.ndarray]):
    """A function: a batch's ids -> positions of those in ``ids`` (see SORTED_MATCH_MIN_IDS)."""
    if pa.types.is_integer(ids.type) and len(ids) > SORTED_MATCH_MIN_IDS:
        if "sorted" not in cache:
            cache["sorted"] = np.sort(ids.to_numpy(zero_copy_only=False))
        keys = cache["sorted"]

        def by_search(batch_ids: pa.Array) -> np.ndarray:
            a = batch_ids.to_numpy(zero_copy_only=False)
            pos = np.minimum(np.searchsorted(keys, a), len(keys) - 1)
            return np.flatnonzero(keys[pos] == a)

        return by_search
    return lambda batch_ids: np.flatnonzero(pc.is_in(batch_ids, value_set=ids).to_numpy(zero_copy_only=False))


def _ids_as(ids: pa.Array, id_type: pa.DataType, *, source: str) -> pa.Array:
    """The label ids in a file's id type; integer labels never match string ids, nor the reverse."""
    if pa.types.is_integer(ids.type) != pa.types.is_integer(id_type):
        kind = lambda t: "integer" if pa.types.is_integer(t) else "string"  # noqa: E731
        raise InputDataError(
            f"{source}: ids are {kind(id_type)}s but the consumers' labels name rows by {kind(ids.type)} ids; "
            "write the embeddings with the data set's own ids"
        )
    return ids if ids.type == id_type else ids.cast(id_type)


# --------------------------------------------------------------------------- candidate files by URI


def parquet_files(uri: str, options: StorageOptions | None = None) -> tuple[Storage, list[str]]:
    """A Parquet file or a folder of them -> (storage, file names below it); nothing is read."""
    src = Storage(uri, options)
    if src.isdir():
        base, names = src, sorted(n for n in src.list() if n.endswith(".parquet"))
        if not names:
            raise InputDataError(f"{uri}: no .parquet files in this folder")
        return base, names
    parent_uri, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri else (".", uri)
    base = Storage(parent_uri, options)
    if not base.exists(name):
        raise InputDataError(f"{uri}: no such file or folder")
    return base, [name]


def version_files(registry: Registry, k: int, entities: Sequence[str] | None = None) -> dict[str, tuple[Storage, list[str]]]:
    """A published version's embedding files, as :meth:`PublishGate.evaluate_files` takes them."""
    v = registry.get(k)
    wanted = list(v.embeddings) if entities is None else list(entities)
    missing = [e for e in wanted if e not in v.embeddings]
    if missing:
        raise RegistryError(f"v{k} has no embeddings for {', '.join(map(repr, missing))} (it has: {', '.join(v.entities) or 'none'})")
    return {e: (registry.embeddings_storage(k, e), [f.path for f in v.embeddings[e].files]) for e in wanted}


def file_dim(store: Storage, name: str) -> int:
    """The embedding dimension of one Parquet file, from its footer."""
    with store.open_input(name) as f:
        schema = parquet_file(f, store.uri(name)).schema_arrow
    layout = inspect_schema(schema, source=store.uri(name))
    if layout.dim < 0:
        raise InputDataError(f"{store.uri(name)}: column '{EMBEDDING}' is a variable-length list; write fixed_size_list<float32>[d]")
    return layout.dim


def register_consumers(
    root: Storage | str, labels: Sequence[TaskLabels], *, version: int, recipe: ConsumerOptions | None = None, prefix: str = ""
) -> list[RegisteredConsumer]:
    """Register one consumer per task in ``labels`` (trained by ``recipe``), named ``<prefix><task>``."""
    store = ConsumerStore(root)
    return [store.register(f"{prefix}{lab.task}", lab, version=version, recipe=recipe) for lab in labels]


__all__ = [
    "ConsumerStore", "GateOptions", "GateRefused", "GateReport", "GateRow", "LabelRows", "PublishGate", "RegisteredConsumer",
    "file_dim", "filter_files", "group_files", "label_ids", "parquet_files", "read_label_rows", "read_version_embeddings",
    "register_consumers", "version_files",
]  # fmt: skip
