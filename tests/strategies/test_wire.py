"""The wire format and byte accounting."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora.comm import lora_parameters, num_parameters, raw_bytes
from strategies.wire import payload_bytes, record_to_state, state_to_record


def test_record_round_trip_is_lossless():
    rng = np.random.default_rng(0)
    state = {
        "a.lora_A.weight": rng.standard_normal((4, 7)).astype(np.float32),
        "a.lora_B.weight": rng.standard_normal((9, 4)).astype(np.float32),
    }
    back = record_to_state(state_to_record(state))
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_payload_bytes_are_the_serialized_objects():
    rng = np.random.default_rng(1)
    state = {
        f"layer{i}.lora_A.weight": rng.standard_normal((8, 300)).astype(np.float32)
        for i in range(3)
    }
    content = RecordDict(
        {"arrays": state_to_record(state), "config": ConfigRecord({"x": "y"})}
    )
    # what Flower pushes: every object of the message tree, deflated
    serialized = [o.deflate() for o in get_all_nested_objects(content).values()]
    assert payload_bytes(content) == sum(len(b) for b in serialized)
    # the array data is all there, plus a small per-array overhead
    overhead = payload_bytes(content) - raw_bytes(state)
    assert 0 < overhead < 600 * len(state)


def test_payload_bytes_of_a_large_state_are_close_to_raw_bytes():
    state = {
        "w": np.random.default_rng(2).standard_normal((512, 1024)).astype(np.float32)
    }
    content = RecordDict({"arrays": state_to_record(state)})
    ratio = payload_bytes(content) / raw_bytes(state)
    assert 1.0 < ratio < 1.01


def test_analytic_counts():
    assert num_parameters({"a": np.zeros((2, 3)), "b": np.zeros(4)}) == 10
    # Mistral-7B shapes: sum(d_out + d_in) = 81,920 per layer, 32 layers, r = 32
    assert lora_parameters([(81_920, 0)] * 32, 32) == 83_886_080
