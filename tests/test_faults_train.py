"""Training faults: a Ray Train worker dies mid-fit; the fit resumes from its last checkpoint (not
from scratch) and publishes the version exactly once.

The fault is the loop's own test hook (``TrainOptions.fail_at_epoch`` / ``fail_marker``): the last
rank ``os._exit(1)``s once, right after reporting that epoch; ``FailureConfig(max_failures)``
restarts the worker group, which resumes from ``ray.train.get_checkpoint()``. About 60 s: Ray
Train starts twice.
"""

from __future__ import annotations

import json

import pytest

from raybc.data.interactions import synthetic_interactions
from raybc.data.slicing import temporal_versions
from raybc.errors import RegistryError
from raybc.registry import Registry
from raybc.storage import Storage
from raybc.train.fit import TrainOptions, fit_version
from test_train import untrained_recall50

EPOCHS, FAIL_AT, CKPT_EVERY, EVAL_EVERY = 16, 9, 4, 2


@pytest.mark.cluster
@pytest.mark.slow
def test_worker_killed_mid_fit_resumes_from_the_last_checkpoint_and_publishes_once(tmp_path, ray_session):
    d = synthetic_interactions(n_users=200, n_items=120, n_edges=4000, n_attributes=16, seed=3)
    slices = temporal_versions(d)
    root = Storage(str(tmp_path / "root"))
    marker = tmp_path / "worker-died"
    opts = TrainOptions(
        method="no-bc", dims=[8, 10, 12], epochs=EPOCHS, eval_every=EVAL_EVERY, checkpoint_every=CKPT_EVERY,
        batch_size=512, num_workers=2, max_failures=2, fail_at_epoch=FAIL_AT, fail_marker=str(marker), seed=1,
    )  # fmt: skip
    v = fit_version(root, d, slices, version=0, options=opts, echo=lambda s: None)

    assert marker.exists(), "the last worker must really have died at the failure epoch"
    # every evaluation exactly once, through the failure point to the end: the history was resumed
    # from the checkpoint at epoch 7 and continued, not restarted and not repeated
    history = v.hyperparameters["history"]
    assert [h["epoch"] for h in history] == list(range(EVAL_EVERY - 1, EPOCHS, EVAL_EVERY))
    assert max(h["epoch"] for h in history) > FAIL_AT
    # resumed with the checkpoint's weights, not a fresh init: the first evaluation after the restart
    # (epoch 9, two epochs past the epoch-7 checkpoint) is no worse than the one at the checkpoint,
    # and the published model beats every untrained one on the same validation edges
    r = {h["epoch"]: h["recall@50"] for h in history}
    assert r[FAIL_AT] >= r[FAIL_AT - 2] - 0.02, r
    baseline = untrained_recall50(d, slices[0], dim=8)
    assert v.metrics["recall@50"] > baseline + 0.1, (v.metrics["recall@50"], baseline)
    # one checkpoint per checkpoint epoch: a restart from scratch would have written epochs 3 and 7 twice
    runs = [r for r in root.list("train-runs") if r.startswith("v0-")]
    assert len(runs) == 1
    ckpt_epochs = sorted(
        json.loads(root.read_bytes(f"train-runs/{runs[0]}/{c}/meta.json"))["epoch"]
        for c in root.list(f"train-runs/{runs[0]}")
        if c.startswith("checkpoint_") and not c.endswith(".json")  # checkpoint_<time>/ folders
    )
    assert ckpt_epochs == list(range(CKPT_EVERY - 1, EPOCHS, CKPT_EVERY))
    # published once: one version, readable, and a second publish of v0 is refused
    reg = Registry(root)
    assert reg.versions() == [0]
    assert reg.model(0).spec["dim"] == 8 and "fail_at_epoch" not in reg.get(0).hyperparameters
    with pytest.raises(RegistryError, match="cannot fit v0: the registry's next version is v1"):
        fit_version(root, d, slices, version=0, options=opts, echo=lambda s: None)
