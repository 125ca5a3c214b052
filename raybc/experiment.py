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

Seeds and the trade-off: ``seeds`` runs the whole protocol once per embedding-model seed (one
seed: roots in ``<out>/<method>/``; several: ``<out>/seed<s>/<method>/``, each seed with its own
consumers, trained on that seed's fix-m0 v0). ``alignment_weights`` adds, for every method that
trains M_k with a joint alignment loss, one variant per extra lambda, in its own root
``<method>.lambda<v>`` (``sweeps`` gives them for some methods at some seeds). ``share_models`` (default on)
trains each seed's M_0 once (fix-m0's, published under every other method) and the post-hoc
methods' M_k once (no-bc's, as the paper aligns no-bc's models) instead of training identical
models again.

This module does not define methods, tasks or the table layout (``train``, ``consumers``, ``report``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from raybc.consumers import TASKS, Consumer, ConsumerOptions, TaskLabels, build_labels, features
from raybc.embeddings import EMBEDDING, ID, read_matrix
from raybc.errors import ConfigError, InputDataError, RegistryError, SnapshotError
from raybc.gate import ConsumerStore, RegisteredConsumer, read_version_embeddings
from raybc.options import Options, validate_options
from raybc.registry import Registry, utc_now
from raybc.results import ExperimentResult
from raybc.snapshots import Snapshots, snapshot_dir
from raybc.storage import Storage
from raybc.train.methods import METHODS, get_method

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
    seeds: list[int] = Field(default=[0], description="Embedding-model seeds; several: <out>/seed<s>/ each, mean ± std in the report.")
    alignment_weights: list[float] = Field(
        default_factory=list, description="Extra lambdas for every joint method and seed (the trade-off curve); each its own root <method>.lambda<v>."
    )
    sweeps: list[Sweep] = Field(
        default_factory=list, description="Extra lambdas for some joint methods at some seeds (the budget's form of alignment_weights)."
    )
    share_models: bool = Field(default=True, description="Train M_0 once per seed and the post-hoc methods' M_k as no-bc's, not again.")
    seed_folders: bool | None = Field(
        default=None, description="Roots in <out>/seed<s>/ (true) or <out>/ (false); default: with several seeds only. "
        "true lets a run of some seeds add to a several-seed output."
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:  # the single-seed spelling of earlier configs
            data = dict(data)
            seed = data.pop("seed")
            if "seeds" in data and data["seeds"] != [seed]:
                raise ValueError(f"give seeds or seed, not both (seed {seed!r}, seeds {data['seeds']!r})")
            data["seeds"] = [seed]
        return data

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"give one or more distinct seeds, got {v}")
        return v

    @field_validator("alignment_weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        return _lambdas(v)

    @model_validator(mode="after")
    def _sweep(self) -> ExperimentOptions:
        joint = [m for m in self.all_methods() if get_method(m).aligns_jointly]
        for j, sw in enumerate(self.sweeps):
            if sw.seeds is not None and not set(sw.seeds) <= set(self.seeds):
                raise ValueError(f"sweeps[{j}].seeds {sw.seeds} must be among seeds {self.seeds}")
            bad = [m for m in sw.methods or [] if m not in joint]
            if bad:
                raise ValueError(f"sweeps[{j}].methods {bad}: a lambda sweep needs a joint method of this run; choose from {joint}")
        return self

    @property
    def seed(self) -> int:
        """The first seed (single-seed callers)."""
        return self.seeds[0]

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

    def variants(self, seed: int) -> dict[str, Variant]:
        """Every (method, lambda) run at ``seed``, by root name: the methods, then the sweep."""
        from raybc.train.fit import TrainOptions

        base = float(self.train.get("alignment_weight", TrainOptions.model_fields["alignment_weight"].default))
        out = {m: Variant(m, m, None) for m in self.all_methods()}
        for sw in [Sweep(alignment_weights=self.alignment_weights), *self.sweeps]:
            if sw.seeds is not None and seed not in sw.seeds:
                continue
            for m in self.all_methods():
                if get_method(m).aligns_jointly and (sw.methods is None or m in sw.methods):
                    for w in sw.alignment_weights:
                        if w != base:  # the profile's own lambda is the method itself
                            label = f"{m}.lambda{w:g}"
                            out[label] = Variant(label, m, w)
        return out


def _lambdas(v: list[float]) -> list[float]:
    if any(w < 0 for w in v):
        raise ValueError(f"lambdas must be >= 0, got {v}")
    return list(dict.fromkeys(float(w) for w in v))


class Sweep(Options):
    """Extra lambdas for some joint methods at some seeds: one root ``<method>.lambda<v>`` each."""

    alignment_weights: list[float] = Field(description="The extra lambdas (the profile's own is the method itself).")
    methods: list[str] | None = Field(default=None, description="Joint methods of the run (default: every one).")
    seeds: list[int] | None = Field(default=None, description="Seeds of the run (default: every one).")

    @field_validator("alignment_weights")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        return _lambdas(v)


ExperimentOptions.model_rebuild()  # Sweep is defined after it


@dataclass(frozen=True)
class Variant:
    """One root of the experiment: a method, and the lambda it overrides (None: the profile's)."""

    label: str
    method: str
    alignment_weight: float | None


def profile_train_options(options: ExperimentOptions, method: str, *, seed: int | None = None, alignment_weight: float | None = None):
    """TrainOptions of ``method`` under the profile (full: the defaults), with ``options.train`` on top
    (and ``alignment_weight`` on top of that, for a sweep variant)."""
    from raybc.train.fit import TrainOptions

    base: dict[str, Any] = {"method": method, "seed": options.seed if seed is None else seed}
    if options.profile == "quick":
        # Tiny and fast: 300 full-graph steps of a few ms each on a tiny graph (~1 s per fit), enough
        # for the joint alignment to converge there.
        base.update(epochs=300, dims=[8, 12, 16, 20, 24], eval_every=20, selection_start=0, posthoc_steps=100, num_workers=0)
    over = {} if alignment_weight is None else {"alignment_weight": alignment_weight}
    return validate_options(TrainOptions, {**base, **options.train, **over}, source=f"experiment.train (method {method})")


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
    """Whether a published version's hyper-parameters are ``options`` (up to execution details).
    Options the manifest predates read as what raybc did before them (``LEGACY_VALUES``)."""
    from raybc.train.fit import LEGACY_VALUES, TrainOptions

    known = {k: v for k, v in hyperparameters.items() if k in TrainOptions.model_fields}
    try:
        return TrainOptions(**{**LEGACY_VALUES, **known}).fingerprint() == options.fingerprint()
    except ValueError:
        return False


# ConsumerOptions fields added after evaluations were cached, at their default (the earlier
# behaviour): left out of the cache key and the recipe comparison so those caches stay valid.
RECIPE_FIELDS_ADDED = {"select_on_next_version": []}


def recipe_key(recipe: ConsumerOptions) -> dict[str, Any]:
    """The consumer recipe as it enters the evaluation cache key (see ``RECIPE_FIELDS_ADDED``)."""
    return {k: v for k, v in recipe.model_dump().items() if not (k in RECIPE_FIELDS_ADDED and v == RECIPE_FIELDS_ADDED[k])}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _train_consumers(ref_root: Storage, data, slices, recipe: ConsumerOptions, echo) -> tuple[dict[str, RegisteredConsumer], dict[str, dict]]:
    """The five consumers on fix-m0's v0 (registered once, reused on reruns). A task in
    ``recipe.select_on_next_version`` trains on every v0 row and is chosen on v1's rows, read
    through fix-m0's v1 (M_0 on the version-1 graph), which must be published."""
    slice0 = slices[0]
    store = ConsumerStore(ref_root)
    reg = Registry(ref_root)
    emb = {e: read_version_embeddings(reg, 0, e) for e in ENTITIES}
    emb1 = {e: read_version_embeddings(reg, 1, e) for e in ENTITIES} if recipe.select_on_next_version else None
    have = set(store.names())
    out, info = {}, {}
    skipped_path = "consumers/skipped.json"
    skipped = ref_root.read_json(skipped_path) if ref_root.exists(skipped_path) else {}
    for task in TASKS:
        if task in have:
            out[task] = store.load(task)
            stored = out[task].consumer.spec.get("recipe") or {}
            if recipe_key(ConsumerOptions.model_validate(stored)) != recipe_key(recipe):  # fields it predates: their defaults
                raise ConfigError([
                    f"consumer: {task} in {ref_root.uri('consumers')} was trained with another recipe than this run's "
                    f"({stored} vs {recipe.model_dump()}); use another --out, or the recipe it was trained with"
                ])  # fmt: skip
            info[task] = out[task].consumer.spec | {"baseline_auc": out[task].baseline_auc}
            continue
        if task in skipped:
            info[task] = {"skipped": skipped[task]}
            continue
        labels = build_labels(data, slice0, task, min_item_ratings=recipe.min_item_ratings, split_seed=recipe.split_seed)
        t0 = time.perf_counter()
        try:
            validation = None
            if task in recipe.select_on_next_version:
                lab1 = build_labels(data, slices[1], task, min_item_ratings=recipe.min_item_ratings, split_seed=recipe.split_seed)
                validation = (features(lab1, emb1, source="fix-m0 v1"), lab1.labels, 1)
            c = Consumer.fit(labels, features(labels, emb, source="fix-m0 v0"), options=recipe, validation=validation)
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
            f"val AUC {c.spec['val_auc']:.4f}" + (" (on v1)" if validation is not None else "")
            + f", test AUC {out[task].baseline_auc:.4f}" + (" (in-sample)" if validation is not None else "")
            + f" ({time.perf_counter() - t0:.1f} s)"
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
        "intended": {
            key: m.get(key)
            for key in ("recall@10", "recall@20", "recall@50", "recall@100", "recall50_last5_mean", "best_epoch", "val_users",
                        "select_recall@50", "all_recall@50", "select_val_users")
        },  # fmt: skip
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
        if "selected_on_version" in rc.consumer.spec:  # the report leaves versions up to it out of the averages
            rec["unintended"][task]["selected_on_version"] = int(rc.consumer.spec["selected_on_version"])
    rec["evaluated_at"] = utc_now()
    return rec


def seed_root(out: Storage, options: ExperimentOptions, seed: int) -> Storage:
    """Where a seed's roots live: ``<out>`` with one seed, ``<out>/seed<s>`` with several (or as
    ``seed_folders`` says)."""
    folders = len(options.seeds) > 1 if options.seed_folders is None else options.seed_folders
    return out.child(f"seed{seed}") if folders else out


def _model_donor_root(variant: Variant, k: int, roots: dict[str, Storage], share: bool) -> Storage | None:
    """The root whose v<k> is this variant's M_k already (``share_models``), or None: M_0 from the
    reference, the post-hoc methods' M_k from no-bc (trained identically; fit_version checks it)."""
    from raybc.train.fit import same_model_training

    if not share:
        return None
    m = get_method(variant.method)
    if k == 0 and variant.label != COMPAT_REFERENCE:
        return roots[COMPAT_REFERENCE]
    if k > 0 and variant.method != INTENDED_REFERENCE and same_model_training(m, get_method(INTENDED_REFERENCE), k):
        return roots[INTENDED_REFERENCE]
    return None


def run_experiment(options: ExperimentOptions, *, ray_address: str | None = None, echo: Callable[[str], None] = print) -> ExperimentResult:
    """Run (or resume) the protocol; see the module doc. Returns every record and writes the report."""
    from raybc.data import load_dataset
    from raybc.data.slicing import temporal_versions
    from raybc.report import write_report
    from raybc.runtime import ensure_ray

    t_start = time.perf_counter()
    methods = options.all_methods()
    plans = {s: options.variants(s) for s in options.seeds}
    train_opts = {  # validates every override up front
        s: {v.label: profile_train_options(options, v.method, seed=s, alignment_weight=v.alignment_weight) for v in plan.values()}
        for s, plan in plans.items()
    }
    recipe = profile_consumer_options(options)
    data = load_dataset(options.dataset, seed=options.seeds[0])
    slices = temporal_versions(data)
    n = options.versions or (QUICK_VERSIONS if options.profile == "quick" else len(slices))
    if n > len(slices):
        raise ConfigError([f"versions: the data set has {len(slices)} versions, not {n}"])
    slices = slices[:n]
    out = Storage(options.out)
    problems = []
    for s, plan in plans.items():  # reuse only versions this very protocol would have trained: refuse before any work
        for label, variant in plan.items():
            root = seed_root(out, options, s).child(label)
            reg = Registry(root)
            for k in reg.versions():
                v = reg.get(k)
                if v.method != variant.method:
                    problems.append(f"out: {root.uri()} holds v{k} of {v.method!r}, not {variant.method!r}; use another --out")
                elif v.hyperparameters.get("data_set") != data.name:
                    problems.append(f"out: v{k} of {label} was trained on {v.hyperparameters.get('data_set')!r}, not {data.name!r}; use another --out")
                elif not _same_training(v.hyperparameters, train_opts[s][label]):
                    problems.append(
                        f"out: v{k} of {label} in {root.uri()} was trained with other options than the {options.profile!r} profile's; "
                        "use another --out, or the profile and train overrides it was trained with"
                    )
    if problems:
        raise ConfigError(problems, source=out.uri())
    ensure_ray(ray_address)
    labels = list(dict.fromkeys(label for plan in plans.values() for label in plan))
    result = ExperimentResult(out=out.uri(), dataset=options.dataset, methods=labels, versions=n, records={}, consumers={})
    for s, plan in plans.items():
        records, consumer_info = _run_seed(
            options, s, plan, train_opts[s], data=data, slices=slices, recipe=recipe, out=out, result=result, ray_address=ray_address, echo=echo
        )
        result.per_seed[s] = records
        result.consumers_per_seed[s] = consumer_info
        if s == options.seeds[0]:
            result.records, result.consumers = records, consumer_info
    result.variants = {  # lambda only where it acts: the methods that train M_k with a joint alignment loss
        label: {"method": v.method, "alignment_weight": train_opts[s][label].alignment_weight if get_method(v.method).aligns_jointly else None}
        for s, plan in plans.items() for label, v in plan.items()
    }  # fmt: skip
    result.seconds = time.perf_counter() - t_start
    result.report_files = write_report(result, out.child("report"))
    if seed_root(out, options, options.seeds[0]) is not out:  # each seed's own single-seed report beside its roots
        from raybc.results import ExperimentResult as _R

        for s in options.seeds:
            one = _R(out=seed_root(out, options, s).uri(), dataset=options.dataset, methods=list(result.per_seed[s]), versions=n,
                     records=result.per_seed[s], consumers=result.consumers_per_seed[s], seconds=result.seconds,
                     per_seed={s: result.per_seed[s]}, variants=result.variants)  # fmt: skip
            write_report(one, seed_root(out, options, s).child("report"))
    return result


def _run_seed(
    options: ExperimentOptions, seed: int, plan: dict[str, Variant], train_opts: dict[str, Any], *, data, slices, recipe: ConsumerOptions,
    out: Storage, result: ExperimentResult, ray_address: str | None, echo: Callable[[str], None],
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict]]:  # fmt: skip
    """One seed of the protocol: every variant's versions trained, backfilled and evaluated."""
    from raybc.backfill import BackfillOptions, backfill
    from raybc.train.fit import fit_version

    n = len(slices)
    base = seed_root(out, options, seed)
    roots = {label: base.child(label) for label in plan}
    tag = f"seed {seed} " if len(options.seeds) > 1 else ""
    consumers: dict[str, RegisteredConsumer] = {}
    consumer_info: dict[str, dict] = {}
    ref_v0: dict[str, pa.Table] = {}
    records: dict[str, dict[int, dict[str, Any]]] = {}
    where = "" if base is out else f"seed{seed}/"
    for label, variant in plan.items():
        root, reg = roots[label], Registry(roots[label])
        records[label] = {}
        for k in range(n):
            if not reg.is_published(k):
                echo(f"[raybc] {tag}{label} v{k}: training")
                donor = _model_donor_root(variant, k, roots, options.share_models)
                fit_version(root, data, slices, version=k, options=train_opts[label], echo=echo, model_from=donor)
                result.trained.append(f"{where}{label}/v{k}")
        if label == COMPAT_REFERENCE:  # after its versions: consumers chosen on v1 read fix-m0's v1
            consumers, consumer_info = _train_consumers(root, data, slices, recipe, echo)
            ref_v0 = {e: read_version_embeddings(reg, 0, e) for e in ENTITIES}
        for k in range(n):
            key = _fingerprint({"consumers": {t: c.consumer.spec for t, c in consumers.items()}, "recipe": recipe_key(recipe), "n": n})
            cache = f"eval/v{k}.json"
            if root.exists(cache):
                rec = root.read_json(cache)
                if rec.get("key") == key:
                    records[label][k] = rec
                    continue
            if k > 0 and any(committed_run(root, j, e, k) is None for j in range(k) for e in ENTITIES):
                s = backfill(root, BackfillOptions(from_version=k, progress=False), ray_address=ray_address, echo=echo)
                result.backfilled.append(f"{where}{label}/v{k}: {len(s.committed)} snapshots in {s.seconds:.1f} s")
            rec = _evaluate(root, label, k, data=data, sl=slices[k], consumers=consumers, recipe=recipe, ref_v0=ref_v0)
            rec["key"] = key
            root.write_json_atomic(cache, rec)
            records[label][k] = rec
            result.evaluated.append(f"{where}{label}/v{k}")
            echo(
                f"[raybc] {tag}{label} v{k}: recall@50 {rec['intended']['recall@50']:.4f}, "
                + ", ".join(f"{t} {r['auc']:.3f}" for t, r in rec["unintended"].items())
            )
        latest = reg.latest()
        if latest and latest > 0:  # CURRENT ends on the newest version (a no-op when it already does)
            backfill(root, BackfillOptions(from_version=latest, progress=False), ray_address=ray_address, echo=echo)
    return records, consumer_info


__all__ = ["ExperimentOptions", "ExperimentResult", "Sweep", "Variant", "committed_run", "seed_root", "profile_consumer_options", "profile_train_options", "read_compatible", "run_experiment"]
