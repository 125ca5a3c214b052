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


# --------------------------------------------------------------------------- a backfilled root, shared


ROWS, GROUP, PART = 3_000, 1_000, 1_500  # a part asks for 1,500 rows; row groups hold 1,000


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory, ray_session):
    """v0..v2 (dims 4, 6, 8), one entity, backfilled by the CLI with --summary-json - from a folder
    where a file named '-' would show."""
    import contextlib
    import io
    import os

    from raybc.data.synthetic import build_registry

    base = tmp_path_factory.mktemp("cli")
    root = Storage(str(base / "root"))
    build_registry(root, dims=[4, 6, 8], rows=ROWS, entities=["users"], rows_per_file=ROWS, row_group_rows=GROUP, seed=3)
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(base)
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(["backfill", "--root", root.uri(), "--rows-per-part", str(PART), "--no-progress", "--summary-json", "-"])
    finally:
        os.chdir(cwd)
    assert code == cli.EXIT_OK
    return root, base, out.getvalue()


def test_summary_json_dash_goes_to_stdout_not_to_a_file_named_dash(backfilled):
    import json

    root, base, out = backfilled
    assert not (base / "-").exists()
    summary = json.loads(out[out.index("\n{") + 1 :])  # after the table
    assert sorted(summary["committed"]) == ["as-v0/users", "as-v1/users"]


def test_rows_per_part_does_what_its_help_says(backfilled, capsys):
    """--help promises whole row groups per part: 1,500 asked, 1,000-row groups -> 1,000-row files."""
    import pyarrow.parquet as pq

    from raybc.snapshots import Snapshots

    root, _, _ = backfilled
    assert "row-group boundaries" in cli.backfill_parser().format_help()
    snap = Snapshots(root).get(0, "users")
    rows = [pq.ParquetFile(root.path(f)).metadata.num_rows for f in snap.files]
    assert rows == [GROUP] * (ROWS // GROUP)


def test_discard_json_prints_json(backfilled, capsys):
    import json

    root, _, _ = backfilled
    code, out, _ = _run(["discard", "--root", root.uri(), "--version", "7", "--json"], capsys)
    assert code == cli.EXIT_OK and json.loads(out) == {"version": 7, "removed": []}


@pytest.mark.parametrize("command", ["snapshots", "versions"])
def test_a_closed_stdout_pipe_ends_quietly(backfilled, command):
    """`raybc snapshots ... | head -1`: the reader is gone before raybc writes; no traceback."""
    import subprocess
    import sys

    root, _, _ = backfilled
    p = subprocess.Popen([sys.executable, "-m", "raybc.cli", command, "--root", root.uri()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    p.stdout.close()  # no reader: the first write gets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == cli.EXIT_PIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_deleted_part_is_named_by_the_reader_and_rebuilt_by_reconcile(backfilled, capsys):
    import json
    import os

    from raybc.errors import SnapshotError
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots, read_snapshot, verify_snapshot

    root, _, _ = backfilled
    snaps = Snapshots(root)
    victim = snaps.get(0, "users").files[1]
    os.remove(root.path(victim))
    with pytest.raises(SnapshotError, match=rf"{root.uri(victim)} is missing.*raybc reconcile --root {root.uri()}"):
        read_snapshot(root.uri(), "users", 0)
    code, out, _ = _run(["reconcile", "--root", root.uri(), "--dry-run"], capsys)
    assert code == cli.EXIT_OK and "as-v0/users" in out and "committed files missing" in out
    code, out, _ = _run(["reconcile", "--root", root.uri(), "--rows-per-part", str(PART), "--summary-json", "-"], capsys)
    assert code == cli.EXIT_OK, out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("raybc reconcile: done") and "built=1" in lines[-1]
    result = json.loads(out[out.index("\n{") + 1 : out.rindex("\n" + lines[-1])])
    assert result["built"] == ["as-v0/users"]
    assert [b["parts_run"] for b in result["backfills"]] == [1]  # the same run: only the lost part ran again
    assert root.exists(victim) and read_snapshot(root.uri(), "users", 0).num_rows == ROWS
    assert verify_snapshot(Registry(root), 0, "users").ok


def test_read_snapshot_hints_fit_the_case(tmp_path):
    from raybc.data.synthetic import build_registry
    from raybc.errors import SnapshotError
    from raybc.snapshots import read_snapshot

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[4, 6, 8], rows=50, entities=["users"], rows_per_file=50)
    cases = {
        (str(tmp_path / "nope"), "users", 0): "holds no registry at all; check the root for a typo",
        (root.uri(), "users", 9): r"v9 is not a published version of .* \(published: v0, v1, v2\)",
        (root.uri(), "items", 0): r"newest version v2 has no entity 'items' \(it has: users\)",
        (root.uri(), "users", 2): r"v2 is the newest version, whose embeddings are stored as they are.*embeddings/v2/users",
        (root.uri(), "users", 0): rf"not built yet; run `raybc reconcile --root {root.uri()}`",
    }
    seen = set()
    for (uri, entity, version), match in cases.items():
        with pytest.raises(SnapshotError, match=match) as info:
            read_snapshot(uri, entity, version)
        if version == 2:
            assert "--to-versions" not in str(info.value)
        seen.add(str(info.value).split(": ", 1)[1])
    assert len(seen) == len(cases)  # a different hint for every case
    assert not (tmp_path / "nope").exists()


# `raybc reconcile` as its console entry point runs it (raybc.cli.main), with one change inside the
# Ray workers: each write task, once its parts are written and renamed in place, drops a marker and
# holds until the process ends. The backfill can then never finish before the test's Ctrl-C lands:
# without the hold, a loaded machine could let it write every part and commit between the test's
# seeing the first part and its SIGINT, and the signal met a finished run (failed 1 in 8 runs).
HELD_RECONCILE = """
import faulthandler, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
# a terminal's Ctrl-C: a shell's background job (CI started with `&`) passes SIGINT on ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
import raybc.backfill as bf
from raybc.cli import main

held = sys.argv[1]

class HeldSink(bf.BackfillSink):
    def write(self, blocks, ctx):
        out = super().write(blocks, ctx)
        open(os.path.join(held, f"held-{os.getpid()}-{time.time_ns()}"), "w").close()
        time.sleep(600)
        return out

bf.BackfillSink = HeldSink  # defined in __main__: Ray ships it to the workers by value
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_ctrl_c_ends_reconcile_with_its_summary_and_the_rerun_commits_no_temporaries(tmp_path, ray_session, capsys):
    """SIGINT while parts are being written (some committed to their files, the others' tasks
    still running, none of the run committed): exit 130 and the summary as the last line; a killed
    worker's temporary in the run folder (planted, so the check never depends on timing) is never
    part of the committed run the rerun makes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from raybc.data.synthetic import build_registry
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots, run_dir, verify_snapshot

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[8, 12, 16], rows=200_000, entities=["users"], rows_per_file=200_000, row_group_rows=5_000, seed=5)
    args = ["reconcile", "--root", root.uri(), "--rows-per-part", "5000"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    held = tmp_path / "held"
    held.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HELD_RECONCILE, str(held), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 180  # a hang guard only: nothing is asserted on time
    while not any(held.iterdir()):  # a write task wrote its parts; none can return
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"reconcile ended or hung before a write task finished its parts (exit {p.returncode}):\n{out}\n{err[-4000:]}")
        time.sleep(0.05)
    written = [f for f in root.walk_files("snapshots") if f.endswith(".parquet")]
    assert written and not [f for f in root.walk_files("snapshots") if f.endswith(("CURRENT", "manifest.json"))], written
    os.kill(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it hangs: faulthandler dumps every thread on SIGUSR1
        os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2)
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"reconcile did not end within 120 s of SIGINT:\n{out}\n{err[-8000:]}")
    assert p.returncode == cli.EXIT_INTERRUPTED, (out, err)
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"raybc reconcile: interrupted root={root.uri()}") and "a rerun resumes" in last, out
    assert "Traceback" not in err, err
    assert not [f for f in root.walk_files("snapshots") if f.endswith(("CURRENT", "manifest.json"))], "an interrupted run committed"
    runs = sorted({f.rsplit("/", 1)[0] for f in root.walk_files("snapshots") if "/from-v2/" in f})
    assert runs, "the interrupted run wrote nothing"
    run_id = runs[0].rsplit("/", 1)[1]
    for t in (0, 1):  # what a worker killed inside open_output leaves behind
        stale = os.path.join(root.path(run_dir(t, "users", 2, run_id)), ".part-00000-00000.parquet.tmp-0123456789ab")
        os.makedirs(os.path.dirname(stale), exist_ok=True)
        open(stale, "wb").write(b"PAR1 half a part")

    code = cli.main(args)
    rerun_out, rerun_err = capsys.readouterr()
    assert code == cli.EXIT_OK, (rerun_out, rerun_err)
    assert rerun_out.strip().splitlines()[-1].startswith("raybc reconcile: done"), rerun_out
    import re

    resumed = re.search(r"parts run / resumed\s+(\d+) / (\d+)", rerun_out)
    assert resumed and int(resumed[2]) >= 1, rerun_out  # the parts the held tasks wrote were not written again
    snaps = Snapshots(root)
    for t in (0, 1):
        snap = snaps.get(t, "users")
        assert snap.run_id == run_id  # the rerun resumed the interrupted run
        folder = os.path.dirname(root.path(snap.files[0]))
        assert not [n for n in os.listdir(folder) if ".tmp-" in n], os.listdir(folder)
        assert verify_snapshot(Registry(root), t, "users").ok


@pytest.mark.slow
def test_demo_verification_streams_checks_every_id_and_compares_a_bounded_sample(tmp_path, ray_session):
    """raybc demo verifies with verify_snapshot(sample_rows=...): every id checked, vectors of a
    bounded set of whole row groups. Its numpy memory grows by the ids only (8 bytes a row, a few
    copies), not by the vectors: the old verification held both tables and a float64 copy, more
    than 1,500 bytes a row at 64 dims, and was OOM-killed at 10M rows."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybc.backfill import BackfillOptions, backfill
    from raybc.data.synthetic import build_registry
    from raybc.embeddings import write_table
    from raybc.snapshots import Snapshots, verify_snapshot

    dim, sample, group = 64, 20_000, 5_000
    peaks, regs = {}, {}
    for rows in (50_000, 200_000):
        root = Storage(str(tmp_path / f"root{rows}"))
        regs[rows] = reg = build_registry(root, dims=[dim, dim], rows=rows, entities=["users"], rows_per_file=50_000, row_group_rows=group, seed=2)
        backfill(root, BackfillOptions(progress=False), echo=lambda _: None)
        tracemalloc.start()
        v = verify_snapshot(reg, 0, "users", sample_rows=sample)
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert v.ok and v.rows == v.input_rows == rows and v.ids_match
        assert sample // 2 <= v.compared_rows <= sample + group, v.compared_rows
    per_row = (peaks[200_000] - peaks[50_000]) / 150_000
    assert per_row < 64, f"verification memory grows by {per_row:.0f} bytes a row (peaks {peaks})"
    reg = regs[200_000]
    root = reg.root
    assert verify_snapshot(reg, 0, "users").compared_rows == 200_000  # below the default sample: every row

    # a wrong vector in the first row group (always compared) and a duplicated id anywhere are caught
    files = Snapshots(root).get(0, "users").files
    first, last = root.path(files[0]), root.path(files[-1])
    good = pq.read_table(first)
    vals = good.column("embedding").combine_chunks().flatten().to_numpy().copy()
    vals[:dim] *= 2
    with open(first, "wb") as f:
        write_table(f, good.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vals), dim)))
    assert not verify_snapshot(reg, 0, "users", sample_rows=sample).ok
    with open(first, "wb") as f:
        write_table(f, good)
    t = pq.read_table(last)
    ids = t.column("id").to_numpy().copy()
    ids[-1] = ids[0]  # one id twice, one missing, in a file whose vectors are mostly not compared
    with open(last, "wb") as f:
        write_table(f, t.set_column(0, "id", pa.array(ids)))
    v = verify_snapshot(reg, 0, "users", sample_rows=sample)
    assert not v.ids_match and not v.ok


def test_quiet_and_log_level(tmp_path):
    """`raybc --quiet backfill`: the summary only, no per-part lines, no Ray INFO lines; a bad
    --log-level is a usage error. Subprocesses: each starts its own local Ray, as a user's would."""
    import os
    import subprocess
    import sys

    from raybc.data.synthetic import build_registry

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYBC_QUIET", "RAYBC_LOG_LEVEL")}

    def raybc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raybc.cli", *args], env=env, capture_output=True, text=True, timeout=300)

    roots = [Storage(str(tmp_path / n)) for n in ("loud", "quiet")]
    for r in roots:
        build_registry(r, dims=[4, 6], rows=3000, entities=["users"], rows_per_file=1000, seed=2)
    loud = raybc("backfill", "--root", roots[0].uri(), "--rows-per-part", "1000")
    quiet = raybc("--quiet", "backfill", "--root", roots[1].uri(), "--rows-per-part", "1000")
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr[-2000:]
    assert "\tINFO " in loud.stderr and "users part" in loud.stdout + loud.stderr  # what --quiet removes
    assert "\tINFO " not in quiet.stderr, quiet.stderr[-2000:]
    assert "users part" not in quiet.stdout + quiet.stderr and "committed: as-v0/users" in quiet.stdout
    bad = raybc("--log-level", "chatty", "versions", "--root", roots[0].uri())
    assert bad.returncode == cli.EXIT_CONFIG and "--log-level: expected one of debug, info, warning, error" in bad.stderr
    assert raybc("--log-level=warning", "versions", "--root", roots[0].uri()).returncode == 0


def test_top_level_usage_version_and_unknown_command(capsys):
    from raybc import __version__

    code, out, _ = _run([], capsys)
    assert code == cli.EXIT_CONFIG and "usage: raybc" in out and "backfill" in out and "--quiet" in out
    code, out, _ = _run(["--help"], capsys)
    assert code == cli.EXIT_OK and "commands:" in out
    code, out, _ = _run(["--version"], capsys)
    assert code == cli.EXIT_OK and out.strip() == f"raybc {__version__}"
    code, _, err = _run(["bakfill", "--root", "x"], capsys)
    assert code == cli.EXIT_CONFIG and "unknown command 'bakfill'" in err and "raybc --help" in err


def test_versions_and_snapshots_json_describe_the_root(backfilled, capsys):
    import json

    root, _, _ = backfilled
    code, out, _ = _run(["versions", "--root", root.uri(), "--json"], capsys)
    versions = json.loads(out)
    assert code == cli.EXIT_OK and [v["version"] for v in versions] == [0, 1, 2]
    assert [v["dim"] for v in versions] == [4, 6, 8] and versions[2]["entities"] == {"users": ROWS} and versions[0]["parent"] is None
    code, out, _ = _run(["versions", "--root", root.uri()], capsys)
    assert code == cli.EXIT_OK and out.splitlines()[2].startswith("v2  dim     8")
    code, out, _ = _run(["snapshots", "--root", root.uri(), "--json"], capsys)
    status = json.loads(out)
    assert [(s["as_version"], s["source_version"], s["rows"]) for s in status["snapshots"]] == [(0, 2, ROWS), (1, 2, ROWS)]
    assert status["missing"] == [] and not any(s["stale"] for s in status["snapshots"])


def test_discard_removes_an_interrupted_publish_and_refuses_a_published_version(backfilled, capsys):
    import json

    root, _, _ = backfilled
    root.write_atomic("registry/v3/aligner.safetensors", b"half-written")  # an interrupted publish of v3
    code, out, _ = _run(["discard", "--root", root.uri(), "--version", "3", "--json"], capsys)
    assert code == cli.EXIT_OK and json.loads(out)["removed"] == [root.uri("registry/v3/aligner.safetensors")]
    assert not root.exists("registry/v3/aligner.safetensors")
    code, _, err = _run(["discard", "--root", root.uri(), "--version", "2"], capsys)
    assert code == cli.EXIT_FAILED and "v2 is published; published versions are immutable" in err
    assert root.exists("registry/v2/manifest.json")


def test_register_refuses_a_malformed_embeddings_flag(tmp_path, capsys):
    code, _, err = _run(["register", "--root", str(tmp_path / "r"), "--version", "0", "--embeddings", "users:/data/z0"], capsys)
    assert code == cli.EXIT_CONFIG and "expected ENTITY=URI" in err and "'users:/data/z0'" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.cluster
def test_backfill_summary_json_file_compression_and_output_dtype_give_readable_correct_snapshots(tmp_path, ray_session):
    """--summary-json FILE holds what the run did; --compression zstd / lz4 and --output-dtype
    float16 reach the files (codec, value type), the manifest, and a plain Parquet reader; each
    snapshot verifies against the float64 transform."""
    import json

    import pyarrow.parquet as pq

    from raybc.data.synthetic import build_registry
    from raybc.registry import Registry
    from raybc.snapshots import Snapshots, read_snapshot, verify_snapshot

    root = Storage(str(tmp_path / "root"))
    build_registry(root, dims=[4, 6, 8], rows=ROWS, entities=["users"], rows_per_file=ROWS, row_group_rows=GROUP, seed=3)
    runs = set()
    for compression, dtype, codec, value in [("zstd", "float32", "ZSTD", "float"), ("lz4", "float16", "LZ4", "halffloat")]:
        out = tmp_path / f"{compression}.json"
        code = cli.main(["--quiet", "backfill", "--root", root.uri(), "--rows-per-part", str(GROUP), "--compression", compression,
                         "--output-dtype", dtype, "--summary-json", str(out)])  # fmt: skip
        assert code == cli.EXIT_OK
        s = json.loads(out.read_text())
        assert (s["source_version"], s["targets"], s["entities"], sorted(s["committed"])) == (2, [0, 1], ["users"], ["as-v0/users", "as-v1/users"])
        assert (s["input_rows"], s["rows_written"], s["parts_run"], s["parts_resumed"]) == (ROWS, 2 * ROWS, ROWS // GROUP, 0)
        assert s["nothing_to_do"] is False and s["seconds"] > 0 and s["rows_per_s"] == pytest.approx(ROWS / s["seconds"])
        snaps = Snapshots(root)
        assert s["run_ids"]["users"] == snaps.pointer(0, "users").run_id not in runs
        runs.add(s["run_ids"]["users"])
        for j, dim in [(0, 4), (1, 6)]:
            snap = snaps.get(j, "users")
            assert (snap.manifest["compression"], snap.manifest["dtype"]) == (compression, dtype)
            for rel in snap.files:  # any Parquet reader, no raybc
                md = pq.read_metadata(root.path(rel))
                assert {md.row_group(g).column(c).compression for g in range(md.num_row_groups) for c in range(2)} <= {codec, codec + "_RAW"}
                plain = pq.read_table(root.path(rel))
                assert plain.schema.field("embedding").type.list_size == dim and str(plain.schema.field("embedding").type.value_type) == value
            assert read_snapshot(root.uri(), "users", j).num_rows == ROWS
            v = verify_snapshot(Registry(root), j, "users")
            assert v.ids_match and v.rows == ROWS and v.max_rel_error < (1e-5 if dtype == "float32" else 1e-3), v
