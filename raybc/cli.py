"""The ``raybc`` command line, and the flag parsing the thin ``jobs/*.py`` entry points share.

Commands: ``demo``, ``backfill``, ``reconcile``, ``retention``, ``register``, ``versions``,
``snapshots``, ``discard``, ``train``, ``experiment``, ``consumers`` (``register``, ``list``,
``remove``), ``gate``.
Options come from ``--config FILE`` (YAML), from flags, or both (flags win). Errors raised on
purpose (:class:`~raybc.errors.RaybcError`) are printed as one clear message and exit non-zero,
without a traceback. Credentials are never taken as flags (they would show in process lists and
shell history): use the standard AWS environment variables, an instance role, or the config file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from raybc.errors import ConfigError, RaybcError

# Exit codes: 0 done (or nothing to do), 1 failed, 2 bad configuration or usage, 3 another run holds
# the reconcile lease (a scheduler's overlapping run: nothing was touched; distinct from 1 so that
# schedulers can count it as a skip, not a failure).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_BUSY = 0, 1, 2, 3
# Ctrl-C, and a closed stdout pipe (``raybc snapshots ... | head -1``): the shells' 128 + signal.
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141

# What --rows-per-part does (raybc.backfill.plan_parts): parts are cut at the input files' row-group
# boundaries, never inside a row group, and never span two input files.
ROWS_PER_PART_HELP = (
    "most rows per part (one output file per target), cut at the input's row-group boundaries: "
    "a part holds whole row groups (raybc writes 65,536-row groups), so a smaller value still gives one "
    "row group per file, and a part never spans two input files (default 1000000)"
)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError([f"{flag}: expected comma-separated integers like 0,1,2, got {text!r}"]) from None


def _entities(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [e.strip() for v in values for e in v.split(",") if e.strip()]


def _given(a: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among ``names`` that were given on the command line (None means not given)."""
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def _storage_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (credentials come from the environment or the config file)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--region", help="bucket region")


def _storage_overrides(a: argparse.Namespace) -> dict[str, Any]:
    out = {}
    if getattr(a, "endpoint_url", None):
        out["endpoint_url"] = a.endpoint_url
    if getattr(a, "region", None):
        out["region"] = a.region
    return {"storage": out} if out else {}


# --------------------------------------------------------------------------- backfill


def backfill_parser(prog: str = "raybc backfill") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Transform the newest embeddings into every older version in one pass and commit the snapshots.",
    )
    p.add_argument("--config", help="YAML file with the job config (flags override it)")
    p.add_argument("--root", help="root URI: local folder, file://, s3://bucket/prefix, gs://bucket/prefix")
    p.add_argument("--from-version", type=int, help="source version k (default: the newest)")
    p.add_argument("--to-versions", help="target versions, comma-separated (default: every older version)")
    p.add_argument("--entity", action="append", help="entity to backfill; repeat or comma-separate (default: all)")
    p.add_argument("--rows-per-part", type=int, help=ROWS_PER_PART_HELP)
    p.add_argument("--batch-rows", type=int, help="rows per batch inside a task")
    p.add_argument("--compression", help="none, snappy, lz4 or zstd")
    p.add_argument("--output-dtype", help="float32 (the contract's type, default) or float16 (half the bytes)")
    p.add_argument("--max-concurrency", type=int, help="most parts in flight")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-part lines")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--summary-json", help="also write the summary as JSON to this local file (- for stdout)")
    _storage_flags(p)
    return p


def backfill_config(argv: Sequence[str], prog: str = "raybc backfill"):
    """Parse flags (and ``--config``) into a :class:`~raybc.config.BackfillJobConfig`."""
    a = backfill_parser(prog).parse_args(argv)
    from raybc.config import BackfillJobConfig
    from raybc.options import load_options
    bf: dict[str, Any] = {}
    if a.from_version is not None:
        bf["from_version"] = a.from_version
    if a.to_versions is not None:
        bf["to_versions"] = _int_list("--to-versions", a.to_versions)
    if a.entity:
        bf["entities"] = _entities(a.entity)
    bf.update(_given(a, "rows_per_part", "batch_rows", "compression", "output_dtype", "max_concurrency"))
    if a.no_progress:
        bf["progress"] = False
    over: dict[str, Any] = {**_storage_overrides(a)}
    if bf:
        over["backfill"] = bf
    over.update(_given(a, "root", "ray_address", "summary_json"))
    return load_options(BackfillJobConfig, file=a.config, overrides=over)


def run_backfill_job(cfg) -> int:
    from raybc.backfill import backfill
    from raybc.storage import Storage

    summary = backfill(Storage(cfg.root, cfg.storage), cfg.backfill, ray_address=cfg.ray_address)
    print(summary.table())
    if cfg.summary_json:
        _write_json(cfg.summary_json, summary.to_json())
    return EXIT_OK


# --------------------------------------------------------------------------- reconcile and retention


def reconcile_parser(prog: str = "raybc reconcile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Backfill every snapshot that is missing or built from an older version, from the newest "
        "version, under a lease (scheduled runs never overlap). Exit 0 done or nothing to do, 1 failed, "
        "2 bad config, 3 another reconcile holds the lease. The last line is a one-line summary.",
    )
    p.add_argument("--config", help="YAML file with the job config (flags override it)")
    p.add_argument("--root", help="root URI: local folder, file://, s3://bucket/prefix, gs://bucket/prefix")
    p.add_argument("--dry-run", action="store_true", help="print the plan only: no lease, no writes, no Ray")
    p.add_argument("--entity", action="append", help="entity to reconcile; repeat or comma-separate (default: all)")
    p.add_argument("--lease-ttl-s", type=float, help="expiry of the lease in seconds (renewed while running)")
    p.add_argument("--retention", action="store_true", help="also remove old runs after the backfill (defaults: see --retention-s)")
    p.add_argument("--retention-s", type=float, help="remove uncommitted/superseded runs older than this (implies --retention)")
    p.add_argument("--grace-s", type=float, help="keep a superseded run this long after its swap (implies --retention)")
    p.add_argument("--keep-embeddings", action="store_true", help="retention leaves older versions' embeddings z_j in place")
    p.add_argument("--rows-per-part", type=int, help=ROWS_PER_PART_HELP)
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--summary-json", help="also write the result as JSON to this local file (- for stdout)")
    _storage_flags(p)
    return p


def _retention_overrides(a: argparse.Namespace) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if a.retention_s is not None:
        out["retention_s"] = a.retention_s
    if a.grace_s is not None:
        out["grace_s"] = a.grace_s
    if a.keep_embeddings:
        out["embeddings"] = False
    return out if (out or getattr(a, "retention", True)) else None


def reconcile_config(argv: Sequence[str], prog: str = "raybc reconcile"):
    """Parse flags (and ``--config``) into a :class:`~raybc.config.ReconcileJobConfig`."""
    a = reconcile_parser(prog).parse_args(argv)
    from raybc.config import ReconcileJobConfig
    from raybc.options import load_options
    rc: dict[str, Any] = {}
    if a.entity:
        rc["entities"] = _entities(a.entity)
    if a.lease_ttl_s is not None:
        rc["lease_ttl_s"] = a.lease_ttl_s
    if a.rows_per_part is not None:
        # scheduled runs stay quiet: no per-part lines can land after the one-line summary
        rc["backfill"] = {"rows_per_part": a.rows_per_part, "progress": False}
    over: dict[str, Any] = {**_storage_overrides(a)}
    if rc:
        over["reconcile"] = rc
    ret = _retention_overrides(a)
    if ret is not None:
        over["retention"] = ret
    if a.dry_run:
        over["dry_run"] = True
    over.update(_given(a, "root", "ray_address", "summary_json"))
    return load_options(ReconcileJobConfig, file=a.config, overrides=over)


def run_reconcile_job(cfg) -> int:
    from raybc.reconcile import ReconcileInterrupted, reconcile
    from raybc.storage import Storage

    try:
        result = reconcile(
            Storage(cfg.root, cfg.storage), cfg.reconcile, dry_run=cfg.dry_run, retention=cfg.retention,
            ray_address=cfg.ray_address,
        )  # fmt: skip
    except ReconcileInterrupted as exc:
        result = exc.result
    for b in result.backfills:
        print(b.table())
    if cfg.summary_json:
        _write_json(cfg.summary_json, result.to_json())
    print(result.one_line(), flush=True)  # the last line, also when interrupted (schedulers read it)
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_BUSY if result.status == "busy" else EXIT_OK


def run_retention(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="raybc retention",
        description="Remove uncommitted and superseded snapshot runs older than the retention, never the one "
        "CURRENT names, never within the grace period after a swap; and older versions' embeddings z_j once a newer "
        "version superseded them (never the newest, never files registered in place, never the source of a CURRENT). "
        "Runs under the reconcile lease (exit 3 if held).",
    )
    p.add_argument("--config", help="YAML file with a retention config")
    p.add_argument("--root")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.add_argument("--retention-s", type=float, help="minimum age in seconds of a run to remove (default a week)")
    p.add_argument("--grace-s", type=float, help="seconds a superseded run stays after its swap (default an hour)")
    p.add_argument("--keep-embeddings", action="store_true", help="leave older versions' embeddings z_j in place")
    _storage_flags(p)
    a = p.parse_args(argv)
    from raybc.config import RetentionJobConfig
    from raybc.lease import Lease, LeaseHeldError
    from raybc.options import load_options
    from raybc.reconcile import LEASE_NAME
    from raybc.registry import Registry
    from raybc.retention import apply_retention
    from raybc.storage import Storage
    over: dict[str, Any] = {**_storage_overrides(a)}
    ret = _retention_overrides(a)
    if ret:
        over["retention"] = ret
    if a.root is not None:
        over["root"] = a.root
    if a.dry_run:
        over["dry_run"] = True
    cfg = load_options(RetentionJobConfig, file=a.config, overrides=over)
    root = Storage(cfg.root, cfg.storage)
    Registry(root).require_exists()  # before the lease: a typo'd root gets no locks/ folder
    if cfg.dry_run:
        apply_retention(root, cfg.retention, dry_run=True)
        return EXIT_OK
    try:
        with Lease(root, LEASE_NAME, ttl_s=cfg.lease_ttl_s):
            result = apply_retention(root, cfg.retention)
    except LeaseHeldError as exc:
        print(f"raybc retention: busy root={root.uri()} -- {exc}")
        return EXIT_BUSY
    print(f"raybc retention: done root={root.uri()} removed_runs={len(result.removed)}")
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raybc demo",
        description="Build a synthetic registry (several versions, growing dimensions) in a local folder, "
        "backfill every older version on a local Ray, verify the snapshots, and show how to read them.",
    )
    p.add_argument("--root", default="./demo-root", help="folder for the demo root (default ./demo-root)")
    p.add_argument("--rows", type=int, help="rows per entity in the newest version (default 200000)")
    p.add_argument("--config", help="YAML file with a demo config")
    p.add_argument("--ray-address", help="Ray cluster address (default: a new local Ray)")
    return p


# Rows whose vectors the demo compares per snapshot: enough to catch a wrong transform anywhere it
# looks (whole row groups across the input), few enough that verifying costs little next to the
# backfill at any --rows (ids are always all checked, 8 bytes a row).
DEMO_VERIFY_ROWS = 100_000


def run_demo(argv: Sequence[str]) -> int:
    a = demo_parser().parse_args(argv)
    from raybc.backfill import BackfillOptions, backfill
    from raybc.config import DemoConfig
    from raybc.data.synthetic import build_registry
    from raybc.options import load_options
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots, verify_snapshot
    from raybc.storage import Storage
    over: dict[str, Any] = {"root": a.root}
    if a.rows is not None:
        over["rows"] = a.rows
    if a.ray_address:
        over["ray_address"] = a.ray_address
    cfg = load_options(DemoConfig, file=a.config, overrides=over)
    root = Storage(cfg.root)
    registry = Registry(root)
    if registry.versions():
        print(f"[raybc] {root.uri()} already holds versions {registry.versions()}; reusing them")
    else:
        print(f"[raybc] building a synthetic registry in {root.uri()}: dims {cfg.dims}, {cfg.rows:,} rows per entity")
        build_registry(root, dims=cfg.dims, rows=cfg.rows, entities=cfg.entities, rows_per_file=cfg.rows_per_file, seed=cfg.seed)
    summary = backfill(root, BackfillOptions(), ray_address=cfg.ray_address)
    print(summary.table())
    newest = registry.latest()
    assert newest is not None
    bad = []
    print(
        "\n[raybc] verifying every snapshot against the step-by-step float64 transform (every id; vectors of "
        f"about {DEMO_VERIFY_ROWS:,} rows, whole row groups spread over the input):"
    )
    for target, entity, ptr in Snapshots(root).list():
        v = verify_snapshot(registry, target, entity, sample_rows=DEMO_VERIFY_ROWS)
        print(
            f"  as-v{target}/{entity}: {v.rows:,} rows, ids exactly once: {v.ids_match}, "
            f"max relative error {v.max_rel_error:.1e} over {v.compared_rows:,} rows compared -> {'ok' if v.ok else 'FAILED'}"
        )
        if not v.ok:
            bad.append(f"as-v{target}/{entity}")
    snap_root = root.uri("snapshots")
    example_entity = cfg.entities[0]
    print(
        f"""
[raybc] snapshots are under {snap_root}/as-v<j>/<entity>/ ; CURRENT names the committed one.
Read one with raybc, pandas or pyarrow:

  import raybc
  table = raybc.read_snapshot({root.uri()!r}, {example_entity!r}, version=0)     # pyarrow.Table: id, embedding
  ds = raybc.read_snapshot_dataset({root.uri()!r}, {example_entity!r}, version=0)  # ray.data.Dataset

  # without raybc: follow CURRENT to the manifest, then read plain Parquet
  import json, os, pandas as pd
  d = {os.path.join(root.uri(), "snapshots", "as-v0", example_entity)!r}
  man_path = os.path.join(d, json.load(open(os.path.join(d, "CURRENT")))["manifest"])
  files = [os.path.join(os.path.dirname(man_path), f["path"]) for f in json.load(open(man_path))["files"]]
  df = pd.concat(pd.read_parquet(f) for f in files)"""
    )
    if bad:
        print(f"\n[raybc] verification FAILED for {', '.join(bad)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------- registry commands


def register_parser(prog: str = "raybc register") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Publish a version trained elsewhere from its z_k Parquet files, with B_k given (--aligner) or fitted "
        "from the ids z_k shares with the stored z_{k-1} (--fit-aligner). Validation, the id join and the copy run in Ray tasks.",
    )
    p.add_argument("--config", help="YAML file with a register config (flags override it)")
    p.add_argument("--root")
    p.add_argument("--version", type=int)
    p.add_argument("--embeddings", action="append", metavar="ENTITY=URI", help="z_k of an entity: a Parquet file or folder; once per entity")
    p.add_argument("--aligner", help="B_k as .npy or .safetensors; not for v0")
    p.add_argument("--aligner-layout", choices=["out_in", "in_out"],
                   help="out_in: (d_{k-1}, d_k), y = B z (torch.nn.Linear weight); in_out: (d_k, d_{k-1}), y = z @ B. Required for a square B")  # fmt: skip
    p.add_argument("--fit-aligner", choices=["linear", "affine", "orthogonal", "residual_mlp"], help="fit B_k from the shared ids instead")
    p.add_argument("--fit-rows", help="pairs to sample by id hash for the fit, in total over the entities (default 1000000; 'all': every shared id)")
    p.add_argument("--holdout", type=float, help="share of sampled ids held out to report the error (default 0.1)")
    p.add_argument("--ridge", type=float, help="ridge penalty for linear/affine (default 0)")
    p.add_argument("--hidden", type=int, help="residual_mlp hidden units (default: sized to the data, at most 256)")
    p.add_argument("--epochs", type=int, help="residual_mlp epochs")
    p.add_argument("--num-workers", type=int, help="residual_mlp Ray Train workers (0: in-process)")
    p.add_argument("--use-gpu", action="store_true", help="residual_mlp on GPU workers")
    p.add_argument("--in-place", action="store_true", help="leave the files where they are (size and ETag/mtime recorded; later changes refused)")
    p.add_argument("--check-rows", type=int, help="shared ids sampled to measure a given B, in total over the entities (default 100000; 0: skip)")
    p.add_argument("--method", help="method name to record (default: external)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--summary-json", help="also write the published manifest as JSON to this local file (- for stdout)")
    _storage_flags(p)
    return p


def register_config(argv: Sequence[str], prog: str = "raybc register"):
    a = register_parser(prog).parse_args(argv)
    from raybc.config import RegisterConfig
    from raybc.options import load_options
    over: dict[str, Any] = {**_storage_overrides(a)}
    over.update(_given(a, "root", "version", "aligner", "method", "ray_address", "summary_json"))
    if a.embeddings:
        pairs: dict[str, str] = {}
        problems = []
        for item in a.embeddings:
            if "=" not in item:
                problems.append(f"--embeddings: expected ENTITY=URI, got {item!r}")
                continue
            e, uri = (x.strip() for x in item.split("=", 1))
            if e in pairs:
                problems.append(f"--embeddings: entity {e!r} given twice ({pairs[e]} and {uri}); give each entity once, "
                                "with a folder holding all its files")  # fmt: skip
            pairs[e] = uri
        if problems:
            raise ConfigError(problems)
        over["embeddings"] = pairs
    reg: dict[str, Any] = _given(a, "aligner_layout", "check_rows")
    if a.in_place:
        reg["in_place"] = True
    fit: dict[str, Any] = {}
    if a.fit_aligner is not None:
        fit["kind"] = a.fit_aligner
    if a.fit_rows is not None:
        if a.fit_rows.strip().lower() == "all":
            fit["fit_rows"] = None
        else:
            try:
                fit["fit_rows"] = int(a.fit_rows)
            except ValueError:
                raise ConfigError([f"--fit-rows: expected a number of pairs or 'all', got {a.fit_rows!r}"]) from None
    fit.update(_given(a, "holdout", "ridge", "hidden", "epochs", "num_workers"))
    if a.use_gpu:
        fit["use_gpu"] = True
    if fit:
        if a.fit_aligner is None and a.config is None:
            raise ConfigError(["--fit-rows/--holdout/--ridge/...: these tune a fit; add --fit-aligner KIND"])
        reg["fit"] = fit
    if reg:
        over["register"] = reg
    return load_options(RegisterConfig, file=a.config, overrides=over)


def run_register_job(cfg) -> int:
    from raybc.registry import Registry
    from raybc.storage import Storage

    reg = Registry(Storage(cfg.root, cfg.storage))
    v = reg.register(
        cfg.version, embeddings=cfg.embeddings, aligner=cfg.aligner, method=cfg.method, options=cfg.register_options,
        source_options=cfg.source_storage, ray_address=cfg.ray_address, echo=print,
    )  # fmt: skip
    print(f"registered v{v.version} (dim {v.dim}) in {reg.root.uri('registry')}: " + ", ".join(f"{e} {f.rows:,} rows" for e, f in v.embeddings.items()))
    if cfg.summary_json:
        _write_json(cfg.summary_json, v.manifest)
    return EXIT_OK


def _write_json(path: str, obj: Any) -> None:
    """``--summary-json PATH``: write ``obj`` to the local file PATH, or to stdout for ``-``."""
    if path == "-":
        print(json.dumps(obj, indent=1, default=str))
        return
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)


def _root_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--root", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _storage_flags(p)
    return p


def _storage_from(a: argparse.Namespace):
    """The ``--root`` of a command that reads or maintains a registry: one without is a usage error
    (exit 2) naming the root, so a typo is never answered "nothing there" with exit 0."""
    from raybc.options import validate_options
    from raybc.registry import Registry
    from raybc.storage import Storage, StorageOptions

    opts = validate_options(StorageOptions, _storage_overrides(a).get("storage", {}), source="command-line flags")
    root = Storage(a.root, opts)
    Registry(root).require_exists()
    return root


def run_versions(argv: Sequence[str]) -> int:
    a = _root_parser("raybc versions", "List published versions and their lineage.").parse_args(argv)
    from raybc.registry import Registry
    reg = Registry(_storage_from(a))
    rows = []
    for k in reg.versions():
        v = reg.get(k)
        rows.append({
            "version": k, "parent": v.parent, "dim": v.dim, "method": v.method,
            "aligner": None if v.aligner is None else v.aligner.spec.get("kind"),
            "entities": {e: f.rows for e, f in v.embeddings.items()}, "created_at": v.created_at,
        })  # fmt: skip
    if a.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no published versions in {reg.root.uri('registry')}")
    else:
        for r in rows:
            ents = ", ".join(f"{e}: {n:,}" for e, n in r["entities"].items()) or "-"
            print(f"v{r['version']}  dim {r['dim']:>5}  {r['method']:<18} B: {r['aligner'] or '-':<13} embeddings: {ents}")
    return EXIT_OK


def run_snapshots(argv: Sequence[str]) -> int:
    a = _root_parser(
        "raybc snapshots",
        "List committed snapshots (what each CURRENT names): source version, age, dtype, whether it is stale against the "
        "newest version, the file URIs to read without raybc; and the snapshots the newest version is missing.",
    ).parse_args(argv)
    from raybc.snapshots import snapshot_status, status_table
    status = snapshot_status(_storage_from(a))
    print(json.dumps(status, indent=2) if a.json else status_table(status))
    return EXIT_OK


def run_discard(argv: Sequence[str]) -> int:
    p = _root_parser("raybc discard", "Remove the weight files of an interrupted, unpublished version.")
    p.add_argument("--version", type=int, required=True)
    a = p.parse_args(argv)
    from raybc.registry import Registry
    removed = Registry(_storage_from(a)).discard_unpublished(a.version)
    if a.json:
        print(json.dumps({"version": a.version, "removed": removed}, indent=2))
    else:
        print("removed: " + (", ".join(removed) if removed else "nothing (no unpublished files)"))
    return EXIT_OK


# --------------------------------------------------------------------------- train


def train_parser(prog: str = "raybc train") -> argparse.ArgumentParser:
    from raybc.data import DATASET_HELP
    from raybc.train.methods import METHODS

    methods = "\n".join(f"  {m.name:<18} {m.description}" for m in METHODS.values())
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fit one version of an embedding model (and its backward transform) with Ray Train, "
        "publish it in the registry and write z_k for users and items.",
        epilog=f"methods:\n{methods}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with the job config (flags override it)")
    p.add_argument("--root", help="root URI of the registry")
    p.add_argument("--dataset", help=DATASET_HELP)
    p.add_argument("--method", help="one of the methods below")
    p.add_argument("--version", type=int, help="version to fit (default: the registry's next one)")
    p.add_argument("--dims", help="dimension per version, comma-separated (default 32,40,48,56,64)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", type=int, help="Ray Train workers (0: in-process)")
    p.add_argument("--use-gpu", action="store_true", help="train on GPU workers")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true", help="no per-tenth progress lines")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    _storage_flags(p)
    return p


def train_config(argv: Sequence[str], prog: str = "raybc train"):
    a = train_parser(prog).parse_args(argv)
    from raybc.config import TrainJobConfig
    from raybc.options import load_options
    train: dict[str, Any] = {}
    if a.method is not None:
        train["method"] = a.method
    if a.dims is not None:
        train["dims"] = _int_list("--dims", a.dims)
    train.update(_given(a, "epochs", "num_workers", "seed"))
    if a.use_gpu:
        train["use_gpu"] = True
    if a.no_progress:
        train["progress"] = False
    over: dict[str, Any] = {**_storage_overrides(a)}
    if train:
        over["train"] = train
    over.update(_given(a, "root", "dataset", "version", "ray_address"))
    return load_options(TrainJobConfig, file=a.config, overrides=over)


def run_train_job(cfg) -> int:
    from raybc.data import load_dataset
    from raybc.data.slicing import temporal_versions
    from raybc.registry import Registry
    from raybc.runtime import ensure_ray
    from raybc.storage import Storage
    from raybc.train.fit import fit_version

    root = Storage(cfg.root, cfg.storage)
    latest = Registry(root).latest()
    version = cfg.version if cfg.version is not None else (0 if latest is None else latest + 1)
    data = load_dataset(cfg.dataset, seed=cfg.train.seed)
    slices = temporal_versions(data)
    # a local Ray gets at least 4 logical CPUs: Train workers and Data tasks must not starve each
    # other on a 2-core machine (RAY_NOTES); a cluster's own resources are left alone
    ensure_ray(cfg.ray_address, num_cpus=max(4, os.cpu_count() or 1))
    v = fit_version(root, data, slices, version=version, options=cfg.train)
    shown = {k: v.metrics[k] for k in ("recall@10", "recall@20", "recall@50", "recall@100", "best_epoch", "fit_seconds") if k in v.metrics}
    shown.update({k: x for k, x in v.metrics.items() if k.startswith("align_err_v")})
    print(f"v{v.version} ({v.method}, dim {v.dim}) published in {root.uri('registry')}")
    for k, x in shown.items():
        print(f"  {k:<14} {x:.4f}" if isinstance(x, float) else f"  {k:<14} {x}")
    return EXIT_OK


# --------------------------------------------------------------------------- experiment


def experiment_parser(prog: str = "raybc experiment") -> argparse.ArgumentParser:
    from raybc.data import DATASET_HELP
    from raybc.train.methods import METHODS

    p = argparse.ArgumentParser(
        prog=prog,
        description="The paper's protocol: train every version of every method, backfill, score the intended task and "
        "five consumer tasks, write the table and plots. Resumable: finished work is never redone.",
    )
    p.add_argument("--config", help="YAML file with the job config (flags override it)")
    p.add_argument("--dataset", help=DATASET_HELP)
    p.add_argument("--methods", help="comma-separated, default all: " + ",".join(METHODS))
    p.add_argument("--out", help="output folder: <out>/<method>/ roots and <out>/report/")
    p.add_argument("--profile", choices=["quick", "full"], help="full: the protocol at CPU scale; quick: a smoke run")
    p.add_argument("--versions", type=int, help="versions to run (default: all, or 3 with --profile quick)")
    p.add_argument("--seeds", help="embedding-model seeds, comma-separated (default 0); several: <out>/seed<s>/, mean ± std")
    p.add_argument("--alignment-weights", help="extra lambdas for every joint method, comma-separated (the trade-off curve)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--summary-json", help="also write what the run did as JSON to this local file (- for stdout)")
    return p


def experiment_config(argv: Sequence[str], prog: str = "raybc experiment"):
    a = experiment_parser(prog).parse_args(argv)
    from raybc.config import ExperimentJobConfig
    from raybc.options import load_options
    exp: dict[str, Any] = {}
    exp.update(_given(a, "dataset", "out", "profile", "versions"))
    if a.methods is not None:
        exp["methods"] = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.seeds is not None:
        exp["seeds"] = _int_list("--seeds", a.seeds)
    if a.alignment_weights is not None:
        try:
            exp["alignment_weights"] = [float(x) for x in a.alignment_weights.split(",") if x.strip()]
        except ValueError:
            raise ConfigError([f"--alignment-weights: {a.alignment_weights!r} is not a comma-separated list of numbers, e.g. 1,4,64"]) from None
    over: dict[str, Any] = {"experiment": exp} if exp else {}
    over.update(_given(a, "ray_address", "summary_json"))
    return load_options(ExperimentJobConfig, file=a.config, overrides=over)


def run_experiment_job(cfg) -> int:
    from raybc.experiment import run_experiment

    r = run_experiment(cfg.experiment, ray_address=cfg.ray_address)
    print(
        f"raybc experiment: done dataset={r.dataset} methods={len(r.methods)} versions={r.versions} "
        f"trained={len(r.trained)} evaluated={len(r.evaluated)} seconds={r.seconds:.1f}"
    )
    for f in r.report_files:
        print(f"  {f}")
    if cfg.summary_json:
        _write_json(cfg.summary_json, {k: v for k, v in vars(r).items() if k != "records"})
    return EXIT_OK


# --------------------------------------------------------------------------- consumers and the publish gate


def _entity_uris(flag: str, values: list[str]) -> dict[str, str]:
    """``ENTITY=URI`` flags -> {entity: uri}; an entity given twice is an error (which one was meant?)."""
    from raybc.storage import StorageError, check_segment

    pairs: dict[str, str] = {}
    problems = []
    for item in values:
        if "=" not in item:
            problems.append(f"{flag}: expected ENTITY=URI (e.g. users=s3://bucket/z5/users/), got {item!r}")
            continue
        e, uri = (x.strip() for x in item.split("=", 1))
        try:
            check_segment(e, what="entity name")
        except StorageError as exc:
            problems.append(f"{flag}: {exc}")
            continue
        if e in pairs:
            problems.append(f"{flag}: entity {e!r} is given twice ({pairs[e]} and {uri}); give each entity once")
            continue
        pairs[e] = uri
    if problems:
        raise ConfigError(problems)
    return pairs


def _read_labels(uri: str, options, *, task: str, version: int):
    """The labels Parquet file (a local path or a URI), checked up front (ConfigError names file and column)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybc.consumers import labels_from_table
    from raybc.storage import Storage

    parent, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri else (".", uri)
    try:
        data = Storage(parent, options).read_bytes(name)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError([f"--labels: {uri}: no such file; give a Parquet file of labelled rows"]) from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError([f"--labels: {uri} is not a readable Parquet file ({exc})"]) from None
    return labels_from_table(table, task, version=version, source=uri)


def _consumers_register(argv: Sequence[str]) -> int:
    from raybc.consumers import TASKS  # the --task choices (imports torch)

    p = _root_parser(
        "raybc consumers register",
        "Register a consumer of version J with the publish gate: its labelled rows and its model, trained here by the "
        "recipe on J's published embeddings (only the labelled rows are read, by Ray tasks).",
    )
    p.add_argument("--name", required=True, help="the consumer's name (a folder name: letters, digits, - _ .)")
    p.add_argument("--task", required=True, choices=TASKS, help="the consumer task (what its labels mean and which ids they carry)")
    p.add_argument(
        "--labels", required=True, metavar="FILE.parquet",
        help="labelled rows: id (user/item tasks) or user_id + item_id (binary-edge-rating), label (0/1), split (train/val/test)",
    )  # fmt: skip
    p.add_argument("--version", type=int, required=True, help="the published version J the consumer reads")
    p.add_argument("--recipe", metavar="YAML", help="the consumer recipe (ConsumerOptions: hidden, dropout, seeds, epochs, lr, ...)")
    p.add_argument("--hidden", help="hidden sizes tried on the val split, comma-separated (overrides the recipe)")
    p.add_argument("--epochs", type=int, help="full-batch Adam steps (overrides the recipe)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    a = p.parse_args(argv)
    from raybc.consumers import ConsumerOptions
    from raybc.gate import ConsumerStore, label_ids, read_label_rows, version_files
    from raybc.options import load_options
    from raybc.registry import Registry
    from raybc.storage import StorageError, check_segment
    try:
        check_segment(a.name, what="consumer name")
    except StorageError as exc:
        raise ConfigError([f"--name: {exc}"]) from None
    over: dict[str, Any] = {}
    if a.hidden is not None:
        over["hidden"] = _int_list("--hidden", a.hidden)
    if a.epochs is not None:
        over["epochs"] = a.epochs
    recipe = load_options(ConsumerOptions, file=a.recipe, overrides=over)
    root = _storage_from(a)
    labels = _read_labels(a.labels, root.options, task=a.task, version=a.version)
    store = ConsumerStore(root)
    if a.name in store.names():
        raise ConfigError([f"--name: consumer {a.name!r} is already registered at {root.uri('consumers')}; choose another name or remove it first"])
    registry = Registry(root)
    if not registry.is_published(a.version):
        raise ConfigError([f"--version: v{a.version} is not published in {root.uri('registry')} (published: {', '.join(f'v{v}' for v in registry.versions()) or 'none'})"])
    ids = label_ids([labels])
    rows = read_label_rows(version_files(registry, a.version, list(ids)), ids, expected_dim=registry.get(a.version).dim, ray_address=a.ray_address)
    rc = store.register(a.name, labels, version=a.version, recipe=recipe, embeddings=rows.tables)
    info = {**store.summary(a.name), "hidden": rc.consumer.spec.get("hidden"), "dropout": rc.consumer.spec.get("dropout")}
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(
            f"registered consumer {a.name!r} ({a.task}, trained on v{a.version}, hidden {info['hidden']}, dropout {info['dropout']}): "
            f"baseline ROC-AUC {rc.baseline_auc:.4f} on its held-out rows; {labels.rows:,} label rows in {root.uri('consumers', a.name)}"
        )
    return EXIT_OK


def _consumers_list(argv: Sequence[str]) -> int:
    a = _root_parser("raybc consumers list", "List the consumers registered with the publish gate.").parse_args(argv)
    from raybc.gate import ConsumerStore
    store = ConsumerStore(_storage_from(a))
    rows = [store.summary(n) for n in store.names()]
    if a.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no consumers registered at {store.root.uri('consumers')}")
    else:
        for r in rows:
            print(f"{r['name']:<28} {r['task']:<24} v{r['version']}  baseline ROC-AUC {r['baseline_auc']:.4f}  {r['label_rows']:>9,} label rows")
    return EXIT_OK


def _consumers_remove(argv: Sequence[str]) -> int:
    p = _root_parser("raybc consumers remove", "Remove a registered consumer: the gate stops asking it.")
    p.add_argument("--name", required=True)
    a = p.parse_args(argv)
    from raybc.gate import ConsumerStore
    removed = ConsumerStore(_storage_from(a)).remove(a.name)
    if a.json:
        print(json.dumps({"name": a.name, "removed": removed}, indent=2))
    else:
        print(f"removed consumer {a.name!r} ({len(removed)} files)")
    return EXIT_OK


CONSUMER_ACTIONS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "register": (_consumers_register, "register a consumer of a version (labels + a recipe trained on its embeddings)"),
    "list": (_consumers_list, "list registered consumers"),
    "remove": (_consumers_remove, "remove a registered consumer"),
}


def run_consumers(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: raybc consumers ACTION [options]   (raybc consumers ACTION --help for its options)\n\nactions:")
        for name, (_, text) in CONSUMER_ACTIONS.items():
            print(f"  {name:<10} {text}")
        return EXIT_OK if argv else EXIT_CONFIG
    if argv[0] not in CONSUMER_ACTIONS:
        raise ConfigError([f"raybc consumers: unknown action {argv[0]!r}; choose one of: {', '.join(CONSUMER_ACTIONS)}"])
    return CONSUMER_ACTIONS[argv[0]][0](argv[1:])


# B_K's two layouts: out_in is (d_{K-1}, d_K) with y = W z (torch.nn.Linear's weight), in_out is
# (d_K, d_{K-1}) with y = z @ M. A non-square matrix's shape tells them apart; a square one's cannot.
ALIGNER_LAYOUTS = ("out_in", "in_out")


def _read_aligner(uri: str, layout: str | None, options, *, in_dim: int, out_dim: int):
    """B_K through the registry's reader, in the layout the user named (required when square);
    a flag that contradicts the file, or a square B without one, is a usage error (exit 2)."""
    from raybc.errors import IntegrityError
    from raybc.registry import Registry

    try:
        t = Registry._read_matrix(uri, options, in_dim=in_dim, out_dim=out_dim, layout=layout)
    except IntegrityError as exc:
        if "--aligner-layout" in str(exc) or (layout is not None and "layout" in str(exc)):
            raise ConfigError([f"--aligner-layout: {exc}"]) from None
        raise
    if layout is not None and not t.is_affine:
        raise ConfigError([f"--aligner-layout: {uri} holds a non-linear transform ({t.spec().get('kind')}); the layout is for matrices: drop the flag"])
    return t


def run_gate(argv: Sequence[str]) -> int:
    p = _root_parser(
        "raybc gate",
        "Check a candidate version K against every registered consumer of an older version: its embeddings mapped by "
        "its B_K (and the published older B's) must keep each consumer's ROC-AUC within --max-degradation. Only the "
        "consumers' labelled rows are read (by Ray tasks). Nothing is published. Without --embeddings, checks the "
        "published v K. Exit 0 accepted, 1 refused, 2 bad usage.",
    )
    p.add_argument("--version", type=int, required=True, help="the candidate version K (the next one after the newest published)")
    p.add_argument("--embeddings", action="append", metavar="ENTITY=URI", help="z_K of an entity: a Parquet file or folder; repeat per entity")
    p.add_argument("--aligner", metavar="FILE", help="B_K: v K -> v K-1 as .npy or .safetensors (with --embeddings)")
    p.add_argument("--aligner-layout", choices=ALIGNER_LAYOUTS, help="out_in: (d_K-1, d_K), y = W z; in_out: (d_K, d_K-1), y = z @ M; required when square")
    p.add_argument("--max-degradation", type=float, help="relative ROC-AUC drop a consumer tolerates (default 0.02)")
    p.add_argument("--consumer", action="append", help="check only this consumer; repeat (default: every registered one)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a new local Ray)")
    a = p.parse_args(argv)
    from raybc.gate import GateOptions, GateRefused, PublishGate, file_dim, parquet_files, version_files
    from raybc.options import validate_options
    from raybc.registry import Registry
    opts = validate_options(GateOptions, _given(a, "max_degradation") | ({"consumers": a.consumer} if a.consumer else {}), source="command-line flags")
    root = _storage_from(a)
    registry = Registry(root)
    k = a.version
    if k < 1:
        raise ConfigError([f"--version: v{k} has no older version, so no consumer to protect; give K >= 1"])
    if a.embeddings:
        pairs = _entity_uris("--embeddings", a.embeddings)
        problems = []
        if a.aligner is None:
            problems.append(f"--aligner: a candidate given by --embeddings needs its B_{k} (v{k} -> v{k - 1}) as .npy or .safetensors")
        if registry.is_published(k):
            problems.append(f"--version: v{k} is already published in {root.uri('registry')}; omit --embeddings and --aligner to check it, or give the next version")
        elif not registry.is_published(k - 1):
            problems.append(f"--version: v{k - 1} is not published in {root.uri('registry')} (published: {', '.join(f'v{v}' for v in registry.versions()) or 'none'}); a candidate follows a published version")
        if problems:
            raise ConfigError(problems)
        try:
            files = {e: parquet_files(uri, root.options) for e, uri in pairs.items()}
        except RaybcError as exc:
            raise ConfigError([f"--embeddings: {exc}"]) from None
        first_store, first_names = next(iter(files.values()))
        aligner = _read_aligner(a.aligner, a.aligner_layout, root.options, in_dim=file_dim(first_store, first_names[0]), out_dim=registry.get(k - 1).dim)
    else:
        if a.aligner or a.aligner_layout:
            raise ConfigError(["--aligner: only with --embeddings (a published version is checked with its own B)"])
        if not registry.is_published(k):
            raise ConfigError([f"--version: v{k} is not published in {root.uri('registry')}; give the candidate's files with --embeddings ENTITY=URI and --aligner FILE"])
        files = version_files(registry, k)
        aligner = registry.aligner(k)
    report = PublishGate(root, options=opts).evaluate_files(k, aligner=aligner, files=files, ray_address=a.ray_address)
    if a.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
        if not report.rows:
            print(f"  (no registered consumer of a version older than v{k}: nothing to check)")
    if report.ok:
        return EXIT_OK
    if a.embeddings:
        raise GateRefused(report)  # its message ends "nothing was published"
    bad = ", ".join(f"{r.name!r} ({100 * r.degradation:.2f}%)" for r in report.rows if not r.ok)
    raise RaybcError(
        f"published v{k} degrades consumer(s) {bad} beyond {100 * report.max_degradation:.2f}%; it stays published (published "
        f"versions are immutable): keep those consumers on snapshots of their own version, or publish a compatible v{k + 1}"
    )


# --------------------------------------------------------------------------- entry points


def guarded(fn: Callable[[], int]) -> int:
    """Run ``fn``; print purposeful errors as one message and map them to exit codes."""
    try:
        return fn()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RaybcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; committed snapshots are unchanged, a rerun resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (run_demo, "build a synthetic registry, backfill it on a local Ray, verify, show how to read"),
    "backfill": (lambda argv: run_backfill_job(backfill_config(argv)), "backfill snapshots of older versions"),
    "train": (lambda argv: run_train_job(train_config(argv)), "fit one version of a method with Ray Train and publish it"),
    "experiment": (lambda argv: run_experiment_job(experiment_config(argv)), "the paper's protocol: train, backfill, evaluate, report"),
    "reconcile": (lambda argv: run_reconcile_job(reconcile_config(argv)), "backfill every missing or stale snapshot (scheduled)"),
    "retention": (run_retention, "remove old uncommitted and superseded snapshot runs"),
    "register": (lambda argv: run_register_job(register_config(argv)), "publish a version trained elsewhere (z_k + B_k given or fitted)"),
    "versions": (run_versions, "list published versions"),
    "snapshots": (run_snapshots, "list committed snapshots"),
    "discard": (run_discard, "remove the files of an interrupted publish"),
    "consumers": (run_consumers, "register, list or remove the consumers the publish gate asks"),
    "gate": (run_gate, "check a candidate version against every registered consumer (publishes nothing)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    while args and (args[0] in ("--quiet", "-q") or args[0].startswith("--log-level")):
        flag = args.pop(0)
        if flag in ("--quiet", "-q"):
            os.environ["RAYBC_QUIET"] = "1"
            continue
        level = flag.split("=", 1)[1] if "=" in flag else (args.pop(0) if args else "")
        from raybc.runtime import LOG_LEVELS

        if level.upper() not in LOG_LEVELS:
            print(f"error: --log-level: expected one of {', '.join(x.lower() for x in LOG_LEVELS)}, got {level!r}", file=sys.stderr)
            return EXIT_CONFIG
        os.environ["RAYBC_LOG_LEVEL"] = level.upper()
    if not args or args[0] in ("-h", "--help"):
        print("usage: raybc [--quiet] [--log-level LEVEL] COMMAND [options]   (raybc COMMAND --help for its options)\n\n"
              "  --quiet, -q          no progress bars or per-part/per-epoch lines; Ray logs warnings only ($RAYBC_QUIET=1)\n"
              "  --log-level LEVEL    Ray's log level: debug, info, warning, error ($RAYBC_LOG_LEVEL)\n\ncommands:")  # fmt: skip
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return EXIT_OK if args else EXIT_CONFIG
    if args[0] == "--version":
        from raybc import __version__

        print(f"raybc {__version__}")
        return EXIT_OK
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; run `raybc --help` for the list", file=sys.stderr)
        return EXIT_CONFIG
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        code = guarded(lambda: COMMANDS[name][0](rest))
        sys.stdout.flush()  # a reader that went away is seen here, not at interpreter exit
        return code
    except BrokenPipeError:
        # `raybc snapshots ... | head -1`: the reader has what it wanted. Point stdout at /dev/null
        # so the interpreter's final flush cannot raise again, and exit like a killed-by-SIGPIPE tool.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
