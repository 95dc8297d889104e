"""The plain-vs-secure SST-2 comparison's table on fabricated runs (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import secagg_sst2
from tests.experiments.test_compare import FakeLauncher

PLAIN = {0: 0.80, 1: 0.83, 2: 0.78}
SECURE = {0: 0.81, 1: 0.82, 2: 0.78}


class Arms(FakeLauncher):
    def accuracy(self, spec):
        return (SECURE if "secagg" in spec.arm.label else PLAIN)[spec.seed]


def test_per_seed_accuracies_and_their_difference_are_paired_by_seed(tmp_path, capsys):
    launcher = Arms()
    secagg_sst2.main(["--quick", "--out", str(tmp_path)], launcher)
    assert sorted(launcher.calls) == [
        (label, "3e-3", seed)
        for label in ("fedavg_lora", "fedavg_lora+secagg")
        for seed in (0, 1, 2)
    ]
    saved = json.loads((tmp_path / "secagg_sst2.json").read_text())
    table = saved["table"]
    diff = np.array([SECURE[s] - PLAIN[s] for s in (0, 1, 2)])
    assert table["plain"]["values"] == pytest.approx(list(PLAIN.values()))
    assert table["secure"]["values"] == pytest.approx(list(SECURE.values()))
    assert table["difference"]["values"] == pytest.approx(diff)
    assert table["difference"]["mean"] == pytest.approx(diff.mean())
    assert table["difference"]["std"] == pytest.approx(diff.std(ddof=1))
    # every run's overrides; secure aggregation only in the variant's
    assert "secure_aggregation=secaggplus" not in saved["overrides"]
    overrides = " ".join(saved["overrides"])
    assert "train.batch_size=16" in overrides and "fraction_evaluate=0" in overrides
    out = capsys.readouterr().out
    assert "| 1 | 83.00 | 82.00 | -1.00 |" in out
    assert "| mean ± std | 80.33 ± 2.52 | 80.33 ± 2.08 | 0.00 ± 1.00 |" in out
