"""Ray job: the scheduled reconcile -- backfill every missing or stale snapshot from the newest version.

    ray job submit --working-dir . -- python jobs/reconcile.py --config jobs/configs/reconcile.yaml
    python jobs/reconcile.py --root ./demo-root --dry-run

Parses the config (``--config FILE`` and/or flags), runs :func:`raybc.reconcile.reconcile` under the
reconcile lease, prints the plan, the backfill summaries and a last one-line summary, and exits
0 (done, or nothing to do), 1 (failed), 2 (bad config) or 3 (another reconcile holds the lease;
nothing was touched).
"""

import sys

from raybc.cli import guarded, reconcile_config, run_reconcile_job

if __name__ == "__main__":
    sys.exit(guarded(lambda: run_reconcile_job(reconcile_config(sys.argv[1:], prog="jobs/reconcile.py"))))
