"""The eight methods of the paper (DESIGN.md), as data: what each trains and what it publishes.

Every method publishes a backward map for every version, so backfill and evaluation treat them
alike: a learned B_k, or the fixed linear map the method implies (identity for fix-m0 and
finetune-m0, "first d_{k-1} dimensions" for no-bc and joint-notrans).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    model: Literal["scratch", "reuse_m0", "finetune_m0"]  # how M_k (k > 0) is obtained
    alignment: Literal["none", "prefix", "single", "multi"]  # alignment loss, if any
    joint: bool  # alignment trained together with M_k (else after it, with M_k frozen)
    backward: Literal["identity", "truncate", "learned"]  # the B_k it publishes
    fixed_dim: bool  # every version keeps version 0's dimension

    @property
    def trains_aligner_jointly(self) -> bool:
        return self.backward == "learned" and self.joint


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fix-m0", "M_0 trained once and reused on every later graph", "reuse_m0", "none", False, "identity", True),
        Method("finetune-m0", "M_0's architecture fine-tuned on each new slice", "finetune_m0", "none", False, "identity", True),
        Method("no-bc", "each M_k from scratch, no alignment (consumers get z_k truncated)", "scratch", "none", False, "truncate", False),
        Method("posthoc-lin-sloss", "no-bc models, then B_k alone with the single-step loss", "scratch", "single", False, "learned", False),
        Method("posthoc-lin-mloss", "no-bc models, then B_k alone with the multi-step loss", "scratch", "multi", False, "learned", False),
        Method("joint-notrans", "BCT: M_k with z_k[:, :d_{k-1}] pulled onto z_{k-1}", "scratch", "prefix", True, "truncate", False),
        Method("joint-lin-sloss", "M_k and B_k jointly, single-step loss", "scratch", "single", True, "learned", False),
        Method("bc-aligner", "M_k and B_k jointly, multi-step loss (the paper's method)", "scratch", "multi", True, "learned", False),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
