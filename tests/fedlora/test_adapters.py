"""Adapter construction and the wire state."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.adapters import get_state, lora_layers, lora_scaling, set_state, wire_name
from fedlora.build import build
from fedlora.errors import ConfigError, StateMismatchError
from fedlora.settings import with_


def test_state_round_trip_is_lossless(settings):
    model, _ = build(settings)
    rng = np.random.default_rng(0)
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32)
        for k, v in get_state(model).items()
    }
    set_state(model, state)
    back = get_state(model)
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_wire_state_holds_exactly_lora_factors_and_head(settings):
    model, _ = build(settings)
    state = get_state(model)
    layers = lora_layers(state)
    assert len(layers) == 2 * 2  # 2 layers x (query, value)
    head = {k for k in state if "classifier" in k}
    assert head == {
        "classifier.modules_to_save.weight",
        "classifier.modules_to_save.bias",
    }
    assert len(state) == 2 * len(layers) + len(head)
    a_key, b_key = next(iter(layers.values()))
    assert state[a_key].shape == (4, 32) and state[b_key].shape == (32, 4)
    assert not np.any(state[b_key])  # PEFT init: B = 0


def test_same_seed_builds_identical_models_and_other_seed_differs(settings):
    first = get_state(build(settings)[0])
    second = get_state(build(settings)[0])
    settings = with_(settings, "federation.seed", 1)
    third = get_state(build(settings)[0])
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    assert any(not np.array_equal(first[k], third[k]) for k in first if "lora_A" in k)


def test_set_state_rejects_missing_extra_and_misshaped_keys(settings):
    model, _ = build(settings)
    state = get_state(model)
    key = next(iter(state))
    with pytest.raises(StateMismatchError, match="missing"):
        set_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(StateMismatchError, match="unexpected"):
        set_state(model, {**state, "bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(StateMismatchError, match="expected shape"):
        set_state(model, {**state, key: np.zeros((1, 1), np.float32)})


def test_target_modules_matching_nothing_names_the_key(settings):
    settings = with_(settings, "adapter.target_modules", ["q_proj"])
    with pytest.raises(ConfigError, match="adapter.target_modules") as info:
        build(settings)
    assert "query" in str(info.value)  # lists the names the model does have


def test_scaling_follows_alpha_over_r_and_rslora(settings):
    plain = with_(settings, "adapter.r", 8, "adapter.alpha", 16).adapter
    assert lora_scaling(plain) == plain.scaling == 2.0
    rs = with_(
        settings, "adapter.r", 16, "adapter.alpha", 16, "adapter.use_rslora", True
    )
    assert lora_scaling(rs.adapter) == 4.0


def test_wire_name_strips_peft_prefix_and_adapter_name():
    name = (
        "base_model.model.bert.encoder.layer.0.attention.self.query"
        ".lora_A.default.weight"
    )
    assert wire_name(name) == "bert.encoder.layer.0.attention.self.query.lora_A.weight"
