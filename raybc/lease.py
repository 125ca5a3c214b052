"""Lease: a lock with an expiry, kept in the storage root, so that two schedules never both write.

Layout below a root::

    locks/<name>/lease-<generation>.json    one file per taking of the lease, never overwritten by others

The lease is held by whoever wrote the file with the highest generation, until that file's
``expires_at`` passes or its holder marks it released. Taking the lease is one
:meth:`~raybc.storage.Storage.create_exclusive` of the *next* generation's file (hard link
locally, ``If-None-Match: *`` on S3), after checking that the current generation is expired or
released. When two runners both see an expired lease, both try to create the same next file and
exactly one succeeds: take-over needs no delete, so there is no window in which a third runner
could slip in. Only the holder ever rewrites its own file (to renew or release it).

A holder renews its lease from a heartbeat thread well inside the expiry, so a live holder never
loses it; a crashed holder's lease is taken over once it expires. Expiry is judged by wall
clocks: keep ``ttl_s`` far above the clock skew between the machines that share a root.

This module is not a general distributed lock service (no fencing tokens are checked by the
storage): it keeps *schedules* apart. What it protects -- the backfill and its CURRENT swaps --
is itself idempotent and atomic, so even a holder frozen past its expiry cannot corrupt a root.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from raybc.errors import AlreadyExistsError, RaybcError
from raybc.storage import Storage, check_segment, json_bytes

LEASE_FORMAT = "raybc.lease/1"
_LEASE_FILE = re.compile(r"^lease-(\d{12})\.json$")
# Earlier generations kept for audit ("who ran when"); older ones are pruned by each new holder.
# Never the newest: take-over depends on it being there.
KEEP_GENERATIONS = 5
# A heartbeat renews at this fraction of the expiry, so two renewals can fail before it lapses.
HEARTBEAT_FRACTION = 1 / 3


class LeaseHeldError(RaybcError):
    """Another runner holds the lease; the message names it and when its lease expires."""

    def __init__(self, message: str, *, holder: LeaseRecord | None = None):
        super().__init__(message)
        self.holder = holder


class LeaseLostError(RaybcError):
    """This runner's lease expired and another runner took it over."""


def lease_file(generation: int) -> str:
    return f"lease-{int(generation):012d}.json"


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class LeaseRecord:
    """The content of one lease file."""

    name: str
    generation: int
    owner: str  # host:pid:random, unique per taking
    acquired_at: float  # seconds since the epoch
    expires_at: float
    released: bool = False

    def active(self, now: float) -> bool:
        return not self.released and now < self.expires_at

    def describe(self) -> str:
        state = "released" if self.released else f"until {_iso(self.expires_at)}"
        return f"{self.owner} (generation {self.generation}, taken {_iso(self.acquired_at)}, {state})"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LEASE_FORMAT,
            "name": self.name,
            "generation": self.generation,
            "owner": self.owner,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
            "expires_at_utc": _iso(self.expires_at),
            "released": self.released,
        }

    @staticmethod
    def from_json(d: Any, *, source: str) -> LeaseRecord:
        try:
            return LeaseRecord(
                name=str(d["name"]),
                generation=int(d["generation"]),
                owner=str(d["owner"]),
                acquired_at=float(d["acquired_at"]),
                expires_at=float(d["expires_at"]),
                released=bool(d.get("released", False)),
            )
        except (KeyError, TypeError, ValueError):
            raise RaybcError(
                f"{source} is not a valid lease file; if no runner is active, remove the folder it is in"
            ) from None


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The lease ``name`` below a root. Use as a context manager: acquire, heartbeat, release.

    ``clock`` is injectable (seconds since the epoch) so expiry can be tested without sleeping.
    """

    def __init__(
        self,
        root: Storage,
        name: str,
        *,
        ttl_s: float,
        owner: str | None = None,
        heartbeat: bool = True,
        clock: Any = time.time,
    ):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.root = root
        self.name = check_segment(name, what="lease name")
        self.dir = f"locks/{self.name}"
        self.ttl_s = float(ttl_s)
        self.owner = owner or default_owner()
        self.clock = clock
        self.heartbeat = heartbeat
        self.record: LeaseRecord | None = None
        self.lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading

    def generations(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.root.list(self.dir) if (m := _LEASE_FILE.match(n)))

    def read(self, generation: int) -> LeaseRecord:
        rel = f"{self.dir}/{lease_file(generation)}"
        return LeaseRecord.from_json(self.root.read_json(rel), source=self.root.uri(rel))

    def current(self) -> LeaseRecord | None:
        """The newest lease record (held, expired or released), or None if never taken."""
        gens = self.generations()
        return self.read(gens[-1]) if gens else None

    # ------------------------------------------------------------------ taking and giving back

    def acquire(self) -> LeaseRecord:
        """Take the lease, or raise LeaseHeldError naming the holder. Exactly one of racers wins."""
        cur = self.current()
        now = self.clock()
        if cur is not None and cur.active(now):
            raise LeaseHeldError(
                f"lease {self.root.uri(self.dir)} is held by {cur.describe()}; "
                "another run is in progress, this one does nothing",
                holder=cur,
            )
        gen = cur.generation + 1 if cur is not None else 1
        rec = LeaseRecord(self.name, gen, self.owner, now, now + self.ttl_s)
        try:
            self.root.create_exclusive(f"{self.dir}/{lease_file(gen)}", json_bytes(rec.to_json()))
        except AlreadyExistsError:
            winner = None
            try:
                winner = self.read(gen)
            except (FileNotFoundError, RaybcError):
                pass
            who = winner.describe() if winner else f"generation {gen}"
            raise LeaseHeldError(
                f"lease {self.root.uri(self.dir)} was just taken by {who}; another run started at the same "
                "time, this one does nothing",
                holder=winner,
            ) from None
        self.record = rec
        self.lost = None
        self._prune(gen)
        if self.heartbeat:
            self._start_heartbeat()
        return rec

    def renew(self) -> LeaseRecord:
        """Push the expiry ``ttl_s`` ahead; LeaseLostError if another runner took over meanwhile."""
        rec = self._require()
        self._check_not_taken_over(rec)
        rec = LeaseRecord(self.name, rec.generation, self.owner, rec.acquired_at, self.clock() + self.ttl_s)
        self.root.write_atomic(f"{self.dir}/{lease_file(rec.generation)}", json_bytes(rec.to_json()))
        self.record = rec
        # A taker may have created the next generation between our check and our write.
        self._check_not_taken_over(rec)
        return rec

    def ensure_held(self) -> None:
        """Raise LeaseLostError if the lease was lost (expired and taken over)."""
        if self.lost is not None:
            raise self.lost
        self._check_not_taken_over(self._require())

    def release(self) -> None:
        """Give the lease back (marks this generation released); a no-op if not held or lost."""
        self._stop_heartbeat()
        rec = self.record
        self.record = None
        if rec is None:
            return
        if self.generations()[-1:] != [rec.generation]:
            return  # taken over: the file is no longer the lease, leave it as a record
        done = LeaseRecord(self.name, rec.generation, self.owner, rec.acquired_at, self.clock(), released=True)
        self.root.write_atomic(f"{self.dir}/{lease_file(rec.generation)}", json_bytes(done.to_json()))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ internals

    def _require(self) -> LeaseRecord:
        if self.record is None:
            raise LeaseLostError(f"lease {self.root.uri(self.dir)} is not held by this runner; acquire it first")
        return self.record

    def _check_not_taken_over(self, rec: LeaseRecord) -> None:
        newer = [g for g in self.generations() if g > rec.generation]
        if newer:
            self.lost = LeaseLostError(
                f"lease {self.root.uri(self.dir)} expired and was taken over (generation {newer[-1]}); "
                f"this runner stopped renewing in time: raise ttl_s above {self.ttl_s:.0f} s"
            )
            raise self.lost

    def _prune(self, gen: int) -> None:
        for g in self.generations():
            if g <= gen - KEEP_GENERATIONS:
                self.root.remove(f"{self.dir}/{lease_file(g)}")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        interval = self.ttl_s * HEARTBEAT_FRACTION

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseLostError:
                    return
                except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat
                    continue

        self._thread = threading.Thread(target=beat, name=f"raybc-lease-{self.name}", daemon=True)
        self._thread.start()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
