"""The identities of algorithms.md for FFA-LoRA, Fed-SB and LoRA-FAIR (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import client_weights, fedavg_lora, fedsb, ffa_lora, lora_fair
from fedlora.fair import gd_correction, ridge_correction
from fedlora.lora_sb import init_from_gradient, init_random_orthogonal, to_plain_lora

D_OUT, D_IN, R, K = 20, 14, 3, 4
LAYERS = ("l0.query", "l0.value", "l1.query")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def p():
    return client_weights([3, 1, 4, 2], "num_examples")


def effective(state, layer, frozen=None):
    """s B A (s = 1) of one layer; B R A for LoRA-SB."""
    s = {**(frozen or {}), **state}
    b, a = s[f"{layer}.lora_B.weight"], s[f"{layer}.lora_A.weight"]
    r = s.get(f"{layer}.lora_R.weight")
    return b @ (r if r is not None else np.eye(b.shape[1])) @ a


def max_gap(states, new, p, frozen=None):
    """max |sum p_k E_k - E_new| over all layers."""
    return max(
        np.abs(
            sum(
                w * effective(s, layer, frozen) for w, s in zip(p, states, strict=False)
            )
            - effective(new, layer, frozen)
        ).max()
        for layer in LAYERS
    )


def test_ffa_aggregate_equals_average_of_effective_weights(rng, p):
    frozen = {
        f"{layer}.lora_A.weight": rng.standard_normal((R, D_IN)) for layer in LAYERS
    }
    states = [
        {f"{layer}.lora_B.weight": rng.standard_normal((D_OUT, R)) for layer in LAYERS}
        for _ in range(K)
    ]
    assert max_gap(states, ffa_lora(states, p), p, frozen) < 1e-10


def test_fedsb_aggregate_equals_average_of_effective_weights(rng, p):
    frozen = {}
    for layer in LAYERS:
        frozen[f"{layer}.lora_B.weight"] = rng.standard_normal((D_OUT, R))
        frozen[f"{layer}.lora_A.weight"] = rng.standard_normal((R, D_IN))
    states = [
        {f"{layer}.lora_R.weight": rng.standard_normal((R, R)) for layer in LAYERS}
        for _ in range(K)
    ]
    assert max_gap(states, fedsb(states, p), p, frozen) < 1e-10


def test_fedavg_lora_aggregate_does_not(rng, p):
    states = [
        {
            **{
                f"{layer}.lora_B.weight": rng.standard_normal((D_OUT, R))
                for layer in LAYERS
            },
            **{
                f"{layer}.lora_A.weight": rng.standard_normal((R, D_IN))
                for layer in LAYERS
            },
        }
        for _ in range(K)
    ]
    assert max_gap(states, fedavg_lora(states, p), p) > 0.1


def fair_problem(rng, k=K):
    bs = [rng.standard_normal((D_OUT, R)) for _ in range(k)]
    as_ = [rng.standard_normal((R, D_IN)) for _ in range(k)]
    return bs, as_


def cos(x, y):
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("solver", ["gd", "ridge"])
def test_lora_fair_cosine_between_plain_average_and_projection_bound(seed, solver, p):
    bs, as_ = fair_problem(np.random.default_rng(seed))
    ideal = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=False))
    abar, bbar = (
        sum(w * a for w, a in zip(p, as_, strict=False)),
        sum(w * b for w, b in zip(p, bs, strict=False)),
    )
    db = (gd_correction if solver == "gd" else ridge_correction)(bs, as_, p, 0.01)
    bound = cos(ideal, ideal @ np.linalg.pinv(abar) @ abar)
    corrected, plain = cos(ideal, (bbar + db) @ abar), cos(ideal, bbar @ abar)
    assert corrected <= bound + 1e-12
    assert corrected >= plain - 1e-12
    assert corrected > plain + 1e-3  # and it does correct something


@pytest.mark.parametrize("solver", ["gd", "ridge"])
def test_lora_fair_larger_lambda_gives_smaller_correction(solver, rng, p):
    bs, as_ = fair_problem(rng)
    solve = gd_correction if solver == "gd" else ridge_correction
    norms = [np.linalg.norm(solve(bs, as_, p, lam)) for lam in (0.001, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def test_ridge_solver_matches_a_dense_numpy_solve(rng, p):
    bs, as_ = fair_problem(rng)
    lam = 0.05
    ideal = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=False))
    abar, bbar = (
        sum(w * a for w, a in zip(p, as_, strict=False)),
        sum(w * b for w, b in zip(p, bs, strict=False)),
    )
    # normal equations of min ||ideal - (Bbar + dB) Abar||^2 + lam ||dB||^2
    lhs = abar @ abar.T + lam * np.eye(R)
    reference = np.linalg.solve(lhs, ((ideal - bbar @ abar) @ abar.T).T).T
    np.testing.assert_allclose(ridge_correction(bs, as_, p, lam), reference, atol=1e-10)


def test_lora_fair_aggregation_corrects_b_and_averages_a(rng, p):
    states = [
        {"x.lora_A.weight": a, "x.lora_B.weight": b, "head": rng.standard_normal(2)}
        for b, a in zip(*fair_problem(rng), strict=False)
    ]
    out = lora_fair(states, p, 0.01, "ridge")
    avg = fedavg_lora(states, p)
    np.testing.assert_allclose(out["x.lora_A.weight"], avg["x.lora_A.weight"])
    np.testing.assert_allclose(out["head"], avg["head"])
    assert not np.allclose(out["x.lora_B.weight"], avg["x.lora_B.weight"])


def test_lora_sb_init_is_the_truncated_sign_update(rng):
    grad = rng.standard_normal((D_OUT, D_IN))
    b, r0, a = init_from_gradient(grad, R, eta=1e-3)
    np.testing.assert_allclose(b.T @ b, np.eye(R), atol=1e-5)  # orthonormal columns
    np.testing.assert_allclose(a @ a.T, np.eye(R), atol=1e-5)  # orthonormal rows
    u, s, vt = np.linalg.svd(-1e-3 * np.sign(grad))
    truncated = u[:, :R] * s[:R] @ vt[:R]
    np.testing.assert_allclose(b @ r0 @ a, truncated, atol=1e-6)
    assert np.all(np.diag(r0) > 0) and np.count_nonzero(r0 - np.diag(np.diag(r0))) == 0


def test_random_orthogonal_init_starts_at_w0(rng):
    b, r0, a = init_random_orthogonal(D_OUT, D_IN, R, rng)
    np.testing.assert_allclose(b.T @ b, np.eye(R), atol=1e-5)
    assert not np.any(r0) and a.shape == (R, D_IN)


def test_plain_lora_export_reproduces_b_r_a(rng):
    frozen = {
        "x.lora_B.weight": rng.standard_normal((D_OUT, R)),
        "x.lora_A.weight": rng.standard_normal((R, D_IN)),
    }
    trained = {"x.lora_R.weight": rng.standard_normal((R, R)), "head": np.ones(2)}
    plain = to_plain_lora(frozen, trained)
    assert set(plain) == {"x.lora_B.weight", "x.lora_A.weight", "head"}
    np.testing.assert_allclose(
        plain["x.lora_B.weight"] @ plain["x.lora_A.weight"],
        frozen["x.lora_B.weight"]
        @ trained["x.lora_R.weight"]
        @ frozen["x.lora_A.weight"],
        rtol=1e-5,
    )
