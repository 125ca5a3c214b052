"""Storage: one root URI, its filesystem, and the few write primitives the contract needs.

Every location raybc reads or writes is a URI fsspec understands: a local path, ``file://``,
``s3://`` (AWS or any S3-compatible endpoint), ``gs://`` (with ``gcsfs`` installed), ``memory://``.
A :class:`Storage` is a root plus relative paths below it; all I/O goes through it, so every job
runs the same code on a laptop folder and on object storage.

Three kinds of write, because the contract needs exactly these:

- :meth:`Storage.write_atomic` replaces an object in one step (a rename locally, one PUT on
  object stores): readers see the old bytes or the new ones, never a mix. CURRENT uses it.
- :meth:`Storage.create_exclusive` writes only if nothing is there yet (hard link locally,
  ``If-None-Match: *`` on S3): of two writers exactly one wins. Published manifests use it.
- :meth:`Storage.open_output` streams a large object and makes it visible only when the writer
  finishes without error (temporary file + rename locally, multipart upload completed on close on
  S3). A crash leaves at worst a hidden temporary, never a truncated file under the final name.

Transient faults (503 SlowDown, 500, timeouts, reset connections) are retried, each layer bounded:
botocore retries every HTTP request up to ``StorageOptions.retries`` attempts; s3fs's own retry
loop is set to one attempt so the layers do not multiply unseen; and a Storage operation whose
error outlived the client's retries is run again up to ``StorageOptions.operation_attempts`` times
with exponential backoff, each retry logged (what, attempt n/N, wait). Permanent errors (403
AccessDenied, missing bucket or file, bad data) are never retried. See :func:`is_transient`.

This module is not the storage *layout* (see ``registry`` and ``snapshots``), and it never logs or
prints credentials: they live in ``SecretStr`` fields and the repr shows only the URI.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import Field, SecretStr, field_validator

from raybc.errors import AlreadyExistsError, RaybcError, StorageError
from raybc.options import Options

log = logging.getLogger(__name__)
T = TypeVar("T")

# Environment variables read when the options leave them unset. The endpoint and region are
# copied into the options (they travel to Ray workers with the Storage; they are not secret).
# Credentials are NOT copied: a Storage whose options give no credentials lets the S3 client
# resolve them itself (these variables, then the profile / instance-role provider chain) in each
# process that opens the filesystem, so a pickled Storage sent to a Ray worker carries no secret
# the driver's environment held; the worker resolves its own. Credentials given explicitly in the
# options (a config file) are the only way to send one to workers, and they do travel inside the
# pickle (as SecretStr: never in a repr, a log line or an error).
_ENV_KEY = "AWS_ACCESS_KEY_ID"
_ENV_SECRET = "AWS_SECRET_ACCESS_KEY"
_ENV_TOKEN = "AWS_SESSION_TOKEN"
_ENV_ENDPOINT = ("RAYBC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_ENV_REGION = ("AWS_REGION", "AWS_DEFAULT_REGION")

# A path segment we accept below a root: no traversal, no hidden tricks, portable on object stores.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")

_LOCAL_PROTOCOLS = {"file", "local"}

# Threads for many small reads (Parquet footers, manifests): they are latency-bound on object
# stores, so overlapping them is what makes planning over thousands of files quick.
IO_THREADS = 16

# Longest wait between two attempts of an operation. With the default 0.5 s first wait and 3
# attempts the waits are 0.5 s and 1 s; the cap only matters for large operation_attempts, where
# waiting longer than this rarely outlasts a throttling episode better than failing and rerunning.
MAX_BACKOFF_S = 20.0
# s3fs retries some errors itself (5 attempts by default) on top of botocore's: one attempt here
# keeps the bound readable: retries (botocore, per request) x operation_attempts (raybc).
_S3FS_ATTEMPTS = 1


class EndpointUnreachableError(StorageError):
    """An S3 endpoint that refuses connections or never answers: nothing to retry."""


# Endpoints that answered in this process (a check per process and endpoint, not per request).
_ANSWERED: set[str] = set()


def _unverified_tls() -> Any:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def probe_endpoint(url: str, *, timeout_s: float) -> None:
    """Check that the HTTP(S) server at ``url`` answers a bare ``HEAD /`` within ``timeout_s``;
    any HTTP status counts (S3 answers 403 without credentials). Raise
    :class:`EndpointUnreachableError` saying what happened when it refuses the connection or
    stays silent: botocore would wait ``read_timeout_s`` x ``retries`` x ``operation_attempts``
    (about 15 minutes with the defaults) before failing. Endpoints behind an HTTP proxy from the environment
    are left to the client (the proxy decides what is reachable)."""
    import http.client
    import ssl
    import urllib.request
    from urllib.parse import urlsplit

    if url in _ANSWERED:
        return
    u = urlsplit(url)
    host, https = u.hostname or "", u.scheme == "https"
    if urllib.request.getproxies().get(u.scheme) and not urllib.request.proxy_bypass(host):
        return
    fix = "check storage.endpoint_url (or $AWS_ENDPOINT_URL) and that the S3 server is running"
    conn: http.client.HTTPConnection = (
        # reachability only: no credentials are sent, and the S3 client verifies the certificate itself
        http.client.HTTPSConnection(host, u.port, timeout=timeout_s, context=_unverified_tls())
        if https
        else http.client.HTTPConnection(host, u.port, timeout=timeout_s)
    )
    try:
        conn.request("HEAD", "/")
        conn.getresponse().read()
    except ConnectionRefusedError:
        raise EndpointUnreachableError(f"S3 endpoint {url} refused the connection (nothing listens there); {fix}") from None
    except TimeoutError:
        raise EndpointUnreachableError(
            f"S3 endpoint {url} did not answer within {timeout_s:g} s (storage.probe_timeout_s): it accepts "
            f"connections but sends nothing, or a firewall drops them; {fix}"
        ) from None
    except (http.client.HTTPException, ConnectionError, ssl.SSLError):
        pass  # it answered, if not in plain HTTP: the S3 client says what it makes of that
    except OSError as exc:  # unknown host, no route
        raise EndpointUnreachableError(f"S3 endpoint {url} is unreachable ({exc}); {fix}") from None
    finally:
        conn.close()
    _ANSWERED.add(url)


class StorageOptions(Options):
    """How to reach the storage behind a root URI. Everything is optional for local folders.

    Credentials left unset are taken from the standard AWS environment variables or, failing
    those, from the usual provider chain (profile, instance role). They are never printed.
    """

    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO, moto, Ceph)."
    )
    region: str | None = Field(default=None, description="Bucket region, e.g. us-east-1.")
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anonymous: bool = Field(default=False, description="Unsigned requests (public buckets).")
    retries: int = Field(
        default=5, ge=0, le=20, description="Attempts of one HTTP request by the S3 client (throttling, 5xx, timeouts, resets)."
    )
    operation_attempts: int = Field(
        default=3, ge=1, le=10,
        description="Attempts of a whole storage operation or backfill part when a transient fault outlives the client's retries.",
    )  # fmt: skip
    backoff_s: float = Field(default=0.5, gt=0, le=60, description="Wait before the first operation retry; doubles each time.")
    connect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    read_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    probe_timeout_s: float = Field(
        default=10.0, ge=0, le=600,
        description="How long an endpoint_url may take to answer a first bare HTTP request before it is reported "
        "unreachable (once per process and endpoint; 0 skips the check).",
    )  # fmt: skip
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Further fsspec storage options, passed as is (e.g. gcsfs project)."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_has_scheme(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must start with http:// or https:// and name a host, e.g. http://127.0.0.1:9000")
        return v


def split_uri(uri: str) -> tuple[str, str]:
    """(protocol, path) of a URI; local paths come back absolute with protocol 'file'."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage URI must be a non-empty string, got {uri!r}")
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol is None or protocol in _LOCAL_PROTOCOLS:
        return "file", os.path.abspath(os.path.expanduser(path))
    path = path.rstrip("/")
    if not path:
        raise StorageError(f"storage URI {uri!r} names no bucket or folder; use e.g. {protocol}://bucket/prefix")
    if any(seg == ".." for seg in path.split("/")):
        raise StorageError(f"storage URI {uri!r} contains '..'; give the location without parent references")
    return protocol, path


class InvalidNameError(StorageError, ValueError):
    """A name or path segment that could escape its folder; a ValueError too, so option validators
    report it beside every other bad field."""


def check_segment(name: str, *, what: str = "name") -> str:
    """Refuse a path segment that could escape its folder or break object-store keys."""
    if not isinstance(name, str) or not _SEGMENT.match(name) or name in (".", ".."):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use letters, digits and _ . = + - only, not starting with '.' or '-'"
        )
    return name


class TransientStorageError(StorageError):
    """A storage fault that may pass if the operation is tried again (throttling, 5xx, timeout, reset)."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage fault worth retrying. Permanent errors (403, missing bucket or
    file, bad data, anything raybc refused on purpose) are not: retrying them only delays the message."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError, RaybcError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, asyncio.TimeoutError)):
        return True
    try:
        import botocore.exceptions as be

        from botocore.parsers import ResponseParserError

        if isinstance(exc, (be.HTTPClientError, be.ConnectionError, be.IncompleteReadError, ResponseParserError)):
            return True
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientResponseError):
            return exc.status >= 500
        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(exc)
    return any(code in text for code in _TRANSIENT_CODES)


# s3fs maps 503 SlowDown/ServiceUnavailable to EBUSY and 500 InternalError to EREMOTEIO.
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN}
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException")


def backoff_s(attempt: int, *, base_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """The longest wait after failed attempt ``attempt`` (1-based): base, 2 x base, 4 x base, ... capped."""
    return min(cap_s, base_s * 2 ** (attempt - 1))


def retry_transient(
    fn: Callable[[], T], *, what: str, attempts: int, base_s: float, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Run ``fn``; on a transient fault wait (exponential backoff, jittered down) and run it again,
    at most ``attempts`` times in all. Permanent errors pass through at once. Every retry is
    logged with what is retried, the attempt and the wait; giving up raises a StorageError that
    says how often it tried."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right here
            if not is_transient(exc):
                raise
            reason = _short(exc)
            if attempt == attempts:
                raise StorageError(
                    f"gave up on {what} after {attempts} attempt{'s' * (attempts != 1)}: transient storage fault "
                    f"persisted ({reason}); the store is unavailable or throttling: retry later, or raise "
                    "storage.operation_attempts / storage.retries"
                ) from exc
            wait = backoff_s(attempt, base_s=base_s) * (0.5 + random.random() / 2)  # jitter spreads parallel retries
            log.warning("[raybc] retrying %s after a transient fault (%s): attempt %d/%d failed, next in %.2f s",
                        what, reason, attempt, attempts, wait)  # fmt: skip
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# botocore's DEBUG logs print every signed request, the session token included (never the secret
# key itself). These loggers get a filter that masks the credentials raybc hands to the client.
_CLIENT_LOGGERS = ("botocore.auth", "botocore.endpoint", "aiobotocore.endpoint", "aiobotocore.auth")


class _RedactSecrets(logging.Filter):
    """Masks known credentials in the S3 client's own (debug) log records."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            if any(s in msg for s in self.secrets):
                for s in self.secrets:
                    msg = msg.replace(s, "**********")
                record.msg, record.args = msg, ()
        return True


_REDACT = _RedactSecrets()


def _redact_in_client_logs(*secrets: SecretStr | None) -> None:
    values = {s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()}
    if not values - _REDACT.secrets:
        return
    _REDACT.secrets |= values
    for name in _CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


def _first_env(names: tuple[str, ...]) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


class Storage:
    """A root location and its filesystem. Cheap to create, picklable, safe to print."""

    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.protocol, self.root = split_uri(uri)
        self.options = self._resolve_options(options or StorageOptions())
        self._fs: fsspec.AbstractFileSystem | None = None

    # ------------------------------------------------------------------ construction

    def _resolve_options(self, opts: StorageOptions) -> StorageOptions:
        """Endpoint and region from the environment when unset; never credentials (see the note at
        ``_ENV_KEY``: those are resolved by the S3 client in every process, never pickled)."""
        if self.protocol not in ("s3", "s3a"):
            return opts
        updates: dict[str, Any] = {}
        if opts.endpoint_url is None and _first_env(_ENV_ENDPOINT):
            updates["endpoint_url"] = _first_env(_ENV_ENDPOINT)
        if opts.region is None and _first_env(_ENV_REGION):
            updates["region"] = _first_env(_ENV_REGION)
        return opts.model_copy(update=updates) if updates else opts

    def _storage_kwargs(self) -> dict[str, Any]:
        o = self.options
        if self.protocol == "file":
            return {"auto_mkdir": True}
        if self.protocol in ("s3", "s3a"):
            kw: dict[str, Any] = {
                "anon": o.anonymous,
                "config_kwargs": {
                    # standard mode: jittered exponential backoff per request; adaptive mode's client-side
                # rate limiter can slow every later request of the process after a burst of 503s.
                "retries": {"total_max_attempts": max(1, o.retries), "mode": "standard"},
                    "connect_timeout": o.connect_timeout_s,
                    "read_timeout": o.read_timeout_s,
                },
                # Listing caches would hide objects another process just wrote (CURRENT swaps).
                "use_listings_cache": False,
                "skip_instance_cache": True,
            }
            if o.endpoint_url:
                kw["endpoint_url"] = o.endpoint_url
            if o.region:
                kw["client_kwargs"] = {"region_name": o.region}
            if o.access_key_id is not None:
                kw["key"] = o.access_key_id.get_secret_value()
            if o.secret_access_key is not None:
                kw["secret"] = o.secret_access_key.get_secret_value()
            # one half given in the options, the other in this process's environment: botocore
            # takes explicit credentials whole or not at all, so complete the pair here (resolved
            # where the client is made, never stored in the options, so never pickled)
            if ("key" in kw) != ("secret" in kw):
                missing, env = ("secret", _ENV_SECRET) if "key" in kw else ("key", _ENV_KEY)
                if os.environ.get(env):
                    kw[missing] = os.environ[env]
            if o.session_token is not None:
                kw["token"] = o.session_token.get_secret_value()
            kw.update(o.extra)
            return kw
        return dict(o.extra)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            try:
                if self.protocol in ("s3", "s3a") and self.options.endpoint_url and self.options.probe_timeout_s:
                    probe_endpoint(self.options.endpoint_url, timeout_s=self.options.probe_timeout_s)
                self._fs = fsspec.filesystem(self.protocol, **self._storage_kwargs())
                if self.protocol in ("s3", "s3a"):
                    self._fs.retries = _S3FS_ATTEMPTS
                    env = [SecretStr(os.environ[n]) for n in (_ENV_SECRET, _ENV_TOKEN) if os.environ.get(n)]
                    _redact_in_client_logs(self.options.secret_access_key, self.options.session_token, *env)
            except ImportError as exc:
                hint = {"gs": "pip install 'raybc[gcs]'", "gcs": "pip install 'raybc[gcs]'"}.get(
                    self.protocol, f"install the fsspec implementation for {self.protocol}://"
                )
                raise StorageError(f"cannot open {self.uri()}: {exc}; {hint}") from None
            except ValueError as exc:
                raise StorageError(f"cannot open {self.uri()}: {exc}") from None
        return self._fs

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # rebuilt from the options in the receiving process
        return state

    def __repr__(self) -> str:
        return f"Storage({self.uri()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and (self.protocol, self.root) == (other.protocol, other.root)

    def __hash__(self) -> int:
        return hash((self.protocol, self.root))

    def child(self, *parts: str) -> Storage:
        """A Storage rooted below this one, sharing its options."""
        sub = Storage.__new__(Storage)
        sub.protocol, sub.root, sub.options, sub._fs = self.protocol, self.path(*parts), self.options, self._fs
        return sub

    # ------------------------------------------------------------------ paths

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root. Parts may hold '/'; each segment is checked."""
        segs: list[str] = []
        for part in parts:
            for seg in str(part).split("/"):
                if seg == "":
                    continue
                segs.append(check_segment(seg, what="path segment"))
        return posixpath.join(self.root, *segs) if segs else self.root

    def uri(self, *parts: str) -> str:
        """A URI for messages and manifests; holds no credentials."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def relative(self, full_path: str) -> str:
        """``full_path`` (as returned by listing) relative to the root."""
        full = full_path.split("://", 1)[-1].rstrip("/")
        root = self.root.rstrip("/")
        if full == root:
            return ""
        if not full.startswith(root + "/"):
            raise StorageError(f"{full_path} is not below {self.uri()}")
        return full[len(root) + 1 :]

    # ------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def _errors(self, action: str, rel: str) -> Iterator[None]:
        """Turn filesystem exceptions into messages naming the URI and the fix; transient faults
        become :class:`TransientStorageError` so :meth:`_retry` (and backfill parts) run them again."""
        try:
            yield
        except (AlreadyExistsError, StorageError):
            raise
        except FileNotFoundError:
            raise
        except PermissionError as exc:
            raise StorageError(
                f"permission denied to {action} {self.uri(rel)}: check the credentials and the bucket or "
                f"folder permissions ({_short(exc)})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - classified and translated here, the one place
            if is_transient(exc):
                raise TransientStorageError(f"cannot {action} {self.uri(rel)}: {_short(exc)}") from exc
            if isinstance(exc, OSError):
                if exc.errno == errno.ENOSPC:
                    raise StorageError(f"no space left to {action} {self.uri(rel)}; free disk space") from None
                raise StorageError(f"cannot {action} {self.uri(rel)}: {_short(exc)}") from exc
            if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs"):
                raise StorageError(f"cannot {action} {self.uri(rel)}: {_short(exc)}") from exc
            raise

    def _retry(self, action: str, rel: str, fn: Callable[[], T]) -> T:
        """Run one idempotent operation, retrying transient faults (bounded, logged)."""
        o = self.options
        return retry_transient(fn, what=f"{action} {self.uri(rel)}", attempts=o.operation_attempts, base_s=o.backoff_s)

    def _bucket_missing(self, rel: str) -> StorageError | None:
        if self.protocol not in ("s3", "s3a", "gs", "gcs"):
            return None
        bucket = self.root.split("/", 1)[0]
        try:
            if not self.fs.exists(bucket):
                return StorageError(
                    f"bucket {bucket!r} of {self.uri(rel)} does not exist (or is not visible with these "
                    "credentials); create it or fix the URI"
                )
        except Exception:  # noqa: BLE001 - the probe itself failing says nothing new
            return None
        return None

    # ------------------------------------------------------------------ reads

    def exists(self, rel: str = "") -> bool:
        def run() -> bool:
            with self._errors("check", rel):
                return bool(self.fs.exists(self.path(rel)))

        return self._retry("check", rel, run)

    def isdir(self, rel: str = "") -> bool:
        def run() -> bool:
            with self._errors("check", rel):
                return bool(self.fs.isdir(self.path(rel)))

        return self._retry("check", rel, run)

    def read_bytes(self, rel: str) -> bytes:
        def run() -> bytes:
            with self._errors("read", rel):
                try:
                    return self.fs.cat_file(self.path(rel))
                except FileNotFoundError:
                    missing = self._bucket_missing(rel)
                    if missing:
                        raise missing from None
                    raise FileNotFoundError(errno.ENOENT, "no such file", self.uri(rel)) from None

        return self._retry("read", rel, run)

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.uri(rel)} is not valid JSON ({exc}); the file is damaged") from None

    def size(self, rel: str) -> int:
        def run() -> int:
            with self._errors("stat", rel):
                return int(self.fs.size(self.path(rel)))

        return self._retry("stat", rel, run)

    def list(self, rel: str = "", *, detail: bool = False) -> list[Any]:
        """Entries directly below ``rel`` (names, or fsspec info dicts with ``detail``); [] if absent."""
        return self._retry("list", rel, lambda: self._list_once(rel, detail))

    def _list_once(self, rel: str, detail: bool) -> list[Any]:
        with self._errors("list", rel):
            base = self.path(rel)
            try:
                entries = self.fs.ls(base, detail=True)
            except FileNotFoundError:
                missing = self._bucket_missing(rel)  # an empty listing must not hide a wrong bucket
                if missing:
                    raise missing from None
                return []
            out = []
            for e in entries:
                name = e["name"].split("://", 1)[-1].rstrip("/")
                if name == base.rstrip("/"):
                    continue
                e = dict(e, basename=posixpath.basename(name))
                out.append(e if detail else e["basename"])
            return sorted(out, key=lambda x: x["basename"] if detail else x)

    def walk_files(self, rel: str = "") -> list[str]:
        """Every file below ``rel``, as paths relative to the root, sorted."""

        def run() -> list[str]:
            with self._errors("list", rel):
                try:
                    found = self.fs.find(self.path(rel))
                except FileNotFoundError:
                    missing = self._bucket_missing(rel)
                    if missing:
                        raise missing from None
                    return []
                return sorted(self.relative(f) for f in found)

        return self._retry("list", rel, run)

    @contextlib.contextmanager
    def open_input(self, rel: str, *, memory_map: bool = False) -> Iterator[Any]:
        """A readable, seekable file (native pyarrow file locally). Opening is retried; reads are the
        caller's to retry (a backfill part retries as a whole).

        ``memory_map``: a local file is mapped rather than read (elsewhere it changes nothing).
        Parquet's reader then takes each column chunk from the page cache in place, where a read
        copies it into a fresh heap buffer whose pages the allocator hands back to the kernel and
        faults in again chunk after chunk: for the backfill's read -> transform -> write that was
        2-4 us of kernel time per 1 KB row against 0.5-1.2 mapped (docs/benchmarks.md). A file
        truncated while mapped kills the reading process (SIGBUS) instead of raising; the backfill
        maps only files whose size the registry recorded and checked."""

        def run() -> Any:
            with self._errors("read", rel):
                if self.is_local:
                    try:
                        return pa.memory_map(self.path(rel), "r") if memory_map else pa.OSFile(self.path(rel), "rb")
                    except FileNotFoundError:
                        raise FileNotFoundError(errno.ENOENT, "no such file", self.uri(rel)) from None
                return self.fs.open(self.path(rel), "rb")

        f = self._retry("read", rel, run)
        try:
            yield f
        finally:
            f.close()

    # ------------------------------------------------------------------ writes

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            with self._errors("create folder", rel):
                os.makedirs(self.path(rel), exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` in one step: readers see old or new, never a mix. Retried:
        writing the same bytes again is harmless."""
        self._retry("write", rel, lambda: self._write_atomic_once(rel, data))

    def _write_atomic_once(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        with self._errors("write", rel):
            if self.is_local:
                _write_local(path, data, os.replace)
            else:
                try:
                    self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
                except FileNotFoundError:
                    raise self._bucket_missing(rel) or StorageError(f"cannot write {self.uri(rel)}") from None

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        self.write_atomic(rel, json_bytes(obj))

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Write ``rel`` only if it does not exist; AlreadyExistsError otherwise. Atomic.

        Not retried here: after a lost reply a second attempt could not tell its own earlier write
        from a rival's (callers such as ``Registry._put_weight`` compare the bytes instead)."""
        path = self.path(rel)
        with self._errors("create", rel):
            if self.is_local:
                try:
                    _write_local(path, data, os.link)  # a hard link fails if path exists; never replaces
                except FileExistsError:
                    raise AlreadyExistsError(f"{self.uri(rel)} already exists") from None
            else:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    raise AlreadyExistsError(f"{self.uri(rel)} already exists") from None
                except FileNotFoundError:
                    raise self._bucket_missing(rel) or StorageError(f"cannot create {self.uri(rel)}") from None
                except OSError as exc:
                    # s3fs maps a 412 without its condition header to EINVAL; it still means "exists".
                    if "PreconditionFailed" in str(exc) or "412" in str(exc) or "Precondition" in str(exc):
                        raise AlreadyExistsError(f"{self.uri(rel)} already exists") from None
                    raise

    @contextlib.contextmanager
    def open_output(self, rel: str) -> Iterator[Any]:
        """Stream a new object; it appears under ``rel`` only if the block exits without error."""
        path = self.path(rel)
        with self._errors("write", rel):
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = _tmp_name(path)
                f: Any = pa.OSFile(tmp, "wb")
            else:
                f = self.fs.open(path, "wb", autocommit=False)
        ok = False
        try:
            yield f
            ok = True
        finally:
            if self.is_local:
                f.close()
                if ok:
                    with self._errors("write", rel):
                        os.replace(tmp, path)
                else:
                    _remove_quietly(tmp)
            else:
                if ok:
                    with self._errors("write", rel):
                        f.close()
                        f.commit()
                else:
                    with contextlib.suppress(Exception):
                        f.discard()  # aborts the multipart upload: nothing appears
                    f.closed = True  # so closing (or garbage collection) uploads nothing

    def remove_temporaries(self, rel: str) -> list[str]:
        """Remove the hidden temporaries of unfinished writes in folder ``rel`` (a killed process's
        :meth:`open_output` leaves one locally; object stores never show an unfinished upload).
        Call it only when no writer of that folder can still be running. Returns the names removed."""
        if not self.is_local:
            return []
        try:
            names = [n for n in self.list(rel) if _TMP_NAME.match(n)]
        except FileNotFoundError:
            return []
        for n in names:
            _remove_quietly(os.path.join(self.path(rel), n))
        return names

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        def run() -> None:
            with self._errors("remove", rel):
                try:
                    self.fs.rm(self.path(rel), recursive=recursive)
                except FileNotFoundError:
                    pass

        self._retry("remove", rel, run)

    def copy_from(self, src: Storage, src_rel: str, rel: str, *, chunk_bytes: int = 8 << 20) -> int:
        """Stream ``src_rel`` of another storage into ``rel`` here (atomically); returns bytes copied.
        A transient fault mid-copy aborts the half-written object and copies again (bounded)."""
        return self._retry("copy to", rel, lambda: self._copy_once(src, src_rel, rel, chunk_bytes))

    def _copy_once(self, src: Storage, src_rel: str, rel: str, chunk_bytes: int) -> int:
        n = 0
        with src.open_input(src_rel) as fin, self.open_output(rel) as fout:
            while True:
                buf = fin.read(chunk_bytes)
                if not buf:
                    break
                fout.write(buf)
                n += len(buf)
        return n

    # ------------------------------------------------------------------ pyarrow

    def arrow_filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem for the same storage (native locally, fsspec-backed otherwise)."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


def file_stamp(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten, from a listing entry: its ETag, else its mtime."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "generation"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _write_local(path: str, data: bytes, publish: Callable[[str, str], None]) -> None:
    """Write ``data`` to a hidden temporary beside ``path``, fsync it, then ``publish(tmp, path)``
    (``os.replace``: atomic swap; ``os.link``: create-exclusive). The temporary never outlives it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        _remove_quietly(tmp)


# What _tmp_name makes: a hidden temporary of a write that never finished when its name is still here.
_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def _tmp_name(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{uuid.uuid4().hex[:12]}")


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, trailing newline): same object, same bytes, same sha256."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
