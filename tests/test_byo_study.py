"""The bring-your-own-model study (raybc.study, jobs/byo_study.py): a quick profile on the real MovieLens-100K.

Two versions trained independently without BC (no-bc, tiny dims, few epochs), registered through
the real register path with B_1 fitted post hoc, backfilled, and scored by consumers trained on v0.
The post-hoc linear B at 100% of the pairs must clearly beat both trivial answers -- z_1 truncated
to d_0 and an untrained Gaussian B -- on consumer ROC-AUC and on the alignment error; 1% of the
pairs (fewer than B's unknowns) must come back as a refusal with register's message.
"""

from __future__ import annotations

import math

import pytest

from raybc.consumers import ConsumerOptions
from raybc.study import StudyOptions, Variant, fit_rows_for, markdown_table, refusals, run_study, summarise

# Margins that exclude the trivial answers. Truncation and an untrained B leave z_1 in an unrelated
# space: their relative error is about 1 or more, and consumers lose 15-30% ROC-AUC (docs/results.md:
# no-bc -25.5%); a fitted linear map between two same-architecture models has an error of a few
# tenths and costs consumers a few % (docs/byo.md). The thresholds sit between the two.
MIN_AUC_GAIN_PCT = 8.0  # percentage points of ROC-AUC relative to fix-m0, over each trivial answer
MAX_LINEAR_ERROR = 0.6
MIN_TRIVIAL_ERROR = 0.9


def test_fit_rows_for_is_a_share_of_all_shared_ids():
    assert fit_rows_for(1.0, 2101) is None  # every pair
    assert fit_rows_for(0.1, 2101) == 210 and fit_rows_for(0.01, 2101) == 21 and fit_rows_for(1e-6, 10) == 1


def test_options_refuse_what_the_study_sets():
    with pytest.raises(ValueError, match="set by the study"):
        Variant(label="x", kind="linear", fit={"fit_rows": 5})
    with pytest.raises(ValueError, match="exactly two"):
        StudyOptions(dims=[8, 16, 24])
    with pytest.raises(ValueError, match="fractions"):
        StudyOptions(fractions=[0.0])


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_quick_study_on_movielens(ray_session, tmp_path):
    options = StudyOptions(
        out=str(tmp_path / "byo"), seeds=[0], dims=[16, 64], fractions=[0.01, 1.0], variants=[Variant(label="linear", kind="linear")],
        joint=False, profile="quick", train={"epochs": 40, "eval_every": 10},
        # one consumer per task and seed: the quick profile's 60-step hidden-16 consumers sit too close to chance to tell maps apart
        consumer=ConsumerOptions(hidden=[32], dropout=[0.0], seeds=[0, 1], epochs=200),
    )  # fmt: skip
    result = run_study(options, echo=print)
    rows = {(r["label"], r["fraction"]): r for r in result["rows"]}
    linear, trunc, rand = rows[("linear", 1.0)], rows[("truncation (no-bc)", None)], rows[("random B", None)]
    assert rows[("fix-m0 (reference)", None)]["unintended_rel_pct"] == 0.0
    assert linear["status"] == "ok" and linear["fit_rows"] is None
    assert linear["pairs_train"] + linear["pairs_holdout"] == linear["shared"]  # 100%: every shared id sampled

    # consumers: the fitted B keeps them far closer to fix-m0 than either trivial map
    for trivial in (trunc, rand):
        assert linear["unintended_rel_pct"] > trivial["unintended_rel_pct"] + MIN_AUC_GAIN_PCT, (linear, trivial)
    # alignment: on the fixed held-out ids (never fitted on) and as the manifest records it
    assert linear["heldout_err"] < MAX_LINEAR_ERROR and linear["manifest_err"] < MAX_LINEAR_ERROR
    assert min(trunc["heldout_err"], rand["heldout_err"]) > MIN_TRIVIAL_ERROR
    # at 100% register's held-out ids are exactly the study's fixed ones: two implementations, one number
    assert math.isclose(linear["heldout_err"], linear["manifest_err"], rel_tol=1e-3)

    # 1% of the pairs (about 50 sampled, fit_rows per entity or in total) is fewer than d_1 = 64 unknowns per
    # output: refused, and the refusal is the result
    refused = rows[("linear", 0.01)]
    assert refused["status"] == "refused" and refused["fit_rows"] == fit_rows_for(0.01, linear["shared"])
    assert "needs at least 64" in refused["message"] and "Nothing was published" not in refused["message"]
    table = markdown_table(summarise(result["rows"]))
    assert "**refused**" in table and "needs at least 64" in refusals(summarise(result["rows"]))
