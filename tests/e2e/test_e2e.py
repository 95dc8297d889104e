"""End to end: the Hydra front door runs a Flower simulation on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tests.conftest import adapter_metrics, run_front_door


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    run_front_door(out, tiny_bert)
    return out


@pytest.mark.slow
def test_run_directory_holds_the_contract_files(run_dir):
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "plots/accuracy_vs_round.png",
        "plots/accuracy_vs_mb.png",
    ):
        assert (run_dir / name).is_file(), name
    rows = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in (
            "eval_accuracy",
            "eval_loss",
            "aggregation_error",
            "bytes_up",
            "bytes_down",
            "clients",
            "failures",
            "federated_eval_accuracy",
        ):
            assert key in r, key
        assert r["clients"] == 3 and r["failures"] == 0
        assert r["aggregation_error"] > 0  # FedAvg-LoRA is inexact
        assert r["bytes_up"] > 4 * r["params_up"] * 0.99
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "fedavg_lora"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["federation"]["num_clients"] == 3


@pytest.mark.slow
def test_global_adapter_changed_and_loads_in_peft_with_the_same_predictions(run_dir):
    from fedlora.adapters import get_state
    from fedlora.build import build
    from fedlora.models import load_base_model
    from fedlora.settings import Settings

    cfg = Settings.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    initial_model, tok = build(cfg)
    initial = get_state(initial_model)
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    a_keys = [k for k in saved if "lora_A" in k]
    assert len(a_keys) == 4 and all(np.abs(saved[k]).max() > 0 for k in saved)
    changed = [
        not np.allclose(saved[k], initial[k.replace("base_model.model.", "")])
        for k in a_keys
    ]
    assert all(changed)  # every A moved away from its shared initialisation

    base = load_base_model(cfg.model, seed=12345)  # the head comes from the adapter
    metrics = adapter_metrics(base, run_dir / "adapter", cfg)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["eval_accuracy"] == last["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-5)
