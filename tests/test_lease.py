"""The reconcile lease over a local folder and a real S3 server: exactly one of racing takers wins,
expired leases are taken over (by exactly one), released leases are free, a lost lease is noticed."""

from __future__ import annotations

import threading

import pytest

from raybc.lease import KEEP_GENERATIONS, Lease, LeaseHeldError, LeaseLostError, lease_file


class Clock:
    """A settable wall clock, so expiry is tested without sleeping."""

    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lease(root, owner: str, clock: Clock, ttl_s: float = 60.0) -> Lease:
    return Lease(root, "reconcile", ttl_s=ttl_s, owner=owner, heartbeat=False, clock=clock)


def race(root, clock: Clock, n: int) -> tuple[list[str], list[str]]:
    """n runners try to take the lease at the same instant; (winners, losers' messages)."""
    barrier = threading.Barrier(n)
    winners, losers = [], []
    lock = threading.Lock()

    def go(i: int) -> None:
        mine = lease(root, f"runner-{i}", clock)
        barrier.wait()
        try:
            mine.acquire()
            with lock:
                winners.append(f"runner-{i}")
        except LeaseHeldError as exc:
            with lock:
                losers.append(str(exc))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return winners, losers


def test_exactly_one_of_racing_runners_takes_a_free_lease(storage_root):
    clock = Clock()
    winners, losers = race(storage_root, clock, 6)
    assert len(winners) == 1 and len(losers) == 5
    assert all("does nothing" in m for m in losers)
    cur = lease(storage_root, "x", clock).current()
    assert cur.owner == winners[0] and cur.generation == 1 and cur.active(clock())


def test_held_lease_is_refused_expired_one_taken_over_by_exactly_one(storage_root):
    clock = Clock()
    first = lease(storage_root, "first", clock)
    first.acquire()
    with pytest.raises(LeaseHeldError, match=r"held by first \(generation 1"):
        lease(storage_root, "second", clock).acquire()

    clock.t += 61  # first's lease expired (it crashed and never renewed)
    winners, _ = race(storage_root, clock, 5)
    assert len(winners) == 1
    cur = first.current()
    assert cur.generation == 2 and cur.owner == winners[0]
    # the crashed holder notices that it lost the lease instead of writing on
    with pytest.raises(LeaseLostError, match="taken over"):
        first.ensure_held()
    with pytest.raises(LeaseLostError):
        first.renew()
    first.release()  # a no-op for a lost lease: the winner's record stays
    assert first.current().owner == winners[0] and not first.current().released


def test_release_frees_the_lease_and_renew_extends_it(storage_root):
    clock = Clock()
    a = lease(storage_root, "a", clock, ttl_s=60)
    a.acquire()
    clock.t += 50
    a.renew()  # now valid until t0 + 110
    clock.t += 50
    with pytest.raises(LeaseHeldError):
        lease(storage_root, "b", clock).acquire()
    a.release()
    assert a.current().released
    b = lease(storage_root, "b", clock)
    assert b.acquire().generation == 2
    b.release()


def test_old_generations_are_pruned_never_the_newest(storage_root):
    clock = Clock()
    for i in range(KEEP_GENERATIONS + 3):
        with lease(storage_root, f"r{i}", clock):
            pass
    gens = lease(storage_root, "x", clock).generations()
    assert gens[-1] == KEEP_GENERATIONS + 3
    assert len(gens) <= KEEP_GENERATIONS
    assert storage_root.exists(f"locks/reconcile/{lease_file(gens[-1])}")


def test_heartbeat_keeps_a_live_holder_leased(tmp_path):
    from raybc.storage import Storage

    root = Storage(str(tmp_path / "root"))
    with Lease(root, "reconcile", ttl_s=0.6, owner="live") as held:
        first_expiry = held.record.expires_at
        threading.Event().wait(1.0)  # longer than the ttl: only renewals keep it
        assert held.record.expires_at > first_expiry
        with pytest.raises(LeaseHeldError, match="held by live"):
            Lease(root, "reconcile", ttl_s=1, heartbeat=False).acquire()
    assert Lease(root, "reconcile", ttl_s=1).current().released
