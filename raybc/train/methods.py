"""The methods, as data: the paper's eight and raybc's own, what each trains and what it publishes.

Every method publishes a backward map for every version, so backfill and evaluation treat them
alike: a learned B_k, or the fixed linear map the method implies (identity for fix-m0 and
finetune-m0, "first d_{k-1} dimensions" for no-bc and joint-notrans).

``bc-aligner-warm`` is raybc's (not the paper's): bc-aligner whose M_k starts from M_{k-1} widened
with near-zero new dimensions (:mod:`raybc.models.widen`) and whose B_k starts at [I 0], so
training starts at the zero-alignment-loss solution instead of a random space; after training,
B_k is refitted in closed form (least squares over every node of the graph, which also minimises
the multi-step loss: see :func:`raybc.train.fit.least_squares_aligner`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    model: Literal["scratch", "reuse_m0", "finetune_m0", "warm_start"]  # how M_k (k > 0) is obtained
    alignment: Literal["none", "prefix", "single", "multi"]  # alignment loss, if any
    joint: bool  # alignment trained together with M_k (else after it, with M_k frozen)
    backward: Literal["identity", "truncate", "learned"]  # the B_k it publishes
    fixed_dim: bool  # every version keeps version 0's dimension
    aligner_init: Literal["random", "truncation"] = "random"  # B_k's start: nn.Linear's init, or [I 0]
    refit_aligner: bool = False  # after training, B_k := least squares of z_{k-1} on z_k over the graph
    paper: bool = True  # one of the paper's eight

    @property
    def trains_aligner_jointly(self) -> bool:
        return self.backward == "learned" and self.joint

    @property
    def aligns_jointly(self) -> bool:
        """M_k is trained with an alignment loss (the joint methods; they trade recall for it)."""
        return self.joint and self.alignment != "none"


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
        Method(
            "bc-aligner-warm", "raybc's: bc-aligner from M_{k-1} widened (B_k = [I 0] at the start), B_k refitted by least squares",
            "warm_start", "multi", True, "learned", False, aligner_init="truncation", refit_aligner=True, paper=False,
        ),  # fmt: skip
    ]
}
# The paper's eight, in its order (reports and the default experiment list).
PAPER_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.paper)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
