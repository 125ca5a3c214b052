"""Benchmark: register a version trained elsewhere with B fitted from stored pairs, then backfill.

    python jobs/bench_register.py --rows 1000000 --workdir /tmp/raybc-breg                 # N and 4N
    python jobs/bench_register.py --rows 20000000 --files 160 --scale --workdir /data/breg  # one large run
    python jobs/bench_register.py --rows 1000000 --as-jobs --workdir /tmp/raybc-breg       # as job processes

Writes two versions of a model trained elsewhere (``raybc.data.synthetic.planted_versions``):
z_0 = A z_1 + noise with ``--dim`` -> ``--out-dim`` dimensions, ids unsorted and the two versions
partitioned differently (``--files`` files for z_1, 3/4 of that for z_0). Then, per size, in one
process and one Ray session:

- ``register v0``: the old version, in place;
- ``register v1 --fit-aligner linear``: validation, the id join with v0, the sample, the fit and
  the held-out check, in place;
- ``backfill``: v1 -> v0 snapshots.

It prints wall time, input rows/s, the driver process's own CPU seconds (``getrusage``: what the
driver did itself, not its Ray workers) and the peak PSS of the whole job (driver + every Ray
process), and the ratio of the driver's CPU at 4N rows against N rows with the same number of
files (target <= 1.5x: the driver's work is O(files), not O(rows)). The driver's CPU is also split
into Ray's client threads (gRPC polling, I/O, timers: a few ms per second of wall time in any
process connected to Ray, rows or none) and the rest, the driver's own work. The planted map's recovery is
checked on a sample of the snapshot: mean |B z_1 - z_0|^2 against the noise floor (target <= 1.5x).
``--scale`` runs one size only.

``--as-jobs`` runs the three steps as users do, each a job process joining this Ray
(``python jobs/register.py ...``, ``python jobs/backfill.py ...`` with ``RAY_ADDRESS`` set, as
``ray job submit`` starts them), and reports each process's whole CPU time from ``os.wait4``:
interpreter start, imports, connecting to Ray, its work, its exit. That is how issue 11 measured
register (5.5 s -> 11.4 s of CPU for 1M -> 4M rows); Ray's client threads cannot be told apart
from outside the process, so that split is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from raybc.aligners import AlignerFitOptions
from raybc.backfill import BackfillOptions, backfill
from raybc.data.synthetic import hashed_normal, planted_versions
from raybc.embeddings import read_matrix
from raybc.intake import RegisterOptions
from raybc.registry import Registry
from raybc.snapshots import Snapshots
from raybc.storage import Storage

NOISE = 0.05
SEED = 0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# Python threads a Ray driver runs besides the caller's: log and error listeners, Ray's GC thread.
_RAY_PY_THREADS = ("ray_", "PythonGCThread")


def _ray_threads_cpu_s() -> float:
    """CPU seconds of this process's threads that Ray runs for its connection, from
    ``/proc/self/task/*/schedstat`` (nanoseconds): the threads its C++ core worker started and
    named (gRPC polling, I/O and timer threads: ``worker.io``, ``client.poll0``, ...) and its Python
    threads (``ray_print_logs``, ``ray_listen_error_messages``, its GC thread). The rest -- the main
    thread, raybc's thread pools -- is the driver's own work. Ray's threads live as long as the
    connection, so a difference of two readings is what they spent in between."""
    import threading

    own = open("/proc/self/comm").read().strip()
    ray_py = {t.native_id for t in threading.enumerate() if t.name.startswith(_RAY_PY_THREADS)}
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            if int(tid) not in ray_py:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip() == own:
                        continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that just ended
            continue
    return total / 1e9


def _measure(fn):
    """(result, wall seconds, driver CPU seconds, of them Ray's client threads, peak PSS of the
    job) of one call."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_backfill import RssSampler

    with RssSampler() as rss:
        c0, r0, t0 = _cpu_s(), _ray_threads_cpu_s(), time.perf_counter()
        out = fn()
        dt, dc, dr = time.perf_counter() - t0, _cpu_s() - c0, _ray_threads_cpu_s() - r0
    return out, dt, {"driver_cpu_s": dc, "ray_client_cpu_s": dr, "driver_own_cpu_s": dc - dr}, rss.peak


def _measure_job(script: str, args: list[str], log: str):
    """(None, wall seconds, CPU of the job process, peak PSS of the job) of one job process run
    as ``ray job submit`` runs its entry point: ``RAY_ADDRESS`` names this driver's Ray. Its CPU is
    ``os.wait4``'s rusage of that process: it starts no processes of its own when joining a cluster."""
    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_backfill import RssSampler

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAYBC_QUIET": "1"}
    with RssSampler() as rss, open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(here, script), *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode, dt = os.waitstatus_to_exitcode(status), time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} exited {proc.returncode}; its output is in {log}")
    nan = float("nan")
    return None, dt, {"driver_cpu_s": ru.ru_utime + ru.ru_stime, "ray_client_cpu_s": nan, "driver_own_cpu_s": nan}, rss.peak


def idle_cpu_per_s(seconds: float = 10.0) -> float:
    """The driver's CPU per wall-second while it only waits on a task: what Ray's own threads in
    any connected process cost (core worker I/O, gRPC polling, log and error listeners)."""
    import ray

    @ray.remote(num_cpus=0)
    def wait(s: float) -> None:
        time.sleep(s)

    ray.get(wait.remote(0.1))
    c0, t0 = _cpu_s(), time.perf_counter()
    ray.get(wait.remote(seconds))
    return (_cpu_s() - c0) / (time.perf_counter() - t0)


def build(workdir: str, rows: int, *, dim: int, out_dim: int, files: int) -> tuple[Storage, Storage]:
    """The two versions' files, reused when a previous run left them complete."""
    base = os.path.join(workdir, f"n{rows}-d{dim}-{out_dim}-f{files}")
    old, new = Storage(os.path.join(base, "z0")), Storage(os.path.join(base, "z1"))
    marker = os.path.join(base, "COMPLETE")
    if not os.path.exists(marker):
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        planted_versions(old, new, rows=rows, d_old=out_dim, d_new=dim, files_old=max(1, files * 3 // 4), files_new=files, noise=NOISE, seed=SEED)
        open(marker, "w").write(f"{time.perf_counter() - t0:.1f} s\n")
    return old, new


def recovery(reg: Registry, *, dim: int, out_dim: int, sample_files: int = 2) -> float:
    """Mean |snapshot - z_0|^2 over the first snapshot files' rows, over the noise floor. The true
    z_0 of an id is recomputed from the generator (a function of the id alone): no join needed."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((out_dim, dim)) / np.sqrt(dim)
    snap = Snapshots(reg.root).get(0, "items")
    errs = []
    for rel in snap.files[:sample_files]:
        with reg.root.open_input(rel) as f:
            ids, got = read_matrix(pq.read_table(f))
        raw = ids // 7  # planted_versions writes ids * 7
        z1 = hashed_normal(raw, dim, salt=SEED * 2 + 1).astype(np.float64)
        z0 = (z1 @ a.T + NOISE * hashed_normal(raw, out_dim, salt=SEED * 2 + 2)).astype(np.float32)
        errs.append(((got.astype(np.float64) - z0) ** 2).sum(1))
    return float(np.concatenate(errs).mean() / (NOISE**2 * out_dim))


def run_size(workdir: str, rows: int, a: argparse.Namespace) -> dict:
    old, new = build(workdir, rows, dim=a.dim, out_dim=a.out_dim, files=a.files)
    root_dir = os.path.join(workdir, f"root-n{rows}")
    shutil.rmtree(root_dir, ignore_errors=True)
    reg = Registry(Storage(root_dir))
    if a.as_jobs:
        log = os.path.join(workdir, f"job-n{rows}")
        common = ["--root", root_dir, "--in-place"]
        _, t_v0, c_v0, rss_v0 = _measure_job("register.py", [*common, "--version", "0", "--embeddings", f"items={old.uri()}"], log + "-v0.log")  # fmt: skip
        _, t_v1, c_v1, rss_v1 = _measure_job("register.py", [*common, "--version", "1", "--embeddings", f"items={new.uri()}",
                                                              "--fit-aligner", "linear", "--fit-rows", str(a.fit_rows)], log + "-v1.log")  # fmt: skip
        _, t_bf, c_bf, rss_bf = _measure_job("backfill.py", ["--root", root_dir, "--no-progress"], log + "-backfill.log")
    else:
        fit = AlignerFitOptions(kind="linear", fit_rows=a.fit_rows)
        _, t_v0, c_v0, rss_v0 = _measure(lambda: reg.register(0, embeddings={"items": old.uri()}, options=RegisterOptions(in_place=True)))  # fmt: skip
        _, t_v1, c_v1, rss_v1 = _measure(
            lambda: reg.register(1, embeddings={"items": new.uri()}, options=RegisterOptions(in_place=True, fit=fit))
        )
        s, t_bf, c_bf, rss_bf = _measure(lambda: backfill(reg.root, BackfillOptions(progress=False), echo=lambda _m: None))
        assert s.committed == ["as-v0/items"], s.committed
    fitrep = reg.get(1).manifest["aligner_fit"]
    idle = idle_cpu_per_s()
    row = {
        "rows": rows, "files": a.files, "dim": a.dim, "out_dim": a.out_dim,
        "register_v0": {"seconds": t_v0, **c_v0, "peak_rss_gb": rss_v0 / 1e9},
        "register_v1_fit": {"seconds": t_v1, **c_v1, "peak_rss_gb": rss_v1 / 1e9,
                            "rows_per_s": 2 * rows / t_v1, "pairs": fitrep["pairs"]["items"],
                            "heldout_rel_error": fitrep["relative_error"]["items"]["v0"]},
        "backfill": {"seconds": t_bf, **c_bf, "peak_rss_gb": rss_bf / 1e9, "rows_per_s": rows / t_bf},
        "recovery_vs_noise_floor": recovery(reg, dim=a.dim, out_dim=a.out_dim),
        "input_gb": (rows * a.dim + rows * a.out_dim) * 4 / 1e9,
        "idle_driver_cpu_per_s": idle,
    }  # fmt: skip
    if a.clean:
        shutil.rmtree(root_dir, ignore_errors=True)
    return row


STEPS = ("register_v0", "register_v1_fit", "backfill")
TIMES = ("seconds", "driver_cpu_s", "ray_client_cpu_s", "driver_own_cpu_s")


def best_of(runs: list[dict]) -> dict:
    """One row from repeated runs of a size: each step's times are the least over the runs, each
    taken on its own (a loaded machine's noise -- a BLAS thread pool waking, a GC pass -- only
    adds); everything else is the first run's. ``repeats`` keeps every run's times."""
    row = {**runs[0], "repeats": [{s: {k: r[s][k] for k in TIMES} for s in STEPS} for r in runs]}
    for step in STEPS:
        row[step] = {**runs[0][step], **{k: min(r[step][k] for r in runs) for k in TIMES}}
        if "rows_per_s" in row[step]:
            row[step]["rows_per_s"] = runs[0][step]["rows_per_s"] * runs[0][step]["seconds"] / row[step]["seconds"]
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'rows':>12} {'step':<18} {'seconds':>9} {'rows/s':>12} {'driver CPU s':>13} {'Ray client':>11} "
            f"{'own':>8} {'peak PSS GB':>12}")  # fmt: skip
    out = [head]
    for r in rows:
        for step, rate in (("register_v0", None), ("register_v1_fit", "rows_per_s"), ("backfill", "rows_per_s")):
            m = r[step]
            rate_s = f"{m[rate]:>12,.0f}" if rate else f"{r['rows'] / m['seconds']:>12,.0f}"
            split = "" if m["ray_client_cpu_s"] != m["ray_client_cpu_s"] else "x"  # NaN with --as-jobs: not measured
            client, own = (f"{m['ray_client_cpu_s']:>11.3f}", f"{m['driver_own_cpu_s']:>8.3f}") if split else (f"{'-':>11}", f"{'-':>8}")
            out.append(f"{r['rows']:>12,} {step:<18} {m['seconds']:>9.2f} {rate_s} {m['driver_cpu_s']:>13.3f} "
                       f"{client} {own} {m['peak_rss_gb']:>12.2f}")  # fmt: skip
        out.append(f"{'':>12} a driver that only waits on a task spends {r['idle_driver_cpu_per_s'] * 1e3:.1f} ms of CPU per "
                   "second (Ray's client threads)")  # fmt: skip
        out.append(f"{'':>12} recovery: mean |B z_1 - z_0|^2 = {r['recovery_vs_noise_floor']:.3f} x the noise floor "
                   f"(target <= 1.5); held-out relative error {r['register_v1_fit']['heldout_rel_error']:.3g}")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jobs/bench_register.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="N: rows of each version (also run at 4N unless --scale)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=192)
    p.add_argument("--files", type=int, default=16, help="files of z_1 (z_0 gets 3/4 as many), the same at N and 4N")
    p.add_argument("--fit-rows", type=int, default=1_000_000)
    p.add_argument("--workdir", default="/tmp/raybc-bench-register")
    p.add_argument("--scale", action="store_true", help="one size only")
    p.add_argument("--clean", action="store_true", help="remove each root (snapshots) after its run")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--repeats", type=int, default=1, help="runs per size (fresh roots); each time is the least of them")
    p.add_argument("--as-jobs", action="store_true", help="each step a job process (jobs/register.py, jobs/backfill.py) joining this Ray; its whole CPU time")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False)
    sizes = [a.rows] if a.scale else [a.rows, 4 * a.rows]
    results = []
    for n in sizes:
        results.append(best_of([run_size(a.workdir, n, a) for _ in range(a.repeats)]))
        print(table(results[-1:]), flush=True)
    print("\n" + table(results))
    summary: dict = {"results": results, "cpus": os.cpu_count(), "ray_cpus": a.cpus, "as_jobs": a.as_jobs}
    if not a.scale:
        keys = (("driver_cpu_s", "job process CPU" if a.as_jobs else "driver CPU"),) + (
            () if a.as_jobs else (("driver_own_cpu_s", "driver CPU less Ray's client threads"),))
        for key, label in keys:
            ratios = {s: results[1][s][key] / results[0][s][key] for s in ("register_v1_fit", "backfill")}
            summary[f"{key}_ratio_4x_rows"] = ratios
            print(f"\n{label} at 4x the rows (same files): "
                  + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()) + " (target <= 1.5x)")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
