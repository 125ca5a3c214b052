"""What an experiment run produced: every (method, version) evaluation record and what the run did.

Its own module so that the runner (:mod:`raybc.experiment`), which fills it, and the report
(:mod:`raybc.report`), which formats it, both depend on this type and not on each other.
This module holds data only; it computes and formats nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExperimentResult:
    """Every (method, version) evaluation, and what the run did."""

    out: str
    dataset: str
    methods: list[str]
    versions: int
    records: dict[str, dict[int, dict[str, Any]]]  # method -> version -> eval record
    consumers: dict[str, dict[str, Any]]  # task -> consumer spec (or {"skipped": reason})
    trained: list[str] = field(default_factory=list)  # "method/v<k>" fitted in this run
    backfilled: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report_files: list[str] = field(default_factory=list)
    # several seeds: seed -> the ``records`` of that seed (``records`` is the first seed's)
    per_seed: dict[int, dict[str, dict[int, dict[str, Any]]]] = field(default_factory=dict)
    consumers_per_seed: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # root name -> {"method": the method it runs, "alignment_weight": its lambda}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def seeds(self) -> dict[int, dict[str, dict[int, dict[str, Any]]]]:
        """Every seed's records (one seed, ``records`` alone, when ``per_seed`` is empty)."""
        return self.per_seed or {0: self.records}


__all__ = ["ExperimentResult"]
