"""Shared fixtures: one local Ray cluster per session, a real S3 server on loopback, storage roots.

- ``ray_session``: ``ray.init(address="local", num_cpus=4)`` once per session (RAY_NOTES: 4 logical
  CPUs so Ray Train workers and Ray Data tasks never starve each other on a 2-core machine).
- ``s3_server``: moto in server mode (a real HTTP S3 endpoint on 127.0.0.1), reset between tests.
- ``storage_root``: one test body over a local folder and an S3 bucket (parametrised).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

import pytest
import requests

# Fake credentials for the loopback S3 server; set before anything builds a client.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster someone else started
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback server; the server is reset afterwards."""
    import boto3
    import s3fs

    name = f"raybc-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name
    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()


def make_storage(kind: str, tmp_path, request):
    from raybc.storage import Storage, StorageOptions

    if kind == "local":
        return Storage(str(tmp_path / "root"))
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/root", StorageOptions(endpoint_url=endpoint))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage_root(request, tmp_path):
    """The same test body over a local folder and an S3 bucket on the loopback server."""
    return make_storage(request.param, tmp_path, request)


# Fixtures that start Ray processes, or talk to the S3 server; a test that uses one (directly or
# through another fixture) gets the marker, so `-m "not cluster"` / `-m "not s3"` never leaks one.
RAY_FIXTURES = frozenset({"ray_session", "ray_head", "two_nodes", "two_node_cluster"})
S3_FIXTURES = frozenset({"s3_server", "s3_bucket"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & RAY_FIXTURES and item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.cluster)
        if used & S3_FIXTURES and item.get_closest_marker("s3") is None:
            item.add_marker(pytest.mark.s3)


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections and never sends a byte (a hung server, or a wrong
    port behind a firewall, as a client sees it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # kept open, never read or answered
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What `raybc --quiet` / `--log-level` leave in the process (cli.main is the console entry point:
# it sets them for Ray's workers to inherit). A test calling cli.main in-process must not make
# every later test quiet.
_PROCESS_ENV = ("RAYBC_QUIET", "RAYBC_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS")
_RAY_LOGGERS = ("ray", "ray.data", "ray.train")


@pytest.fixture(autouse=True)
def _restore_cli_process_settings():
    import logging

    env = {k: os.environ.get(k) for k in _PROCESS_ENV}
    levels = {n: logging.getLogger(n).level for n in _RAY_LOGGERS}
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
