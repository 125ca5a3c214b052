"""Ray job: register a version trained elsewhere, with B_k given or fitted from the stored pairs.

    ray job submit --working-dir . -- python jobs/register.py --config jobs/configs/register-fit.yaml
    python jobs/register.py --root ./root --version 5 --embeddings items=s3://bucket/z5/items/ --fit-aligner linear

Parses the config (``--config FILE`` and/or flags), runs :func:`raybc.intake.register_version`
(validation, the id join, the copy and the fit run in Ray tasks), prints what it published, and
exits non-zero on failure (1) or on a bad config (2).
"""

import sys

from raybc.cli import guarded, register_config, run_register_job

if __name__ == "__main__":
    sys.exit(guarded(lambda: run_register_job(register_config(sys.argv[1:], prog="jobs/register.py"))))
