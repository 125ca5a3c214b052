"""Test helpers around the size + stamp (ETag or mtime) every published embedding file carries.

Published embeddings are immutable: the backfill refuses a file whose size or stamp differs from
its version's manifest. Tests of row-level validation (NaN, duplicate ids, a wrong dimension, ...)
need a published file holding those rows; :func:`restamp` records a rewritten file's size and
stamp in its version's manifest, as if it had been published that way, so the backfill gets past
the stamp check to the rows. Only tests do this: a published manifest is never rewritten by raybc.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from raybc.registry import MANIFEST, Registry, listing, version_dir
from raybc.storage import Storage, file_stamp, json_bytes


def restamp(root: Storage, version: int, entity: str) -> None:
    """Record the current size and stamp of every file of ``entity`` in v<version>'s manifest
    (the row counts stay as published: a changed row count is still the backfill's to refuse)."""
    rel = f"registry/{version_dir(version)}/{MANIFEST}"
    manifest = json.loads(root.read_bytes(rel))
    infos = listing(Registry(root).embeddings_storage(version, entity))
    for f in manifest["embeddings"][entity]["files"]:
        info = infos[f["path"]]
        f["bytes"], f["stamp"] = int(info["size"]), file_stamp(info)
    root.remove(rel)
    root.create_exclusive(rel, json_bytes(manifest))


def wait_for_a_newer_mtime(path: str) -> None:
    """Return once a file written now in ``path``'s folder gets a newer mtime than ``path`` has.

    A local stamp is an mtime, which kernels without fine-grained timestamps (before Linux 6.13)
    take from a coarse clock (one tick is 1-10 ms): a same-size rewrite within the tick of the first
    write would keep its stamp. Rewrites that a test means to be seen wait here first (no user
    rewrites a file within milliseconds of publishing it). Waits on the filesystem's own clock, at
    most ~10 s; asserts nothing on time."""
    probe = os.path.join(os.path.dirname(path), f".clock-probe-{uuid.uuid4().hex[:8]}")
    try:
        for _ in range(2000):
            with open(probe, "wb"):
                pass
            if os.stat(probe).st_mtime_ns > os.stat(path).st_mtime_ns:
                return
            time.sleep(0.005)
        raise AssertionError(f"the filesystem clock did not move past the mtime of {path}")
    finally:
        if os.path.exists(probe):
            os.remove(probe)
