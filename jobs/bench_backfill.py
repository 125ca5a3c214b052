"""Benchmark: the Ray backfill against a bare single-process pyarrow+numpy loop, on the same files.

    python jobs/bench_backfill.py --rows 2000000 --dim 256 --workdir /tmp/raybc-bench --json docs/bench.json
    python jobs/bench_backfill.py --rows 50000000 --files 400 --scale --output-dtype float16   # scale run

Builds (or reuses) a synthetic root with versions v0..v10: v10 has ``--dim`` dimensions, every
older version ``--out-dim``, linear B's. Then, in one process and one run, measures (``--cases``):

- baseline: read -> ``z @ W`` -> write, file by file, one process (numpy's BLAS and pyarrow may use
  threads; the CPU cores it used are reported), with raybc's writer settings; ``defaults``: the
  same loop with pyarrow's default writer, as a first loop would be written; ``baseline-mmap``:
  the baseline reading memory-mapped files, as the backfill does (a trick a bare loop could use);
- throughput: the Ray backfill v10 -> v9 (ratio to the baseline, target >= 1.6x);
- distance: v10 -> v0 against v10 -> v9 (fusion makes distance free, target <= 1.1x);
- fanout: v10 -> v9, v8, v7, v6 in one pass against one target (target <= 1.6x); ``separate``:
  the same four targets as four jobs;
- float16 output: bytes written, time, and precision against float64 step by step;
- ``--cold``: every run starts with the input files dropped from the page cache, so it reads them
  from the disk, as a backfill of a table larger than memory does;
- memory: peak RSS of the whole job (driver + Ray workers) at ``--rows`` and 10x ``--rows``
  (``--memory``; target growth < 1.2x);
and prints a table (rows/s, GB/s in and out, peak RSS, ratios), also written as JSON with ``--json``.
``--scale`` runs one backfill only (rows/s, GB/s, peak RSS) and removes its output afterwards.
Runs the same way against S3 (``--workdir s3://bucket/prefix`` plus the usual AWS variables).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from raybc.backfill import BackfillOptions, backfill
from raybc.data.synthetic import embedding_tables
from raybc.embeddings import EMBEDDING, ID, WRITER_OPTIONS, make_batch, read_matrix, table_schema
from raybc.registry import Registry
from raybc.snapshots import Snapshots
from raybc.storage import Storage
from raybc.transforms import Affine, apply_steps, chain_steps, compose_steps

# Versions of the bench root: v10 is the source, v0..v9 the targets (distance 1 to 10).
SOURCE = 10


def build_root(root: Storage, *, rows: int, dim: int, out_dim: int, files: int, seed: int = 0) -> Registry:
    """v0..v10 with linear B's; z_10 of one entity 'items' in ``files`` files. Reused when present."""
    reg = Registry(root)
    if reg.versions() == list(range(SOURCE + 1)) and reg.get(SOURCE).embeddings["items"].rows == rows:
        return reg
    if root.exists("registry") or root.exists("embeddings"):
        raise SystemExit(f"{root.uri()} holds another bench root; remove it or choose another --workdir")
    rng = np.random.default_rng(seed)
    for k in range(SOURCE + 1):
        d = dim if k == SOURCE else out_dim
        b = None
        if k:
            d_in = d
            # orthogonal-ish maps keep values at unit scale however many are composed
            q, _ = np.linalg.qr(rng.standard_normal((max(d_in, out_dim), max(d_in, out_dim))))
            b = Affine(q[:out_dim, :d_in].astype(np.float32))
        listing = {}
        if k == SOURCE:
            per_file = -(-rows // files)
            listing["items"] = reg.write_embeddings(k, "items", embedding_tables(rows, dim, rows_per_file=per_file, seed=seed))
        reg.publish(k, dim=d, method="bench", aligner=b, embeddings=listing)
    return reg


def baseline_loop(reg: Registry, out: str, *, target: int, writer_options: dict | None = None, memory_map: bool = False) -> tuple[float, float]:
    """Bare single-process loop over the same files: read a batch, ``z @ W`` with numpy (W fused
    once, as any loop would), write it; returns (seconds, CPU cores used on average).

    ``writer_options=None``: pyarrow's default writer (dictionary encoding tried on every column,
    statistics on every column), as a first loop would be written; otherwise those options.
    ``memory_map``: read the files memory-mapped (pyarrow's ``memory_map=True``), as the backfill does."""
    steps = chain_steps({v: reg.aligner(v) for v in range(SOURCE, target, -1)}, SOURCE, target)
    (fused,) = compose_steps(steps)  # the bench chain is linear: one matrix
    w = np.ascontiguousarray(np.asarray(fused.weight, np.float64).T.astype(np.float32))
    src = reg.embeddings_storage(SOURCE, "items")
    os.makedirs(out, exist_ok=True)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for f in reg.get(SOURCE).embeddings["items"].files:
        with src.open_input(f.path, memory_map=memory_map) as fin:
            writer = None
            for batch in pq.ParquetFile(fin).iter_batches(batch_size=65_536, columns=[ID, EMBEDDING]):
                col = batch.column(1)
                y = col.values.to_numpy().reshape(len(col), -1) @ w
                if writer is None:
                    writer = pq.ParquetWriter(os.path.join(out, f.path), table_schema(y.shape[1]), compression="none", **(writer_options or {}))
                writer.write_batch(make_batch(batch.column(0), y))
            writer.close()
    seconds, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return seconds, (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / seconds


class RssSampler:
    """Peak PSS of this process and every process it started (the local Ray's raylet, GCS and
    workers), from a sampler in its own process (``jobs/pss_sampler.py``), so the /proc reads are
    not billed to this process's CPU time, which the benchmarks report as the driver's."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak = interval_s, 0

    def __enter__(self) -> RssSampler:
        import subprocess

        fd, self._out = tempfile.mkstemp(prefix="raybc-pss-")
        os.close(fd)
        here = os.path.dirname(os.path.abspath(__file__))
        self._proc = subprocess.Popen([sys.executable, os.path.join(here, "pss_sampler.py"), str(os.getpid()), self._out, str(self.interval_s)])
        time.sleep(2 * self.interval_s)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(self.interval_s)
        self._proc.terminate()
        self._proc.wait(timeout=30)
        try:
            with open(self._out) as f:
                self.peak = int(f.read() or 0)
        finally:
            os.remove(self._out)


# Ray starts its workers at this niceness (its ``worker_niceness``; ``RAY_worker_niceness``). The
# baselines run at the same one, so that other work on a shared machine slows both sides alike: at
# nice 0 against Ray's 15, any busy neighbour at nice 0 took almost all of the CPU from the workers
# and none from the baseline.
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))


def _child_init(nice: int) -> None:
    os.nice(max(0, nice - os.nice(0)))


def in_child(fn, *args, nice: int, blas_threads: int | None = None, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh process at niceness ``nice`` (and, when given, that many
    BLAS/OpenMP threads, as Ray gives a 1-CPU task); returns its result."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if blas_threads is not None:  # read by numpy's BLAS when the child imports it
        os.environ.update({k: str(blas_threads) for k in saved})
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_child_init, initargs=(nice,)) as pool:
            return pool.submit(fn, *args, **kwargs).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stage_costs(reg: Registry, out: str, *, rows: int) -> dict[str, float]:
    """One core's cost per row of each stage of a part, on the first ``rows`` rows of v10's files,
    microseconds: ``read`` (decode a 64k-row batch, ids + 256-d vectors to numpy, NaN/Inf check),
    ``matmul`` (one 192-d target) and ``write`` (encode one 192-d target's batch with raybc's writer
    settings and write it). What one pass shares is the read; every further target costs a matmul
    and a write. Run in a 1-thread child (see :func:`in_child`), as each Ray write task runs."""
    w = np.asarray(reg.aligner(SOURCE).weight, np.float32).T.copy()  # (256, 192)
    src = reg.embeddings_storage(SOURCE, "items")
    os.makedirs(out, exist_ok=True)
    t = {"read": 0.0, "matmul": 0.0, "write": 0.0}
    n = 0
    y = None
    for f in reg.get(SOURCE).embeddings["items"].files:
        if n >= rows:
            break
        with src.open_input(f.path, memory_map=True) as fin, pq.ParquetWriter(os.path.join(out, f.path), table_schema(w.shape[1]), compression="none", **WRITER_OPTIONS) as wr:  # fmt: skip
            batches = pq.ParquetFile(fin).iter_batches(batch_size=65_536, columns=[ID, EMBEDDING], use_threads=False)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                z = batch.column(1).values.to_numpy().reshape(len(batch), -1)
                ids = batch.column(0)
                assert np.isfinite(z.sum(dtype=np.float32))
                t1 = time.perf_counter()
                if y is None or len(y) != len(z):
                    y = np.empty((len(z), w.shape[1]), np.float32)
                np.matmul(z, w, out=y)
                t2 = time.perf_counter()
                wr.write_batch(make_batch(ids, y))
                t3 = time.perf_counter()
                t["read"], t["matmul"], t["write"] = t["read"] + t1 - t0, t["matmul"] + t2 - t1, t["write"] + t3 - t2
                n += len(z)
    shutil.rmtree(out, ignore_errors=True)
    return {k: v / n * 1e6 for k, v in t.items()} | {"rows": n}


def fanout_floor(costs: dict[str, float], targets: int) -> float:
    """The least time ``targets`` targets in one pass can take against one target, from the stage
    costs: the read is shared, each target pays its matmul and its write."""
    per_target = costs["matmul"] + costs["write"]
    return (costs["read"] + targets * per_target) / (costs["read"] + per_target)


class SystemProfile:
    """What the machine did during one case, from /proc: CPU time by kind (all cores: user, nice
    -- Ray's workers run niced --, system, iowait, idle), the disks' bytes read and written, page
    reclaim (pages scanned by kswapd and by the processes themselves), time stalled on memory and
    I/O (pressure stall information), the peak of dirty + writeback pages and how much shared
    memory (where Ray's object store lives) grew, both sampled."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.result: dict[str, float] = {}

    @staticmethod
    def _counters() -> dict[str, float]:
        c: dict[str, float] = {}
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        for k, x in zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), v):
            c[f"cpu_{k}"] = x
        disks = set(_disks())
        c["read_bytes"] = c["write_bytes"] = c["reads"] = c["writes"] = 0
        with open("/proc/diskstats") as f:
            for line in f:
                x = line.split()
                if x[2] in disks:
                    c["reads"] += int(x[3])  # requests completed (after merging): their size is the read-ahead's
                    c["read_bytes"] += int(x[5]) * 512
                    c["writes"] += int(x[7])
                    c["write_bytes"] += int(x[9]) * 512
        with open("/proc/vmstat") as f:
            vm = dict(line.split() for line in f)
        c["scan_kswapd"] = int(vm.get("pgscan_kswapd", 0))
        c["scan_direct"] = int(vm.get("pgscan_direct", 0))
        for res in ("memory", "io"):
            try:
                with open(f"/proc/pressure/{res}") as f:
                    c[f"stall_{res}_us"] = int(f.readline().rsplit("total=", 1)[1])
            except OSError:
                c[f"stall_{res}_us"] = 0
        return c

    @staticmethod
    def _memory() -> tuple[int, int]:
        """(dirty + writeback, shared memory: Ray's object stores live there) in bytes."""
        with open("/proc/meminfo") as f:
            m = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return m.get("Dirty", 0) + m.get("Writeback", 0), m.get("Shmem", 0)

    def _sample(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            mem = self._memory()
            self._peak = tuple(map(max, self._peak, mem))
            n += 1
            if n % 4 == 0:  # once a second: counters for the timeline
                self._samples.append((time.perf_counter(), self._counters(), mem[0]))

    def _timeline(self, t1: float, c1: dict[str, float]) -> list[dict[str, float]]:
        """The run in tenths of its wall time: CPU busy and iowait (% of all cores), disk GB/s
        read and written, dirty + writeback GB at the tenth's end."""
        samples = [(self._t0, self._c0, 0.0), *self._samples, (t1, c1, self._memory()[0])]
        out = []
        for i in range(10):
            lo, hi = self._t0 + (t1 - self._t0) * i / 10, self._t0 + (t1 - self._t0) * (i + 1) / 10
            a = max((s for s in samples if s[0] <= lo), key=lambda s: s[0])
            b = min((s for s in samples if s[0] >= hi), key=lambda s: s[0], default=samples[-1])
            if b[0] <= a[0]:
                continue
            d = {k: b[1][k] - a[1][k] for k in b[1]}
            ticks = sum(d[k] for k in d if k.startswith("cpu_")) or 1
            out.append({
                "busy_pct": 100 * (ticks - d["cpu_idle"] - d["cpu_iowait"] - d["cpu_steal"]) / ticks, "iowait_pct": 100 * d["cpu_iowait"] / ticks,
                "steal_pct": 100 * d["cpu_steal"] / ticks,  # the hypervisor ran someone else
                # pages the processes had to reclaim themselves (kswapd behind), in their own kernel time
                "direct_reclaim_gb": d["scan_direct"] * 4096 / 1e9,
                "kswapd_reclaim_gb": d["scan_kswapd"] * 4096 / 1e9,  # the kernel's reclaim thread
                "read_gb_per_s": d["read_bytes"] / (b[0] - a[0]) / 1e9, "write_gb_per_s": d["write_bytes"] / (b[0] - a[0]) / 1e9,
                "dirty_gb": b[2] / 1e9,
            })  # fmt: skip
        return out

    def __enter__(self) -> SystemProfile:
        import threading

        self._stop, self._peak, self._samples = threading.Event(), self._memory(), []
        self._shm0 = self._peak[1]
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._c0, self._t0 = self._counters(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        c1, dt = self._counters(), time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        d = {k: c1[k] - self._c0[k] for k in c1}
        ticks = sum(d[k] for k in d if k.startswith("cpu_")) or 1
        self.result = {
            **{f"{k[4:]}_pct": 100 * d[k] / ticks for k in ("cpu_user", "cpu_nice", "cpu_system", "cpu_iowait", "cpu_idle", "cpu_steal")},
            "disk_read_gb_per_s": d["read_bytes"] / dt / 1e9, "disk_write_gb_per_s": d["write_bytes"] / dt / 1e9,
            "disk_read_kb_per_request": d["read_bytes"] / max(d["reads"], 1) / 1024,
            "disk_write_kb_per_request": d["write_bytes"] / max(d["writes"], 1) / 1024,
            "reclaim_scanned_gb": (d["scan_kswapd"] + d["scan_direct"]) * 4096 / 1e9,
            "direct_reclaim_scanned_gb": d["scan_direct"] * 4096 / 1e9,
            "memory_stall_pct": 100 * d["stall_memory_us"] / 1e6 / dt, "io_stall_pct": 100 * d["stall_io_us"] / 1e6 / dt,
            "peak_dirty_gb": max(self._peak[0], self._memory()[0]) / 1e9,
            "shared_memory_growth_gb": (max(self._peak[1], self._memory()[1]) - self._shm0) / 1e9,
            "timeline": self._timeline(self._t0 + dt, c1),
        }  # fmt: skip


def _disks() -> list[str]:
    """The machine's block devices that hold data (no loop, RAM or zram devices)."""
    devs = sorted(os.listdir("/sys/block")) if os.path.isdir("/sys/block") else []
    return [d for d in devs if not d.startswith(("loop", "ram", "zram"))]


def read_ahead_kb() -> dict[str, int]:
    """The disks' read-ahead window (``/sys/block/*/queue/read_ahead_kb``)."""
    out = {}
    for dev in _disks():
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{dev}/queue/read_ahead_kb") as f:
                out[dev] = int(f.read())
    return out


def snapshot_bytes(reg: Registry, target: int) -> int:
    return sum(f["bytes"] for f in Snapshots(reg.root).get(target, "items").manifest["files"])


def half_precision_report(reg: Registry, *, target: int) -> dict[str, float]:
    """Bytes and precision of the float16 snapshot just written, against float64 step by step."""
    snaps = Snapshots(reg.root)
    snap = snaps.get(target, "items")
    with reg.root.open_input(snap.files[0]) as f:
        ids, got = read_matrix(pq.read_table(f))
    src = reg.embeddings_storage(SOURCE, "items")
    with src.open_input(reg.get(SOURCE).embeddings["items"].files[0].path) as f:
        src_ids, z = read_matrix(pq.read_table(f))
    assert np.array_equal(ids, src_ids[: len(ids)]), "part 0 holds the first input file's rows in order"
    steps = chain_steps({v: reg.aligner(v) for v in range(SOURCE, target, -1)}, SOURCE, target)
    ref = apply_steps(steps, z[: len(ids)])
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return {"bytes": snapshot_bytes(reg, target), "max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean())}


def evict_inputs(reg: Registry) -> int:
    """Drop v10's files from the page cache (``posix_fadvise(DONTNEED)``; local files only; no root
    needed), so that the next run reads its input from the disk: what a backfill of a table larger
    than memory does. Returns the bytes of the files."""
    store, total = reg.embeddings_storage(SOURCE, "items"), 0
    if not store.is_local:
        return 0
    for f in reg.get(SOURCE).embeddings["items"].files:
        fd = os.open(store.path(f.path), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def ray_backfill(root: Storage, targets: list[int], **opts) -> tuple[float, int, dict]:
    """Seconds, peak RSS and (system profile, part timing) of one Ray backfill from scratch
    (snapshots removed first)."""
    root.remove("snapshots", recursive=True)
    with RssSampler() as rss, SystemProfile() as system:
        t0 = time.perf_counter()
        s = backfill(root, BackfillOptions(from_version=SOURCE, to_versions=targets, progress=False, **opts), echo=lambda _: None)
        dt = time.perf_counter() - t0
    assert s.committed, "the backfill committed nothing"
    return dt, rss.peak, {"system": system.result, "part_timing": s.part_timing}


def start_ray(a: argparse.Namespace) -> None:
    import ray

    ray.init(address=a.ray_address or "local", **({} if a.ray_address else {"num_cpus": a.cpus, "include_dashboard": False}))


CASES = ("baseline", "baseline-mmap", "defaults", "throughput", "distance", "fanout", "separate", "float16")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jobs/bench_backfill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=192)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--workdir", default="/tmp/raybc-bench")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray (ignored with --ray-address)")
    p.add_argument("--ray-address")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement; the best is kept")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS at 10x the rows")
    p.add_argument("--scale", action="store_true", help="only one Ray backfill v10 -> v9 (--output-dtype), once, then remove its output")
    p.add_argument("--output-dtype", default="float32", choices=["float32", "float16"], help="output of the --scale run")
    p.add_argument("--baseline-nice", type=int, default=RAY_WORKER_NICENESS,
                   help="niceness of the baselines' process (default: Ray's workers' own, so load elsewhere slows both alike)")
    p.add_argument("--cold", action="store_true", help="drop the input files from the page cache before every run (local disk)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    cases = set(a.cases.split(","))
    if cases - set(CASES):
        p.error(f"--cases: unknown {sorted(cases - set(CASES))}; choose from {', '.join(CASES)}")

    root = Storage(os.path.join(a.workdir, f"root-{a.rows}x{a.dim}"))
    t = time.perf_counter()
    reg = build_root(root, rows=a.rows, dim=a.dim, out_dim=a.out_dim, files=a.files)
    print(f"[bench] input ready in {time.perf_counter() - t:.1f} s: {a.rows:,} rows x {a.dim} in {a.files} files at {root.uri()}")
    in_bytes = a.rows * a.dim * 4
    results: dict[str, dict] = {}

    def record(name: str, seconds: float, *, rows: int = a.rows, rss: int = 0, out_bytes: int | None = None,
               cores: float | None = None, extra: dict | None = None) -> None:
        results[name] = {"case": name, "seconds": seconds, "rows": rows, "rows_per_s": rows / seconds,
                         "input_gb_per_s": rows * a.dim * 4 / seconds / 1e9, "peak_rss_gb": rss / 1e9, **(extra or {})}
        if out_bytes is not None:
            results[name]["output_gb_per_s"] = out_bytes / seconds / 1e9
        if cores is not None:
            results[name]["cpu_cores_used"] = cores
    # fmt: skip

    def best(fn):
        def once():
            if a.cold:
                evict_inputs(reg)
            return fn()

        return min((once() for _ in range(a.repeats)), key=lambda r: r[0])

    def baseline(**kw) -> tuple[float, float, dict]:
        with SystemProfile() as system:
            sec, cores = in_child(baseline_loop, reg, base_dir, target=SOURCE - 1, nice=a.baseline_nice, **kw)
        return sec, cores, {"system": system.result}

    ratios: dict[str, float] = {}
    costs: dict[str, float] | None = None
    load0 = os.getloadavg()
    if a.scale:
        start_ray(a)
        if a.cold:
            evict_inputs(reg)
        sec, rss, extra = ray_backfill(root, [SOURCE - 1], output_dtype=a.output_dtype)
        record(f"ray v10->v9 ({a.output_dtype} output)", sec, rss=rss, out_bytes=snapshot_bytes(reg, SOURCE - 1), extra=extra)
        root.remove("snapshots", recursive=True)
    else:
        # The baselines run before Ray starts: an idle local Ray (GCS, raylet, workers) would take
        # CPU from them. Their first run warms the page cache for both sides.
        local = "://" not in a.workdir
        base_dir = os.path.join(a.workdir, "baseline-out") if local else tempfile.mkdtemp(prefix="raybc-bench-")
        if "baseline" in cases:
            sec, cores, extra = best(lambda: baseline(writer_options=WRITER_OPTIONS))
            record("baseline v10->v9 (1 process, raybc writer)", sec, cores=cores, extra=extra)
        if "baseline-mmap" in cases:
            sec, cores, extra = best(lambda: baseline(writer_options=WRITER_OPTIONS, memory_map=True))
            record("baseline v10->v9 (1 process, raybc writer, mmap)", sec, cores=cores, extra=extra)
        if "defaults" in cases:
            sec, cores, extra = best(lambda: baseline())
            record("baseline v10->v9 (1 process, pyarrow defaults)", sec, cores=cores, extra=extra)
        if "fanout" in cases:  # one core's cost per row of each stage: what the fan-out floor is made of
            costs = in_child(stage_costs, reg, base_dir, rows=min(a.rows, 1_000_000), nice=a.baseline_nice, blas_threads=1)
        shutil.rmtree(base_dir, ignore_errors=True)
        start_ray(a)
        ray_backfill(root, [SOURCE - 1])  # start Ray's workers (and warm the page cache) once
        sec, rss, extra = best(lambda: ray_backfill(root, [SOURCE - 1]))
        f32_bytes = snapshot_bytes(reg, SOURCE - 1)
        record("ray v10->v9", sec, rss=rss, out_bytes=f32_bytes, extra=extra)
        one = sec
        if "baseline" in cases:
            ratios["throughput: ray / baseline rows/s (target >= 1.6)"] = results["baseline v10->v9 (1 process, raybc writer)"]["seconds"] / one
        if "baseline-mmap" in cases:
            ratios["throughput: ray / baseline reading memory-mapped files"] = results["baseline v10->v9 (1 process, raybc writer, mmap)"]["seconds"] / one
        if "defaults" in cases:
            ratios["throughput: ray / baseline with pyarrow's default writer"] = results["baseline v10->v9 (1 process, pyarrow defaults)"]["seconds"] / one
        if "distance" in cases:
            sec, rss, extra = best(lambda: ray_backfill(root, [0]))
            record("ray v10->v0", sec, rss=rss, extra=extra)
            ratios["distance: v10->v0 / v10->v9 time (target <= 1.1)"] = sec / one
        if "fanout" in cases:
            sec, rss, extra = best(lambda: ray_backfill(root, [9, 8, 7, 6]))
            record("ray v10->v9,v8,v7,v6 (one pass)", sec, rss=rss, out_bytes=4 * f32_bytes, extra=extra)
            ratios["fan-out: 4 targets / 1 target time"] = sec / one
            floor = fanout_floor(costs, 4)
            ratios["fan-out: floor of 4 targets / 1 target (stage costs)"] = floor
            ratios["fan-out: one pass / its floor (target <= 1.15)"] = sec / one / floor
        if "separate" in cases:
            jobs = [best(lambda: ray_backfill(root, [t])) for t in (9, 8, 7, 6)]  # noqa: B023 - called at once
            sec = sum(s for s, _, _ in jobs)
            record("ray v10->v9, v8, v7, v6 (4 separate jobs)", sec, rss=max(r for _, r, _ in jobs), out_bytes=4 * f32_bytes)
            if "fanout" in cases:
                ratios["fan-out: one pass / 4 separate jobs (target <= 0.75)"] = results["ray v10->v9,v8,v7,v6 (one pass)"]["seconds"] / sec
        if "float16" in cases:
            sec, rss, extra = best(lambda: ray_backfill(root, [SOURCE - 1], output_dtype="float16"))
            half = half_precision_report(reg, target=SOURCE - 1)
            record("ray v10->v9 float16 output", sec, rss=rss, out_bytes=half["bytes"], extra=extra)
            ratios["float16 output: bytes written / float32"] = half["bytes"] / f32_bytes
            ratios["float16 output: time / float32"] = sec / one
            ratios["float16 output: max row relative error vs float64"] = half["max_rel_error"]
            ratios["float16 output: mean row relative error vs float64"] = half["mean_rel_error"]
        if a.memory:
            big = Storage(os.path.join(a.workdir, f"root-{a.rows * 10}x{a.dim}"))
            build_root(big, rows=a.rows * 10, dim=a.dim, out_dim=a.out_dim, files=a.files * 10)
            sec, rss, extra = ray_backfill(big, [SOURCE - 1])
            record(f"ray v10->v9 at 10x rows ({a.rows * 10:,})", sec, rows=a.rows * 10, rss=rss, extra=extra)
            ratios["memory: peak RSS at 10x rows / at 1x (target < 1.2)"] = rss / results["ray v10->v9"]["peak_rss_gb"] / 1e9

    print(f"\n{'case':<48} {'seconds':>8} {'rows/s':>11} {'GB/s in':>8} {'GB/s out':>8} {'peak RSS GB':>11} {'cores':>5}")
    for r in results.values():
        out = f"{r['output_gb_per_s']:8.3f}" if "output_gb_per_s" in r else f"{'-':>8}"
        rss = f"{r['peak_rss_gb']:11.2f}" if r["peak_rss_gb"] else f"{'-':>11}"
        cores = f"{r['cpu_cores_used']:5.2f}" if "cpu_cores_used" in r else f"{'-':>5}"
        print(f"{r['case']:<48} {r['seconds']:8.2f} {r['rows_per_s']:11,.0f} {r['input_gb_per_s']:8.3f} {out} {rss} {cores}")
    print(f"\n{'what the machine did (all cores)':<48} {'user%':>6} {'nice%':>6} {'sys%':>6} {'iowait%':>7} {'idle%':>6} "
          f"{'disk r GB/s':>11} {'w GB/s':>7} {'r KB/io':>7} {'w KB/io':>7} {'reclaim GB':>10} {'mem stall%':>10} {'io stall%':>9} {'dirty GB':>8} {'+shm GB':>7}")  # fmt: skip
    for r in results.values():
        m = r.get("system")
        if m:
            print(f"{r['case']:<48} {m['user_pct']:6.1f} {m['nice_pct']:6.1f} {m['system_pct']:6.1f} {m['iowait_pct']:7.1f} "
                  f"{m['idle_pct']:6.1f} {m['disk_read_gb_per_s']:11.3f} {m['disk_write_gb_per_s']:7.3f} "
                  f"{m['disk_read_kb_per_request']:7.0f} {m['disk_write_kb_per_request']:7.0f} "
                  f"{m['reclaim_scanned_gb']:10.2f} {m['memory_stall_pct']:10.1f} {m['io_stall_pct']:9.1f} {m['peak_dirty_gb']:8.2f} "
                  f"{m['shared_memory_growth_gb']:7.2f}")  # fmt: skip
    for r in results.values():
        t = r.get("part_timing") or {}
        if t:
            print(f"{r['case']}: CPU per row in the write tasks {t['cpu_us_per_row']['user']:.2f} us user + "
                  f"{t['cpu_us_per_row']['system']:.2f} us kernel; rows/s per part, by tenth of the parts in start order: "
                  + " ".join(f"{x['rows_per_s']:,.0f}" for x in t["timeline"])
                  + "; their CPU per row, user + kernel us: "
                  + " ".join(f"{x['cpu_us_per_row']['user']:.2f}+{x['cpu_us_per_row']['system']:.2f}" for x in t["timeline"]))  # fmt: skip
    for r in results.values():
        tl = (r.get("system") or {}).get("timeline")
        if tl:
            print(f"{r['case']}: by tenth of the run's wall time, CPU busy % / iowait % / steal % / disk read GB/s / write GB/s / dirty GB / reclaimed GB by kswapd / directly: "
                  + "  ".join(f"{x['busy_pct']:.0f}/{x['iowait_pct']:.0f}/{x['steal_pct']:.0f}/{x['read_gb_per_s']:.2f}/{x['write_gb_per_s']:.2f}/{x['dirty_gb']:.1f}/{x['kswapd_reclaim_gb']:.1f}/{x['direct_reclaim_gb']:.1f}" for x in tl))  # fmt: skip
    if costs:
        print(f"stage costs, one core, us per row (first {costs['rows']:,} rows): read {costs['read']:.3f}, "
              f"matmul {costs['matmul']:.3f}, write {costs['write']:.3f} (per target)")
    print()
    for k, v in ratios.items():
        print(f"{k:<58} {v:9.2e}" if v < 0.01 else f"{k:<58} {v:6.2f}")
    if a.json:
        info = {"rows": a.rows, "dim": a.dim, "out_dim": a.out_dim, "files": a.files, "input_gb": in_bytes / 1e9,
                "baseline_nice": a.baseline_nice, "cold": a.cold, "read_ahead_kb": read_ahead_kb(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                "stage_costs_us_per_row": costs,
                "cpus": a.cpus, "machine": platform.machine(), "python": platform.python_version(), "argv": argv,
                "blas_env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}}  # fmt: skip
        with open(a.json, "w") as f:
            json.dump({"setup": info, "cases": list(results.values()), "ratios": ratios}, f, indent=2)
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
