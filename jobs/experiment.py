"""Ray job: the paper's protocol for a list of methods on one data set -- table and plots.

    python jobs/experiment.py --dataset movielens-100k --out runs/ml100k --profile full
    python jobs/experiment.py --config jobs/configs/experiment-movielens.yaml
    ray job submit --working-dir . -- python jobs/experiment.py --dataset synthetic --out /tmp/exp --profile quick

Parses the config (``--config FILE`` and/or flags), runs :func:`raybc.experiment.run_experiment`
(resumable: finished method/version pairs are not recomputed), prints where the report is, and
exits non-zero on failure (1) or a bad config (2).
"""

import sys

from raybc.cli import experiment_config, guarded, run_experiment_job

if __name__ == "__main__":
    sys.exit(guarded(lambda: run_experiment_job(experiment_config(sys.argv[1:], prog="jobs/experiment.py"))))
