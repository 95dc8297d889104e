"""End to end, FedEx-LoRA through the front door: exact rounds, the residual in the
measured traffic, the exports (the exact merged delta and a truncated PEFT adapter),
and a resumed run that ends as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from fedlora import checkpoint
from fedlora.base_delta import BaseDelta
from fedlora.data import server_examples
from fedlora.methods.merged_export import MERGED_FILE
from fedlora.models import load_base_model, load_tokenizer
from fedlora.settings import Settings
from fedlora.train import evaluate
from tests.conftest import run_front_door

pytestmark = pytest.mark.slow

FEDEX = ("strategy=fedex_lora",)
ADAPTER = "adapter/adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_factors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (B, A)}`` of a saved PEFT adapter, keyed as the merged delta is
    (``<layer>.weight``)."""
    saved = load_file(str(folder / ADAPTER))
    out = {}
    for key, a in saved.items():
        if key.endswith(".lora_A.weight"):
            layer = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            b = saved[key.replace(".lora_A.", ".lora_B.")]
            out[f"{layer}.weight"] = (b.astype(np.float64), a.astype(np.float64))
    return out


def exact_delta(run: Path) -> dict[str, np.ndarray]:
    """From the last checkpoint: the summed folds plus ``s B A`` of the global
    adapter, per layer, float64."""
    ckpt = checkpoint.load_latest(run)
    scaling = cfg(run).adapter.scaling
    base = BaseDelta.from_state(ckpt.arrays["strategy.base"]).matrices()
    glob = ckpt.arrays["global"]
    out = {}
    for layer, folded in base.items():
        b = glob[f"{layer}.lora_B.weight"].astype(np.float64)
        a = glob[f"{layer}.lora_A.weight"].astype(np.float64)
        out[f"{layer}.weight"] = folded + scaling * b @ a
    return out


def test_fedex_lora_is_exact_sends_its_residual_and_exports_the_merged_delta(
    tiny_bert, tmp_path
):
    out = tmp_path / "run"
    rows = run_front_door(out, tiny_bert, *FEDEX)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 3 and r["failures"] == 0 and not r["rejected"]
        assert r["aggregation_error"] < 1e-6  # exact, up to float32 round-off
        # 4 adapted 32 x 32 layers, r 8, K 3: (K-1) r (d_out + d_in) = 1024 = d_out
        # d_in, a tie: dense
        assert r["fedex"] == {
            "residual_params_factored": 4 * 1024,
            "residual_params_dense": 4 * 1024,
            "residual_params_sent": 4 * 1024,
            "wire": "dense",
        }
    # each round's residual reaches the 3 nodes with its evaluate messages (they
    # keep it for training), and the measured bytes_down count it
    for r in rows[1:]:
        residual = r["fedex"]["residual_params_sent"]
        assert r["bytes_down_folds_eval"] >= 4 * 3 * residual
        assert r["bytes_down"] >= 4 * (r["params_down"] + 3 * residual)
    # exports: the exact merged delta, and a PEFT adapter of rank adapter.r
    merged = load_file(str(out / "adapter" / MERGED_FILE))
    exact = exact_delta(out)
    assert merged.keys() == exact.keys() and len(merged) == 4
    tail = total = 0.0
    factors = peft_factors(out)
    for key, want in exact.items():
        got = merged[key].astype(np.float64)
        assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
        b, a = factors[key]  # exported at scale 1: B A is the delta
        assert b.shape == (32, 8) and a.shape == (8, 32)
        tail += np.sum((want - b @ a) ** 2)
        total += np.sum(want**2)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert not config["use_rslora"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export_rank"] == 8
    assert 0 < summary["export_truncation_error"] < 1
    assert summary["export_truncation_error"] == pytest.approx(
        np.sqrt(tail / total), rel=1e-3
    )
    # the base model + the merged delta + the adapter's head is the final model
    exact_model, peft_merged = loaded_models(out)
    metrics = server_metrics(out, exact_model)
    assert metrics["eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)
    # PEFT applies the truncated adapter at scale 1: its weights move by B' A'
    pristine = dict(load_base_model(cfg(out).model, seed=0).named_parameters())
    for name, p in peft_merged.named_parameters():
        if f"{name}" in factors:
            b, a = factors[name]
            moved = (
                p.detach().double().numpy() - pristine[name].detach().double().numpy()
            )
            assert np.linalg.norm(moved - b @ a) <= 1e-5 * np.linalg.norm(b @ a)


def cfg(run: Path) -> Settings:
    return Settings.from_dict(yaml.safe_load((run / "config.yaml").read_text()))


def loaded_models(run: Path):
    """``(exact, truncated)``: the base model with the merged delta added to its
    weights and the exported head (the adapter's LoRA zeroed), and the PEFT adapter
    merged into the base model."""
    from peft import PeftModel

    settings = cfg(run)
    merged = load_file(str(run / "adapter" / MERGED_FILE))
    exact = PeftModel.from_pretrained(
        load_base_model(settings.model, seed=1), str(run / "adapter")
    )
    with torch.no_grad():
        for name, p in exact.named_parameters():
            if ".lora_B." in name:
                p.zero_()
        for name, module in exact.named_modules():
            key = f"{name[len(PEFT_PREFIX) :]}.weight"
            if hasattr(module, "base_layer") and key in merged:
                module.base_layer.weight += torch.from_numpy(merged[key])
    truncated = PeftModel.from_pretrained(
        load_base_model(settings.model, seed=2), str(run / "adapter")
    ).merge_and_unload()
    return exact, truncated


def server_metrics(run: Path, model) -> dict:
    """The server's evaluation of ``model`` (what ``metrics.jsonl`` reports)."""
    settings = cfg(run)
    tokenizer = load_tokenizer(settings.model)
    return evaluate(
        model,
        server_examples(settings, tokenizer),
        settings.model.task,
        torch.device("cpu"),
        tokenizer.pad_token_id,
        settings.train.eval_batch_size,
    )


def test_a_resumed_fedex_run_ends_with_the_same_adapter_and_base_delta(
    tiny_bert, tmp_path
):
    reference = tmp_path / "full"
    full = run_front_door(reference, tiny_bert, *FEDEX, "federation.rounds=3")
    out = tmp_path / "resumed"
    first = run_front_door(out, tiny_bert, *FEDEX)  # 2 rounds
    ckpt = checkpoint.load_latest(out)
    assert ckpt.round == 2 and ckpt.state["strategy"]["base_round"] == 2
    assert BaseDelta.from_state(ckpt.arrays["strategy.base"])  # the summed folds
    rows = run_front_door(
        out, tiny_bert, *FEDEX, f"resume={out}", "federation.rounds=3"
    )
    assert rows[:3] == first and [r["round"] for r in rows] == [0, 1, 2, 3]
    for got, want in zip(rows, full, strict=True):  # bit-identical on CPU
        for key in ("eval_loss", "eval_accuracy", "aggregation_error", "clients"):
            assert got.get(key) == want.get(key), (got["round"], key)
    for name in (ADAPTER, f"adapter/{MERGED_FILE}"):
        got, want = load_file(str(out / name)), load_file(str(reference / name))
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k], want[k]), (name, k)
    got, want = exact_delta(out), exact_delta(reference)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
