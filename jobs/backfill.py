"""Ray job: backfill snapshots of every older version from the newest embeddings, in one pass.

    ray job submit --working-dir . -- python jobs/backfill.py --config jobs/configs/backfill.yaml
    python jobs/backfill.py --root ./demo-root --to-versions 0,1

Parses the config (``--config FILE`` and/or flags), runs :func:`raybc.backfill.backfill`, prints
the summary, and exits non-zero on failure (1) or on a bad config (2).
"""

import sys

from raybc.cli import backfill_config, guarded, run_backfill_job

if __name__ == "__main__":
    sys.exit(guarded(lambda: run_backfill_job(backfill_config(sys.argv[1:], prog="jobs/backfill.py"))))
