"""Adding a method takes one Python file and one YAML: a toy method (the
coordinate-wise median of the clients' states), written outside the package into a
temporary folder, runs end to end through the front door without touching fedlora."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from fedlora.methods import from_settings
from fedlora.settings import with_
from tests.conftest import run_front_door

METHOD = '''
"""Toy: the coordinate-wise median of the clients' states (robust, inexact)."""
import numpy as np

from fedlora.methods.base import Method


class Median(Method):
    """``x <- median_k x_k`` per coordinate; weights unused."""

    name = "toy_median"

    def aggregate(self, states, weights, sent):
        return {
            k: np.median(np.stack([s[k] for s in states]), axis=0).astype(
                states[0][k].dtype
            )
            for k in states[0]
        }
'''
YAML = """
# Toy: coordinate-wise median.
defaults:
  - _common
  - _self_
_target_: toy_median.Median
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The method's one file (on PYTHONPATH) and one YAML (on Hydra's search path)."""
    (tmp_path / "toy_median.py").write_text(textwrap.dedent(METHOD))
    strategy_dir = tmp_path / "conf" / "strategy"
    strategy_dir.mkdir(parents=True)
    (strategy_dir / "toy_median.yaml").write_text(YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_method_in_one_file_loads_from_its_target(toy, settings):
    method = from_settings(
        with_(settings, "strategy", {"_target_": "toy_median.Median"})
    )
    states = [
        {"x": np.array([1.0, 5.0])},
        {"x": np.array([2.0, 0.0])},
        {"x": np.array([9.0, 1.0])},
    ]
    out = method.aggregate(states, np.full(3, 1 / 3), states[0])
    np.testing.assert_array_equal(out["x"], [2.0, 1.0])


@pytest.mark.slow
def test_a_toy_method_runs_end_to_end_with_one_file_and_one_yaml(toy, tiny_bert):
    out = toy / "run"
    rows = run_front_door(
        out,
        tiny_bert,
        "strategy=toy_median",
        f"hydra.searchpath=[file://{toy / 'conf'}]",
        env={
            "PYTHONPATH": os.pathsep.join([str(toy), os.environ.get("PYTHONPATH", "")])
        },
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in rows[1:])
    assert all(r["aggregation_error"] > 0 for r in rows[1:])  # a median is inexact
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "toy_median"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
