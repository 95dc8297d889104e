"""``diagnostics.every``: the aggregation-error diagnostic in every N-th round only,
or while it is cheap (``auto``), through the real strategy and ClientApp; the rounds
without it say so."""

from __future__ import annotations

import pytest

from fedlora.errors import ConfigError
from strategies.server_app import compose
from strategies.strategy import LoRAStrategy
from tests.fedlora.methods.test_methods import (  # noqa: F401 - the fixture
    client_frozen,
    dense_check,
    experiment,
    federated_round,
)


def rounds(tiny_bert, client_frozen, every, n):  # noqa: F811 - the fixture
    """``n`` rounds of FedAvg-LoRA with ``diagnostics.every=every``."""
    cfg = experiment(tiny_bert, "fedavg_lora", f"diagnostics.every={every}")
    out = [federated_round(cfg, client_frozen)]
    for _ in range(n - 1):
        out.append(federated_round(cfg, client_frozen, previous=out[-1]))
    return out


def test_every_second_round_measures_rounds_2_and_4_and_marks_the_others(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811 - the fixture
):
    played = rounds(tiny_bert, client_frozen, 2, 4)
    log = played[-1].strategy.round_log
    for rnd in played:
        entry = log[rnd.server_round]
        if rnd.server_round % 2:
            assert entry["aggregation_error"] is None
            assert entry["aggregation_error_by_module"] == {}
            assert entry["aggregation_error_skipped"] == (
                "diagnostics.every=2: measured in rounds 2, 4, ..."
            )
        else:  # measured, and right: the dense float64 reference
            assert "aggregation_error_skipped" not in entry
            assert entry["aggregation_error"] == pytest.approx(
                dense_check(rnd).error, rel=1e-4
            )
            assert entry["aggregation_error"] > 1e-3  # FedAvg-LoRA is inexact
        assert entry["clients"] == 3  # the round itself is unchanged


def test_every_zero_never_measures(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811 - the fixture
):
    played = rounds(tiny_bert, client_frozen, 0, 2)
    for rnd in played:
        entry = rnd.strategy.round_log[rnd.server_round]
        assert entry["aggregation_error"] is None
        assert entry["aggregation_error_skipped"] == (
            "diagnostics.every=0: never measured"
        )


def test_auto_measures_every_round_while_cheap_and_skips_while_over_budget(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811 - the fixture
):
    """On the tiny BERT the diagnostic is cheap: ``auto`` measures every round and
    times it. A schedule whose diagnostics have cost more than the rest of the
    aggregation (and whose last one was not cheap) skips the next round, says
    why, and goes on counting the round's time as the rest's."""
    played = rounds(tiny_bert, client_frozen, "auto", 2)
    schedule = played[-1].strategy.diagnostics
    for rnd in played:
        entry = rnd.strategy.round_log[rnd.server_round]
        assert entry["aggregation_error"] == pytest.approx(
            dense_check(rnd).error, rel=1e-4
        )
        assert 0 < entry["diagnostic_time"] < entry["server_aggregate_time"]
    assert schedule.spent == pytest.approx(
        sum(r.strategy.round_log[r.server_round]["diagnostic_time"] for r in played)
    )
    total = sum(
        r.strategy.round_log[r.server_round]["server_aggregate_time"] for r in played
    )
    assert schedule.rest == pytest.approx(total - schedule.spent)

    rest = schedule.rest
    schedule.free_seconds, schedule.spent = 0.0, rest + 100.0  # a costly past
    cfg = experiment(tiny_bert, "fedavg_lora", "diagnostics.every=auto")
    skipped = federated_round(cfg, client_frozen, previous=played[-1])
    entry = skipped.strategy.round_log[skipped.server_round]
    assert entry["aggregation_error"] is None and "diagnostic_time" not in entry
    assert entry["aggregation_error_skipped"].startswith(
        "diagnostics.every=auto: skipped to keep the diagnostic's"
    )
    assert schedule.rest == pytest.approx(rest + entry["server_aggregate_time"])
    assert entry["clients"] == 3  # the round itself is unchanged


@pytest.mark.parametrize("value", ["-1", "1.5", "often", "true"])
def test_a_bad_every_is_refused_naming_the_key_the_value_and_the_fix(value):
    with pytest.raises(ConfigError, match=r"^diagnostics\.every=") as err:
        compose([f"diagnostics.every={value}"])
    assert err.value.key == "diagnostics.every"
    assert "0 never" in err.value.fix and "every round" in err.value.fix


def test_the_strategy_refuses_a_bad_every_itself():
    from fedlora.methods.fedavg_lora import FedAvgLoRA

    with pytest.raises(
        ValueError, match=r"diagnostics_every=-2: give 'auto' or a whole"
    ):
        LoRAStrategy(FedAvgLoRA(), diagnostics_every=-2)


def test_auto_does_not_charge_the_frozen_factors_one_time_qr_to_the_rounds(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811 - the fixture
):
    """Fed-SB's diagnostic first factors the frozen B and A (once a run): round 1
    records that as ``diagnostic_setup_time``, and the schedule counts neither it
    as the diagnostic's nor as the rest's seconds."""
    cfg = experiment(
        tiny_bert, "fedsb", "strategy.init=random_orthogonal", "diagnostics.every=auto"
    )
    first = federated_round(cfg, client_frozen)
    second = federated_round(cfg, client_frozen, previous=first)
    log, schedule = second.strategy.round_log, second.strategy.diagnostics
    setup = log[1]["diagnostic_setup_time"]
    assert 0 < setup < log[1]["diagnostic_time"]
    assert "diagnostic_setup_time" not in log[2]
    assert schedule.spent == pytest.approx(
        log[1]["diagnostic_time"] - setup + log[2]["diagnostic_time"]
    )
    assert schedule.rest == pytest.approx(
        sum(log[r]["server_aggregate_time"] - log[r]["diagnostic_time"] for r in (1, 2))
    )
    assert log[2]["aggregation_error"] < 1e-5  # Fed-SB is exact
