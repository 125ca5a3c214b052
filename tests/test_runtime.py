"""Joining Ray: a wrong address fails fast, naming the address and what happened, instead of
ray.init's minutes of retry warnings. Real loopback sockets: one that accepts and never answers,
one where nothing listens, and the session's real Ray cluster."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from raybc.runtime import RayAddressError, probe_ray_address


def test_a_silent_address_fails_within_the_bound(silent_port):
    t0 = time.monotonic()
    with pytest.raises(RayAddressError, match=rf"no Ray cluster at 127.0.0.1:{silent_port}: no answer within 1 s.*--ray-address"):
        probe_ray_address(f"127.0.0.1:{silent_port}", timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def test_a_refused_address_says_nothing_listens(closed_port):
    port = closed_port
    with pytest.raises(RayAddressError, match=rf"127.0.0.1:{port}: connection refused \(nothing listens there\)"):
        probe_ray_address(f"ray://127.0.0.1:{port}", timeout_s=1.0)


@pytest.mark.cluster
def test_a_real_cluster_passes_the_probe(ray_session):
    probe_ray_address(ray_session.get_runtime_context().gcs_address, timeout_s=5.0)


@pytest.mark.slow
def test_backfill_with_a_silent_ray_address_exits_1_naming_it(silent_port, tmp_path):
    from raybc.data.synthetic import build_registry

    build_registry(str(tmp_path / "root"), dims=[4, 6], rows=100, entities=["users"], rows_per_file=100)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "raybc.cli", "backfill", "--root", str(tmp_path / "root"), "--ray-address", f"127.0.0.1:{silent_port}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert f"no Ray cluster at 127.0.0.1:{silent_port}: no answer within 10 s" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
