"""Warm Ray workers (``simulation.warm_workers``, the default) change when a worker
builds its model and reads its data, not what it computes: the same seeds give
the same metrics, round for round, as workers that do it at their first message."""

from __future__ import annotations

import pytest

from tests.conftest import run_front_door

pytestmark = pytest.mark.slow

SAME = ("eval_loss", "eval_accuracy", "federated_eval_loss", "aggregation_error")


def figures(row: dict) -> dict:
    """A row's metrics and every client's training loss, by partition."""
    replies = row.get("client_replies") or []
    losses = {str(c.get("partition-id")): c.get("train_loss") for c in replies}
    return {**{k: row.get(k) for k in SAME}, "train_loss": losses}


def test_warm_and_cold_workers_give_the_same_metrics(tiny_bert, tmp_path):
    warm = run_front_door(tmp_path / "warm", tiny_bert)  # 2 workers, 3 clients
    cold = run_front_door(tmp_path / "cold", tiny_bert, "simulation.warm_workers=false")
    assert len(warm) == len(cold) == 3  # round 0 and 2 rounds
    assert warm[-1]["client_replies"]  # the clients trained
    assert [figures(r) for r in warm] == [figures(r) for r in cold]
