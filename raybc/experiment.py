"""The paper's protocol for a list of methods on one data set: train, backfill, evaluate, report.

For every method, one root ``<out>/<method>/`` laid out as the storage contract:

1. every version k of the method is fitted with :func:`~raybc.train.fit.fit_version` unless it is
   already published there (its manifest's method must match);
2. the five consumer tasks (:mod:`raybc.consumers`) are trained ONCE, on fix-m0's version-0
   embeddings and version-0 labels, and registered under ``<out>/fix-m0/consumers/<task>/`` (the
   publish gate's format), so anyone can reuse them;
3. after v<k> is published it is backfilled into every older version (Ray Data, committed
   snapshots; every version's run is kept), and its version-0-compatible embeddings are read back
   from the committed ``as-v0`` snapshot built from v<k> -- the path a consumer uses -- and
   scored by each consumer on version k's labels (v0: the v0 embeddings, held-out labels);
4. each (method, version) result is cached in ``<out>/<method>/eval/v<k>.json``: a rerun trains,
   backfills and evaluates nothing that is done;
5. :mod:`raybc.report` writes the table (Markdown + CSV) and the plots to ``<out>/report/``.

Profiles: ``full`` is the paper's protocol at CPU scale (:class:`TrainOptions` defaults, every
version of the data set, the default consumer grid); ``quick`` is a seconds-long smoke run for CI
(3 versions, few epochs, tiny dimensions, a small consumer grid).

This module does not define methods, tasks or the table layout (``train``, ``consumers``, ``report``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from raybc.consumers import TASKS, Consumer, ConsumerOptions, TaskLabels, build_labels, features
from raybc.embeddings import EMBEDDING, ID, read_matrix
from raybc.errors import ConfigError, InputDataError, RegistryError, SnapshotError
from raybc.gate import ConsumerStore, RegisteredConsumer, read_version_embeddings
from raybc.options import Options, validate_options
from raybc.registry import Registry, utc_now
from raybc.results import ExperimentResult
from raybc.snapshots import Snapshots, snapshot_dir
from raybc.storage import Storage
from raybc.train.methods import METHODS

# The references every table is relative to: consumers of fix-m0 define "fully compatible",
# no-bc defines "best intended performance"; the runner adds them when they are not listed.
COMPAT_REFERENCE = "fix-m0"
INTENDED_REFERENCE = "no-bc"
ENTITIES = ("users", "items")
EVAL_FORMAT = "raybc.experiment-eval/1"
# Versions of the quick profile: enough for a composed B (v2 -> v1 -> v0), fast enough for CI.
QUICK_VERSIONS = 3


class ExperimentOptions(Options):
    """What to run: data set, methods, output folder, profile (and optional overrides of it)."""

    dataset: str = Field(default="movielens-100k", description="movielens-100k | amazon:REVIEWS[,META] | synthetic[:U,I,E]")
    methods: list[str] = Field(default_factory=lambda: list(METHODS), description="Methods to compare (fix-m0 and no-bc are always added).")
    out: str = Field(default="runs/ml100k", description="Output folder: one root per method, the report in <out>/report.")
    profile: Literal["quick", "full"] = "full"
    versions: int | None = Field(default=None, ge=2, description="Versions to run; default all (full) or 3 (quick).")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainOptions fields on top of the profile's (not `method`).")
    consumer: ConsumerOptions | None = Field(default=None, description="The consumer recipe; default the profile's.")
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown or not v:
            raise ValueError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
        return list(dict.fromkeys(v))

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "method" in v:
            raise ValueError("train.method is set per method by the runner; remove it")
        return v

    def all_methods(self) -> list[str]:
        """The methods run, references first (fix-m0's v0 trains the consumers)."""
        return list(dict.fromkeys([COMPAT_REFERENCE, INTENDED_REFERENCE, *self.methods]))


def profile_train_options(options: ExperimentOptions, method: str):
    """TrainOptions of ``method`` under the profile (full: the defaults), with ``options.train`` on top."""
    from raybc.train.fit import TrainOptions

    base: dict[str, Any] = {"method": method, "seed": options.seed}
    if options.profile == "quick":
        # Tiny and fast: 300 full-graph steps of a few ms each on a tiny graph (~1 s per fit), enough
        # for the joint alignment to converge there.
        base.update(epochs=300, dims=[8, 12, 16, 20, 24], eval_every=20, selection_start=0, posthoc_steps=100, num_workers=0)
    return validate_options(TrainOptions, {**base, **options.train}, source=f"experiment.train (method {method})")


def profile_consumer_options(options: ExperimentOptions) -> ConsumerOptions:
    if options.consumer is not None:
        return options.consumer
    if options.profile == "quick":
        return ConsumerOptions(hidden=[16], dropout=[0.0], seeds=[0, 1], epochs=60, min_item_ratings=3)
    return ConsumerOptions()


# --------------------------------------------------------------------------- snapshot reading


def committed_run(root: Storage, target: int, entity: str, source: int) -> str | None:
    """Root-relative path of the newest committed run manifest of as-v<target>/<entity>/from-v<source>."""
    base = f"{snapshot_dir(target, entity)}/from-v{int(source)}"
    best: tuple[str, str] | None = None
    for run in root.list(base):
        rel = f"{base}/{run}/manifest.json"
        if root.exists(rel):
            created = str(root.read_json(rel).get("created_at", ""))
            if best is None or created > best[0]:
                best = (created, rel)
    return None if best is None else best[1]


def read_compatible(root: Storage, entity: str, *, target: int, source: int) -> tuple[pa.Table, str]:
    """Version-``target``-compatible embeddings built from v<source>, read from committed snapshots.

    The consumer's path: CURRENT when it points at a run from v<source>; otherwise (a later version
    was backfilled since) that committed run's manifest, which stays readable until retention.
    """
    snaps = Snapshots(root)
    p = snaps.pointer(target, entity)
    if p is not None and p.source_version == source:
        return snaps.read_table(target, entity), f"{snapshot_dir(target, entity)}/{p.manifest}"
    rel = committed_run(root, target, entity, source)
    if rel is None:
        raise SnapshotError(
            f"no committed snapshot of {entity!r} as v{target} from v{source} in {root.uri('snapshots')}; "
            f"run `raybc backfill --root {root.uri()} --from-version {source}`"
        )
    man = root.read_json(rel)
    run = rel.rsplit("/", 1)[0]
    tables = []
    for f in man["files"]:
        with root.open_input(f"{run}/{f['path'] if isinstance(f, dict) else f}") as fh:
            tables.append(pq.read_table(fh, columns=[ID, EMBEDDING]))
    return pa.concat_tables(tables), rel


# --------------------------------------------------------------------------- the runner


def _same_training(hyperparameters: dict[str, Any], options) -> bool:
    """Whether a published version's hyper-parameters are ``options`` (up to execution details)."""
    from raybc.train.fit import TrainOptions

    known = {k: v for k, v in hyperparameters.items() if k in TrainOptions.model_fields}
    try:
        return TrainOptions(**known).fingerprint() == options.fingerprint()
    except ValueError:
        return False


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _train_consumers(ref_root: Storage, data, slice0, recipe: ConsumerOptions, echo) -> tuple[dict[str, RegisteredConsumer], dict[str, dict]]:
    """The five consumers on fix-m0's v0 (registered once, reused on reruns)."""
    store = ConsumerStore(ref_root)
    reg = Registry(ref_root)
    emb = {e: read_version_embeddings(reg, 0, e) for e in ENTITIES}
    have = set(store.names())
    out, info = {}, {}
    skipped_path = "consumers/skipped.json"
    skipped = ref_root.read_json(skipped_path) if ref_root.exists(skipped_path) else {}
    for task in TASKS:
        if task in have:
            out[task] = store.load(task)
            info[task] = out[task].consumer.spec | {"baseline_auc": out[task].baseline_auc}
            continue
        if task in skipped:
            info[task] = {"skipped": skipped[task]}
            continue
        labels = build_labels(data, slice0, task, min_item_ratings=recipe.min_item_ratings, split_seed=recipe.split_seed)
        t0 = time.perf_counter()
        try:
            c = Consumer.fit(labels, features(labels, emb, source="fix-m0 v0"), options=recipe)
            held = labels.split("test")
            auc = c.score(features(held, emb), held.labels)["auc"]
            if not auc > 0.5:
                raise InputDataError(f"ROC-AUC {auc:.4f} on {held.rows} held-out v0 rows: no better than chance")
        except InputDataError as exc:
            skipped[task] = str(exc)
            ref_root.write_json_atomic(skipped_path, skipped)
            info[task] = {"skipped": str(exc)}
            echo(f"[raybc] consumer {task}: skipped ({exc})")
            continue
        out[task] = store.register(task, labels, version=0, consumer=c, embeddings=emb)
        info[task] = c.spec | {"baseline_auc": out[task].baseline_auc}
        echo(
            f"[raybc] consumer {task}: {labels.rows} rows, hidden {c.spec['hidden']} dropout {c.spec['dropout']}, "
            f"val AUC {c.spec['val_auc']:.4f}, test AUC {out[task].baseline_auc:.4f} ({time.perf_counter() - t0:.1f} s)"
        )
    return out, info


def _evaluate(
    root: Storage, method: str, k: int, *, data, sl, consumers: dict[str, RegisteredConsumer], recipe: ConsumerOptions, ref_v0: dict[str, pa.Table]
) -> dict[str, Any]:
    reg = Registry(root)
    v = reg.get(k)
    m = v.metrics
    rec: dict[str, Any] = {
        "format": EVAL_FORMAT, "method": method, "version": k, "dim": v.dim,
        "intended": {key: m.get(key) for key in ("recall@10", "recall@20", "recall@50", "recall@100", "recall50_last5_mean", "best_epoch", "val_users")},
        "align_err_v0": m.get("align_err_v0", 0.0 if k == 0 else None),
        "truncation_err_v0": m.get("truncation_err_v0"),
        "fit_seconds": m.get("fit_seconds"),
        "unintended": {}, "snapshots": {},
    }  # fmt: skip
    if k == 0:
        emb = {e: read_version_embeddings(reg, 0, e) for e in ENTITIES}
        diffs = []
        for e in ENTITIES:  # every method must share fix-m0's M_0, or fix-m0's consumers do not apply
            a_ids, a = read_matrix(emb[e])
            b_ids, b = read_matrix(ref_v0[e])
            same = len(a_ids) == len(b_ids) and bool(np.all(np.sort(a_ids) == np.sort(b_ids)))
            diffs.append(float(np.abs(a[np.argsort(a_ids)] - b[np.argsort(b_ids)]).max()) if same else float("inf"))
        rec["v0_max_abs_diff_vs_fix_m0"] = max(diffs)
    else:
        emb = {}
        for e in ENTITIES:
            emb[e], rec["snapshots"][e] = read_compatible(root, e, target=0, source=k)
    for task, rc in consumers.items():
        labels = build_labels(data, sl, task, min_item_ratings=recipe.min_item_ratings, split_seed=recipe.split_seed)
        if k == 0:
            labels = labels.split("test")  # the consumer trained and selected on the other v0 rows
        if labels.rows == 0 or labels.labels.min() == labels.labels.max():
            rec["unintended"][task] = {"auc": float("nan"), "rows": labels.rows, "note": "single class"}
            continue
        rec["unintended"][task] = rc.consumer.score(features(labels, emb, source=f"{method} v{k} as v0"), labels.labels)
    rec["evaluated_at"] = utc_now()
    return rec


def run_experiment(options: ExperimentOptions, *, ray_address: str | None = None, echo: Callable[[str], None] = print) -> ExperimentResult:
    """Run (or resume) the protocol; see the module doc. Returns every record and writes the report."""
    from raybc.backfill import BackfillOptions, backfill
    from raybc.data import load_dataset
    from raybc.data.slicing import temporal_versions
    from raybc.report import write_report
    from raybc.runtime import ensure_ray
    from raybc.train.fit import fit_version

    t_start = time.perf_counter()
    methods = options.all_methods()
    train_opts = {m: profile_train_options(options, m) for m in methods}  # validates every override up front
    recipe = profile_consumer_options(options)
    data = load_dataset(options.dataset, seed=options.seed)
    slices = temporal_versions(data)
    n = options.versions or (QUICK_VERSIONS if options.profile == "quick" else len(slices))
    if n > len(slices):
        raise ConfigError([f"versions: the data set has {len(slices)} versions, not {n}"])
    slices = slices[:n]
    out = Storage(options.out)
    roots = {m: out.child(m) for m in methods}
    problems = []
    for m in methods:  # reuse only versions this very protocol would have trained: refuse before any work
        reg = Registry(roots[m])
        for k in reg.versions():
            v = reg.get(k)
            if v.method != m:
                problems.append(f"out: {roots[m].uri()} holds v{k} of {v.method!r}, not {m!r}; use another --out")
            elif v.hyperparameters.get("data_set") != data.name:
                problems.append(f"out: v{k} of {m} was trained on {v.hyperparameters.get('data_set')!r}, not {data.name!r}; use another --out")
            elif not _same_training(v.hyperparameters, train_opts[m]):
                problems.append(
                    f"out: v{k} of {m} in {roots[m].uri()} was trained with other options than the {options.profile!r} profile's; "
                    "use another --out, or the profile and train overrides it was trained with"
                )
    if problems:
        raise ConfigError(problems, source=out.uri())
    ensure_ray(ray_address)
    result = ExperimentResult(out=out.uri(), dataset=options.dataset, methods=methods, versions=n, records={}, consumers={})
    consumers: dict[str, RegisteredConsumer] = {}
    ref_v0: dict[str, pa.Table] = {}
    for m in methods:
        root, reg = roots[m], Registry(roots[m])
        result.records[m] = {}
        for k in range(n):
            if not reg.is_published(k):
                echo(f"[raybc] {m} v{k}: training")
                fit_version(root, data, slices, version=k, options=train_opts[m], echo=echo)
                result.trained.append(f"{m}/v{k}")
            if m == COMPAT_REFERENCE and k == 0:
                consumers, result.consumers = _train_consumers(root, data, slices[0], recipe, echo)
                ref_v0 = {e: read_version_embeddings(reg, 0, e) for e in ENTITIES}
            key = _fingerprint({"consumers": {t: c.consumer.spec for t, c in consumers.items()}, "recipe": recipe.model_dump(), "n": n})
            cache = f"eval/v{k}.json"
            if root.exists(cache):
                rec = root.read_json(cache)
                if rec.get("key") == key:
                    result.records[m][k] = rec
                    continue
            if k > 0 and any(committed_run(root, j, e, k) is None for j in range(k) for e in ENTITIES):
                s = backfill(root, BackfillOptions(from_version=k, progress=False), ray_address=ray_address, echo=echo)
                result.backfilled.append(f"{m}/v{k}: {len(s.committed)} snapshots in {s.seconds:.1f} s")
            rec = _evaluate(root, m, k, data=data, sl=slices[k], consumers=consumers, recipe=recipe, ref_v0=ref_v0)
            rec["key"] = key
            root.write_json_atomic(cache, rec)
            result.records[m][k] = rec
            result.evaluated.append(f"{m}/v{k}")
            echo(
                f"[raybc] {m} v{k}: recall@50 {rec['intended']['recall@50']:.4f}, "
                + ", ".join(f"{t} {r['auc']:.3f}" for t, r in rec["unintended"].items())
            )
        latest = reg.latest()
        if latest and latest > 0:  # CURRENT ends on the newest version (a no-op when it already does)
            backfill(root, BackfillOptions(from_version=latest, progress=False), ray_address=ray_address, echo=echo)
    result.seconds = time.perf_counter() - t_start
    result.report_files = write_report(result, out.child("report"))
    return result


__all__ = ["ExperimentOptions", "ExperimentResult", "committed_run", "profile_consumer_options", "profile_train_options", "read_compatible", "run_experiment"]
