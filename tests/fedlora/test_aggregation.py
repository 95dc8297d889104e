"""FedAvg-LoRA aggregation and the aggregation-error diagnostic (float64 checks)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import client_weights
from fedlora.diagnostics import (
    aggregation_error,
    frozen_triangles,
    layer_factors,
    shared_factor_error,
    sum_of_products_sqnorm,
)
from fedlora.errors import ConfigError
from fedlora.methods.fedavg_lora import FedAvgLoRA

LAYERS = ("enc.0.attn.query", "enc.0.attn.value", "enc.1.attn.query")


def random_state(rng, d_out=12, d_in=10, r=3, shared_a=None):
    state = {}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = (
            rng.standard_normal((r, d_in)) if shared_a is None else shared_a[layer]
        )
        state[f"{layer}.lora_B.weight"] = rng.standard_normal((d_out, r))
    state["classifier.weight"] = rng.standard_normal((2, d_in))
    return state


def test_weights_are_proportional_to_examples_or_uniform():
    np.testing.assert_allclose(client_weights([10, 30], "num_examples"), [0.25, 0.75])
    np.testing.assert_allclose(client_weights([10, 30], "uniform"), [0.5, 0.5])
    with pytest.raises(ConfigError, match="strategy.weighting"):
        client_weights([1], "median")


def test_fedavg_lora_equals_float64_numpy_reference():
    rng = np.random.default_rng(0)
    states = [random_state(rng) for _ in range(4)]
    counts = [5, 1, 7, 3]
    out = FedAvgLoRA().aggregate(
        states, client_weights(counts, "num_examples"), states[0]
    )
    for key in states[0]:
        stacked = np.stack([s[key] for s in states])
        reference = np.average(stacked, axis=0, weights=counts)
        np.testing.assert_allclose(out[key], reference, rtol=0, atol=1e-12)


def test_fedavg_lora_keeps_float32_without_upcasting():
    rng = np.random.default_rng(1)
    states = [
        {k: v.astype(np.float32) for k, v in random_state(rng).items()}
        for _ in range(2)
    ]
    out = FedAvgLoRA().aggregate(states, np.array([0.5, 0.5]), states[0])
    assert all(v.dtype == np.float32 for v in out.values())


def test_factored_norm_equals_dense_norm():
    rng = np.random.default_rng(2)
    terms = [
        (c, rng.standard_normal((9, 2)), rng.standard_normal((2, 7)))
        for c in (0.3, -1.2, 2.0)
    ]
    dense = sum(c * b @ a for c, b, a in terms)
    assert sum_of_products_sqnorm(terms) == pytest.approx(np.sum(dense**2), rel=1e-12)


def test_aggregation_identity_holds():
    # ideal - Bbar Abar = sum p_k (B_k - Bbar)(A_k - Abar), with Bbar, Abar what
    # the project's FedAvg-LoRA aggregation produced and p_k = n_k / sum n
    rng = np.random.default_rng(3)
    counts = [2, 3, 5]
    p = np.asarray(counts, np.float64) / sum(counts)  # the dense formula's weights
    states = [random_state(rng) for _ in counts]  # float64
    old = random_state(rng)
    new = FedAvgLoRA().aggregate(
        states, client_weights(counts, "num_examples"), states[0]
    )
    scaling = 2.0
    overall, _ = aggregation_error(
        [layer_factors(s) for s in states],
        client_weights(counts, "num_examples"),
        layer_factors(old),
        layer_factors(new),
        scaling,
    )
    num = den = 0.0
    for layer in LAYERS:
        a_key, b_key = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        bbar, abar = new[b_key], new[a_key]
        ideal = sum(w * s[b_key] @ s[a_key] for w, s in zip(p, states, strict=True))
        cross = sum(
            w * (s[b_key] - bbar) @ (s[a_key] - abar)
            for w, s in zip(p, states, strict=True)
        )
        gap = ideal - bbar @ abar
        np.testing.assert_allclose(gap, cross, rtol=0, atol=1e-12)
        rank = np.linalg.matrix_rank(cross)
        assert 0 < rank <= (len(counts) - 1) * abar.shape[0]  # at most (K-1) r
        num += np.sum((scaling * gap) ** 2)
        den += np.sum((scaling * (ideal - old[b_key] @ old[a_key])) ** 2)
    # the reported aggregation error is exactly this gap, relative to the update
    assert overall == pytest.approx(np.sqrt(num / den), rel=1e-9)


def _error(states, old, weights, scaling=2.0):
    new = FedAvgLoRA().aggregate(states, weights, states[0])
    return aggregation_error(
        [layer_factors(s) for s in states],
        weights,
        layer_factors(old),
        layer_factors(new),
        scaling,
    )


def test_aggregation_error_is_zero_when_clients_share_a():
    rng = np.random.default_rng(4)
    shared = {layer: rng.standard_normal((3, 10)) for layer in LAYERS}
    old = random_state(rng, shared_a=shared)
    states = [random_state(rng, shared_a=shared) for _ in range(3)]
    overall, by_module = _error(states, old, client_weights([1, 2, 3], "num_examples"))
    assert overall < 1e-12
    assert set(by_module) == {"query", "value"}
    assert max(by_module.values()) < 1e-12


def test_aggregation_error_is_positive_and_matches_dense_definition():
    rng = np.random.default_rng(5)
    old = random_state(rng)
    states = [random_state(rng) for _ in range(3)]
    p = client_weights([1, 2, 3], "num_examples")
    overall, by_module = _error(states, old, p, scaling=2.0)
    new = FedAvgLoRA().aggregate(states, p, states[0])

    def delta(s, layer):
        return 2.0 * s[f"{layer}.lora_B.weight"] @ s[f"{layer}.lora_A.weight"]

    num = den = 0.0
    for layer in LAYERS:
        ideal = sum(w * delta(s, layer) for w, s in zip(p, states, strict=False))
        num += np.sum((ideal - delta(new, layer)) ** 2)
        den += np.sum((ideal - delta(old, layer)) ** 2)
    assert overall > 0.01
    assert overall == pytest.approx(np.sqrt(num / den), rel=1e-9)
    assert by_module["value"] > 0


@pytest.mark.parametrize("fedsb", [False, True])
def test_shared_factor_error_equals_the_general_diagnostic(fedsb):
    # FFA: delta = B A (A frozen); Fed-SB: delta = B R A (B, A frozen)
    rng = np.random.default_rng(6)
    d_out, d_in, r = 12, 10, 3
    # modules of unequal layer counts, interleaved: each module's own error
    layers = (*LAYERS, "enc.2.attn.query")
    a = {layer: rng.standard_normal((r, d_in)) for layer in layers}
    b = {layer: rng.standard_normal((d_out, r)) for layer in layers}
    shape = (r, r) if fedsb else (d_out, r)
    p = client_weights([1, 2, 3], "num_examples")
    clients = [{ly: rng.standard_normal(shape) for ly in layers} for _ in p]
    old = {ly: rng.standard_normal(shape) for ly in layers}
    new = {ly: rng.standard_normal(shape) for ly in layers}  # not the mean: error > 0

    def factors(x):
        return {ly: ((b[ly] @ x[ly]) if fedsb else x[ly], a[ly]) for ly in layers}

    general = aggregation_error(
        [factors(c) for c in clients], p, factors(old), factors(new), 2.0
    )
    frozen = {f"{ly}.A": a[ly] for ly in layers} | {f"{ly}.B": b[ly] for ly in layers}
    triangles = frozen_triangles(
        frozen, {ly: (f"{ly}.B" if fedsb else None, f"{ly}.A") for ly in layers}
    )
    shared = shared_factor_error(clients, p, old, new, triangles)
    assert shared[0] > 0.1
    assert shared[0] == pytest.approx(general[0], rel=1e-9)
    assert shared[1] == pytest.approx(general[1], rel=1e-9)
    mean = {
        ly: sum(w * c[ly] for w, c in zip(p, clients, strict=True)) for ly in layers
    }
    assert shared_factor_error(clients, p, old, mean, triangles)[0] < 1e-12


def test_weighted_average_of_many_small_arrays_is_bit_for_bit_the_per_array_sum():
    """Small arrays are averaged stacked by shape and dtype (Fed-SB's hundreds of
    r x r matrices): the same bits as ``sum_k p_k x_k`` array by array in the
    inputs' dtype, close to a float64 reference, keys in their order, large
    arrays and mixed shapes and dtypes included, at LoRA's scale (1e-3)."""
    from fedlora.aggregation import SMALL_ENTRIES, weighted_average

    rng = np.random.default_rng(11)
    shapes = [(16, 16), (8, 4), (16, 16), (SMALL_ENTRIES + 1,), (2, 3), (16, 16)]
    dtypes = [np.float32, np.float32, np.float32, np.float32, np.float64, np.float32]
    keys = [f"layers.{i}.lora_R.weight" for i in range(len(shapes))]
    states = [
        {
            k: (rng.standard_normal(s) * 1e-3).astype(d)
            for k, s, d in zip(keys, shapes, dtypes, strict=True)
        }
        for _ in range(5)
    ]
    p = client_weights([30, 10, 25, 5, 17], "num_examples")
    out = weighted_average(states, p)
    assert list(out) == keys
    for k in keys:
        one_by_one = np.zeros_like(states[0][k])
        for state, pk in zip(states, p, strict=True):
            one_by_one += state[k] * one_by_one.dtype.type(pk)
        assert out[k].dtype == states[0][k].dtype and out[k].shape == one_by_one.shape
        assert np.array_equal(out[k], one_by_one)  # bit for bit
        ref = sum(pk * s[k].astype(np.float64) for s, pk in zip(states, p, strict=True))
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-9)
