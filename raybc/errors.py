"""The exceptions raybc raises on purpose.

Every message names the thing that is wrong (a file, a field, a row, a version), says what it
means for the job, and says how to fix it. Jobs print the message and exit non-zero; they never
dump a traceback for one of these.
"""

from __future__ import annotations


class RaybcError(Exception):
    """Base class: an error whose message is meant for the user as is."""


class ConfigError(RaybcError, ValueError):
    """Options that cannot work; the message lists every problem at once."""

    def __init__(self, problems: list[str], *, source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head} ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n{lines}")


class StorageError(RaybcError, OSError):
    """Storage that cannot be reached or used (permissions, missing bucket, bad URI)."""


class AlreadyExistsError(RaybcError, FileExistsError):
    """A create-exclusive write found the object already there."""


class InputDataError(RaybcError, ValueError):
    """Embeddings that break the storage contract: the message names the file and row."""


class RegistryError(RaybcError, LookupError):
    """A version that is missing, incomplete or inconsistent in the registry."""


class IntegrityError(RaybcError, ValueError):
    """A file whose checksum, size or structure does not match what its manifest records."""


class SnapshotError(RaybcError, RuntimeError):
    """A snapshot that cannot be committed or read."""


def root_cause(exc: BaseException) -> BaseException:
    """The RaybcError that ``exc`` wraps (a Ray task error, a Ray Data execution error, a chain of
    ``raise ... from``), else ``exc`` itself. Ray's ``RayTaskError`` subclasses the error its task
    raised, but prints as the task's whole traceback: the error the task raised -- its ``cause``,
    whose message is meant for the user as is -- is preferred."""
    from ray.exceptions import RayError

    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RaybcError) and not isinstance(cur, RayError):
            return _without_ray_data_note(cur)
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    return exc


# What Ray Data appends to an exception's message when a task of its pipeline fails ("Failed to
# apply UDF transform after 1/1 attempts ... configure retried_map_errors"): advice to retry,
# which is wrong for an error raybc raised on purpose.
_RAY_DATA_NOTE = "\nFailed to "


def _without_ray_data_note(exc: BaseException) -> BaseException:
    if exc.args and isinstance(exc.args[0], str) and _RAY_DATA_NOTE in exc.args[0] and "attempts (total backoff" in exc.args[0]:
        exc.args = (exc.args[0].split(_RAY_DATA_NOTE, 1)[0], *exc.args[1:])
    return exc


def reraise_root_cause(exc: BaseException) -> None:
    """Raise :func:`root_cause` of ``exc`` without Ray's wrappers and tracebacks when it is a
    RaybcError; return otherwise (the caller re-raises ``exc``)."""
    cause = root_cause(exc)
    if cause is not exc:
        raise cause.with_traceback(None) from None


# The commands that create a registry: named in the error a root without one gets.
CREATING_COMMANDS = "`raybc register` (a version trained elsewhere), `raybc train`, `raybc experiment`, or `raybc demo` (synthetic)"


class NoRegistryError(ConfigError):
    """A root that holds no registry: most often a typo in ``--root``. Nothing was created there."""

    def __init__(self, root: str, registry: str):
        self.root = root
        super().__init__(
            [f"root: {root} holds no registry (no {registry} folder); check --root for a typo, or create one by "
             f"publishing a version: {CREATING_COMMANDS}. Nothing was written there."]  # fmt: skip
        )
