"""Study: post-hoc B_1 (each aligner kind, shares of the pairs) for two independently trained versions.

    python jobs/byo_study.py --out runs/byo --docs-out docs/byo                  # MovieLens-100K, seeds 0 and 1
    python jobs/byo_study.py --seeds 0 --fractions 0.01,1 --variants linear --profile quick --epochs 40 --dims 16,64

Per seed: the protocol's fix-m0 / no-bc / bc-aligner on two versions (d_0, d_1), then no-bc's stored
z_0 and z_1 registered into fresh roots through ``raybc register`` with B_1 fitted post hoc, each
backfilled and scored by the consumers trained on v0 (``raybc.study``). Prints the table; writes
results.json, results.csv, summary.csv and table.md to ``--docs-out``. Exit 0 done, 1 failed, 2 bad
options.
"""

from __future__ import annotations

import argparse
import sys

from raybc.cli import guarded
from raybc.options import validate_options


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse(argv: list[str]):
    from raybc.study import StudyOptions, default_variants

    p = argparse.ArgumentParser(prog="jobs/byo_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--out", default="runs/byo", help="work folder (roots of every seed and cell)")
    p.add_argument("--docs-out", default="docs/byo", help="where the CSV/JSON/table go")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--dims", default="32,64", help="d_0,d_1")
    p.add_argument("--fractions", default="0.01,0.1,1", help="shares of the shared ids to fit on")
    p.add_argument("--variants", default=",".join(v.label for v in default_variants()),
                   help="post-hoc fits to run, by label: " + ", ".join(v.label for v in default_variants()))
    p.add_argument("--no-joint", action="store_true", help="skip the joint bc-aligner reference")
    p.add_argument("--profile", choices=["quick", "full"], default="full")
    p.add_argument("--epochs", type=int, help="TrainOptions.epochs override")
    p.add_argument("--ray-address")
    a = p.parse_args(argv)
    known = {v.label: v for v in default_variants()}
    wanted = [x.strip() for x in a.variants.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in known]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(known)}")
    variants = [known[x] for x in wanted]
    cfg = {
        "dataset": a.dataset, "out": a.out, "seeds": _ints(a.seeds), "dims": _ints(a.dims),
        "fractions": [float(x) for x in a.fractions.split(",")], "variants": [v.model_dump() for v in variants],
        "joint": not a.no_joint, "profile": a.profile, "train": {"epochs": a.epochs} if a.epochs else {},
    }  # fmt: skip
    return validate_options(StudyOptions, cfg, source="jobs/byo_study.py"), a


def main(argv: list[str]) -> int:
    import ray

    from raybc.study import markdown_table, refusals, run_study, write_outputs

    options, a = parse(argv)
    if a.ray_address is None:
        ray.init(address="local", num_cpus=4, include_dashboard=False)  # RAY_NOTES: 4 logical CPUs on 2 cores
    result = run_study(options, ray_address=a.ray_address)
    print("\n" + markdown_table(result["summary"]))
    print("\nRefusals:\n" + (refusals(result["summary"]) or "none"))
    files = write_outputs(result, a.docs_out)
    for seed, t in result["timing"].items():
        print(f"seed {seed}: references {t['references_s']:.1f} s, post-hoc cells {t['cells_s']:.1f} s")
    print(f"\nstudy took {result['seconds']:.1f} s; wrote " + ", ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(lambda: main(sys.argv[1:])))
