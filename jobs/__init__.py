raise ImportError(
    "jobs/ holds entry points, not a library: run them (`python jobs/backfill.py --help`, or through "
    "`ray job submit ... -- python jobs/backfill.py`) and import from `raybc` instead"
)
