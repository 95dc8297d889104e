"""FFA-LoRA and LoRA-SB models: what is trained, what the forward computes, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.adapters import (
    get_frozen_state,
    get_state,
    lora_scaling,
    set_frozen_state,
    set_state,
)
from fedlora.build import build
from fedlora.data import client_examples
from fedlora.errors import ConfigError
from fedlora.lora_sb import gradient_sums, lora_layers_of, to_plain_lora
from fedlora.models import load_base_model
from fedlora.results import save_adapter
from fedlora.settings import with_
from fedlora.train import batches, train_local
from tests.conftest import FEDSB, FFA_LORA, assert_same_logits

CPU = torch.device("cpu")


def randomise(state, seed):
    rng = np.random.default_rng(seed)
    return {
        k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in state.items()
    }


def test_ffa_trains_and_sends_only_b_and_the_head(settings):
    settings = with_(settings, "strategy", {"_target_": FFA_LORA})
    model, tok = build(settings)
    state, frozen = get_state(model), get_frozen_state(model)
    assert all(".lora_B." in k or "classifier" in k for k in state)
    assert frozen and all(".lora_A." in k for k in frozen)
    examples, _ = client_examples(settings, tok, 0, 2)
    train_local(model, examples, settings.train, CPU, tok.pad_token_id, seed=0)
    after = get_frozen_state(model)
    assert all(np.array_equal(after[k], frozen[k]) for k in frozen)  # A never moves
    assert any(not np.array_equal(get_state(model)[k], state[k]) for k in state)


def sb_settings(settings, r=4):
    return with_(
        settings,
        "strategy",
        {"_target_": FEDSB, "init": "random_orthogonal"},
        "adapter.r",
        r,
        "adapter.alpha",
        r,
    )


def test_lora_sb_trains_only_r_and_the_head(settings):
    model, _ = build(sb_settings(settings))
    state = get_state(model)
    r_keys = [k for k in state if ".lora_R." in k]
    assert len(r_keys) == 4 and all(state[k].shape == (4, 4) for k in r_keys)
    assert all(".lora_R." in k or "classifier" in k for k in state)
    assert len(get_frozen_state(model)) == 8  # A and B of 4 layers


def test_lora_sb_forward_is_w0_plus_s_b_r_a(settings):
    settings = sb_settings(settings)
    model, _ = build(settings)
    set_frozen_state(model, randomise(get_frozen_state(model), 1))
    set_state(model, randomise(get_state(model), 2))
    name, layer = next(iter(lora_layers_of(model).items()))
    base = layer.get_base_layer()
    b = layer.lora_B["default"].weight
    r = layer.lora_R["default"].weight
    a = layer.lora_A["default"].weight
    x = torch.randn(5, base.in_features)
    expected = base(x) + lora_scaling(settings.adapter) * x @ (b @ r @ a).T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_gradient_sums_match_autograd_and_leave_trainability_alone(settings):
    settings = sb_settings(settings)
    model, tok = build(settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    examples, _ = client_examples(settings, tok, 0, 2)
    grads = gradient_sums(model, examples[:20], 8, tok.pad_token_id, CPU)
    # PEFT's disable_adapter() would re-enable A and B: must be undone
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    layer_name, layer = next(iter(lora_layers_of(model).items()))
    weight = layer.get_base_layer().weight
    weight.requires_grad_(True)
    model.eval()
    with model.disable_adapter():
        total = sum(
            model(**batch).loss * batch["input_ids"].shape[0]
            for batch in batches(examples[:20], 20, tok.pad_token_id)
        )
        (reference,) = torch.autograd.grad(total, weight)
    weight.requires_grad_(False)
    np.testing.assert_allclose(grads[layer_name], reference.numpy(), atol=1e-5)


def test_fedsb_export_loads_in_peft_with_the_same_logits(settings, tmp_path):
    from peft import PeftModel

    cfg = sb_settings(settings)
    model, tok = build(cfg)
    frozen = randomise(get_frozen_state(model), 3)
    trained = randomise(get_state(model), 4)
    set_frozen_state(model, frozen)
    set_state(model, trained)
    exported, _ = build(cfg, plain=True)
    save_adapter(exported, to_plain_lora(frozen, trained), tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        load_base_model(cfg.model, seed=99), str(tmp_path / "adapter")
    )
    assert_same_logits(model, loaded, cfg, tok)


def test_an_unknown_method_names_the_key(settings):
    settings = with_(settings, "strategy", {"_target_": "fedlora.methods.dora.DoRA"})
    with pytest.raises(ConfigError, match=r"strategy\._target_"):
        build(settings)


def test_lora_sb_rank_larger_than_the_layer_names_the_key(settings):
    settings = sb_settings(settings, r=40)  # hidden 32
    with pytest.raises(ConfigError, match="adapter.r"):
        build(settings)
