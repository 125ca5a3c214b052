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


# Ray cancels a running task (Ray Data does, for the rest of a pipeline that failed) with
# `_thread.interrupt_main()` in the worker: a KeyboardInterrupt wherever the main thread is. The
# child below fires it while the backfill's float16 conversion is importing torch for the first
# time, as it did in CI (2026-12-04): torch was left half-imported and every later float16 task
# in that worker failed ("Trying to override a python impl ... aten::broadcast_tensors").
_CANCELLED_DURING_IMPORT = r"""
import _thread, sys, threading, time
import numpy as np
import pyarrow as pa
from raybc.backfill import _to_half

assert "torch" not in sys.modules, "torch must not be imported yet"
fired = []

def cancel_mid_import():
    while MODULE not in sys.modules:
        time.sleep(0.0005)
    fired.append(time.perf_counter())
    _thread.interrupt_main()  # what ray.cancel does in the task's worker

threading.Thread(target=cancel_mid_import, daemon=True).start()
mat = np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8)
ids = pa.array(range(8), pa.int64())
try:
    _to_half(mat, np.empty((8, 8), np.float16), ids, where="t", row_offset=0)
    print("NOT CANCELLED")
except KeyboardInterrupt:
    print("cancelled after", "torch._C" in sys.modules and "torch._refs" in sys.modules)
# the next task in this worker converts as if nothing had happened
out = _to_half(mat, np.empty((8, 8), np.float16), ids, where="t", row_offset=0)
assert fired, "the cancellation never fired"
assert np.array_equal(out, mat.astype(np.float16)), "float16 bits differ"
print("next task ok")
"""


@pytest.mark.parametrize("module", ["torch", "torch._refs"])  # at its start; while it registers operators
def test_a_task_cancelled_while_importing_torch_leaves_the_worker_able_to_import_it(module):
    code = f"MODULE = {module!r}\n" + _CANCELLED_DURING_IMPORT
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    # the cancellation still happens (the task ends with KeyboardInterrupt), once torch is whole
    assert p.stdout.splitlines() == ["cancelled after True", "next task ok"], p.stdout + p.stderr
