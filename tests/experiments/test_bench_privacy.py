"""The privacy-utility sweep's command lines (no runs: subprocess is replaced)."""

from __future__ import annotations

import json
import sys

import pytest

from experiments import bench_privacy


def test_every_run_gets_the_arm_the_strategy_and_the_extra_overrides(
    tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(
        bench_privacy.subprocess, "run", lambda cmd, **kw: calls.append(cmd)
    )
    monkeypatch.setattr(bench_privacy, "load_runs", lambda folder: {})
    extra = ["train.batch_size=2048", "privacy.max_physical_batch_size=256"]
    accs = bench_privacy.sweep(tmp_path, tmp_path / "runs", 3, False, extra)
    assert accs == {}  # nothing ran, nothing to report
    # no DP + 3 epsilons, one run per seed
    assert len(calls) == 4 * len(bench_privacy.STRATEGIES) * 3
    for cmd in calls:
        assert cmd[-1].startswith("hydra.sweep.dir=") and "=" not in cmd[-1][17:]
        assert cmd[-3:-1] == extra  # after the sweep's own settings: they win
    seeds = [c for c in calls if "strategy=ffa_lora" in c and "privacy=none" in c]
    assert [c[c.index("strategy=ffa_lora") + 1] for c in seeds] == [
        f"federation.seed={s}" for s in range(3)
    ]
    dp = [c for c in calls if "privacy=dp_sgd" in c]
    assert sorted({c[c.index("privacy=dp_sgd") + 1] for c in dp}) == [
        "privacy.target_epsilon=1.0",
        "privacy.target_epsilon=3.0",
        "privacy.target_epsilon=8.0",
    ]
    fedsb = [c for c in calls if "strategy=fedsb" in c]
    assert all("strategy.init=random_orthogonal" in c for c in fedsb)


def test_the_presets_hold_the_settings_the_sweeps_used_to_spell_out(data_folder):
    from strategies.server_app import compose, settings

    # data_folder: SST-2's layout, which validation reads
    before = [  # the overrides bench_privacy built itself (and the docs' --set)
        "data=sst2",
        f"data.path={data_folder}",
        "data.client_eval_fraction=0",
        "federation.num_clients=3",
        "federation.min_train_clients=3",
        "federation.fraction_evaluate=0",
        "partition.type=dirichlet",
        "partition.alpha=0.5",
        "partition.min_partition_size=20",
        "train.lr=5e-3",
        "quiet=true",
        "data.max_train_examples=1200",
        "data.max_eval_examples=400",
        "federation.rounds=2",
    ]
    large = [
        "data.max_train_examples=30000",
        "data.max_eval_examples=null",
        "federation.rounds=3",
        "train.batch_size=2500",
        "train.max_physical_batch_size=64",
        "++privacy.max_physical_batch_size=64",
    ]
    for arm in (["privacy=none"], ["privacy=dp_sgd", "privacy.target_epsilon=8"]):
        run = ["strategy=ffa_lora", "federation.seed=1", *arm]
        small = bench_privacy.common(data_folder, False)
        assert small[0] == "+experiment=dp_sweep"
        assert settings(compose([*run, *small])) == settings(compose([*run, *before]))
        dp_large = bench_privacy.common(data_folder, False, "dp_large")
        assert settings(compose([*run, *dp_large])) == settings(
            compose([*run, *before, *large])
        )


def test_the_sweep_runs_the_preset_it_is_given(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        bench_privacy.subprocess, "run", lambda cmd, **kw: calls.append(cmd)
    )
    monkeypatch.setattr(bench_privacy, "load_runs", lambda folder: {})
    bench_privacy.sweep(tmp_path, tmp_path / "r", 1, False, (), experiment="dp_large")
    assert calls and all("+experiment=dp_large" in c for c in calls)
    monkeypatch.setattr(
        sys, "argv", ["bench_privacy", "--data", str(tmp_path), "--experiment", "nope"]
    )
    with pytest.raises(SystemExit, match="no such preset.*dp_large"):
        bench_privacy.main()


def write_run(folder, strategy, seed, accuracy, failures=0):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"federation:\n  seed: {seed}\n")
    summary = {"strategy": strategy, "final_eval_accuracy": accuracy}
    (folder / "summary.json").write_text(json.dumps({**summary, "failures": failures}))


def test_the_sweep_resumes_per_seed_in_the_given_arm_order(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        bench_privacy.subprocess, "run", lambda cmd, **kw: calls.append(cmd)
    )
    runs = tmp_path / "runs"
    # seed 1 of FedAvg-LoRA at epsilon 8 finished earlier, in any layout; seed 0
    # was interrupted: its partial folder goes
    partial = runs / "eps8" / "fedavg_lora" / "seed0" / "0_fedavg_lora"
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text("{}\n")
    # seed 2 finished but lost clients on the way (out of memory): not a result
    lost = runs / "eps8" / "fedavg_lora" / "seed2" / "0_fedavg_lora"
    write_run(lost, "fedavg_lora", 2, 0.5, failures=7)
    write_run(
        runs / "eps8" / "fedavg_lora" / "old" / "0_fedavg_lora", "fedavg_lora", 1, 0.7
    )
    accs = bench_privacy.sweep(tmp_path, runs, 3, False, (), arms=["8", "none"])
    assert len(calls) == 2 * 3 * 3 - 1  # the finished seed is not run again
    fedavg_eps8 = [
        c for c in calls if "strategy=fedavg_lora" in c and "privacy=dp_sgd" in c
    ]
    assert [c[5] for c in fedavg_eps8] == ["federation.seed=0", "federation.seed=2"]
    assert not partial.exists() and not lost.exists()
    assert "privacy=dp_sgd" in calls[0]  # the first arm given runs first
    assert "privacy=none" in calls[-1]
    assert accs == {"fedavg_lora | eps=8": [0.7]}
    # collecting only runs nothing and still reports the finished runs
    calls.clear()
    write_run(lost, "fedavg_lora", 2, 0.5, failures=1)  # left out of the table
    accs = bench_privacy.sweep(tmp_path, runs, 3, False, (), arms=["8"], run=False)
    assert calls == [] and accs == {"fedavg_lora | eps=8": [0.7]}
    assert "(1)" in bench_privacy.report(accs)
    header = bench_privacy.report(
        {
            "ffa_lora | eps=1": [0.5],
            "ffa_lora | eps=10": [0.6],
            "ffa_lora | none": [0.8],
        }
    ).splitlines()[0]
    assert header == "| strategy | none | eps=10 | eps=1 |"


def test_a_bad_arm_is_refused_before_any_run(monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["bench_privacy", "--data", str(tmp_path), "--arms", "8,eight"]
    )
    with pytest.raises(SystemExit, match="--arms 'eight'"):
        bench_privacy.main()


def test_a_set_without_equals_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["bench_privacy", "--data", str(tmp_path), "--set", "lr"]
    )
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench_privacy.main()


def test_the_plot_is_written_with_no_dp_and_a_strategy_without_runs(tmp_path):
    accs = {
        "fedavg_lora | none": [0.82, 0.80, 0.84],
        "fedavg_lora | eps=8": [0.76, 0.51, 0.51],
        "ffa_lora | eps=8": [0.68],
        "ffa_lora | eps=3": [],  # nothing finished yet: left out, not a crash
    }
    bench_privacy.plot(accs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
