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

This module does not train embeddings and does not define the tasks (see ``consumers``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from raybc.consumers import Consumer, ConsumerOptions, TaskLabels, features
from raybc.embeddings import EMBEDDING, ID, make_table, read_matrix
from raybc.errors import AlreadyExistsError, IntegrityError, RaybcError, RegistryError
from raybc.options import Options
from raybc.registry import Registry
from raybc.storage import Storage, check_segment, json_bytes
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

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

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

    def evaluate(self, version: int, *, aligner: Transform | None, embeddings: Mapping[str, pa.Table]) -> GateReport:
        """ROC-AUC of every consumer of an older version on the candidate's mapped embeddings."""
        store = ConsumerStore(self.root)
        names = self.options.consumers if self.options.consumers is not None else store.names()
        registry = Registry(self.root)
        rows = []
        for name in names:
            rc = store.load(name)
            j = rc.consumer.version
            if j >= version:
                continue  # a consumer of this version or a newer one has nothing to fear from it
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
        report = self.evaluate(version, aligner=aligner, embeddings=embeddings)
        echo(report.table())
        if not report.ok:
            raise GateRefused(report)
        return report


def register_consumers(
    root: Storage | str, labels: Sequence[TaskLabels], *, version: int, recipe: ConsumerOptions | None = None, prefix: str = ""
) -> list[RegisteredConsumer]:
    """Register one consumer per task in ``labels`` (trained by ``recipe``), named ``<prefix><task>``."""
    store = ConsumerStore(root)
    return [store.register(f"{prefix}{lab.task}", lab, version=version, recipe=recipe) for lab in labels]


__all__ = [
    "ConsumerStore", "GateOptions", "GateRefused", "GateReport", "GateRow", "PublishGate", "RegisteredConsumer",
    "read_version_embeddings", "register_consumers",
]  # fmt: skip
