"""Storage faults: transient S3 errors are retried with bounded backoff, permanent ones fail fast.

Faults are injected by a small proxy (``faultproxy.FaultProxy``) between the S3 client and the real
loopback S3 server (moto): 503 SlowDown, 500, stalls past the read timeout, reset connections,
403 AccessDenied. The classifier and the retry loop are also tested as pure functions.
"""

from __future__ import annotations

import errno
import logging
import time

import pytest

from faultproxy import FaultProxy
from raybc.errors import InputDataError, IntegrityError, StorageError
from raybc.storage import (
    MAX_BACKOFF_S,
    Storage,
    StorageOptions,
    TransientStorageError,
    backoff_s,
    is_transient,
    retry_transient,
)

# --------------------------------------------------------------------------- pure: classify, back off


def test_transient_and_permanent_errors_are_told_apart():
    import aiohttp
    import botocore.exceptions as be

    transient = [
        OSError(errno.EBUSY, "SlowDown: Please reduce your request rate"),  # s3fs's 503
        OSError(121, "We encountered an internal error"),  # s3fs's 500 (EREMOTEIO)
        TimeoutError("read timed out"),
        ConnectionResetError(104, "Connection reset by peer"),
        be.ReadTimeoutError(endpoint_url="http://x"),
        be.ConnectionClosedError(endpoint_url="http://x"),
        be.EndpointConnectionError(endpoint_url="http://x"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        TransientStorageError("cannot read s3://b/x: reset"),
    ]
    permanent = [
        PermissionError("Access Denied"),
        FileNotFoundError("NoSuchBucket"),
        StorageError("bucket 'x' does not exist"),
        StorageError("gave up on read s3://b/x after 3 attempts"),  # exhausted: outer layers must not retry again
        InputDataError("row 3 holds NaN"),
        IntegrityError("sha256 does not match"),
        ValueError("bad value"),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_backoff_doubles_and_is_capped():
    assert [backoff_s(a, base_s=0.5) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(30, base_s=0.5) == MAX_BACKOFF_S


def test_retry_is_bounded_logged_and_gives_up_with_the_count(caplog):
    calls, waits = [], []

    def flaky():
        calls.append(1)
        raise OSError(errno.EBUSY, "SlowDown")

    with caplog.at_level(logging.WARNING, logger="raybc.storage"):
        with pytest.raises(StorageError, match=r"gave up on read s3://b/k after 4 attempts: transient storage fault"):
            retry_transient(flaky, what="read s3://b/k", attempts=4, base_s=0.5, sleep=waits.append)
    assert len(calls) == 4 and len(waits) == 3
    assert all(0.5 * backoff_s(i + 1, base_s=0.5) <= w <= backoff_s(i + 1, base_s=0.5) for i, w in enumerate(waits))
    lines = [r.getMessage() for r in caplog.records]
    assert "retrying read s3://b/k after a transient fault" in lines[0] and "attempt 1/4 failed, next in" in lines[0]
    assert "attempt 3/4" in lines[2] and len(lines) == 3


def test_permanent_error_is_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(PermissionError):
        retry_transient(denied, what="read x", attempts=5, base_s=0.01, sleep=lambda s: None)
    assert len(calls) == 1


def test_a_transient_fault_that_passes_returns_the_result():
    state = {"n": 0}

    def once_then_ok():
        state["n"] += 1
        if state["n"] == 1:
            raise ConnectionResetError(104, "reset")
        return "ok"

    assert retry_transient(once_then_ok, what="x", attempts=2, base_s=0.01, sleep=lambda s: None) == "ok"


# --------------------------------------------------------------------------- through the proxy



@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server, stall_s=3.0) as p:
        yield p


def via(proxy: FaultProxy, bucket: str, **opts) -> Storage:
    """A Storage reaching the bucket through the proxy, with short timeouts so stalls are quick."""
    # read timeout well above a busy machine's moto answer, well below the stall
    base = dict(endpoint_url=proxy.url, connect_timeout_s=1.0, read_timeout_s=1.5, backoff_s=0.02)
    return Storage(f"s3://{bucket}/root", StorageOptions(**{**base, **opts}))


@pytest.mark.s3
def test_client_retries_a_slowdown_within_its_attempts(proxy, s3_bucket):
    s = via(proxy, s3_bucket, retries=3, operation_attempts=1)
    s.write_atomic("x.json", b"{}")
    proxy.inject("slowdown", times=2, method="GET")
    assert s.read_bytes("x.json") == b"{}"
    assert proxy.injected("slowdown") == 2 and proxy.requests("GET") == 3  # botocore: 3 attempts


@pytest.mark.s3
@pytest.mark.parametrize("fault", ["slowdown", "internal", "stall", "reset"])
def test_transient_fault_is_retried_by_the_operation_and_logged(proxy, s3_bucket, fault, caplog):
    s = via(proxy, s3_bucket, retries=1, operation_attempts=3)  # no client retries: every fault reaches raybc
    s.write_atomic("data/x.bin", b"payload")
    proxy.inject(fault, times=2, method="GET")
    with caplog.at_level(logging.WARNING, logger="raybc.storage"):
        assert s.read_bytes("data/x.bin") == b"payload"
    assert proxy.injected(fault) == 2
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    # aiohttp itself resends a request once when its reused keep-alive connection is reset (the
    # connection write_atomic left open): the first reset never reaches raybc, the second does.
    # Either way the proxy saw exactly the two faulted GETs and the one that passed.
    assert len(lines) == (1 if fault == "reset" else 2), lines
    assert proxy.requests("GET") == 3
    assert f"retrying read s3://{s3_bucket}/root/data/x.bin after a transient fault" in lines[0]
    assert [("attempt %d/3 failed" % (i + 1)) in line for i, line in enumerate(lines)] == [True] * len(lines)
    # writes too: CURRENT-style one-PUT replacement
    proxy.inject(fault, times=1, method="PUT")
    s.write_atomic("data/CURRENT", b"{}")
    assert s.read_bytes("data/CURRENT") == b"{}"


@pytest.mark.s3
def test_persistent_fault_gives_up_within_the_bound(proxy, s3_bucket):
    s = via(proxy, s3_bucket, retries=2, operation_attempts=3)
    s.write_atomic("x", b"1")
    proxy.inject("slowdown", times=1000, method="GET")
    before = proxy.requests("GET")
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=rf"gave up on read s3://{s3_bucket}/root/x after 3 attempts: transient"):
        s.read_bytes("x")
    # bound: retries (client, per request) x operation_attempts (raybc) requests, no more
    assert proxy.requests("GET") - before == 2 * 3
    assert time.perf_counter() - t0 < 30


@pytest.mark.s3
def test_access_denied_fails_fast_with_a_clear_message(proxy, s3_bucket, caplog):
    s = via(proxy, s3_bucket, retries=5, operation_attempts=5)
    s.write_atomic("x", b"1")
    proxy.inject("forbidden", times=1000)
    before = len(proxy.log)
    with caplog.at_level(logging.WARNING, logger="raybc.storage"):
        with pytest.raises(StorageError, match=rf"permission denied to read s3://{s3_bucket}/root/x: check the credentials"):
            s.read_bytes("x")
        with pytest.raises(StorageError, match="permission denied to write"):
            s.write_atomic("y", b"2")
    assert len(proxy.log) - before == 2, "a 403 is never retried"
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


@pytest.mark.s3
def test_missing_bucket_fails_fast(proxy):
    s = Storage("s3://raybc-no-such-bucket/root", StorageOptions(endpoint_url=proxy.url, retries=5, operation_attempts=5))
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="bucket 'raybc-no-such-bucket' .*does not exist"):
        s.read_bytes("registry/v0/manifest.json")
    # the read and the bucket probe, each request sent once: nothing retried
    assert len(set(proxy.log)) == len(proxy.log) <= 5 and time.perf_counter() - t0 < 5
    # listing a missing bucket is an error too, not an empty registry
    from raybc.registry import Registry

    with pytest.raises(StorageError, match="bucket 'raybc-no-such-bucket' .*does not exist"):
        Registry(s).versions()


# --------------------------------------------------------------------------- a backfill through the proxy


def s3_registry(s3_server: str, bucket: str):
    """v0..v2 with 6k item rows in 3 files of v2, written straight to the server (no faults)."""
    from raybc.data.synthetic import build_registry

    direct = Storage(f"s3://{bucket}/root", StorageOptions(endpoint_url=s3_server))
    return build_registry(direct, dims=[8, 12, 16], rows=6_000, entities=["items"], rows_per_file=2_000, row_group_rows=1_000)


@pytest.mark.s3
@pytest.mark.cluster
@pytest.mark.slow
def test_backfill_survives_throttling_timeouts_and_resets(proxy, s3_server, s3_bucket, ray_session):
    from raybc.backfill import BackfillOptions, backfill
    from raybc.registry import Registry
    from raybc.snapshots import verify_snapshot

    s3_registry(s3_server, s3_bucket)
    root = via(proxy, s3_bucket, retries=1, operation_attempts=4, read_timeout_s=1.0)
    # faults everywhere the backfill does I/O: planning reads (driver), part reads and multipart
    # uploads (Ray workers), the commit's checks and CURRENT (driver)
    proxy.inject("slowdown", times=2, method="GET", path=r"/embeddings/v2/items/part-")
    proxy.inject("reset", times=1, method="GET", path=r"/embeddings/v2/items/part-", skip=3)
    proxy.inject("stall", times=1, method="GET", path=r"/embeddings/v2/items/part-", skip=6)
    proxy.inject("internal", times=2, method="PUT", path=r"partNumber=")
    proxy.inject("slowdown", times=1, method="PUT", path=r"/CURRENT")
    summary = backfill(root, BackfillOptions(rows_per_part=1_000, progress=False), echo=lambda _: None)
    assert sorted(summary.committed) == ["as-v0/items", "as-v1/items"]
    injected = {f: proxy.injected(f) for f in ("slowdown", "reset", "stall", "internal")}
    assert injected == {"slowdown": 3, "reset": 1, "stall": 1, "internal": 2}, injected
    reg = Registry(Storage(f"s3://{s3_bucket}/root", StorageOptions(endpoint_url=s3_server)))
    for j in (0, 1):
        v = verify_snapshot(reg, j, "items")
        assert v.ok and v.rows == 6_000, v  # every row exactly once, values right


@pytest.mark.s3
@pytest.mark.cluster
def test_backfill_gives_up_on_a_persistent_fault_and_a_rerun_completes(proxy, s3_server, s3_bucket, ray_session):
    from raybc.backfill import BackfillOptions, backfill
    from raybc.snapshots import Snapshots

    s3_registry(s3_server, s3_bucket)
    root = via(proxy, s3_bucket, retries=2, operation_attempts=2)
    proxy.inject("slowdown", times=10_000, method="PUT", path=r"partNumber=")
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"gave up on backfill part items/part-\d+-\d+.parquet of run-\w+ after 2 attempts"):
        backfill(root, BackfillOptions(rows_per_part=2_000, progress=False), echo=lambda _: None)
    assert time.perf_counter() - t0 < 60
    assert Snapshots(root).pointer(0, "items") is None and Snapshots(root).pointer(1, "items") is None
    proxy.clear()
    s = backfill(root, BackfillOptions(rows_per_part=2_000, progress=False), echo=lambda _: None)
    assert sorted(s.committed) == ["as-v0/items", "as-v1/items"]


@pytest.mark.s3
@pytest.mark.cluster
def test_backfill_fails_fast_when_access_is_denied(proxy, s3_server, s3_bucket, ray_session):
    from raybc.backfill import BackfillOptions, backfill
    from raybc.snapshots import Snapshots

    s3_registry(s3_server, s3_bucket)
    root = via(proxy, s3_bucket, retries=5, operation_attempts=5)
    proxy.inject("forbidden", times=10_000, method="POST", path=r"\?uploads")  # every upload start refused
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"permission denied to write s3://.*/snapshots/as-v\d/items/.*: check the credentials"):
        backfill(root, BackfillOptions(rows_per_part=2_000, progress=False), echo=lambda _: None)
    assert time.perf_counter() - t0 < 30
    # never retried: at most one refused upload start per part and target (3 parts x 2 targets)
    assert proxy.injected("forbidden") <= 6
    assert Snapshots(root).pointer(0, "items") is None


# --------------------------------------------------------------------------- an endpoint that is not there


@pytest.mark.s3
def test_a_silent_or_refusing_endpoint_fails_at_once_naming_it(silent_port, closed_port, capsys, monkeypatch):
    """Before: a silent endpoint took read_timeout x retries x attempts (936 s for `raybc versions`),
    a refusing one 17-38 s of retries advising to raise them. Now the first request of a process is
    a bare probe: a clear error within the probe's timeout, and nothing retried."""
    from raybc import cli

    silent_endpoint, refused = f"http://127.0.0.1:{silent_port}", f"http://127.0.0.1:{closed_port}"
    for url, says, bound_s in ((silent_endpoint, "did not answer within 2 s", 6), (refused, "refused the connection", 3)):
        s = Storage("s3://b/root", StorageOptions(endpoint_url=url, probe_timeout_s=2))
        t0 = time.perf_counter()
        with pytest.raises(StorageError, match=rf"S3 endpoint {url} {says}.*check storage.endpoint_url"):
            s.read_bytes("registry/v0/manifest.json")
        assert time.perf_counter() - t0 < bound_s
    # the CLI, with the endpoint from the environment and the default probe timeout (10 s)
    for url, says in ((silent_endpoint, "did not answer within 10 s"), (refused, "refused the connection")):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        t0 = time.perf_counter()
        assert cli.main(["versions", "--root", "s3://b/root"]) == cli.EXIT_FAILED
        err = capsys.readouterr().err
        assert f"S3 endpoint {url} {says}" in err and "Traceback" not in err and "raise" not in err, err
        assert time.perf_counter() - t0 < 15


@pytest.mark.s3
def test_an_answering_endpoint_is_probed_once_per_process(proxy, s3_bucket):
    """Any HTTP answer passes the probe (moto answers HEAD / itself); later Storages of the same
    endpoint in this process send no further probe."""
    via(proxy, s3_bucket).write_atomic("x", b"1")
    via(proxy, s3_bucket).write_atomic("y", b"2")
    assert proxy.requests("HEAD", r"^/$") == 1, proxy.log
