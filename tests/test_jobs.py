"""The entry points: shipped configs validate, jobs/ refuses import, the real command lines run --
including ``ray job submit`` against a ``ray start --head`` cluster with token auth."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from raybc.config import BackfillJobConfig
from raybc.options import load_options

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def test_jobs_package_refuses_import():
    with pytest.raises(ImportError, match="entry points, not a library"):
        import jobs  # noqa: F401


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("backfill*.yaml")), ids=lambda p: p.name)
def test_shipped_backfill_configs_validate(path):
    cfg = load_options(BackfillJobConfig, file=path)
    assert cfg.root and cfg.backfill.rows_per_part > 0


def copy_checkout(dest: Path) -> Path:
    """``dest`` holding a copy of this checkout's tracked and unignored files: what a user's clone
    (and ``ray job submit --working-dir .`` from it) has."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in listed.stdout.split():
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def run(cmd: list[str], *, env: dict | None = None, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.cluster  # `raybc demo` starts a local Ray in its own process
def test_demo_command_builds_backfills_and_verifies(tmp_path):
    root = tmp_path / "demo"
    p = run([f"{VENV_BIN}/raybc", "demo", "--root", str(root), "--rows", "5000"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("-> ok") == 8  # 4 older versions x 2 entities
    assert "raybc.read_snapshot(" in p.stdout and "pd.read_parquet" in p.stdout
    assert (root / "snapshots" / "as-v0" / "users" / "CURRENT").exists()
    # what a user reads has none of Ray's misleading lines, and a log file no colour codes
    out = p.stdout + p.stderr
    assert "data written" not in out and "available CPUs" not in out and "\x1b[" not in out, out[-3000:]
    # run again: reuses the registry and has nothing to do
    again = run([f"{VENV_BIN}/raybc", "demo", "--root", str(root), "--rows", "5000"])
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_backfill_help_lists_the_flags():
    p = run([sys.executable, "jobs/backfill.py", "--help"])
    assert p.returncode == 0
    for flag in ("--config", "--root", "--from-version", "--to-versions", "--entity"):
        assert flag in p.stdout


@pytest.fixture
def ray_head(tmp_path):
    """A real `ray start --head` cluster with token auth, torn down by its own temp dir."""
    temp_dir = f"/tmp/rbc-{uuid.uuid4().hex[:6]}"  # short: unix socket paths are limited
    from conftest import free_port

    gcs_port, dash_port = free_port(), free_port()
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "w")
    proc = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
         f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
         # the agent and client ports default to fixed numbers that the session's own Ray holds
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = run([f"{VENV_BIN}/ray", "job", "list", "--address", address], env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, timeout=60)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        pytest.fail("ray head did not come up: " + (tmp_path / "ray-head.log").read_text()[-2000:])
    yield address, token, temp_dir
    # Stop only this cluster: everything started with our temp dir (never `ray stop`, which would
    # also kill the test session's own local cluster).
    os.killpg(proc.pid, signal.SIGTERM)
    subprocess.run(["pkill", "-TERM", "-f", temp_dir])
    time.sleep(2)
    subprocess.run(["pkill", "-KILL", "-f", temp_dir])
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cmd: list[str], token: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is still starting."""
    deadline = time.time() + 120
    while True:
        p = run(cmd, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        if "No available agent to submit job" not in p.stderr or time.time() > deadline:
            return p
        time.sleep(3)


@pytest.mark.cluster
@pytest.mark.slow
def test_ray_job_submit_backfill_with_token_auth(ray_head, tmp_path):
    from raybc.data.synthetic import build_registry
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots, verify_snapshot
    from raybc.storage import Storage

    address, token, temp_dir = ray_head
    outputs: list[str] = []
    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[8, 12, 16], rows=4_000, entities=["items"], rows_per_file=1_000)
    base = [f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
    job = base + ["python", "jobs/backfill.py", "--root", root.uri(), "--to-versions", "0,1", "--no-progress"]

    # without the token the job server refuses
    refused = submit(job, "wrong-token")
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
    assert Snapshots(root).pointer(0, "items") is None

    ok = submit(job, token)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "snapshots committed" in ok.stdout and "succeeded" in (ok.stdout + ok.stderr)
    for j in (0, 1):
        assert verify_snapshot(Registry(root), j, "items").ok

    # training runs as a Ray job too: the job joins the cluster (RAY_ADDRESS) and publishes v0
    train_root = tmp_path / "trained"
    trained = submit(base + ["python", "jobs/train_version.py", "--root", str(train_root), "--dataset", "synthetic:200,120,3000",
                             "--method", "no-bc", "--epochs", "3"], token)  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert Registry(Storage(str(train_root))).versions() == [0]

    # the README's own flow, as written: `raybc demo --root ./demo-root` in a clone, then its
    # `ray job submit ... --root "$PWD/demo-root"` line run by a shell in that clone
    clone = copy_checkout(tmp_path / "clone")
    demo = run([f"{VENV_BIN}/raybc", "demo", "--root", "./demo-root", "--rows", "2000"], cwd=clone)
    assert demo.returncode == 0, demo.stderr[-3000:]
    shutil.rmtree(clone / "demo-root" / "snapshots")  # so the submitted job has all of it to do
    readme = (REPO / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265"))
    cont = readme.splitlines()[readme.splitlines().index(line) + 1].strip()
    documented = (line.rstrip("\\ ") + " " + cont).replace("http://127.0.0.1:8265", address)
    assert '--root "$PWD/demo-root"' in documented, documented
    flow = run(["bash", "-c", documented], env={"RAY_AUTH_TOKEN": token}, cwd=clone, timeout=600)
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
    demo_root = Storage(str(clone / "demo-root"))
    assert "snapshots committed" in flow.stdout
    assert all(verify_snapshot(Registry(demo_root), j, e).ok for j in range(4) for e in ("users", "items"))
    # a relative root under `ray job submit` says why it cannot work, and writes nothing
    rel = submit(base[:-3] + ["--working-dir", str(clone), "--", "python", "jobs/backfill.py", "--root", "./demo-root"], token)
    assert rel.returncode != 0 and "is a relative path, and this runs as a `ray job submit` job" in rel.stdout + rel.stderr
    assert '--root "$PWD/demo-root"' in rel.stdout + rel.stderr

    # the token never shows: not in what any submit printed, nor in any log file of the cluster
    outputs += [p.stdout + p.stderr for p in (refused, ok, trained, flow, rel)]
    assert not [o for o in outputs if token in o]
    logs = [f for f in Path(temp_dir).rglob("*") if f.is_file() and f.suffix in (".log", ".out", ".err", ".txt", ".json")]
    assert logs, f"no log files found under {temp_dir}"
    leaked = [str(f) for f in logs if token.encode() in f.read_bytes()]
    assert not leaked, leaked

    # a failing job makes the CLI exit non-zero
    bad = submit(base + ["python", "jobs/backfill.py", "--root", root.uri(), "--from-version", "9"], token)
    assert bad.returncode != 0
    assert "from_version: v9 is not published" in bad.stdout + bad.stderr
