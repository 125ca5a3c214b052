"""The version registry: published versions, their weights, their embeddings, their lineage.

Layout below a root (the storage contract)::

    registry/v<k>/manifest.json        immutable once published
    registry/v<k>/model.safetensors    M_k weights (when raybc trained it)
    registry/v<k>/aligner.safetensors  B_k: v<k> -> v<k-1> (absent for v0)
    embeddings/v<k>/<entity>/*.parquet z_k

A version is *published* when its manifest exists. Publishing writes the weight files first, each
create-exclusive (so two publishers of one version cannot overwrite each other's weights), then the
manifest, create-exclusive too: of two publishers exactly one wins, the other gets a clear error,
and a published version can never be overwritten. The manifest records every weight file's sha256
and size; loading verifies both before parsing, and parsing is safetensors: it never unpickles.

Versions trained elsewhere join through :meth:`Registry.register`: the user's z_k Parquet files
and B_k matrix are checked, copied into the layout and published like any other version.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raybc import __version__
from raybc.embeddings import ROW_GROUP_ROWS, inspect_schema, parquet_file, write_table
from raybc.errors import AlreadyExistsError, InputDataError, IntegrityError, NoRegistryError, RegistryError, StorageError
from raybc.storage import IO_THREADS, Storage, StorageOptions, check_segment, file_stamp, json_bytes
from raybc.transforms import FanOutPlan, Transform, from_bytes, from_matrix, has_spec, to_bytes

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
ALIGNER_FILE = "aligner.safetensors"
VERSION_FORMAT = "raybc.version/1"
# Written by retention beside an old version's (immutable) manifest before its z_k files go:
# which entities' embeddings were removed and when. B_k and the manifest stay.
EMBEDDINGS_REMOVED = "embeddings-removed.json"
_VERSION_DIR = re.compile(r"^v(\d+)$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def version_dir(k: int) -> str:
    return f"v{int(k)}"


@dataclass(frozen=True)
class WeightFile:
    """A weight file of a version, as its manifest records it."""

    file: str
    sha256: str
    bytes: int
    spec: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes, "spec": self.spec}


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the entity folder
    rows: int
    bytes: int
    stamp: str | None = None  # ETag or mtime when published: a later change is refused (None: published before stamps)


def listing(store: Storage) -> dict[str, dict[str, Any]]:
    """The files directly in ``store``'s folder, by name: fsspec info dicts (size, ETag or mtime)."""
    return {e["basename"]: e for e in store.list(detail=True)}


def with_stamps(store: Storage, entries: Iterable[FileEntry], infos: Mapping[str, dict[str, Any]]) -> tuple[FileEntry, ...]:
    """``entries``, each without a stamp given the size and stamp (ETag, else mtime) of its file in
    ``infos`` (a :func:`listing`): what the backfill compares later to refuse a changed file."""
    out = []
    for f in entries:
        if f.stamp is None:
            if f.path not in infos:
                raise InputDataError(f"{store.uri(f.path)} was written or listed but is gone: it was removed meanwhile; write the version's files again")
            f = FileEntry(f.path, f.rows, int(infos[f.path].get("size") or 0), file_stamp(infos[f.path]))
        out.append(f)
    return tuple(out)


def check_unchanged(store: Storage, files: Iterable[FileEntry], *, version: int, infos: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Refuse a published embedding file that is missing, or whose size or stamp differs from what
    its manifest records (files published before stamps were recorded are not checked)."""
    infos = infos if infos is not None else listing(store)
    for f in files:
        if f.path not in infos:
            raise IntegrityError(f"{store.uri(f.path)} is listed in v{version}'s manifest but missing; restore it")
        info = dict(infos[f.path])
        if f.stamp is not None and (int(info.get("size") or -1) != f.bytes or file_stamp(info) != f.stamp):
            raise IntegrityError(
                f"{store.uri(f.path)} changed after v{version} was published (size {info.get('size')}, stamp "
                f"{file_stamp(info)!r}; published: {f.bytes}, {f.stamp!r}): published embeddings are immutable. "
                f"Restore the file, or publish the new embeddings as a new version (raybc register --version {version + 1} ...)"
            )


@dataclass(frozen=True)
class EntityFiles:
    """The Parquet files of one entity's embeddings in one version."""

    entity: str
    dim: int
    id_type: str  # "int64" or "string"
    files: tuple[FileEntry, ...]
    # Where the files live when registered in place (a folder URI); None: embeddings/v<k>/<entity>/.
    location: str | None = None
    # The registry read every row at registration: values, ids unique across all files.
    verified: bool = False

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dim": self.dim,
            "id_type": self.id_type,
            "rows": self.rows,
            "files": [
                {"path": f.path, "rows": f.rows, "bytes": f.bytes, **({"stamp": f.stamp} if f.stamp is not None else {})}
                for f in self.files
            ],
        }
        if self.location is not None:
            out["location"] = self.location
        if self.verified:
            out["verified"] = True
        return out

    @staticmethod
    def from_json(entity: str, d: Mapping[str, Any]) -> EntityFiles:
        return EntityFiles(
            entity=entity,
            dim=int(d["dim"]),
            id_type=str(d["id_type"]),
            files=tuple(
                FileEntry(str(f["path"]), int(f["rows"]), int(f["bytes"]), None if f.get("stamp") is None else str(f["stamp"]))
                for f in d["files"]
            ),
            location=None if d.get("location") is None else str(d["location"]),
            verified=bool(d.get("verified", False)),
        )


@dataclass(frozen=True)
class Version:
    """A published version, read from its manifest."""

    version: int
    parent: int | None
    dim: int
    method: str
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    aligner: WeightFile | None
    model: WeightFile | None
    embeddings: dict[str, EntityFiles]
    created_at: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def entities(self) -> list[str]:
        return sorted(self.embeddings)


@dataclass(frozen=True)
class ModelWeights:
    """M_k: its tensors and the constructor arguments that rebuild it."""

    tensors: dict[str, np.ndarray]
    spec: dict[str, Any]


def _id_type_name(t: pa.DataType) -> str:
    return "int64" if pa.types.is_integer(t) else "string"


class Registry:
    """Versions below ``<root>/registry`` and their embeddings below ``<root>/embeddings``."""

    def __init__(self, root: Storage | str, options: StorageOptions | None = None):
        self.root = root if isinstance(root, Storage) else Storage(root, options)
        self._versions: dict[int, Version] = {}
        self._aligners: dict[int, Transform] = {}
        self._models: dict[int, ModelWeights] = {}

    def __repr__(self) -> str:
        return f"Registry({self.root.uri()!r})"

    # ------------------------------------------------------------------ reading

    def versions(self) -> list[int]:
        """Published versions (those with a manifest), ascending."""
        found = []
        for name in self.root.list("registry"):
            m = _VERSION_DIR.match(name)
            if m and self.root.exists(f"registry/{name}/{MANIFEST}"):
                found.append(int(m.group(1)))
        return sorted(found)

    def require_exists(self) -> Registry:
        """Raise :class:`~raybc.errors.NoRegistryError` (a usage error) unless the root holds a
        ``registry/`` folder. Commands that only read or maintain a registry call this before they
        write anything (a lease, a snapshot), so a typo'd root is refused and left untouched."""
        if not self.root.isdir("registry"):
            missing = self.root._bucket_missing("registry")  # a missing bucket is a storage error, named
            if missing is not None:
                raise missing
            raise NoRegistryError(self.root.uri(), self.root.uri("registry") + "/")
        return self

    def latest(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def is_published(self, k: int) -> bool:
        return self.root.exists(f"registry/{version_dir(k)}/{MANIFEST}")

    def get(self, k: int) -> Version:
        """The manifest of version ``k``; RegistryError names what is missing and how to fix it."""
        if k in self._versions:
            return self._versions[k]
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise RegistryError(f"invalid version {k!r}: versions are integers >= 0")
        rel = f"registry/{version_dir(k)}/{MANIFEST}"
        try:
            m = self.root.read_json(rel)
        except FileNotFoundError:
            known = self.versions()
            raise RegistryError(
                f"version {k} is not published in {self.root.uri('registry')} "
                f"(published: {', '.join(f'v{v}' for v in known) or 'none'})"
            ) from None
        v = self._parse_manifest(k, m, self.root.uri(rel))
        self._versions[k] = v
        return v

    def _parse_manifest(self, k: int, m: Any, source: str) -> Version:
        problems = []
        if not isinstance(m, dict):
            raise IntegrityError(f"{source}: manifest must be a JSON object")
        if m.get("format") != VERSION_FORMAT:
            problems.append(f"format is {m.get('format')!r}, expected {VERSION_FORMAT!r}")
        if m.get("version") != k:
            problems.append(f"names version {m.get('version')!r} but lies in folder v{k}")
        if k > 0 and m.get("parent") != k - 1:
            problems.append(f"parent is {m.get('parent')!r}, expected {k - 1}")
        if not isinstance(m.get("dim"), int) or m["dim"] <= 0:
            problems.append(f"dim is {m.get('dim')!r}, expected a positive integer")
        if k > 0 and not isinstance(m.get("aligner"), dict):
            problems.append("has no aligner entry; every version after v0 needs B_k")
        if problems:
            raise IntegrityError(f"{source}: tampered or damaged manifest: " + "; ".join(problems))
        try:
            weights = {
                name: (None if m.get(name) is None else WeightFile(**{key: m[name][key] for key in ("file", "sha256", "bytes", "spec")}))
                for name in ("aligner", "model")
            }
            embeddings = {e: EntityFiles.from_json(e, d) for e, d in (m.get("embeddings") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{source}: tampered or damaged manifest: bad entry ({exc!r})") from None
        for wf in weights.values():
            if wf is not None and wf.file not in (MODEL_FILE, ALIGNER_FILE):
                raise IntegrityError(f"{source}: weight file name {wf.file!r} is not allowed")
        try:
            for e in embeddings.values():
                check_segment(e.entity, what="entity name")
                for f in e.files:
                    check_segment(f.path, what="embedding file name")
        except StorageError as exc:
            raise IntegrityError(f"{source}: tampered or damaged manifest: {exc}") from None
        return Version(
            version=k,
            parent=m.get("parent"),
            dim=int(m["dim"]),
            method=str(m.get("method", "unknown")),
            hyperparameters=dict(m.get("hyperparameters") or {}),
            metrics=dict(m.get("metrics") or {}),
            aligner=weights["aligner"],
            model=weights["model"],
            embeddings=embeddings,
            created_at=str(m.get("created_at", "")),
            manifest=m,
        )

    def lineage(self, k: int) -> list[int]:
        """[k, k-1, ..., 0], checking every ancestor is published."""
        out = []
        for v in range(k, -1, -1):
            self.get(v)
            out.append(v)
        return out

    def _read_weight(self, k: int, wf: WeightFile) -> bytes:
        rel = f"registry/{version_dir(k)}/{wf.file}"
        try:
            data = self.root.read_bytes(rel)
        except FileNotFoundError:
            raise IntegrityError(f"{self.root.uri(rel)} is missing but v{k}'s manifest lists it; restore it") from None
        if len(data) != wf.bytes:
            raise IntegrityError(
                f"{self.root.uri(rel)} has {len(data)} bytes but the manifest records {wf.bytes}: "
                "truncated or replaced; restore the original file"
            )
        digest = sha256_hex(data)
        if digest != wf.sha256:
            raise IntegrityError(
                f"{self.root.uri(rel)}: sha256 {digest[:16]}... does not match the manifest's {wf.sha256[:16]}...: "
                "the file was changed after publishing; restore the original file"
            )
        return data

    def aligner(self, k: int) -> Transform:
        """B_k (v<k> -> v<k-1>), checksum-verified."""
        if k in self._aligners:
            return self._aligners[k]
        v = self.get(k)
        if v.aligner is None:
            raise RegistryError(f"v{k} has no backward transform (v0 is the oldest version)")
        data = self._read_weight(k, v.aligner)
        t = from_bytes(data, source=self.root.uri(f"registry/{version_dir(k)}/{v.aligner.file}"))
        parent_dim = self.get(k - 1).dim
        if (t.in_dim, t.out_dim) != (v.dim, parent_dim):
            raise IntegrityError(f"B_{k} maps {t.in_dim}->{t.out_dim} but v{k} has dim {v.dim} and v{k - 1} has {parent_dim}")
        self._aligners[k] = t
        return t

    def model(self, k: int) -> ModelWeights:
        """M_k's tensors and constructor arguments, checksum-verified."""
        from safetensors.numpy import load as st_load

        if k in self._models:  # published weights are immutable: read and verify them once
            return self._models[k]
        v = self.get(k)
        if v.model is None:
            raise RegistryError(f"v{k} has no model weights (it was registered from elsewhere)")
        data = self._read_weight(k, v.model)
        try:
            tensors = st_load(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise IntegrityError(f"v{k} {v.model.file} is not a readable safetensors file ({exc})") from None
        self._models[k] = ModelWeights(tensors=tensors, spec=dict(v.model.spec))
        return self._models[k]

    def plan(self, source: int, targets: Iterable[int]) -> FanOutPlan:
        """The fused fan-out transform from ``source`` to every version in ``targets``."""
        targets = sorted(set(int(t) for t in targets))
        for t in targets:
            if t >= source or t < 0:
                raise RegistryError(f"target version {t} is not older than source v{source}; targets lie in 0..{source - 1}")
            self.get(t)
        steps = {v: self.aligner(v) for v in range(source, targets[0], -1)}
        return FanOutPlan(source, targets, steps)

    def transform(self, source: int, target: int) -> BackwardTransform:
        """A callable turning batches of z_source into version ``target`` (online use)."""
        return BackwardTransform(self.plan(source, [target]), target)

    def removed_embeddings(self, k: int) -> dict[str, str]:
        """Entities of version ``k`` whose z_k retention removed -> when (UTC)."""
        rel = f"registry/{version_dir(k)}/{EMBEDDINGS_REMOVED}"
        try:
            d = self.root.read_json(rel)
        except FileNotFoundError:
            return {}
        if not isinstance(d, dict) or not isinstance(d.get("entities"), dict):
            raise IntegrityError(f"{self.root.uri(rel)}: damaged record of removed embeddings (expected {{'entities': {{...}}}})")
        return {str(e): str(t) for e, t in d["entities"].items()}

    def mark_embeddings_removed(self, k: int, entity: str) -> None:
        """Record (before any file goes) that z_k of ``entity`` is being removed: every reader then
        refuses it with a clear message, whether or not the removal finished."""
        removed = self.removed_embeddings(k)
        if entity in removed:
            return
        removed[entity] = utc_now()
        self.root.write_atomic(f"registry/{version_dir(k)}/{EMBEDDINGS_REMOVED}", json_bytes({"entities": removed}))

    def stored_embeddings(self, k: int, entity: str) -> Storage:
        """embeddings/v<k>/<entity>/ below the root, whatever the version's state (retention's view)."""
        return self.root.child("embeddings", version_dir(k), check_segment(entity, what="entity name"))

    def embeddings_storage(self, k: int, entity: str) -> Storage:
        """Where z_k of ``entity`` lives: embeddings/v<k>/<entity>/, or its own folder when it was
        registered in place (read with the root's storage options). RegistryError when retention
        removed it (only the newest version's embeddings are kept)."""
        check_segment(entity, what="entity name")
        v = self._versions.get(k)
        if v is None and self.is_published(k):
            v = self.get(k)
        when = self.removed_embeddings(k).get(entity) if v is not None else None
        if when is not None:
            latest = self.latest()
            raise RegistryError(
                f"z_{k} of {entity!r} was removed by retention at {when}: raybc keeps only the newest version's embeddings "
                f"(v{latest}). Read the as-v{k} snapshot (raybc.read_snapshot(root, {entity!r}, version={k})) or backfill "
                f"from v{latest}"
            )
        ef = v.embeddings.get(entity) if v is not None else None
        if ef is not None and ef.location is not None:
            return Storage(ef.location, self.root.options)
        return self.stored_embeddings(k, entity)

    # ------------------------------------------------------------------ writing

    def write_embeddings(
        self, k: int, entity: str, tables: Iterable[pa.Table], *, compression: str = "none", row_group_rows: int = ROW_GROUP_ROWS
    ) -> EntityFiles:
        """Write z_k of ``entity`` as part-NNNNN.parquet files (one per table) for a not-yet-published version."""
        if self.is_published(k):
            raise AlreadyExistsError(f"v{k} is already published; its embeddings are immutable")
        store = self.embeddings_storage(k, entity)
        if store.walk_files():
            raise AlreadyExistsError(f"{store.uri()} already holds files; remove them or write to a new version")
        entries, dim, id_type = [], None, None
        for i, t in enumerate(tables):
            layout = inspect_schema(t.schema, source=f"{entity} table {i}", expected_dim=dim)
            dim, id_type = layout.dim, _id_type_name(layout.id_type)
            name = f"part-{i:05d}.parquet"
            with store.open_output(name) as f:
                write_table(f, t, compression=compression, row_group_rows=row_group_rows)
            entries.append(FileEntry(name, t.num_rows, 0))
        if dim is None:
            raise InputDataError(f"no embeddings given for {entity} of v{k}")
        # size and stamp of each file as written: once published, a later change is refused
        return EntityFiles(entity=entity, dim=dim, id_type=id_type or "int64", files=with_stamps(store, entries, listing(store)))

    def scan_embeddings(self, k: int, entity: str, *, expected_dim: int | None = None) -> EntityFiles:
        """Describe the Parquet files already in embeddings/v<k>/<entity>/ from their footers."""
        store = self.embeddings_storage(k, entity)
        # listed (sizes, stamps) before the footers are read: a file rewritten meanwhile no longer
        # matches its stamp when publish lists the folder again, and is refused there
        infos = listing(store)
        names = [n for n in infos if n.endswith(".parquet")]
        if not names:
            raise InputDataError(f"{store.uri()} holds no .parquet files")

        def describe(name: str) -> tuple[FileEntry, Any]:
            with store.open_input(name) as f:
                md = parquet_file(f, store.uri(name)).metadata
                schema = md.schema.to_arrow_schema()
            return FileEntry(name, md.num_rows, 0), schema

        with ThreadPoolExecutor(IO_THREADS) as pool:
            described = list(pool.map(describe, names))
        dim, id_type = expected_dim, None
        for (entry, schema) in described:
            layout = inspect_schema(schema, source=store.uri(entry.path), expected_dim=dim)
            if layout.dim < 0:
                raise InputDataError(f"{store.uri(entry.path)}: variable-length embeddings; give the version's dimension")
            dim = layout.dim
            t = _id_type_name(layout.id_type)
            if id_type is not None and t != id_type:
                raise InputDataError(f"{store.uri(entry.path)}: ids are {t} but other files of {entity} hold {id_type} ids")
            id_type = t
        return EntityFiles(entity=entity, dim=int(dim), id_type=id_type or "int64", files=with_stamps(store, (e for e, _ in described), infos))

    def publish(
        self,
        k: int,
        *,
        dim: int,
        method: str,
        aligner: Transform | None,
        embeddings: Mapping[str, EntityFiles] | None = None,
        model: ModelWeights | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Version:
        """Publish version ``k``: weights (create-exclusive), then the manifest (create-exclusive).

        ``embeddings`` defaults to scanning embeddings/v<k>/ for every entity folder there.
        """
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise RegistryError(f"invalid version {k!r}: versions are integers >= 0")
        k = int(k)
        if self.is_published(k):
            raise AlreadyExistsError(
                f"v{k} is already published in {self.root.uri('registry')}; published versions are immutable: publish v{k + 1}"
            )
        if k > 0:
            if not self.is_published(k - 1):
                raise RegistryError(f"cannot publish v{k}: its parent v{k - 1} is not published; publish v{k - 1} first")
            parent_dim = self.get(k - 1).dim
            if aligner is None:
                raise RegistryError(f"v{k} needs a backward transform B_{k} ({dim} -> {parent_dim}) to be published")
            if (aligner.in_dim, aligner.out_dim) != (dim, parent_dim):
                raise RegistryError(
                    f"B_{k} maps {aligner.in_dim}->{aligner.out_dim} but v{k} has dim {dim} and v{k - 1} has dim {parent_dim}"
                )
        elif aligner is not None:
            raise RegistryError("v0 is the oldest version: it takes no backward transform")

        if embeddings is None:
            names = self.root.list(f"embeddings/{version_dir(k)}")
            embeddings = {e: self.scan_embeddings(k, e, expected_dim=dim) for e in names}
        embeddings = dict(embeddings)
        for e, ef in embeddings.items():
            if ef.dim != dim:
                raise InputDataError(f"embeddings of {e} have dimension {ef.dim}, but v{k} has dimension {dim}")
            store = Storage(ef.location, self.root.options) if ef.location is not None else self.embeddings_storage(k, e)
            infos = listing(store)
            for f in ef.files:
                if f.path not in infos:
                    raise InputDataError(f"{store.uri(f.path)} is listed for v{k} but does not exist")
                size, stamp = int(infos[f.path].get("size") or -1), file_stamp(infos[f.path])
                if (f.stamp is not None and (size != f.bytes or stamp != f.stamp)) or (f.stamp is None and f.bytes and size != f.bytes):
                    raise InputDataError(
                        f"{store.uri(f.path)} changed while v{k} was being published (now {size} bytes, stamp {stamp!r}; "
                        f"described with {f.bytes} bytes, stamp {f.stamp!r}); publish again once the file is final"
                    )
            # every published file carries its size and stamp: the backfill refuses it once changed
            embeddings[e] = EntityFiles(ef.entity, ef.dim, ef.id_type, with_stamps(store, ef.files, infos), ef.location, ef.verified)

        files: dict[str, WeightFile] = {}
        blobs: list[tuple[str, str, bytes, dict[str, Any]]] = []
        if aligner is not None:
            blobs.append(("aligner", ALIGNER_FILE, to_bytes(aligner), aligner.spec()))
        if model is not None:
            from safetensors.numpy import save as st_save

            blobs.append(("model", MODEL_FILE, st_save({n: np.ascontiguousarray(a) for n, a in model.tensors.items()}), dict(model.spec)))
        for key, name, data, spec in sorted(blobs, key=lambda b: b[1]):  # one fixed order: the first file decides a race
            self._put_weight(k, name, data)
            files[key] = WeightFile(file=name, sha256=sha256_hex(data), bytes=len(data), spec=spec)

        manifest = {
            "format": VERSION_FORMAT,
            "version": k,
            "parent": k - 1 if k > 0 else None,
            "dim": int(dim),
            "parent_dim": self.get(k - 1).dim if k > 0 else None,
            "method": method,
            "hyperparameters": dict(hyperparameters or {}),
            "metrics": dict(metrics or {}),
            "aligner": files["aligner"].to_json() if "aligner" in files else None,
            "model": files["model"].to_json() if "model" in files else None,
            "embeddings": {e: ef.to_json() for e, ef in sorted(embeddings.items())},
            "created_at": utc_now(),
            "raybc_version": __version__,
            **dict(extra or {}),
        }
        rel = f"registry/{version_dir(k)}/{MANIFEST}"
        try:
            self.root.create_exclusive(rel, json_bytes(manifest))
        except AlreadyExistsError:
            raise AlreadyExistsError(
                f"v{k} was published by another publisher while this one was writing; "
                f"its manifest at {self.root.uri(rel)} stands and this attempt changed nothing"
            ) from None
        return self.get(k)

    def _put_weight(self, k: int, name: str, data: bytes) -> None:
        rel = f"registry/{version_dir(k)}/{name}"
        try:
            self.root.create_exclusive(rel, data)
        except AlreadyExistsError:
            existing = self.root.read_bytes(rel)
            if sha256_hex(existing) == sha256_hex(data):
                return  # the same bytes from an earlier, interrupted attempt of this very publish
            if self.is_published(k):
                raise AlreadyExistsError(f"v{k} is already published; published versions are immutable: publish v{k + 1}") from None
            raise AlreadyExistsError(
                f"{self.root.uri(rel)} holds different weights from another publisher of v{k} (running now, or "
                f"interrupted before publishing its manifest). If no other publish of v{k} is running, remove the "
                f"unpublished files with `raybc registry discard --root {self.root.uri()} --version {k}` and retry"
            ) from None

    def discard_unpublished(self, k: int) -> list[str]:
        """Remove the weight files of an interrupted publish of ``k``; refuses a published version."""
        if self.is_published(k):
            raise RegistryError(f"v{k} is published; published versions are immutable and are never discarded")
        removed = []
        for name in (ALIGNER_FILE, MODEL_FILE):
            rel = f"registry/{version_dir(k)}/{name}"
            if self.root.exists(rel):
                self.root.remove(rel)
                removed.append(self.root.uri(rel))
        return removed

    # ------------------------------------------------------------------ versions trained elsewhere

    def register(
        self,
        k: int,
        *,
        embeddings: Mapping[str, str],
        aligner: str | Transform | None = None,
        source_options: StorageOptions | None = None,
        method: str = "external",
        metrics: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        options: Any = None,
        ray_address: str | None = None,
        echo: Any = None,
    ) -> Version:
        """Publish a version trained elsewhere: see :func:`raybc.intake.register_version`."""
        from raybc.intake import register_version

        return register_version(
            self, k, embeddings=embeddings, aligner=aligner, options=options, source_options=source_options, method=method,
            metrics=metrics, hyperparameters=hyperparameters, ray_address=ray_address, echo=echo,
        )  # fmt: skip

    @staticmethod
    def _read_matrix(uri: str, options: StorageOptions | None, *, in_dim: int, out_dim: int, layout: str | None = None) -> Transform:
        """B_k from a ``.npy`` matrix or a ``.safetensors`` file (see :func:`raybc.transforms.from_matrix`
        for ``layout``; a file written by raybc carries its own and needs none)."""
        parent_uri, name = uri.rstrip("/").rsplit("/", 1) if "/" in uri else (".", uri)
        store = Storage(parent_uri, options)
        try:
            data = store.read_bytes(name)
        except FileNotFoundError:
            raise InputDataError(f"{uri}: no such file") from None
        if name.endswith(".npy"):
            try:
                m = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle user files
            except (ValueError, EOFError, OSError) as exc:
                raise InputDataError(f"{uri}: not a plain .npy matrix ({exc or 'empty file'})") from None
            return from_matrix(m, in_dim=in_dim, out_dim=out_dim, source=uri, layout=layout)
        if name.endswith(".safetensors"):
            t = from_bytes(data, source=uri)
            if has_spec(data) and layout is None:  # raybc's own file: torch layout, recorded
                if (t.in_dim, t.out_dim) != (in_dim, out_dim):
                    raise InputDataError(f"{uri}: transform maps {t.in_dim}->{t.out_dim}, expected {in_dim}->{out_dim}")
                return t
            if t.is_affine:
                return from_matrix(t.weight, in_dim=in_dim, out_dim=out_dim, bias=t.bias, source=uri, layout=layout)  # type: ignore[attr-defined]
            if (t.in_dim, t.out_dim) != (in_dim, out_dim):
                raise InputDataError(f"{uri}: transform maps {t.in_dim}->{t.out_dim}, expected {in_dim}->{out_dim}")
            return t
        raise InputDataError(f"{uri}: B_k must be a .npy or .safetensors file")


class BackwardTransform:
    """z_source -> version ``target`` for batches in memory (numpy or torch), fused into one matmul."""

    def __init__(self, plan: FanOutPlan, target: int):
        self.plan = plan
        self.target = target
        self.source = plan.source_version

    @property
    def in_dim(self) -> int:
        return self.plan.in_dim

    @property
    def out_dim(self) -> int:
        return self.plan.out_dims[self.target]

    def __call__(self, z: Any) -> Any:
        if type(z).__module__.startswith("torch"):
            import torch

            out = self.plan.apply(z.detach().cpu().numpy())[self.target]
            return torch.from_numpy(out).to(z.device)
        return self.plan.apply(np.asarray(z))[self.target]

    def __repr__(self) -> str:
        return f"BackwardTransform(v{self.source} -> v{self.target}, {self.in_dim} -> {self.out_dim})"


def open_registry(uri: str, options: StorageOptions | None = None) -> Registry:
    return Registry(Storage(uri, options))


__all__ = [
    "ALIGNER_FILE", "MANIFEST", "MODEL_FILE", "BackwardTransform", "EntityFiles", "FileEntry", "ModelWeights",
    "Registry", "StorageError", "Version", "WeightFile", "open_registry",
]  # fmt: skip
