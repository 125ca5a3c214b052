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
