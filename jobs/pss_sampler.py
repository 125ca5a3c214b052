"""Peak memory of a process tree, sampled from another process (the benchmarks' memory column).

    python jobs/pss_sampler.py PID OUT [INTERVAL_S]

Every INTERVAL_S (default 0.2) sums PSS (``/proc/<pid>/smaps_rollup``) over PID and every process
it started -- for a benchmark driver with a local Ray: the raylet, the GCS and every worker. PSS
counts each shared page (the object store's included) once over the processes sharing it, where
summed VmRSS counts it once per process. Writes the peak in bytes to OUT after every sample. It
runs as its own process so that its /proc reads (kernel time) are not billed to the driver whose
own CPU the benchmarks report; it leaves itself out of the sum.
"""

from __future__ import annotations

import os
import sys
import time


def pss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def main(argv: list[str]) -> int:
    pid, out = int(argv[0]), argv[1]
    interval = float(argv[2]) if len(argv) > 2 else 0.2
    me, peak = os.getpid(), 0
    while os.path.exists(f"/proc/{pid}"):
        peak = max(peak, sum(pss_of(p) for p in tree(pid) if p != me))
        with open(out + ".tmp", "w") as f:
            f.write(str(peak))
        os.replace(out + ".tmp", out)
        time.sleep(interval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
