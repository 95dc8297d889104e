"""The privacy-utility sweep's command lines (no runs: subprocess is replaced)."""

from __future__ import annotations

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
    assert len(calls) == 4 * len(bench_privacy.STRATEGIES)  # no DP + 3 epsilons
    for cmd in calls:
        assert cmd[-1].startswith("hydra.sweep.dir=") and "=" not in cmd[-1][17:]
        assert cmd[-3:-1] == extra  # after the sweep's own settings: they win
        assert "federation.seed=0,1,2" in cmd
    dp = [c for c in calls if "privacy=dp_sgd" in c]
    assert sorted({c[c.index("privacy=dp_sgd") + 1] for c in dp}) == [
        "privacy.target_epsilon=1.0",
        "privacy.target_epsilon=3.0",
        "privacy.target_epsilon=8.0",
    ]
    fedsb = [c for c in calls if "strategy=fedsb" in c]
    assert all("strategy.init=random_orthogonal" in c for c in fedsb)


def test_a_set_without_equals_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["bench_privacy", "--data", str(tmp_path), "--set", "lr"]
    )
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench_privacy.main()
