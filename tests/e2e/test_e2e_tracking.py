"""End to end: ``logger=tensorboard`` on the tiny simulation; TensorBoard's own
reader gets every round of ``metrics.jsonl`` back from ``<run dir>/tensorboard/``."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_front_door


@pytest.mark.slow
def test_tensorboard_holds_every_round_of_metrics_jsonl(tiny_bert, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    out = tmp_path / "run"
    rows = run_front_door(out, tiny_bert, "logger=tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("eval_accuracy", "eval_loss", "bytes_up", "clients", "wall_time"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        want = {r["round"]: r[key] for r in rows}
        assert logged == pytest.approx(want, rel=1e-6), key  # stored as float32
    # a nested mapping, flattened: aggregation_error_by_module/<module>, from round 1
    by_module = {k for k in tags if k.startswith("aggregation_error_by_module/")}
    assert by_module == {
        f"aggregation_error_by_module/{m}"
        for m in rows[1]["aggregation_error_by_module"]
    }
    assert {e.step for e in events.Scalars("aggregation_error")} == {1, 2}  # 0: null
    summary = json.loads((out / "summary.json").read_text())
    final = events.Scalars("summary/final_eval_accuracy")
    assert [(e.step, e.value) for e in final] == [
        (2, pytest.approx(summary["final_eval_accuracy"]))
    ]
    assert {"plots/accuracy_vs_round", "plots/accuracy_vs_mb"} <= set(
        events.Tags()["images"]
    )
