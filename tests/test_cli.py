"""The ``raybc`` command line as a user meets it: what a command does with a wrong ``--root``,
its machine-readable output, pipes, and the hints its errors give. Real files, the loopback S3
server, and the real console entry point (a subprocess) where the shell's behaviour is the claim.
"""

from __future__ import annotations

import pytest

from raybc import cli
from raybc.storage import Storage

# Every command that reads or maintains a registry, with the flags it needs besides --root.
# demo, train, register and experiment create one and are not in this list.
NEEDS_A_REGISTRY = [
    ["versions"],
    ["versions", "--json"],
    ["snapshots"],
    ["snapshots", "--json"],
    ["backfill"],
    ["reconcile"],
    ["reconcile", "--dry-run"],
    ["reconcile", "--retention"],
    ["retention"],
    ["retention", "--dry-run"],
    ["discard", "--version", "1"],
    ["gate", "--version", "1"],
    ["consumers", "list"],
    ["consumers", "remove", "--name", "team"],
    ["consumers", "register", "--name", "team", "--task", "user-activity", "--labels", "labels.parquet", "--version", "0"],
]


def _root_flags(root: Storage) -> list[str]:
    out = ["--root", root.uri()]
    if root.options.endpoint_url:
        out += ["--endpoint-url", root.options.endpoint_url]
    return out


@pytest.mark.parametrize("command", NEEDS_A_REGISTRY, ids=lambda c: " ".join(c[:2]))
def test_a_root_without_a_registry_is_a_usage_error_and_nothing_is_created_there(command, storage_root, capsys):
    typo = storage_root.child("nope")
    code = cli.main([*command, *_root_flags(typo)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert f"{typo.uri()} holds no registry" in err and "--root" in err and "raybc register" in err and "Traceback" not in err
    # nothing written below the typo'd root (no locks/, no snapshots/), nor beside it
    assert not typo.exists() and storage_root.walk_files() == []
