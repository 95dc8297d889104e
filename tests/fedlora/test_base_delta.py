"""The summed base-weight folds (fedlora.base_delta), against dense float64 sums."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.base_delta import BaseDelta, FoldLog


def fold(rng, d_out=12, d_in=9, k=2, scale=1e-3):
    """A realistic fold: a rank-``k`` residual of LoRA-scale factors."""
    return (
        (rng.normal(size=(d_out, k)) * scale).astype(np.float32),
        (rng.normal(size=(k, d_in)) * 0.1).astype(np.float32),
    )


def dense(u, v):
    return u.astype(np.float64) @ v.astype(np.float64)


def test_summed_folds_equal_the_dense_sum_and_stay_factored_while_smaller():
    rng = np.random.default_rng(0)
    delta, expected = BaseDelta(), np.zeros((12, 9))
    for _ in range(2):  # rank 4 < 12 * 9 / 21: factored
        u, v = fold(rng)
        delta.add({"layer": (u, v)})
        expected += dense(u, v)
    assert delta.factors("layer")[0].shape == (12, 4)
    np.testing.assert_allclose(delta.matrix("layer"), expected, rtol=1e-12, atol=0)
    for _ in range(2):  # rank 8: (12 + 9) * 8 > 108: dense from now on
        u, v = fold(rng)
        delta.add({"layer": (u, v)})
        expected += dense(u, v)
    assert delta.factors("layer") is None
    np.testing.assert_allclose(delta.matrix("layer"), expected, rtol=1e-12, atol=0)
    delta.add({"layer": np.ones((12, 9))})  # a dense fold
    np.testing.assert_allclose(delta.matrix("layer"), expected + 1, rtol=1e-12)


def test_the_wire_form_round_trips():
    rng = np.random.default_rng(1)
    delta = BaseDelta()
    delta.add({"a": fold(rng), "b": np.full((3, 4), 0.5)})
    back = BaseDelta.from_state(delta.to_state())
    assert set(back) == {"a", "b"}
    for layer in ("a", "b"):
        np.testing.assert_array_equal(back.matrix(layer), delta.matrix(layer))
    with pytest.raises(ValueError, match="unexpected key"):
        BaseDelta.from_state({"a.lora_A.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="has no"):
        BaseDelta.from_state({"a.base_U": np.zeros((2, 1))})
    with pytest.raises(ValueError, match="U .d_out x k. and V"):
        delta.add({"a": (np.zeros((12, 2)), np.zeros((3, 9)))})


def test_a_node_gets_the_later_folds_or_the_whole_sum():
    rng = np.random.default_rng(2)
    log = FoldLog()
    folds = {r: {"layer": fold(rng, d_out=64, d_in=64, k=1)} for r in (1, 2, 3)}
    for r, f in folds.items():
        log.add(r, f)
    log.add(4, {})  # a round without a fold changes nothing
    assert log.latest == 3
    start, delta = log.since(1)  # holds round 1: gets 2 and 3
    assert start == 1
    want = dense(*folds[2]["layer"]) + dense(*folds[3]["layer"])
    np.testing.assert_allclose(delta.matrix("layer"), want, rtol=1e-12)
    start, delta = log.since(None)  # knows nothing: the whole sum
    assert start == 0
    np.testing.assert_allclose(
        delta.matrix("layer"), want + dense(*folds[1]["layer"]), rtol=1e-12
    )
    start, delta = log.since(3)  # up to date: nothing
    assert start == 3 and not delta
    # after a restart from a checkpoint every node starts from the whole sum
    log.restart(log.total.copy(), 3)
    assert log.since(None)[0] == 0 and not log.since(3)[1]


def test_the_norm_of_the_summed_folds_is_the_dense_one():
    rng = np.random.default_rng(3)
    delta = BaseDelta()
    delta.add({"a": fold(rng), "b": fold(rng, d_out=4, d_in=3, k=3)})  # b dense
    delta.add({"a": fold(rng)})
    want = np.sqrt(sum(np.sum(delta.matrix(k) ** 2) for k in delta))
    assert delta.factors("a") is not None and delta.factors("b") is None
    assert delta.norm() == pytest.approx(want, rel=1e-12)
    assert BaseDelta().norm() == 0.0
