"""``diagnostics.every``: the aggregation-error diagnostic in every N-th round only,
through the real strategy and ClientApp; the rounds without it say so."""

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


@pytest.mark.parametrize("value", ["-1", "1.5", "often", "true"])
def test_a_bad_every_is_refused_naming_the_key_the_value_and_the_fix(value):
    with pytest.raises(ConfigError, match=r"^diagnostics\.every=") as err:
        compose([f"diagnostics.every={value}"])
    assert err.value.key == "diagnostics.every"
    assert "0 never" in err.value.fix and "every round" in err.value.fix


def test_the_strategy_refuses_a_bad_every_itself():
    from fedlora.methods.fedavg_lora import FedAvgLoRA

    with pytest.raises(ValueError, match=r"diagnostics_every=-2: give a whole"):
        LoRAStrategy(FedAvgLoRA(), diagnostics_every=-2)
