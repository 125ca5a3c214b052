"""Security: weights load only through safetensors with checksum verification, never pickle; and
secrets (S3 keys, the Ray token) never appear in logs, outputs, manifests or errors.

The job server's token auth is exercised end to end by ``test_jobs.py`` (``ray job submit`` with
``RAY_AUTH_MODE=token``); ``docs/reliability.md`` shows the commands.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from raybc import cli
from raybc.data.synthetic import build_registry
from raybc.embeddings import make_table
from raybc.errors import InputDataError, IntegrityError, RaybcError
from raybc.registry import ALIGNER_FILE, ModelWeights, Registry
from raybc.storage import Storage, StorageOptions
from raybc.transforms import Linear, from_bytes, to_bytes

PACKAGE = Path(__file__).resolve().parents[1] / "raybc"


# --------------------------------------------------------------------------- never unpickle


class Unpickled(Exception):
    pass


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way to unpickle raises: a load path that reaches one fails the test."""
    import torch

    def refuse(*args, **kwargs):
        raise Unpickled("a load path tried to unpickle")

    class RefusingUnpickler:
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    import numpy.lib.format as npformat

    monkeypatch.setattr(npformat, "pickle", None, raising=False)  # np.load's object-array path needs it


def test_every_load_path_works_without_pickle(tmp_path, no_unpickling):
    import torch
    from torch import nn

    from raybc.train.loop import Joint, load_checkpoint, save_checkpoint

    root = Storage(str(tmp_path / "root"))
    reg = build_registry(root, dims=[4, 6], rows=20, entities=["items"])
    fresh = Registry(root)
    assert fresh.aligner(1).in_dim == 6  # registry: sha256-verified safetensors
    model = ModelWeights({"w": np.ones((2, 2), np.float32)}, {"arch": "x"})
    fresh.publish(2, dim=6, method="m", aligner=_eye(6, 6), embeddings={}, model=model)
    assert Registry(root).model(2).spec == {"arch": "x"}
    assert from_bytes(to_bytes(reg.aligner(1))).out_dim == 4
    # register: .npy (allow_pickle=False) and .safetensors
    z = tmp_path / "z.parquet"
    import pyarrow.parquet as pq

    pq.write_table(make_table(np.arange(3), np.ones((3, 8), np.float32)), z)
    np.save(tmp_path / "b.npy", np.ones((6, 8), np.float32))
    # register reads B through these (the rows it validates in Ray tasks are Parquet, never pickles)
    assert Registry._read_matrix(str(tmp_path / "b.npy"), None, in_dim=8, out_dim=6).in_dim == 8
    (tmp_path / "b.safetensors").write_bytes(to_bytes(Linear(np.ones((8, 10), np.float32))))  # v4 (10-d) -> v3 (8-d)
    assert Registry._read_matrix(str(tmp_path / "b.safetensors"), None, in_dim=10, out_dim=8).in_dim == 10
    # Ray Train checkpoints: safetensors + JSON
    joint = Joint(nn.Linear(3, 2), None)
    opt = torch.optim.Adam(joint.parameters(), lr=0.1)
    joint.model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(str(tmp_path), joint=joint, best=None, optim=opt, meta={"epoch": 1})
    current, _, osd, meta = load_checkpoint(str(tmp_path))
    assert meta["epoch"] == 1 and set(current) == {"model.weight", "model.bias"}


def _eye(in_dim: int, out_dim: int):
    return Linear(np.eye(out_dim, in_dim, dtype=np.float32))


def _table(tmp_path: Path, dim: int) -> Path:
    import pyarrow.parquet as pq

    p = tmp_path / f"z{dim}.parquet"
    pq.write_table(make_table(np.arange(3), np.ones((3, dim), np.float32)), p)
    return p


def test_no_module_of_the_package_can_unpickle():
    """A source scan: no pickle, torch.load, np.load with pickles, unsafe YAML or their cousins."""
    banned = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib|shelve|marshal)\b"
        r"|\bpickle\.(loads?|Unpickler)\b|\btorch\.load\(|allow_pickle\s*=\s*True|\byaml\.(load|unsafe_load|full_load)\("
        r"|\bUnpickler\b|\bnp\.load\((?!.*allow_pickle\s*=\s*False)",  # np.load must say allow_pickle=False
        re.M,
    )
    found = [
        f"{p.relative_to(PACKAGE.parent)}:{src[: m.start()].count(chr(10)) + 1}: {m.group(0).strip()}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for src in [p.read_text()]
        for m in banned.finditer(src)
    ]
    assert found == [], found


class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_disguised_as_weights_are_refused_unopened(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Boom(str(marker)))
    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[4, 6], rows=10, entities=["items"])
    # a pickle in place of the aligner, the manifest "fixed" to match its checksum and size
    root.write_atomic(f"registry/v1/{ALIGNER_FILE}", payload)
    m = root.read_json("registry/v1/manifest.json")
    m["aligner"].update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    root.write_json_atomic("registry/v1/manifest.json", m)
    with pytest.raises(IntegrityError, match="is not a readable safetensors file"):
        Registry(root).aligner(1)
    # torch.save output (a zip of pickles) handed to register as B_k, and an object-array .npy
    import torch

    torch.save({"w": torch.ones(6, 6), "boom": _Boom(str(marker))}, tmp_path / "b.safetensors")
    buf = io.BytesIO()
    np.save(buf, np.array([_Boom(str(marker))], dtype=object), allow_pickle=True)
    (tmp_path / "b.npy").write_bytes(buf.getvalue())
    z = _table(tmp_path, 6)
    with pytest.raises(IntegrityError, match="b.safetensors is not a readable safetensors file"):
        Registry(root).register(2, embeddings={"items": str(z)}, aligner=str(tmp_path / "b.safetensors"))
    with pytest.raises(InputDataError, match=r"b.npy: not a plain .npy matrix \(Object arrays cannot be loaded when allow_pickle=False\)"):
        Registry(root).register(2, embeddings={"items": str(z)}, aligner=str(tmp_path / "b.npy"))
    assert not marker.exists(), "something unpickled a payload"
    assert Registry(root).versions() == [0, 1]


# --------------------------------------------------------------------------- secrets never leak


SECRET = "PLANTED-s3cr3t-7f3a9c1e-DO-NOT-LEAK"
RAY_TOKEN = "PLANTED-raytoken-b41d07aa-DO-NOT-LEAK"
KEY_ID = "AKIAPLANTEDKEY0042"


@pytest.mark.s3
@pytest.mark.cluster
def test_planted_secrets_appear_in_no_output_manifest_or_error(
    s3_server, s3_bucket, tmp_path, monkeypatch, capfd, caplog, ray_session
):
    import ray

    from raybc.backfill import BackfillOptions, backfill

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
    caplog.set_level(logging.DEBUG)  # every logger, botocore's request logs included
    uri = f"s3://{s3_bucket}/root"
    opts = StorageOptions(endpoint_url=s3_server, access_key_id=KEY_ID, secret_access_key=SECRET, session_token=RAY_TOKEN + "-session")
    root = Storage(uri, opts)
    texts: list[str] = [repr(root), repr(opts), str(opts), repr(opts.model_dump()), opts.model_dump_json()]

    # the happy paths: publish, backfill on S3 (Ray workers), register, the CLI listing
    reg = build_registry(root, dims=[4, 6, 8], rows=2_000, entities=["items"], rows_per_file=1_000)
    summary = backfill(root, BackfillOptions(progress=True), echo=lambda s: texts.append(s))
    texts += [summary.table(), repr(summary.to_json())]
    src = tmp_path / "z"
    src.mkdir()
    import pyarrow.parquet as pq

    from raybc.embeddings import read_matrix
    from raybc.gate import read_version_embeddings

    z = np.random.default_rng(0).standard_normal((10, 10)).astype(np.float32)
    pq.write_table(make_table(np.arange(10), z), src / "z.parquet")
    ids2, z2 = read_matrix(read_version_embeddings(reg, 2, "items"))
    b = np.linalg.lstsq(z, z2[np.searchsorted(ids2, np.arange(10))], rcond=None)[0]  # B_3 consistent with z_2 on ids 0..9
    np.save(tmp_path / "b.npy", b.astype(np.float32))
    texts.append(repr(reg.register(3, embeddings={"items": str(src)}, aligner=str(tmp_path / "b.npy"))))
    assert cli.main(["versions", "--root", uri, "--endpoint-url", s3_server, "--json"]) == cli.EXIT_OK
    assert cli.main(["snapshots", "--root", uri, "--endpoint-url", s3_server]) == cli.EXIT_OK

    # the error paths: bad config holding the secret, a missing bucket, bad input, a wrong endpoint
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"root: {uri}\nstorage:\n  endpoint_url: {s3_server}\n  secret_access_key: [{SECRET}]\n  access_key_id: 7\n"
        f"  session_token: {{x: {RAY_TOKEN}}}\n  retries: 99\nbackfill:\n  rows_per_part: 0\n"
    )
    assert cli.main(["backfill", "--config", str(cfg)]) == cli.EXIT_CONFIG
    cfg.write_text(f"root: s3://raybc-no-such-bucket/x\nstorage:\n  endpoint_url: {s3_server}\n  secret_access_key: {SECRET}\n")
    assert cli.main(["backfill", "--config", str(cfg), "--no-progress"]) == cli.EXIT_FAILED
    cfg.write_text(
        f"root: {uri}\nstorage:\n  endpoint_url: http://127.0.0.1:9\n  secret_access_key: {SECRET}\n"
        "  retries: 1\n  operation_attempts: 2\n  backoff_s: 0.01\n"
    )
    assert cli.main(["backfill", "--config", str(cfg), "--no-progress"]) == cli.EXIT_FAILED  # nothing listens there
    assert cli.main(["register", "--root", uri, "--endpoint-url", s3_server, "--version", "4", "--embeddings",
                     f"items={tmp_path / 'missing.parquet'}", "--aligner", str(tmp_path / "b.npy")]) != cli.EXIT_OK  # fmt: skip
    unreachable = opts.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "retries": 1, "operation_attempts": 1})
    for bad in (
        lambda: Registry(Storage("s3://raybc-no-such-bucket/x", opts)).get(0),
        lambda: Storage(uri, unreachable).read_bytes("x"),
        lambda: StorageOptions(endpoint_url="nope", secret_access_key=SECRET),
    ):
        with pytest.raises(Exception) as err:
            bad()
        texts += [str(err.value), repr(err.value), "".join(__import__("traceback").format_exception(err.value))]
        if isinstance(err.value, RaybcError):
            assert SECRET not in str(err.value)

    out, errs = capfd.readouterr()
    texts += [out, errs, caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    # the output really was captured: each error path printed its message
    assert "storage.retries" in errs and "storage.secret_access_key" in errs and "'**********'" in errs
    assert "bucket 'raybc-no-such-bucket'" in errs and "127.0.0.1:9" in errs and "missing.parquet" in errs
    # everything written below the root: manifests, CURRENT files, embeddings and snapshots
    for rel in root.walk_files():
        texts.append(root.read_bytes(rel).decode("latin-1"))
    # and the Ray session's logs (driver, raylet, workers that ran the backfill)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for p in logs.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            texts.append(p.read_bytes().decode("latin-1"))
    blob = "\n".join(texts)
    for planted in (SECRET, RAY_TOKEN, RAY_TOKEN + "-session"):
        assert planted not in blob, f"a planted secret leaked: ...{blob[max(0, blob.find(planted) - 200): blob.find(planted) + 50]}..."
    assert len(root.walk_files()) > 10 and "s3://" in blob
