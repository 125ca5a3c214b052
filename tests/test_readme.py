"""The README's commands, run as written.

Every command line of the README's ``bash`` blocks is either run below, read from the README itself
(so an edit there is what runs), or listed in ``NOT_RUN`` with the reason; a command added to the
README without either fails ``test_every_readme_command_is_run_here_or_says_why_not``.

"As written" allows only these changes, each named where it is made: placeholder data paths
(``/data/...``) point into the test's folder, the S3 endpoint ``http://127.0.0.1:9000`` becomes the
loopback S3 server's port (and ``AWS_ENDPOINT_URL`` points the configs' real-AWS roots there),
and a synopsis's ``[--optional flags]`` are left out. Commands run with ``bash -c`` in a copy of
the clone (``git ls-files``) whose ``.venv`` is this test run's virtual environment, so ``./demo-root``,
``./root``, ``jobs/configs/...`` and ``.venv/bin/raybc`` mean what they mean to a user.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
README = REPO / "README.md"


def readme_commands(text: str | None = None) -> list[str]:
    """Every command line of the README's ```bash blocks: continuations joined, comments dropped."""
    text = README.read_text() if text is None else text
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        cur = ""
        for line in block.split("\n"):
            cur = f"{cur} {line.strip()}" if cur else line.strip()
            if cur.endswith("\\"):
                cur = cur[:-1].rstrip()
                continue
            cmd = re.sub(r"\s+#\s.*$", "", cur).strip()
            cur = ""
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def readme(cmd: str) -> str:
    """``cmd``, after checking that the README holds exactly this command line."""
    assert cmd in readme_commands(), f"the README no longer holds the command {cmd!r}: update this test with it"
    return cmd


# --------------------------------------------------------------------------- what runs where

SETUP_DEMO = "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt torch==2.13.0 -e . && .venv/bin/raybc demo --root ./demo-root"
DEMO_ROOT = [  # test_the_demo_root_commands_as_written, in this order
    "raybc backfill --root ./demo-root",
    "raybc backfill --config jobs/configs/backfill.yaml",
    "raybc reconcile --root ./demo-root",
    "raybc versions --root ./demo-root",
    "raybc snapshots --root ./demo-root",
    "raybc --quiet reconcile --root ./demo-root",
    "raybc retention --root ./demo-root --dry-run",
    "raybc train --help",
]
S3_BACKFILL = "raybc backfill --root s3://bucket/raybc --to-versions 0,2 --entity items --endpoint-url http://127.0.0.1:9000"
S3_DRY_RUN = "raybc reconcile --root s3://my-embeddings-bucket/raybc --dry-run"
S3_REGISTER_FIT = "python jobs/register.py --config jobs/configs/register-fit.yaml"
S3_RECONCILE = "raybc reconcile --config jobs/configs/reconcile-s3.yaml"
REGISTER_GIVEN = "raybc register --root ./root --version 5 --embeddings items=/data/z5/items/ --aligner /data/b5.npy"
REGISTER_FIT = "raybc register --root ./root --version 5 --embeddings items=/data/z5/items/ --fit-aligner linear --in-place"
CONSUMER_ITEMS = "raybc consumers register --root ./root --name ratings --task binary-item-rating-avg --labels labels.parquet --version 0"
GATE_ITEMS = "raybc gate --root ./root --version 5 --embeddings items=/data/z5/items/ --aligner /data/b5.npy --json"
CONSUMER_EDGES = ("raybc consumers register --root ./root --name ratings-team --task binary-edge-rating --labels labels.parquet "
                  "--version 0 --recipe consumer.yaml")  # fmt: skip
CONSUMERS_LIST = "raybc consumers list --root ./root"
CONSUMERS_REMOVE = "raybc consumers remove --root ./root --name ratings-team"
GATE_SYNOPSIS = ("raybc gate --root ./root --version 5 --embeddings users=/data/z5/users/ --embeddings items=/data/z5/items/ "
                 "--aligner /data/b5.npy [--aligner-layout out_in|in_out] [--max-degradation 0.02] [--json]")  # fmt: skip
GATE_PUBLISHED = "raybc gate --root ./root --version 4"

RUN_HERE = {
    SETUP_DEMO: "its last part, `.venv/bin/raybc demo --root ./demo-root`: test_the_demo_root_commands_as_written "
    "(the venv and the install are the ones this test runs in; .ci/run makes them on a clean clone)",
    **{c: "test_the_demo_root_commands_as_written" for c in DEMO_ROOT},
    **{c: "test_the_s3_commands_as_written" for c in (S3_BACKFILL, S3_DRY_RUN, S3_REGISTER_FIT, S3_RECONCILE)},
    **{c: "test_the_register_consumers_and_gate_commands_as_written"
       for c in (REGISTER_GIVEN, REGISTER_FIT, CONSUMER_ITEMS, GATE_ITEMS, CONSUMER_EDGES, CONSUMERS_LIST, CONSUMERS_REMOVE,
                 GATE_SYNOPSIS, GATE_PUBLISHED)},  # fmt: skip
    'RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/backfill.py --root "$PWD/demo-root"':
        "tests/test_jobs.py::test_ray_job_submit_backfill_with_token_auth reads it from the README and runs it in a clone "
        "(address: that test's own head)",
}  # fmt: skip

NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt torch==2.13.0 -e '.[dev]' && .venv/bin/python -m pytest":
        "it is the test suite itself; .ci/run runs exactly it on a clean clone",
    "ray start --head --num-cpus=2 --disable-usage-stats":
        "tests/test_jobs.py's ray_head starts it with these flags plus private ports and temp dir (the session's own Ray holds the defaults)",
    "ray stop": "would stop every Ray on the machine, the test session's own included; ray_head stops its cluster by its temp dir",
    "python jobs/bench_backfill.py --rows 2000000 --workdir /tmp/raybc-bench":
        "minutes of benchmark; tests/test_bench.py runs the same script end to end on fewer rows, local and S3",
    "python jobs/bench_backfill.py --workdir s3://bucket/bench --ray-address auto":
        "needs a running cluster and a bucket; tests/test_bench.py runs the script on the loopback S3 server",
    "for k in 0 1 2 3 4; do": "MovieLens-100K training, 50-400 s a version (docs/training.md); tests/test_train.py fits every method on small data",
    "python jobs/train_version.py --root ./ml-root/bc-aligner --dataset movielens-100k --method bc-aligner --version $k":
        "as above (the loop's body)",
    "done": "as above (the loop's end)",
    "python jobs/train_version.py --config jobs/configs/train-movielens.yaml":
        "as above; tests/test_train.py::test_shipped_train_configs_validate validates the config",
    "raybc backfill --root ./ml-root/bc-aligner": "needs the MovieLens root the loop above builds",
    "raybc experiment --dataset movielens-100k --out runs/ml --seeds 0,1,2 --alignment-weights 1,4,64":
        "the paper's full protocol over three seeds with a lambda sweep: hours on 2 cores (docs/results.md §6); "
        "tests/test_experiment.py::test_several_seeds_and_a_lambda_sweep_share_models_and_report_both_bases runs seeds and a sweep on small data",
    "raybc experiment --dataset synthetic:300,150,6000 --out /tmp/exp --profile quick":
        "minutes on 2 cores; tests/test_experiment.py::test_quick_profile_runs_every_method_and_version_and_resumes runs this "
        "data set and profile through raybc.experiment, not through the command line",
    "raybc experiment --config jobs/configs/experiment-movielens.yaml": "the full protocol on MovieLens (as above)",
    "aws iam create-instance-profile --instance-profile-name raybc-ray-node": "AWS account",
    "aws iam add-role-to-instance-profile --instance-profile-name raybc-ray-node --role-name raybc-ray-node": "AWS account",
    'aws ssm put-parameter --name /raybc/ray-auth-token --type SecureString --value "$(.venv/bin/ray get-auth-token --generate 2>/dev/null)"':
        "AWS account",
    ".venv/bin/ray up -y cluster.yaml": "AWS account; tests/test_cluster_yaml.py validates cluster.yaml against Ray's schema",
    ".venv/bin/ray dashboard cluster.yaml &": "a launched cluster",
    "export RAY_AUTH_MODE=token": "part of the cluster session (step 4)",
    'export RAY_AUTH_TOKEN="$(aws ssm get-parameter --name /raybc/ray-auth-token --with-decryption --query Parameter.Value --output text)"':
        "AWS account",
    ".venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json "
    "'{\"env_vars\": {\"AWS_REGION\": \"us-east-1\", \"RAY_DATA_DISABLE_PROGRESS_BARS\": \"1\"}}' -- python jobs/backfill.py "
    "--root s3://my-embeddings-bucket/raybc": "a launched cluster and a bucket; the same submit against a local head is tests/test_jobs.py's",
    ".venv/bin/ray down -y cluster.yaml": "a launched cluster",
}  # fmt: skip


def test_every_readme_command_is_run_here_or_says_why_not():
    commands = readme_commands()
    assert len(commands) == len(set(commands)), "a command line appears twice in the README: key this table otherwise"
    accounted = set(RUN_HERE) | set(NOT_RUN)
    assert not set(RUN_HERE) & set(NOT_RUN)
    unaccounted = [c for c in commands if c not in accounted]
    stale = sorted(accounted - set(commands))
    assert not unaccounted, f"README commands no test runs and NOT_RUN does not explain: {unaccounted}"
    assert not stale, f"commands listed here that the README no longer holds: {stale}"


def test_readme_commands_parser_joins_continuations_and_drops_comments():
    text = "x\n```bash\n# a comment\nraybc a --b \\\n    --c d   # why\n\nraybc e\n```\n```python\nnot = 'bash'\n```\n"
    assert readme_commands(text) == ["raybc a --b --c d", "raybc e"]


# --------------------------------------------------------------------------- running them


@pytest.fixture
def clone(tmp_path) -> Path:
    """A copy of the clone's tracked and unignored files, with this test run's venv as its .venv."""
    from test_jobs import copy_checkout

    dest = copy_checkout(tmp_path / "clone")
    (dest / ".venv").symlink_to(VENV)
    return dest


def sh(cmd: str, cwd: Path, *, env: dict[str, str] | None = None, subs: dict[str, str] | None = None, timeout: int = 600):
    """Run a README command line with bash in ``cwd``; ``subs`` are the placeholder substitutions."""
    for old, new in (subs or {}).items():
        assert old in cmd, (old, cmd)
        cmd = cmd.replace(old, new)
    full = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    full.pop("RAY_ADDRESS", None)
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    return p


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}: {p.args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
@pytest.mark.cluster  # each command starts its own local Ray
def test_the_demo_root_commands_as_written(clone):
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots
    from raybc.storage import Storage

    setup = readme(SETUP_DEMO)
    demo = setup.rsplit(" && ", 1)[1]
    assert demo == ".venv/bin/raybc demo --root ./demo-root"
    out = ok(sh(demo, clone))
    assert out.count("-> ok") == 8, out[-3000:]  # v0..v3 x users, items
    root = Storage(str(clone / "demo-root"))
    committed = {(t, e): p.run_id for t, e, p in Snapshots(root).list()}
    assert len(committed) == 8

    backfill, backfill_cfg, reconcile, versions, snapshots, quiet, retention, train_help = (readme(c) for c in DEMO_ROOT)
    assert "nothing to do" in ok(sh(backfill, clone))
    assert "nothing to do" in ok(sh(backfill_cfg, clone))  # the config's root is ./demo-root
    assert ok(sh(reconcile, clone)).strip().splitlines()[-1].startswith(f"raybc reconcile: nothing to do root={root.uri()} newest=v4")
    listed = ok(sh(versions, clone))
    assert all(f"v{k}" in listed for k in range(5)), listed
    shown = ok(sh(snapshots, clone))
    assert all(f"as-v{j}" in shown for j in range(4)) and "users" in shown and "items" in shown, shown
    assert {(t, e): p.run_id for t, e, p in Snapshots(root).list()} == committed, "nothing was rebuilt"
    shutil.rmtree(clone / "demo-root" / "snapshots" / "as-v0" / "users")  # work for the quiet reconcile
    q = sh(quiet, clone)
    lines = ok(q).strip().splitlines()
    assert lines[-1].startswith(f"raybc reconcile: done root={root.uri()} newest=v4 built=1 up_to_date=7"), q.stdout
    assert not [ln for ln in lines if " part-" in ln] and "\tINFO " not in q.stderr, q.stdout + q.stderr[-3000:]
    assert {(t, e): p.run_id for t, e, p in Snapshots(root).list()} == committed, "the same run rebuilt"
    assert "would remove" in ok(sh(retention, clone))
    assert "--method" in ok(sh(train_help, clone))

    # the README's Python block, as written, after a z4_batch of the newest version's dimension
    block = re.search(r"```python\n(import raybc\n.*?)```", README.read_text(), re.S)
    assert block, "the README's reading block is gone"
    dim4 = Registry(root).get(4).dim
    code = f"import numpy as np\nz4_batch = np.ones((3, {dim4}), np.float32)\n{block[1]}\nprint(table.num_rows, ds.count(), z1.shape)\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=clone, capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == f"200000 200000 (3, {Registry(root).get(1).dim})", p.stdout


# --------------------------------------------------------------------------- S3


def _s3(uri: str, endpoint: str):
    from raybc.storage import Storage, StorageOptions

    return Storage(uri, StorageOptions(endpoint_url=endpoint))


@pytest.mark.slow
@pytest.mark.cluster
def test_the_s3_commands_as_written(clone, s3_server, s3_bucket):
    """The README's S3 lines against the loopback S3 server: buckets named as written; the explicit
    --endpoint-url given the server's port; the configs (real-AWS roots) pointed there by
    AWS_ENDPOINT_URL, as the README says S3-compatible stores are."""
    import boto3

    from raybc.data.synthetic import build_registry
    from raybc.embeddings import make_table, read_matrix, write_table
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots, verify_snapshot

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for b in ("bucket", "my-embeddings-bucket"):
        s3.create_bucket(Bucket=b)  # the loopback server is reset after the test (s3_bucket)
    env = {"AWS_ENDPOINT_URL": s3_server}

    small = _s3("s3://bucket/raybc", s3_server)
    build_registry(small, dims=[8, 12, 16, 24], rows=3_000, entities=["items"], rows_per_file=1_000)
    ok(sh(readme(S3_BACKFILL), clone, subs={"http://127.0.0.1:9000": s3_server}))
    assert sorted(f"as-v{t}/{e}" for t, e, _ in Snapshots(small).list()) == ["as-v0/items", "as-v2/items"]
    assert all(verify_snapshot(Registry(small), t, "items").ok for t in (0, 2))

    # register-fit.yaml: v5 of items and users, exported to s3://my-embeddings-bucket/exports/z5/, in place, B_5 fitted
    root = _s3("s3://my-embeddings-bucket/raybc", s3_server)
    reg = build_registry(root, dims=[8, 12, 16, 24, 32], rows=3_000, entities=["users", "items"], rows_per_file=1_500)
    q = np.random.default_rng(5).standard_normal((32, 32)).astype(np.float32)  # z5 = z4 Q (Q invertible): a linear B_5 recovers z4
    for e in ("users", "items"):
        store = reg.embeddings_storage(4, e)
        for f in reg.get(4).embeddings[e].files:
            with store.open_input(f.path) as fh:
                ids, z4 = read_matrix(pq.read_table(fh))
            with _s3(f"s3://my-embeddings-bucket/exports/z5/{e}", s3_server).open_output(f.path) as fh:
                write_table(fh, make_table(ids, z4 @ q))
    plan = ok(sh(readme(S3_DRY_RUN), clone, env=env))
    assert plan.strip().splitlines()[-1].startswith("raybc reconcile: dry run root=s3://my-embeddings-bucket/raybc newest=v4 would_build=8"), plan
    ok(sh(readme(S3_REGISTER_FIT), clone, env=env))
    v5 = Registry(root).get(5)
    assert v5.embeddings["items"].location.rstrip("/") == "s3://my-embeddings-bucket/exports/z5/items"
    assert v5.manifest["aligner_fit"]["kind"] == "linear" and all(f.stamp for f in v5.embeddings["items"].files)
    out = ok(sh(readme(S3_RECONCILE), clone, env=env))
    last = out.strip().splitlines()[-1]
    assert last.startswith("raybc reconcile: done root=s3://my-embeddings-bucket/raybc newest=v5 built=10"), out[-3000:]
    assert all(verify_snapshot(Registry(root), t, e).ok for t in range(5) for e in ("users", "items"))


# --------------------------------------------------------------------------- register, consumers, gate

DIMS = [8, 12, 16, 20, 24, 28]  # v0..v5
N = {"users": 400, "items": 300}
RECIPE = "hidden: [16]\ndropout: [0.0]\nseeds: [0]\nepochs: 150\n"


def _world(root_dir: Path, data: Path, *, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """./root with v0..v4 whose B's are exact (B_k z_k = z_{k-1}, z_k of full rank), z_0 and
    z_4 stored for users and items; /data/z5/{users,items}/ and /data/b5.npy an exact v5 candidate
    (28-d, B_5 a (24, 28) matrix: its shape decides the layout). Returns v0's (ids, z_0) per entity."""
    from raybc.embeddings import make_table
    from raybc.registry import Registry
    from raybc.storage import Storage
    from raybc.transforms import Linear

    shutil.rmtree(root_dir, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    rng = np.random.default_rng(seed)
    ids = {e: np.arange(m, dtype=np.int64) * 3 + 1 for e, m in N.items()}  # the data set's own ids
    z0 = {e: rng.standard_normal((m, DIMS[0])) for e, m in N.items()}
    z = dict(z0)
    reg = Registry(Storage(str(root_dir)))
    for k, d in enumerate(DIMS):
        b = None
        if k:
            b = (rng.standard_normal((DIMS[k - 1], d)) / np.sqrt(d)).astype(np.float32)  # y = B z
            # z_k = B^+ z_{k-1} + a random part in B's null space: B_k z_k = z_{k-1}, and z_k spans all d_k dims
            null = np.linalg.svd(b.astype(np.float64))[2][DIMS[k - 1]:]  # (d_k - d_{k-1}, d_k)
            z = {e: m @ np.linalg.pinv(b.astype(np.float64)).T + rng.standard_normal((len(m), len(null))) @ null for e, m in z.items()}
        if k == 5:
            for e, m in z.items():
                (data / "z5" / e).mkdir(parents=True)
                pq.write_table(make_table(ids[e], m.astype(np.float32)), data / "z5" / e / "part-00000.parquet")
            np.save(data / "b5.npy", b)
            break
        listing = {e: reg.write_embeddings(k, e, [make_table(ids[e], m.astype(np.float32))]) for e, m in z.items()} if k in (0, 4) else {}
        reg.publish(k, dim=d, method="external", aligner=None if b is None else Linear(b), embeddings=listing)
    return {e: (ids[e], z0[e]) for e in N}


def _labels(z0: dict[str, tuple[np.ndarray, np.ndarray]], task: str, *, seed: int = 1) -> pa.Table:
    """Labels that v0's embeddings decide (plus noise), split 60/20/20."""
    rng = np.random.default_rng(seed)
    if task == "binary-item-rating-avg":
        ids, z = z0["items"]
        y = z[:, 0] + z[:, 1] + 0.3 * rng.standard_normal(len(ids)) > 0
        cols = {"id": ids}
    else:  # binary-edge-rating: 1,500 (user, item) pairs
        (uid, zu), (iid, zi) = z0["users"], z0["items"]
        u, i = rng.integers(0, len(uid), 1_500), rng.integers(0, len(iid), 1_500)
        y = zu[u, 0] + zi[i, 1] + 0.3 * rng.standard_normal(1_500) > 0
        cols = {"user_id": uid[u], "item_id": iid[i]}
    return pa.table({**cols, "label": y.astype(np.int8), "split": rng.choice(["train", "val", "test"], len(y), p=[0.6, 0.2, 0.2])})


@pytest.mark.slow
@pytest.mark.cluster
def test_the_register_consumers_and_gate_commands_as_written(clone, tmp_path):
    """The Use-it lines (register with a given B, register fitting B in place, a consumer, the gate
    with --json) and the gate section's (a consumer with a recipe, list, the gate synopsis without
    its optional flags, the gate of a published version, remove), each on a fresh ./root; the
    candidate is exact, so every gate accepts it (exit 0) and every register publishes."""
    from raybc.gate import ConsumerStore
    from raybc.registry import Registry
    from raybc.storage import Storage

    data = tmp_path / "data"
    subs = {"/data/": f"{data}/"}
    root_dir = clone / "root"
    root = Storage(str(root_dir))

    # Use it: a consumer of items, the gate of the candidate, then register (which runs the gate again)
    z0 = _world(root_dir, data)
    pq.write_table(_labels(z0, "binary-item-rating-avg"), clone / "labels.parquet")
    ok(sh(readme(CONSUMER_ITEMS), clone))
    assert ConsumerStore(root).names() == ["ratings"]
    report = json.loads(ok(sh(readme(GATE_ITEMS), clone, subs=subs)))
    assert report["ok"] is True and report["version"] == 5 and [c["name"] for c in report["consumers"]] == ["ratings"], report
    assert abs(report["consumers"][0]["degradation"]) < 1e-3, report  # the exact candidate scores as v0 itself
    out = ok(sh(readme(REGISTER_GIVEN), clone, subs=subs))
    assert "accepted" in out, out[-3000:]
    v5 = Registry(root).get(5)
    assert list(v5.embeddings) == ["items"] and v5.manifest["aligner_check"]["relative_error"]["items"]["v4"] < 1e-3, v5.manifest["aligner_check"]

    z0 = _world(root_dir, data)
    ok(sh(readme(REGISTER_FIT), clone, subs=subs))
    v5 = Registry(root).get(5)
    assert v5.embeddings["items"].location.rstrip("/") == str(data / "z5" / "items") and v5.manifest["aligner_fit"]["kind"] == "linear"
    assert not (root_dir / "embeddings" / "v5").exists(), "in place: nothing copied"

    # the gate section
    z0 = _world(root_dir, data)
    pq.write_table(_labels(z0, "binary-edge-rating"), clone / "labels.parquet")
    (clone / "consumer.yaml").write_text(RECIPE)
    ok(sh(readme(CONSUMER_EDGES), clone))
    assert "ratings-team" in ok(sh(readme(CONSUMERS_LIST), clone))
    synopsis = readme(GATE_SYNOPSIS)
    concrete = re.sub(r"\s*\[[^]]*\]", "", synopsis)  # the optional flags left out
    assert concrete == "raybc gate --root ./root --version 5 --embeddings users=/data/z5/users/ --embeddings items=/data/z5/items/ --aligner /data/b5.npy"
    assert "accepted" in ok(sh(concrete, clone, subs=subs))
    assert "accepted" in ok(sh(readme(GATE_PUBLISHED), clone))
    ok(sh(readme(CONSUMERS_REMOVE), clone))
    assert ConsumerStore(root).names() == []
