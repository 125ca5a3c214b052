"""Intake: registering a version trained elsewhere, at cluster scale.

A team with its own embedding model brings z_k (Parquet files, any partitioning, ids unsorted)
and either B_k or nothing: then B_k is fitted here from the ids z_k shares with the stored
z_{k-1} (``aligners``). :func:`register_version` runs, in this order, and publishes nothing unless
every step passes:

1. the sources, from listings and Parquet footers in the driver (O(files)): the contract's types
   (``fixed_size_list<float32>[d]``; ids int64 or UTF-8 string, the same kind as every older
   version's), one dimension, one flag per entity;
2. B_k, when given, read in one documented layout (a square B needs its layout stated);
3. in Ray tasks (``pairs``): every row validated (null or non-UTF-8 ids, nulls, NaN/Inf), ids
   unique across all files, the files copied into ``embeddings/v<k>/`` (or registered in place:
   left where they are, each file's size and ETag/mtime recorded, and any later change refused by
   the backfill), the ids shared with v<k-1> counted and a sample of them joined into pairs;
4. B_k fitted on the pairs, or the given one measured on them, in the parent's space and every
   older space; one that maps z_k further from z_{k-1} than zeros would is refused;
5. the publish gate, when consumers are registered;
6. publishing: weights, then the manifest, which records the fit or check and the verification.

A refused registration removes the files it copied. Reading, sampling and checking never happen in
the driver: 10x the rows cost it the same work with the same number of files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from raybc.aligners import AlignerFitOptions, AlignerReport, check_given, fit_from_scans
from raybc.embeddings import inspect_schema, parquet_file
from raybc.errors import AlreadyExistsError, ConfigError, InputDataError, RegistryError
from raybc.options import Options
from raybc.pairs import EntityScan, SourceFiles, scan_entity
from raybc.registry import EntityFiles, FileEntry, Registry, Version, check_unchanged
from raybc.storage import IO_THREADS, Storage, StorageOptions, check_segment, file_stamp
from raybc.transforms import Transform

# Relative error of a B in the parent's space at or above which it is refused: mapping every
# vector to zeros scores exactly 1.
WORSE_THAN_ZEROS = 1.0
# An entity is judged on its own only with at least this many held-out pairs; below it the
# estimate is noise (5 ids of a small table can score 1.2 for a B that is fine on 2,000), so such
# entities count through the error pooled over all entities, and are shown, not refused.
MIN_JUDGED = 100


def split_target(target: int | None, rows: Mapping[str, int]) -> dict[str, int | None]:
    """``--fit-rows`` / ``--check-rows`` is a total over entities: each gets its share of rows,
    so every entity is sampled at the same rate (at least one pair each when the total allows)."""
    total = sum(rows.values())
    if target is None or target == 0 or total == 0:
        return {e: target for e in rows}
    return {e: max(1, round(target * n / total)) if n else 0 for e, n in rows.items()}


def refused(report: AlignerReport, parent: int) -> dict[str, float]:
    """Entities (or "all") whose B maps further from z_parent than zeros do, on enough evidence."""
    space = f"v{parent}"
    bad = {
        e: errs[space] for e, errs in report.error.items()
        if e != "all" and report.pairs[e]["holdout"] >= MIN_JUDGED and not errs[space] < WORSE_THAN_ZEROS
    }  # fmt: skip
    pooled = report.error.get("all")
    if pooled is not None and not pooled[space] < WORSE_THAN_ZEROS:
        bad["all"] = pooled[space]
    if not bad and len(report.error) == 1:  # one entity: its error is the pooled one, whatever its size
        (e, errs), = report.error.items()
        if not errs[space] < WORSE_THAN_ZEROS:
            bad[e] = errs[space]
    return bad


class RegisterOptions(Options):
    """How ``raybc register`` publishes a version trained elsewhere."""

    fit: AlignerFitOptions | None = Field(default=None, description="Fit B_k from the pairs instead of taking one.")
    aligner_layout: Literal["out_in", "in_out"] | None = Field(
        default=None,
        description="How a given B is laid out: out_in = (d_{k-1}, d_k), y = B z (torch.nn.Linear weight); "
        "in_out = (d_k, d_{k-1}), y = z @ B. Required when B is square.",
    )
    in_place: bool = Field(default=False, description="Leave the files where they are (size and ETag/mtime recorded).")
    check_rows: int = Field(
        default=100_000, ge=0, description="Shared ids sampled to measure a given B, in total over the entities (0: no check, recorded as skipped)."
    )
    cpus_per_task: float = Field(default=1.0, gt=0, le=64)


def _source_files(uri: str, options: StorageOptions | None) -> tuple[Storage, list[dict[str, Any]]]:
    """(folder storage, listing entries of its .parquet files) for a file or folder URI."""
    src = Storage(uri, options)
    if src.isdir():
        entries = [e for e in src.list(detail=True) if e["basename"].endswith(".parquet") and e.get("type") != "directory"]
        if not entries:
            raise InputDataError(f"{uri}: no .parquet files there")
        return src, entries
    parent_uri, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri else (".", uri)
    base = Storage(parent_uri, options)
    found = [e for e in base.list(detail=True) if e["basename"] == name]
    if not found:
        raise InputDataError(f"{uri}: no such file or folder")
    return base, found


def _footer(store: Storage, name: str) -> tuple[int, pa.Schema]:
    with store.open_input(name) as f:
        pf = parquet_file(f, store.uri(name))
        return pf.metadata.num_rows, pf.schema_arrow


def _id_kind(t: pa.DataType, source: str) -> str:
    if t == pa.int64():
        return "int64"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    raise InputDataError(
        f"{source}: column 'id' is {t}; the storage contract's ids are int64 or UTF-8 strings, and a registered file "
        "is kept as it is: cast the ids to int64 (pyarrow: table.set_column(0, 'id', table['id'].cast('int64'))) and write it again"
    )


def _check_schema(schema: pa.Schema, *, source: str, dim: int | None) -> tuple[int, str]:
    """(dim, id kind) of a file to register: exactly the contract's types, nothing normalised."""
    layout = inspect_schema(schema, source=source, expected_dim=dim)
    if not layout.fixed:
        raise InputDataError(f"{source}: column 'embedding' is a variable-length list; write it as fixed_size_list<float32>[d]")
    if layout.value_type != pa.float32():
        raise InputDataError(
            f"{source}: column 'embedding' holds {layout.value_type} values; the storage contract stores float32 and a "
            f"registered file is kept as it is: cast it (pyarrow: pa.compute.cast(col, pa.list_(pa.float32(), {layout.dim}))) and write it again"
        )
    return layout.dim, _id_kind(schema.field("id").type, source)


def _plan_sources(registry: Registry, k: int, embeddings: Mapping[str, str], options: StorageOptions | None) -> tuple[int, dict[str, SourceFiles], dict[str, str], dict[str, dict[str, dict]]]:
    """Listings and footers of every source file; the contract's type checks (driver, O(files))."""
    sources: dict[str, SourceFiles] = {}
    kinds: dict[str, str] = {}
    listings: dict[str, dict[str, dict]] = {}
    dim: int | None = None
    for entity, uri in embeddings.items():
        check_segment(entity, what="entity name")
        store, entries = _source_files(uri, options)
        names = sorted(e["basename"] for e in entries)
        with ThreadPoolExecutor(IO_THREADS) as pool:
            footers = list(pool.map(lambda n: _footer(store, n), names))
        kind = None
        for n, (_, schema) in zip(names, footers):
            d, kd = _check_schema(schema, source=store.uri(n), dim=dim)
            if kind is not None and kd != kind:
                raise InputDataError(f"{store.uri(n)}: ids are {kd} but other files of {entity} hold {kind} ids; every file of an entity needs the same id type")
            dim, kind = d, kd
        rows = tuple(r for r, _ in footers)
        if sum(rows) == 0:
            raise InputDataError(f"the files given for {entity} ({', '.join(store.uri(n) for n in names)}) hold no rows")
        assert dim is not None and kind is not None
        sources[entity] = SourceFiles(entity, store, tuple(names), rows, dim)
        kinds[entity] = kind
        listings[entity] = {e["basename"]: e for e in entries}
    assert dim is not None
    for v in registry.versions():
        if v >= k:
            continue
        for entity, kind in kinds.items():
            older = registry.get(v).embeddings.get(entity)
            if older is not None and older.id_type != kind:
                raise InputDataError(
                    f"{embeddings[entity]}: {entity} ids are {kind} but v{v}'s {entity} ids are {older.id_type}; "
                    "every version must use the same ids (the data set's own), so consumers can join them: "
                    f"write z_{k} with {older.id_type} ids"
                )
    return dim, sources, kinds, listings


def _parent_files(registry: Registry, k: int, entity: str) -> SourceFiles | None:
    if k == 0:
        return None
    v = registry.get(k - 1)
    ef = v.embeddings.get(entity)
    if ef is None:
        return None
    store = registry.embeddings_storage(k - 1, entity)
    check_unchanged(store, ef.files, version=k - 1)  # B_k is judged against the z_{k-1} that was published
    return SourceFiles(entity, store, tuple(f.path for f in ef.files), tuple(f.rows for f in ef.files), ef.dim)


def register_version(
    registry: Registry,
    k: int,
    *,
    embeddings: Mapping[str, str],
    aligner: str | Transform | None = None,
    options: RegisterOptions | None = None,
    source_options: StorageOptions | None = None,
    method: str = "external",
    metrics: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    ray_address: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> Version:
    """Publish version ``k`` from its z_k files (entity -> file or folder URI) and B_k (a ``.npy`` /
    ``.safetensors`` URI or a Transform), or with B_k fitted (``options.fit``); see the module doc."""
    from raybc.runtime import ensure_ray

    options = options or RegisterOptions()
    echo = echo or (lambda _msg: None)
    if not isinstance(k, int) or k < 0:
        raise RegistryError(f"invalid version {k!r}: versions are integers >= 0")
    if not embeddings:
        raise InputDataError("register needs at least one entity's embeddings (entity=URI)")
    if registry.is_published(k):
        raise AlreadyExistsError(f"v{k} is already published; published versions are immutable: register v{k + 1}")
    if k > 0 and not registry.is_published(k - 1):
        raise RegistryError(f"cannot register v{k}: its parent v{k - 1} is not published; register v{k - 1} first")
    if k == 0 and (aligner is not None or options.fit is not None):
        raise InputDataError("v0 is the oldest version: it takes no --aligner and no --fit-aligner")
    if k > 0 and aligner is None and options.fit is None:
        raise InputDataError(f"v{k} needs B_{k}: give --aligner FILE (.npy or .safetensors) or fit one with --fit-aligner KIND")
    if aligner is not None and options.fit is not None:
        raise ConfigError([f"aligner and fit: give B_{k} (--aligner) or fit it (--fit-aligner), not both"])
    if options.in_place and source_options is not None and source_options != registry.root.options:
        raise ConfigError(["in_place: files registered in place are read with the root's storage options; "
                           "put them where the root's credentials reach, or copy them (drop --in-place)"])  # fmt: skip

    dim, sources, kinds, listings = _plan_sources(registry, k, embeddings, source_options)
    parent_dim = registry.get(k - 1).dim if k > 0 else None
    b: Transform | None = None
    if isinstance(aligner, Transform):
        if (aligner.in_dim, aligner.out_dim) != (dim, parent_dim):
            raise InputDataError(f"B_{k} maps {aligner.in_dim}->{aligner.out_dim} but v{k} has dim {dim} and v{k - 1} has {parent_dim}")
        b = aligner
    elif aligner is not None:
        b = Registry._read_matrix(aligner, source_options, in_dim=dim, out_dim=parent_dim, layout=options.aligner_layout)  # type: ignore[arg-type]

    ensure_ray(ray_address, num_cpus=max(4, os.cpu_count() or 1))
    copied: list[Storage] = []
    try:
        scans: list[EntityScan] = []
        targets = split_target(
            options.fit.fit_rows if options.fit is not None else options.check_rows, {e: s.total_rows for e, s in sources.items()}
        )
        for entity, src in sources.items():
            target = targets[entity]
            dest, dest_names = None, None
            if not options.in_place:
                dest = registry.embeddings_storage(k, entity)
                if dest.walk_files():
                    raise AlreadyExistsError(f"{dest.uri()} already holds files of an unfinished registration; remove them first")
                dest_names = [f"part-{i:05d}.parquet" for i in range(len(src.names))]
                copied.append(dest)
            echo(f"[raybc] {entity}: {src.total_rows:,} rows in {len(src.names)} files: validating"
                 + ("" if options.in_place else ", copying") + (f", joining with v{k - 1}" if k > 0 else ""))  # fmt: skip
            scans.append(
                scan_entity(
                    src, _parent_files(registry, k, entity) if target != 0 else None, target_pairs=target,
                    holdout=options.fit.holdout if options.fit is not None else 0.0, copy_to=dest, dest_names=dest_names,
                    cpus_per_task=options.cpus_per_task,
                )  # fmt: skip
            )
        report: AlignerReport | None = None
        source = ", ".join(f"{e}={u}" for e, u in embeddings.items())
        if k > 0 and options.fit is not None:
            b, report = fit_from_scans(scans, options.fit, d_in=dim, d_out=parent_dim, registry=registry, version=k, source=source)  # type: ignore[arg-type]
        elif k > 0 and options.check_rows > 0:
            assert b is not None
            if not any(s.shared for s in scans):
                raise InputDataError(
                    f"{source}: no id of the new embeddings occurs in v{k - 1}, so B_{k} cannot be measured against the stored "
                    f"z_{k - 1}; check that the ids are the data set's own (the same as v{k - 1}'s), or skip the check with --check-rows 0"
                )
            report = check_given(scans, b, registry=registry, version=k)
        if report is not None:
            echo(report.table())
            bad = refused(report, k - 1)
            for e, errs in report.error.items():
                if e not in bad and e != "all" and report.pairs[e]["holdout"] and not errs[f"v{k - 1}"] < WORSE_THAN_ZEROS:
                    echo(f"[raybc] warning: {e}: relative error {errs[f'v{k - 1}']:.3g} on only {report.pairs[e]['holdout']:,} "
                         f"held-out ids (fewer than {MIN_JUDGED}); judged through the pooled error instead")  # fmt: skip
            if bad:
                hint = (" A square B read the wrong way round does this: check --aligner-layout." if b is not None and b.in_dim == b.out_dim else "")
                raise InputDataError(
                    f"B_{k} maps z_{k} further from the stored z_{k - 1} than mapping every vector to zeros would: relative error "
                    + ", ".join(f"{e} {x:.3g}" for e, x in bad.items())
                    + f" (zeros score 1.0) on {sum(p['holdout'] for p in report.pairs.values()):,} shared ids. Nothing was published."
                    + hint
                )
        from raybc.gate import ConsumerStore, PublishGate

        if k > 0 and ConsumerStore(registry.root).names():
            PublishGate(registry.root).check_files(
                k, aligner=b, files={e: (s.store if options.in_place else copied_store(registry, k, e), list(_names(s, options))) for e, s in sources.items()},
                echo=echo,
            )  # fmt: skip
        listing = _entity_files(registry, k, sources, scans, kinds, listings, options)
        extra: dict[str, Any] = {"registered_from": {e: s.store.uri(s.names[0]) if len(s.names) == 1 else s.store.uri() for e, s in sources.items()}}
        if report is not None:
            extra["aligner_fit" if report.fitted else "aligner_check"] = report.to_json()
        elif k > 0:
            extra["aligner_check"] = {"skipped": True}
        return registry.publish(
            k, dim=dim, method=method, aligner=b, embeddings=listing, metrics=metrics, hyperparameters=hyperparameters, extra=extra,
        )  # fmt: skip
    except BaseException:
        try:
            if copied and not registry.is_published(k):
                for dest in copied:
                    dest.remove("", recursive=True)
                if not registry.root.walk_files(f"embeddings/v{k}"):
                    registry.root.remove(f"embeddings/v{k}", recursive=True)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise


def copied_store(registry: Registry, k: int, entity: str) -> Storage:
    return registry.root.child("embeddings", f"v{k}", entity)


def _names(src: SourceFiles, options: RegisterOptions) -> list[str]:
    return list(src.names) if options.in_place else [f"part-{i:05d}.parquet" for i in range(len(src.names))]


def _entity_files(registry: Registry, k: int, sources: Mapping[str, SourceFiles], scans: list[EntityScan], kinds: Mapping[str, str],
                  listings: Mapping[str, Mapping[str, dict]], options: RegisterOptions) -> dict[str, EntityFiles]:  # fmt: skip
    """The manifest's listing: per file its rows, bytes and stamp (what the backfill checks later)."""
    out = {}
    for s in scans:
        src = sources[s.entity]
        rows = {m["name"]: m["rows"] for m in s.files}
        if options.in_place:
            info = listings[s.entity]
            entries = [FileEntry(n, rows[n], int(info[n].get("size") or 0), file_stamp(info[n])) for n in src.names]
            location = src.store.uri()
        else:
            dest = copied_store(registry, k, s.entity)
            info = {e["basename"]: e for e in dest.list(detail=True)}
            entries = [FileEntry(d, rows[n], int(info[d].get("size") or 0), file_stamp(info[d])) for n, d in zip(src.names, _names(src, options))]
            location = None
        out[s.entity] = EntityFiles(s.entity, src.dim, kinds[s.entity], tuple(entries), location=location, verified=True)
    return out


__all__ = ["RegisterOptions", "register_version"]
