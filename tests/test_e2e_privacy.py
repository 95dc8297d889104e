"""End to end with DP: epsilon reported per client per round, declines, central DP."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_front_door

pytestmark = pytest.mark.slow


def test_dp_sgd_run_reports_epsilon_and_out_of_budget_clients_decline(
    tiny_bert, tmp_path
):
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        "privacy=dp_sgd",
        "privacy.target_epsilon=2.0",
        "privacy.planned_rounds=1",
        "strategy=ffa_lora",
    )
    first, second = rows[1], rows[2]
    assert first["clients"] == 3 and not first["declined"]
    assert set(first["epsilon"]) == {"0", "1", "2"}
    assert 1.0 < first["epsilon_max"] <= 2.0
    # round 2 was not planned: every client declines with its reason, the run goes on
    assert second["clients"] == 0 and second["failures"] == 0
    assert len(second["declined"]) == 3
    assert all("privacy budget" in d["reason"] for d in second["declined"])
    assert second["epsilon"] == first["epsilon"]  # nothing more was spent
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epsilon_max"] <= 2.0 and summary["accountant"] == "prv"
    assert (tmp_path / "run" / "plots" / "epsilon_vs_round.png").is_file()


def test_central_dp_wraps_the_strategy_and_accounts_each_release(tiny_bert, tmp_path):
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        "privacy=central",
        "strategy=fedsb",
        "strategy.init=random_orthogonal",
        "adapter.r=4",
    )
    eps = [r["central_epsilon"] for r in rows[1:]]
    assert 0 < eps[0] < eps[1]
    assert all(r["clients"] == 3 for r in rows[1:])
