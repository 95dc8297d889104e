"""LLM-scale options: ``model.dtype``, ``model.quantization`` (QLoRA, CUDA only) and
``train.gradient_checkpointing``; what can be checked on a CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fedlora.adapters import get_state, trainable_parameters
from fedlora.build import build
from fedlora.data import synthetic_table, tokenise
from fedlora.errors import ConfigError
from fedlora.models import quantization_config
from fedlora.preflight import preflight
from fedlora.settings import with_
from fedlora.train import collate, train_local
from strategies.server_app import compose
from tests.conftest import REPO
from tests.fedlora.test_train import llama

CPU = torch.device("cpu")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine")


def test_the_options_compose_and_validate():
    s = compose(
        [
            "model.dtype=bfloat16",
            "model.quantization=4bit",
            "train.gradient_checkpointing=true",
        ]
    )
    assert (s.model.dtype, s.model.quantization) == ("bfloat16", "4bit")
    assert s.train.gradient_checkpointing is True
    default = compose([])  # today's behaviour
    assert default.model.dtype is None and default.model.quantization is None
    assert default.train.gradient_checkpointing is False


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["model.dtype=float64"], "model.dtype", "bfloat16"),
        (["model.quantization=2bit"], "model.quantization", "4bit"),
        (
            ["train.gradient_checkpointing=sometimes"],
            "train.gradient_checkpointing",
            "",
        ),
        (
            ["model.quantization=4bit", "train.device=cpu"],
            "model.quantization",
            "train.device=auto",
        ),
        (
            ["privacy=dp_sgd", "train.gradient_checkpointing=true"],
            "train.gradient_checkpointing",
            "per-example",
        ),
        (["privacy=dp_sgd", "model.quantization=4bit"], "model.quantization", "Opacus"),
        (["privacy=dp_sgd", "model.dtype=bfloat16"], "model.dtype", "float32"),
        (["strategy=fedex_lora", "model.quantization=4bit"], "model.quantization", ""),
        (["strategy=flora", "model.quantization=8bit"], "model.quantization", ""),
        (["strategy=fedsb", "model.quantization=4bit"], "strategy.init", "random_orth"),
    ],
)
def test_bad_values_and_combinations_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert str(info.value).startswith(key + "="), str(info.value)
    assert words in str(info.value)


def test_fedsb_with_the_data_free_init_may_quantize():
    s = compose(
        ["strategy=fedsb", "strategy.init=random_orthogonal", "model.quantization=4bit"]
    )
    assert s.model.quantization == "4bit"


@no_cuda
def test_quantization_is_refused_at_start_up_without_cuda(settings):
    s = with_(settings, "model.quantization", "4bit", "train.device", "auto")
    with pytest.raises(ConfigError) as info:
        preflight(s, data=False)
    assert info.value.key == "model.quantization" and info.value.found == "4bit"
    assert "no CUDA device" in str(info.value)
    assert "model.quantization=null" in str(info.value)  # the fix
    with pytest.raises(ConfigError, match="no CUDA device"):
        build(s)  # a deployed server or client building the model: the same


@no_cuda
def test_the_front_door_refuses_quantization_without_cuda(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            f"hydra.run.dir={tmp_path}",
            "model.quantization=4bit",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "configuration error: model.quantization='4bit'" in proc.stderr
    assert "no CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quantization_without_bitsandbytes_names_the_extra(settings, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    model = with_(settings, "model.quantization", "8bit").model
    with pytest.raises(ConfigError) as info:
        quantization_config(model)
    assert info.value.key == "model.quantization"
    assert "bitsandbytes" in str(info.value) and "fedlora[gpu]" in str(info.value)


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_bfloat16_base_weights_with_float32_lora_factors(settings, tiny_llama, task):
    if task == "causal_lm":
        settings = llama(settings, tiny_llama)
    model, tok = build(with_(settings, "model.dtype", "bfloat16"))
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    base = {
        n: p
        for n, p in model.named_parameters()
        if ".lora_" not in n and "modules_to_save" not in n
    }
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert base and {p.dtype for p in base.values()} == {torch.bfloat16}
    state = get_state(model)  # what travels: float32, as with float32 weights
    assert {v.dtype for v in state.values()} == {np.dtype(np.float32)}
    ex = tokenise(synthetic_table(16, seed=1), tok, settings.data, task, 32)
    out = train_local(model, ex, settings.train, CPU, tok.pad_token_id, seed=0)
    assert np.isfinite(out["train_loss"])
    after = get_state(model)
    assert any(not np.array_equal(after[k], state[k]) for k in state)  # it trained
    plain, _ = build(settings)  # null: the checkpoint's dtype (float32 here)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}


def _gradients(settings, batch):
    """Loss and float64 gradients of the trainable parameters on ``batch``, with
    the number of times the first decoder layer's MLP began (forward + backward;
    a recomputation stops once it has what backward needs, before the end)."""
    model, _ = build(settings)
    with torch.no_grad():  # B = 0 at init would give A no gradient
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
                )
    calls = []
    mlp = model.get_base_model().model.layers[0].mlp
    hook = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    torch.manual_seed(3)  # the same LoRA dropout masks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_cache is switched off: expected
        loss = model(**batch).loss
        loss.backward()
    hook.remove()
    grads = {
        k: p.grad.to(torch.float64).numpy()
        for k, p in trainable_parameters(model).items()
    }
    return float(loss.detach()), grads, len(calls)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(settings, tiny_llama):
    s = llama(settings, tiny_llama, "adapter.dropout", 0.1)
    _, tok = build(s)
    ex = tokenise(synthetic_table(6, seed=5), tok, s.data, "causal_lm", 32)
    batch = collate(ex, tok.pad_token_id)
    loss, grads, calls = _gradients(s, batch)
    ck_loss, ck_grads, ck_calls = _gradients(
        with_(s, "train.gradient_checkpointing", True), batch
    )
    assert (calls, ck_calls) == (1, 2)  # recomputed in the backward pass
    assert ck_loss == pytest.approx(loss, rel=1e-6)
    assert set(ck_grads) == set(grads) and len(grads) == 8  # 2 layers x q, v x A, B
    for key, g in grads.items():
        assert np.abs(g).max() > 0, key
        np.testing.assert_allclose(ck_grads[key], g, rtol=1e-5, atol=1e-7)


def test_training_with_gradient_checkpointing_takes_the_same_steps(
    settings, tiny_llama
):
    s = llama(settings, tiny_llama, "train.local_steps", 3, "train.batch_size", 4)
    states = []
    for on in (False, True):
        model, tok = build(with_(s, "train.gradient_checkpointing", on))
        ex = tokenise(synthetic_table(24, seed=6), tok, s.data, "causal_lm", 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_local(model, ex, s.train, CPU, tok.pad_token_id, seed=0)
        states.append(get_state(model))
    for key, value in states[0].items():
        np.testing.assert_allclose(states[1][key], value, rtol=1e-4, atol=1e-6)


def test_opacus_gets_no_per_example_gradients_through_checkpointed_layers(
    settings, tiny_llama
):
    """Why DP-SGD refuses ``train.gradient_checkpointing`` (a newer Opacus that
    handles it fails this test: then lift the refusal)."""
    from opacus.grad_sample import GradSampleModule

    s = llama(settings, tiny_llama, "train.gradient_checkpointing", True)
    model, tok = build(s)
    ex = tokenise(synthetic_table(4, seed=5), tok, s.data, "causal_lm", 32)
    batch = collate(ex, tok.pad_token_id)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, force_functorch=False)
        wrapped(**batch).loss.backward()
    params = trainable_parameters(model).values()
    assert any(p.grad is not None for p in params)
    assert all(getattr(p, "grad_sample", None) is None for p in params)
    wrapped._close()


@no_cuda
def test_gpu_check_without_cuda_says_so_and_exits_3(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.gpu_check", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "nothing was run" in proc.stdout
    assert not out.exists()
