"""cluster.yaml validates offline against Ray's own cluster-config schema, and says what the
operations guide promises: CPU workers for Ray Data, GPU workers for Ray Train, autoscaling bounds,
the project installed from the synced clone with the tested pins, token auth on the job server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMMAND_LISTS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(raw)
    validate_config(cfg)  # raises on anything Ray's schema refuses
    return cfg


def test_validates_against_rays_schema_and_sets_every_command_list(raw, prepared):
    assert raw["provider"]["type"] == "aws"
    missing = [k for k in COMMAND_LISTS if k not in raw]
    assert not missing, f"set {missing} explicitly, or prepare_config merges in defaults (a Ray nightly install)"
    every = [c for k in COMMAND_LISTS for c in prepared[k]]
    assert not any("nightly" in c or "ray-wheels" in c for c in every)


def test_node_types_cpu_for_data_gpu_for_train_with_autoscaling_bounds(raw, prepared):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head drives jobs and runs no tasks"
    cpu = [n for n, t in types.items() if n != raw["head_node_type"] and not t["resources"].get("GPU")]
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu
    for name, t in types.items():
        assert all(isinstance(v, int) for v in t["resources"].values()), f"{name}: resources must be integers"
        assert "InstanceType" in t["node_config"] and "IamInstanceProfile" in t["node_config"]
        if name != raw["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]
    assert sum(types[n]["max_workers"] for n in cpu + gpu) <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0


def test_setup_installs_the_project_with_the_tested_pins_and_token_auth(raw, prepared):
    assert raw["file_mounts"]["~/raybc"] == ".", "the clone is synced to every node"
    for k in ("head_setup_commands", "worker_setup_commands"):  # what prepare_config runs per node kind
        setup = "\n".join(prepared[k])
        for needed in ("-c ~/raybc/constraints.txt", "-e ~/raybc", "> ~/.ray/auth_token"):
            assert needed in setup, f"{k}: {needed!r} must run on the head and on every worker"
    for k in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[k] if " start " in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), f"{k}: start Ray with token auth"
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"]), "job server not public"
    text = (REPO / "cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text, "S3 goes through the instance role"
