"""Backward transforms: fusion parity against step-by-step float64, fan-out plans, serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from raybc.errors import IntegrityError
from raybc.transforms import (
    Affine,
    FanOutPlan,
    Linear,
    ResidualMLP,
    Scratch,
    apply_steps,
    chain_steps,
    compose_steps,
    from_bytes,
    from_matrix,
    to_bytes,
    truncation,
)

# float32 application of a float64-fused map against the float64 step-by-step reference
REL_TOL = 1e-5


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def random_chain(dims: list[int], *, nonlinear_at: set[int] = frozenset(), affine_at: set[int] = frozenset(), seed=0):
    """{v: B_v} for v = len(dims)-1 .. 1 with B_v: dims[v] -> dims[v-1]."""
    rng = np.random.default_rng(seed)
    steps = {}
    for v in range(len(dims) - 1, 0, -1):
        din, dout = dims[v], dims[v - 1]
        if v in nonlinear_at:
            steps[v] = ResidualMLP.random(din, dout, hidden=16, seed=seed + v)
        elif v in affine_at:
            steps[v] = Affine(rng.standard_normal((dout, din)) / np.sqrt(din), rng.standard_normal(dout) * 0.1)
        else:
            steps[v] = Linear((rng.standard_normal((dout, din)) / np.sqrt(din)).astype(np.float32))
    return steps


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["linear", "nonlinear-middle", "affine-mixed"])
def test_fused_matches_step_by_step(length, kind):
    dims = [24 + 8 * i for i in range(length + 1)]  # differing dimensions, growing per version
    k = length
    nonlinear = {k // 2 + 1} if kind == "nonlinear-middle" and length >= 1 else set()
    affine = set(range(1, k + 1, 2)) if kind == "affine-mixed" else set()
    steps = random_chain(dims, nonlinear_at=nonlinear, affine_at=affine, seed=length)
    z = np.random.default_rng(7).standard_normal((500, dims[k])).astype(np.float32)
    plan = FanOutPlan(k, list(range(k)), steps)
    out = plan.apply(z)
    for j in range(k):
        ref = apply_steps(chain_steps(steps, k, j), z)
        assert out[j].dtype == np.float32 and out[j].shape == (500, dims[j])
        assert rel_err(out[j], ref) < REL_TOL, (kind, length, j)


@pytest.mark.parametrize("kind", ["linear", "nonlinear-middle", "affine-mixed"])
def test_scratch_buffers_give_the_same_results_batch_after_batch(kind):
    dims = [24, 32, 40, 48]
    steps = random_chain(dims, nonlinear_at={2} if kind == "nonlinear-middle" else set(), affine_at={1, 3} if kind == "affine-mixed" else set())
    for targets in ([2], [0, 1, 2]):
        plan = FanOutPlan(3, targets, steps)
        scratch = Scratch()
        rng = np.random.default_rng(3)
        held = []
        for n in (300, 300, 120, 500):  # same size (reuse), smaller (a view), larger (regrown)
            z = rng.standard_normal((n, 48)).astype(np.float32)
            got, ref = plan.apply(z, scratch=scratch), plan.apply(z)
            for j in targets:
                assert got[j].flags.c_contiguous and got[j].shape == ref[j].shape
                np.testing.assert_array_equal(got[j], ref[j])
            held.append((got, ref))
        # the contract of a scratch: results are overwritten by the next call (write them first)
        first_got, first_ref = held[0]
        assert not np.array_equal(first_got[targets[0]], first_ref[targets[0]])


def test_all_linear_chain_is_one_matmul_for_every_target():
    steps = random_chain([16, 24, 32, 48, 64, 80])
    plan = FanOutPlan(5, [0, 1, 2, 3, 4], steps)
    assert plan.matmul_count == 1
    fused = compose_steps(chain_steps(steps, 5, 0))
    assert len(fused) == 1 and fused[0].weight.shape == (16, 80)


def test_nonlinear_step_splits_the_plan_into_two_bases():
    steps = random_chain([16, 24, 32, 48, 64], nonlinear_at={2})
    plan = FanOutPlan(4, [0, 1, 2, 3], steps)
    assert plan.matmul_count == 2
    assert len(compose_steps(chain_steps(steps, 4, 0))) == 3  # fused, MLP, fused


def test_subset_of_targets_and_out_dims():
    steps = random_chain([16, 24, 32, 48])
    plan = FanOutPlan(3, [0, 2], steps)
    assert plan.out_dims == {0: 16, 2: 32}
    z = np.ones((3, 48), np.float32)
    assert set(plan.apply(z)) == {0, 2}


def test_plan_refuses_bad_targets_and_missing_steps():
    steps = random_chain([16, 24, 32])
    with pytest.raises(ValueError, match="targets must lie in"):
        FanOutPlan(2, [2], steps)
    with pytest.raises(ValueError, match="no backward transform"):
        FanOutPlan(2, [0], {2: steps[2]})
    with pytest.raises(ValueError, match=r"expected a \(n, 32\) batch"):
        FanOutPlan(2, [0], steps).apply(np.zeros((2, 31), np.float32))


def test_dimension_mismatch_in_chain_is_refused():
    steps = {2: Linear(np.zeros((20, 32))), 1: Linear(np.zeros((16, 24)))}
    with pytest.raises(ValueError, match="B_1 expects 24-d input"):
        FanOutPlan(2, [0], steps)


@pytest.mark.parametrize(
    "t",
    [
        Linear(np.arange(12, dtype=np.float32).reshape(3, 4)),
        Affine(np.ones((3, 4), np.float32), np.arange(3, dtype=np.float32)),
        ResidualMLP.random(6, 4, hidden=5, seed=1),
    ],
    ids=["linear", "affine", "residual_mlp"],
)
def test_safetensors_round_trip_keeps_spec_and_values(t):
    back = from_bytes(to_bytes(t), source="t.safetensors")
    assert back.spec() == t.spec()
    x = np.random.default_rng(0).standard_normal((5, t.in_dim)).astype(np.float32)
    np.testing.assert_allclose(back.apply(x), t.apply(x), rtol=1e-6, atol=1e-6)


def test_garbage_and_truncated_files_are_refused():
    with pytest.raises(IntegrityError, match="b.safetensors is not a readable safetensors file"):
        from_bytes(b"not a safetensors file at all", source="b.safetensors")
    good = to_bytes(Linear(np.ones((3, 4), np.float32)))
    with pytest.raises(IntegrityError, match="trunc.safetensors"):
        from_bytes(good[: len(good) - 7], source="trunc.safetensors")


def test_nan_weights_are_refused():
    bad = to_bytes(Linear(np.array([[np.nan, 1.0]], np.float32)))
    with pytest.raises(IntegrityError, match="NaN or Inf"):
        from_bytes(bad, source="nan.safetensors")


def test_user_matrix_in_either_layout():
    m = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)  # (in, out)
    a = from_matrix(m, in_dim=8, out_dim=5, source="b.npy")
    b = from_matrix(m.T, in_dim=8, out_dim=5, source="b.npy")
    np.testing.assert_array_equal(a.weight, b.weight)
    with pytest.raises(IntegrityError, match=r"b.npy: B has shape \(8, 5\).*needs \(6, 8\) or \(8, 6\)"):
        from_matrix(m, in_dim=8, out_dim=6, source="b.npy")


def test_truncation_keeps_the_first_dims():
    z = np.arange(10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(truncation(5, 3).apply(z), z[:, :3])
    with pytest.raises(ValueError, match="cannot truncate"):
        truncation(3, 5)
