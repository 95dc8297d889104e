"""End to end with DP: epsilon reported per client per round, declines, central DP."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from tests.conftest import run_front_door

pytestmark = pytest.mark.slow


def test_dp_sgd_run_reports_epsilon_and_out_of_budget_clients_decline(
    tiny_bert, tmp_path
):
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        "privacy=dp_sgd",
        "federation.fraction_evaluate=0",
        f"simulation.client_dir={tmp_path / 'clients'}",
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


DP_RUN = (
    "privacy=dp_sgd",
    "federation.fraction_evaluate=0",
    "privacy.planned_rounds=3",
    "strategy=ffa_lora",
)
ADAPTER = "adapter/adapter_model.safetensors"


def final_epsilon(rows):
    return {k: round(v, 9) for k, v in rows[-1]["epsilon"].items()}


def test_dp_sgd_runs_differ_and_a_resumed_one_spends_what_an_uninterrupted_one_does(
    tiny_bert, tmp_path
):
    clients = f"simulation.client_dir={tmp_path / 'clients'}"
    runs = {}
    for name in ("a", "b"):  # the same configuration twice, 3 rounds in one go
        out = tmp_path / name
        runs[name] = run_front_door(
            out, tiny_bert, *DP_RUN, clients, "federation.rounds=3"
        )
    a, b = (load_file(str(tmp_path / n / ADAPTER)) for n in ("a", "b"))
    assert a.keys() == b.keys()
    assert any((a[k] != b[k]).any() for k in a)  # noise the config cannot predict
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["reproducible_noise"] is False
    other = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["run_id"] != other["run_id"]
    # 2 rounds, then resumed to 3: the clients find their ledgers by the run id
    out = tmp_path / "resumed"
    first = run_front_door(out, tiny_bert, *DP_RUN, clients, "federation.rounds=2")
    rows = run_front_door(
        out, tiny_bert, *DP_RUN, clients, f"resume={out}", "federation.rounds=3"
    )
    assert rows[:3] == first and [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["clients"] == 3 and not rows[3]["declined"]
    assert final_epsilon(rows) == final_epsilon(runs["a"])  # nothing forgotten
    assert all(e <= 3.0 for e in rows[3]["epsilon"].values())
    assert final_epsilon(first) != final_epsilon(rows)  # round 3 was accounted
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    ledgers = sorted((tmp_path / "clients" / "privacy-ledger" / run_id).iterdir())
    assert [json.loads(p.read_text())["rounds"] for p in ledgers] == [[1, 2, 3]] * 3
