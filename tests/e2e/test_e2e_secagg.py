"""End to end with secure_aggregation=secaggplus: the simulation runs the protocol
through Flower's own grid, and lands where the plain run on the same seeds does;
with DP-SGD, and with client-level DP whose noise the clients add."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_front_door

pytestmark = pytest.mark.slow


def test_secure_run_matches_the_plain_run_on_the_same_seeds(tiny_bert, tmp_path):
    common = ("strategy=fedavg_lora", "federation.min_train_clients=3")
    plain = run_front_door(tmp_path / "plain", tiny_bert, *common)
    secure = run_front_door(
        tmp_path / "secure", tiny_bert, *common, "secure_aggregation=secaggplus"
    )
    for row in secure[1:]:
        assert row["secure_aggregation"] is True and row["clients"] == 3
        assert row["aggregation_error"] is None
        assert 0 < row["secagg_error_bound"] < 1e-6 and row["secagg_clipped"] == 0
        assert row["bytes_up"] > row["secagg_bytes_up"] > 0
    # the same client updates, summed within ~1e-9: the same model
    assert secure[-1]["eval_accuracy"] == pytest.approx(
        plain[-1]["eval_accuracy"], abs=0.02
    )
    assert secure[-1]["eval_loss"] == pytest.approx(plain[-1]["eval_loss"], rel=1e-3)


def test_secure_aggregation_composes_with_dp_sgd(tiny_bert, tmp_path):
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        "secure_aggregation=secaggplus",
        "federation.min_train_clients=3",
        "privacy=dp_sgd",
        "federation.fraction_evaluate=0",
        f"simulation.client_dir={tmp_path / 'clients'}",
        "strategy=ffa_lora",
    )
    for row in rows[1:]:
        assert row["secure_aggregation"] is True and row["clients"] == 3
        assert set(row["epsilon"]) == {"0", "1", "2"}


def test_client_level_dp_with_distributed_noise_accounts_every_release(
    tiny_bert, tmp_path
):
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        "secure_aggregation=secaggplus",
        "federation.min_train_clients=3",
        "privacy=distributed",
        "privacy.noise_multiplier=2.0",
        "privacy.clipping_norm=0.1",
    )
    spent = [row["distributed_epsilon"] for row in rows[1:]]
    assert 0 < spent[0] < spent[1]  # one release a round, composed
    for row in rows[1:]:
        assert row["secure_aggregation"] is True and row["clients"] == 3
        assert row["distributed_min_clients"] == 2  # more than half of 3
        assert row["distributed_noise_multiplier"] == pytest.approx(2.0 * 1.5**0.5)
        assert row["secagg_clipped"] is None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"] == "distributed"
    assert summary["distributed_epsilon"] == spent[-1]
    ledger = tmp_path / "run" / "distributed_releases.jsonl"  # on disk, per release
    assert len(ledger.read_text().splitlines()) == 2
