"""The server rejects malformed client updates before aggregation, whatever bytes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.updates import check_update
from strategies.strategy import LoRAStrategy
from strategies.wire import record_to_state, state_to_record
from tests.conftest import exchange

SHAPES = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (5, 2), "head.weight": (2, 6)}


pytestmark = pytest.mark.usefixtures("task_identity")


def state(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()}


def good(seed, n=10):
    return RecordDict(
        {
            "arrays": state_to_record(state(seed)),
            "metrics": MetricRecord({"num-examples": n, "partition-id": seed}),
        }
    )


def test_only_valid_updates_reach_the_global_model():
    nan = state(2)
    nan["l.lora_B.weight"][0, 0] = np.nan
    shape = state(3)
    shape["head.weight"] = np.zeros((3, 6), np.float32)
    extra = {**state(4), "sneaky.weight": np.ones(2, np.float32)}
    contents = [
        good(0, 10),
        good(1, 30),
        RecordDict(
            {
                "arrays": state_to_record(nan),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        RecordDict(
            {
                "arrays": state_to_record(shape),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        RecordDict(
            {
                "arrays": state_to_record(extra),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        RecordDict(
            {
                "arrays": state_to_record(state(5)),
                "metrics": MetricRecord({"num-examples": -3}),
            }
        ),
    ]
    strategy = LoRAStrategy(FedAvgLoRA(), min_available_nodes=1)
    arrays, _ = strategy.aggregate_train(1, exchange(strategy, state(9), contents))
    out = record_to_state(arrays)
    for k in SHAPES:  # the example-weighted mean of the two valid updates
        np.testing.assert_allclose(
            out[k], 0.25 * state(0)[k] + 0.75 * state(1)[k], rtol=1e-6
        )
    reasons = [r["reason"] for r in strategy.round_log[1]["rejected"]]
    assert len(reasons) == 4 and strategy.round_log[1]["clients"] == 2
    assert any("NaN" in r for r in reasons) and any("shape" in r for r in reasons)
    assert any("unexpected ['sneaky.weight']" in r for r in reasons)
    assert any("num-examples" in r for r in reasons)


def test_update_norm_outlier_is_rejected_when_enabled():
    big = {k: v * 1000 for k, v in state(7).items()}
    contents = [good(s) for s in range(4)] + [
        RecordDict(
            {
                "arrays": state_to_record(big),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
    ]
    strategy = LoRAStrategy(
        FedAvgLoRA(max_update_norm_ratio=5.0), min_available_nodes=1
    )
    strategy.aggregate_train(1, exchange(strategy, state(9), contents))
    assert [r["node"] for r in strategy.round_log[1]["rejected"]] == [5]


def garbage_contents(rng):
    """Random and truncated payloads, in many shapes."""
    n = rng.integers(0, 4)
    kind = rng.integers(0, 8)
    if kind == 0:  # random bytes posing as an array
        arr = Array(
            dtype="float32",
            shape=(2, 6),
            stype="numpy.ndarray",
            data=rng.bytes(int(rng.integers(0, 80))),
        )
        return RecordDict(
            {
                "arrays": ArrayRecord({"l.lora_A.weight": arr}),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
    if kind == 1:  # a real array, truncated
        real = Array(state(int(n))["l.lora_A.weight"])
        cut = Array(
            dtype=real.dtype,
            shape=real.shape,
            stype=real.stype,
            data=real.data[: int(rng.integers(0, len(real.data)))],
        )
        return RecordDict(
            {
                "arrays": ArrayRecord(
                    {
                        **{k: Array(v) for k, v in state(1).items()},
                        "l.lora_A.weight": cut,
                    }
                ),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
    if kind == 2:  # no metrics
        return RecordDict({"arrays": state_to_record(state(1))})
    if kind == 3:  # wrong dtype
        ints = {k: np.ones(v, np.int64) for k, v in SHAPES.items()}
        return RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in ints.items()}),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
    if kind == 4:  # absurd or non-integer example counts
        count = [0, 10**12, 2.5, -1][int(n)]
        return RecordDict(
            {
                "arrays": state_to_record(state(1)),
                "metrics": MetricRecord({"num-examples": count}),
            }
        )
    if kind == 5:  # random shapes
        shaped = {
            k: rng.standard_normal(tuple(int(x) for x in rng.integers(1, 5, 2))).astype(
                np.float32
            )
            for k in SHAPES
        }
        return RecordDict(
            {
                "arrays": state_to_record(shaped),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
    if kind == 6:  # Inf
        bad = state(1)
        bad["head.weight"][1, 1] = np.inf
        return RecordDict(
            {
                "arrays": state_to_record(bad),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
    return RecordDict(
        {
            "config": ConfigRecord({"x": "y"}),  # wrong records entirely
            "metrics": MetricRecord({"num-examples": 5}),
        }
    )


def test_fuzzed_payloads_never_crash_the_server_and_are_all_rejected():
    rng = np.random.default_rng(0)
    strategy = LoRAStrategy(
        FedAvgLoRA(), min_available_nodes=1, max_failed_rounds=10**6
    )
    for round_ in range(1, 301):
        contents = [garbage_contents(rng) for _ in range(2)]
        arrays, _ = strategy.aggregate_train(
            round_, exchange(strategy, state(9), contents)
        )
        assert arrays is None  # nothing reached the global model
        assert len(strategy.round_log[round_]["rejected"]) == 2


def test_check_update_accepts_a_well_formed_update():
    assert check_update(state(0), SHAPES, 12) is None
    assert "integer" in check_update(state(0), SHAPES, True)


def test_fedavg_is_flowers_base():
    assert issubclass(LoRAStrategy, FedAvg)


def test_too_few_usable_updates_keep_the_model_then_stop_the_run_clearly():
    strategy = LoRAStrategy(
        FedAvgLoRA(), min_available_nodes=1, min_replies=2, max_failed_rounds=2
    )
    assert (
        strategy.aggregate_train(1, exchange(strategy, state(9), [good(0)]))[0] is None
    )
    ok, _ = strategy.aggregate_train(
        2, exchange(strategy, state(9), [good(0), good(1)])
    )
    assert ok is not None  # the counter resets after a good round
    strategy.aggregate_train(3, exchange(strategy, state(9), [good(0)]))
    with pytest.raises(RuntimeError, match="federation.min_replies=2"):
        strategy.aggregate_train(4, exchange(strategy, state(9), [good(0)]))


def test_an_error_the_superlink_writes_for_a_lost_node_names_that_node():
    from flwr.app import Error

    strategy = LoRAStrategy(FedAvgLoRA(), min_available_nodes=1)
    replies = exchange(strategy, state(9), [good(0), good(1), good(2)])
    lost = Message(Error(code=0, reason="Node Unavailable"), reply_to=replies[1])
    lost.metadata.__dict__["_src_node_id"] = 0  # no sampled node's (the SuperLink)
    raised = Message(Error(code=0, reason="boom"), reply_to=replies[2])
    raised.metadata.__dict__["_src_node_id"] = 3  # the node itself
    strategy.aggregate_train(1, [replies[0], lost, raised])
    entry = strategy.round_log[1]
    assert entry["failures"] == 2
    assert {(f["node"], f["reason"]) for f in entry["failure_reasons"]} == {
        (2, "Node Unavailable"),
        (3, "boom"),
    }


@pytest.mark.parametrize("bad", ["layers.3.R", "layers.0.R", "big", "layers.7.R"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_check_update_names_the_array_holding_nan_or_inf(bad, value):
    """Small arrays are checked together (Fed-SB's hundreds of r x r matrices),
    large ones alone: either way the reason names the array, the first in the
    expected order, and a clean update passes."""
    shapes = {f"layers.{i}.R": (16, 16) for i in range(8)} | {"big": (5000, 2)}
    rng = np.random.default_rng(5)
    update = {
        k: rng.standard_normal(s).astype(np.float32) * 1e-3 for k, s in shapes.items()
    }
    assert check_update(update, shapes, 7) is None
    update[bad][3, 1] = value
    update["layers.7.R"][0, 0] = value  # a later one too: the first is named
    first = bad if bad != "big" else "layers.7.R"
    assert check_update(update, shapes, 7) == f"{first}: contains NaN or Inf"
