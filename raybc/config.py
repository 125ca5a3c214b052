"""Job configs: what each job and ``raybc`` command accepts, as pydantic models.

Each job config nests the options of the components it drives (``StorageOptions``,
``BackfillOptions``, ...), which live next to those components. A config comes from a YAML file
(``--config FILE``), from flags, or both (flags win); unknown fields anywhere are an error, and all
problems are reported at once (see :func:`raybc.options.load_options`).
"""

from __future__ import annotations

import json
import os

from pydantic import Field, field_validator, model_validator

from raybc.backfill import BackfillOptions
from raybc.errors import StorageError
from raybc.experiment import ExperimentOptions
from raybc.intake import RegisterOptions
from raybc.options import Options
from raybc.reconcile import LEASE_TTL_S, ReconcileOptions
from raybc.retention import RetentionOptions
from raybc.storage import StorageOptions, check_segment, split_uri
from raybc.train.fit import TrainOptions


def submitted_working_dir() -> str | None:
    """The unpacked ``--working-dir`` a ``ray job submit`` entrypoint runs in (its cwd), else None.
    The job supervisor hands the entrypoint its runtime env in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def _check_uri(v: str) -> str:
    try:
        split_uri(v)
    except StorageError as exc:
        raise ValueError(str(exc)) from None
    workdir = submitted_working_dir()
    if workdir is not None and "://" not in v and not os.path.isabs(v):
        there = os.path.exists(v)
        raise ValueError(
            f"{v!r} is a relative path, and this runs as a `ray job submit` job, whose working directory is a "
            f"temporary copy of the uploaded folder ({workdir}): "
            + ("what the job wrote there would be deleted with it" if there else
               "the path is not there (folders .gitignore excludes, such as a demo root, are not uploaded)")
            + f". Pass an absolute path on a disk the cluster's nodes share (--root \"$PWD/{os.path.normpath(v)}\") "
            "or a URI (s3://bucket/prefix)"
        )  # fmt: skip
    return v


class BackfillJobConfig(Options):
    """``jobs/backfill.py`` and ``raybc backfill``."""

    root: str = Field(description="Root URI of the registry, embeddings and snapshots (local path, s3://, gs://).")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    backfill: BackfillOptions = Field(default_factory=BackfillOptions)
    ray_address: str | None = Field(default=None, description="Ray cluster; default $RAY_ADDRESS or a new local Ray.")
    summary_json: str | None = Field(default=None, description="Also write the summary as JSON to this local path.")

    _root = field_validator("root")(_check_uri)


class DemoConfig(Options):
    """``raybc demo``: a synthetic registry in a local folder, backfilled and verified."""

    root: str = "./demo-root"
    rows: int = Field(default=200_000, ge=1, le=1_000_000_000, description="Rows per entity in the newest version.")
    dims: list[int] = Field(default=[32, 48, 64, 96, 128], description="Dimension of each version, v0 first.")
    entities: list[str] = Field(default=["users", "items"])
    rows_per_file: int = Field(default=250_000, ge=1)
    seed: int = 0
    ray_address: str | None = None

    _root = field_validator("root")(_check_uri)

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if len(v) < 2:
            raise ValueError("give at least two versions' dimensions, e.g. [32, 48, 64]")
        if any(d <= 0 for d in v):
            raise ValueError("dimensions must be positive")
        return v

    @field_validator("entities")
    @classmethod
    def _entities(cls, v: list[str]) -> list[str]:
        for e in v:
            check_segment(e, what="entity name")
        return v


class RegisterConfig(Options):
    """``raybc register`` / ``jobs/register.py``: publish a version trained elsewhere from its z_k,
    with B_k given (``aligner``) or fitted from the ids it shares with v<k-1> (``register.fit``)."""

    root: str
    storage: StorageOptions = Field(default_factory=StorageOptions)
    version: int = Field(ge=0)
    embeddings: dict[str, str] = Field(description="entity -> URI of a Parquet file or folder of z_k.")
    aligner: str | None = Field(default=None, description="URI of B_k as .npy or .safetensors (not for v0).")
    method: str = "external"
    source_storage: StorageOptions | None = Field(
        default=None, description="How to reach the source files when they live elsewhere than the root."
    )
    # YAML key ``register`` (a field of that name would shadow pydantic's ABC ``register``)
    register_options: RegisterOptions = Field(default_factory=RegisterOptions, alias="register")
    ray_address: str | None = Field(default=None, description="Ray cluster; default $RAY_ADDRESS or a new local Ray.")
    summary_json: str | None = Field(default=None, description="Also write the published manifest as JSON to this local path.")

    _root = field_validator("root")(_check_uri)

    @model_validator(mode="after")
    def _entities(self) -> RegisterConfig:
        for e in self.embeddings:
            check_segment(e, what="entity name")
        return self


class ReconcileJobConfig(Options):
    """``jobs/reconcile.py`` and ``raybc reconcile``: the scheduled catch-up backfill (+ retention)."""

    root: str = Field(description="Root URI of the registry, embeddings and snapshots (local path, s3://, gs://).")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    reconcile: ReconcileOptions = Field(default_factory=ReconcileOptions)
    retention: RetentionOptions | None = Field(
        default=None, description="Also remove old runs after the backfill, under the same lease; unset: keep all."
    )
    dry_run: bool = Field(default=False, description="Print the plan only: no lease, no writes, no Ray.")
    ray_address: str | None = Field(default=None, description="Ray cluster; default $RAY_ADDRESS or a new local Ray.")
    summary_json: str | None = Field(default=None, description="Also write the result as JSON to this local path.")

    _root = field_validator("root")(_check_uri)


class RetentionJobConfig(Options):
    """``raybc retention``: remove old uncommitted and superseded runs (under the reconcile lease)."""

    root: str
    storage: StorageOptions = Field(default_factory=StorageOptions)
    retention: RetentionOptions = Field(default_factory=RetentionOptions)
    dry_run: bool = False
    lease_ttl_s: float = Field(default=LEASE_TTL_S, gt=0)

    _root = field_validator("root")(_check_uri)


class TrainJobConfig(Options):
    """``jobs/train_version.py`` and ``raybc train``: fit one version of one method and publish it."""

    root: str
    storage: StorageOptions = Field(default_factory=StorageOptions)
    dataset: str = Field(default="movielens-100k", description="movielens-100k | amazon:REVIEWS[,META] | synthetic[:U,I,E]")
    version: int | None = Field(default=None, ge=0, description="Version to fit; default the registry's next one.")
    train: TrainOptions
    ray_address: str | None = None

    _root = field_validator("root")(_check_uri)


class ExperimentJobConfig(Options):
    """``jobs/experiment.py`` and ``raybc experiment``: the paper's protocol for a list of methods."""

    experiment: ExperimentOptions = Field(default_factory=ExperimentOptions)
    ray_address: str | None = Field(default=None, description="Ray cluster; default $RAY_ADDRESS or a new local Ray.")
    summary_json: str | None = Field(default=None, description="Also write what the run did as JSON to this local path.")
