"""The tuned-sweep preset end to end at toy size: Optuna's sweeper runs 2 trials on
the held-out validation split, and experiments.report picks the best of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from experiments.report import load_runs, tuned_studies
from tests.conftest import REPO, front_door_command

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # pip install -e ".[tune]"


@pytest.mark.slow
def test_the_optuna_preset_tunes_on_validation_and_the_report_picks_the_best(
    tmp_path, tiny_bert
):
    sweep = tmp_path / "sweep"
    cmd = front_door_command(
        tmp_path / "unused",
        tiny_bert,
        "+experiment=tune_lr",
        "data=synthetic",  # the preset's SST-2 back to the toy task
        "data.path=null",
        "data.max_train_examples=null",
        "federation.min_train_clients=3",
        "partition.type=iid",
        "hydra.sweeper.n_trials=2",
        "train.local_epochs=choice(1,2)",  # the optional second setting
        f"hydra.sweep.dir={sweep}",
        drop=("train.lr", "hydra.run.dir"),  # the sweeper chooses train.lr
    )
    cmd.insert(3, "-m")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    optuna = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    trials = sorted(sweep.glob("*_fedavg_lora"))
    assert [t.name for t in trials] == ["0_fedavg_lora", "1_fedavg_lora"]
    objective = {}
    for folder in trials:  # each trial records its setting and its objective
        overrides = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
        assert any(str(o).startswith("train.lr=") for o in overrides)
        config = OmegaConf.load(folder / "config.yaml")
        assert 1e-4 <= config.train.lr <= 3e-2
        rows = [
            json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()
        ]
        assert {r["validation_examples"] for r in rows} == {24.0}  # 10% of 240
        assert {r["eval_examples"] for r in rows} == {60.0}  # the reported split
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["final_validation_accuracy"] == rows[-1]["validation_accuracy"]
        objective[folder.name] = (summary["final_validation_accuracy"], config)
    # the report: the best trial by validation accuracy (the first of ties), the
    # one the sweeper reports, with its accuracy on the evaluation split
    studies = tuned_studies(sweep, load_runs(sweep))
    (study,) = studies.values()
    best = study["best"]
    top = max(v for v, _ in objective.values())
    first = next(k for k, (v, _) in objective.items() if v == top)
    assert best["dir"] == str(sweep / first) and best["validation_acc"] == top
    assert optuna["best_value"] == pytest.approx(top)
    assert optuna["best_params"]["train.lr"] == pytest.approx(best["train.lr"])
    assert optuna["best_params"]["train.local_epochs"] == best["train.local_epochs"]
    chosen = json.loads((sweep / first / "summary.json").read_text())
    assert best["test_acc"] == chosen["final_eval_accuracy"]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.report", str(sweep)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "best trial" in (sweep / "report.md").read_text()
