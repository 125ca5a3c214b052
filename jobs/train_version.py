"""Ray job: fit one version of an embedding model (+ its backward transform), publish it, write z_k.

    ray job submit --working-dir . -- python jobs/train_version.py --config jobs/configs/train-movielens.yaml
    python jobs/train_version.py --root ./ml-root --dataset movielens-100k --method bc-aligner
    python jobs/train_version.py --help     # lists the methods

Parses the config (``--config FILE`` and/or flags), runs :func:`raybc.train.fit.fit_version` with
Ray Train, prints the version's metrics, and exits non-zero on failure (1) or a bad config (2).
"""

import sys

from raybc.cli import guarded, run_train_job, train_config

if __name__ == "__main__":
    sys.exit(guarded(lambda: run_train_job(train_config(sys.argv[1:], prog="jobs/train_version.py"))))
