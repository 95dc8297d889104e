"""The computed byte count of a message equals Flower's own serialization.

:func:`strategies.wire.payload_bytes` sizes a message from the layout of Flower
1.39's inflatable objects; :func:`strategies.wire.deflated_bytes`, the reference,
deflates every distinct object as Flower does (and hashes it). They must agree to
the byte, on hand-made contents that reach every corner of the layout and on the
real train messages and replies of every method (the real strategy and ClientApp).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.proto.recorddict_pb2 import ConfigRecordValue

from strategies import wire_size
from strategies.wire import (
    deflated_bytes,
    from_array,
    payload_bytes,
    record_to_state,
    record_to_views,
    state_to_record,
    to_array,
)
from tests.fedlora.methods.test_methods import (  # noqa: F401 - the fixture
    client_frozen,
    experiment,
    federated_round,
)

CHUNK = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # bytes of an array chunk (5 MiB)
F32 = CHUNK // 4  # float32 entries in one chunk


def contents() -> dict[str, RecordDict]:
    """Hand-made message contents, one corner of the layout each."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal(2 * F32 + 1000, dtype=np.float32)  # 3 chunks
    zeros = np.zeros(3 * F32, np.float32)  # identical chunks
    # chunks that agree on the bytes sampled (start, middle, end) but not all
    tricky = np.zeros(2 * F32 + 12, np.float32)
    tricky[F32 // 3] = 1.0
    config = {
        "str": "héllo ✓",
        "": 3,  # proto3 leaves an empty key out
        "int": -5,
        "int0": 0,
        "int_max": 2**63 - 1,
        "uint": 2**63 + 1,  # above int64: uint64
        "float": 0.5,
        "neg_zero": -0.0,
        "bool": False,
        "bytes": b"\x00xyz" * 40,
        "empty_bytes": b"",
        "empty_list": [],
        "strs": ["a", "", "long" * 50],
        "ints": [1, -300, 2**40, 0],
        "uints": [1, 2**64 - 1],
        "floats": [0.1, 2.0],
        "bools": [True, False, True],
        "bytes_list": [b"", b"ab"],
        "key ü": "x" * 200,  # a non-ASCII key, a 2-byte length
    }
    metrics = {"loss": 1.5, "n": 10, "neg": -(2**62), "fl": [1.0, 2.0], "il": [-1, 2]}
    return {
        "big arrays and identical chunks": RecordDict(
            {
                "arrays": state_to_record(
                    {"a": big, "z": zeros, "z2": zeros.copy(), "tricky": tricky}
                ),
                "same arrays elsewhere": state_to_record({"z": zeros, "t": tricky}),
            }
        ),
        "one chunk exactly and one byte more": RecordDict(
            {
                "arrays": ArrayRecord(
                    {
                        "exact": Array("u8", (CHUNK,), "raw", b"\x01" * CHUNK),
                        "more": Array("u8", (CHUNK + 1,), "raw", b"\x01" * (CHUNK + 1)),
                        "none": Array("u8", (0,), "raw", b""),
                        # an array whose one chunk is the last chunk of "more"
                        "tail": Array("u8", (1,), "raw", b"\x01"),
                    }
                )
            }
        ),
        "empty records": RecordDict(
            {
                "arrays": ArrayRecord({}),
                "config": ConfigRecord({}),
                "config too": ConfigRecord({}),  # the same object id: sent once
                "metrics": MetricRecord({}),
            }
        ),
        "nothing": RecordDict({}),
        "config and metric records": RecordDict(
            {
                "config": ConfigRecord(config),
                "metrics": MetricRecord(metrics),
                "small": state_to_record(
                    {
                        "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
                        "scalar": np.array(2.0),
                        "empty": np.ones((0, 4)),
                        "f64": rng.standard_normal((7, 2)),
                    }
                ),
            }
        ),
    }


@pytest.mark.parametrize("name", list(contents()))
def test_payload_bytes_equal_flowers_serialization(name):
    content = contents()[name]
    assert payload_bytes(content) == deflated_bytes(content)


def test_a_message_with_identical_chunks_counts_them_once():
    zeros = np.zeros(4 * F32, np.float32)  # 4 identical chunks, then the header's
    content = RecordDict({"arrays": state_to_record({"z": zeros, "z2": zeros})})
    assert deflated_bytes(content) < 2.5 * CHUNK  # the reference deduplicates
    assert payload_bytes(content) == deflated_bytes(content)


@pytest.mark.parametrize(
    "value", [0, 1, 127, 128, 16383, 16384, 2**35 - 1, 2**35, 2**63 - 1, 2**64 - 1]
)
def test_varint_sizes_match_protobuf(value):
    # protobuf's own encoding of a uint64 field: one tag byte, then the varint
    assert (
        wire_size.varint_size(value)
        == len(ConfigRecordValue(uint64=value).SerializeToString()) - 1
    )


@pytest.mark.parametrize("value", [0, -1, 1, -64, 64, -(2**63), 2**63 - 1])
def test_sint64_sizes_match_protobuf(value):
    size, _ = wire_size.value_size(value, wire_size.CONFIG_TYPES)
    assert size == len(ConfigRecordValue(sint64=value).SerializeToString())


def test_decoding_reads_the_bytes_numpy_wrote_without_copying():
    rng = np.random.default_rng(3)
    for value in [
        rng.standard_normal((4, 6)).astype(np.float32),
        np.asfortranarray(rng.standard_normal((3, 5))),
        np.ones((0, 2), np.float32),
        np.array(1.5, np.float32),
        np.arange(7, dtype=np.int64),
    ]:
        array = Array(value)  # Flower's own np.save
        assert (
            to_array(np.ascontiguousarray(value)).data
            == Array(np.ascontiguousarray(value)).data
        )
        view = from_array(array)
        np.testing.assert_array_equal(view, array.numpy())
        assert view.dtype == value.dtype and view.shape == value.shape
    record = state_to_record({"w": rng.standard_normal((5, 3)).astype(np.float32)})
    view = record_to_views(record)["w"]
    assert not view.flags.writeable  # a view of the record's bytes, not a copy
    assert np.shares_memory(view, np.frombuffer(record["w"].data, np.uint8))
    assert record_to_state(record)["w"].flags.writeable  # a copy of its own


def test_encoded_arrays_are_the_objects_flowers_constructor_builds():
    """``to_array`` builds Flower's ``Array`` directly (its constructor is 5 us
    of each of Fed-SB's many small arrays): the same fields and flags as
    ``Array(value)``, the same object id, and it behaves like one when changed;
    on the installed Flower the direct build is the one used."""
    from strategies import wire

    assert wire._FAST_ARRAY  # flwr 1.39: else every array took the slow path
    rng = np.random.default_rng(4)
    for value in [
        rng.standard_normal((16, 16)).astype(np.float32),
        rng.standard_normal((3, 5)),
        np.ones((0, 2), np.float32),
        np.array(1.5, np.float32),
        rng.standard_normal(9).astype(np.float16),
    ]:
        ours, flowers = to_array(value), Array(value)
        assert type(ours) is Array
        assert ours.__dict__ == flowers.__dict__
        assert ours.object_id == flowers.object_id
        np.testing.assert_array_equal(ours.numpy(), value)
        ours.data = flowers.data[:-1]  # Flower's own bookkeeping on a change
        assert ours.is_dirty and "_object_id" not in ours.__dict__


def test_truncated_or_pickled_arrays_are_refused():
    good = Array(np.arange(6, dtype=np.float32))
    short = Array(good.dtype, good.shape, good.stype, good.data[:-1])
    with pytest.raises(ValueError, match="needs 24 bytes of data, got 23"):
        from_array(short)
    header = io.BytesIO()  # a pickled array's header, as np.save would write it
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (2,)}
    )
    pickled = Array("object", (2,), good.stype, header.getvalue() + b"\x80" * 16)
    with pytest.raises(ValueError, match="Python objects"):
        from_array(pickled)


# --- every method's real messages: the strategy's downlink, the ClientApp's reply --
METHODS = {
    "fedavg_lora": [],
    "ffa_lora": [],
    "fedsb": ["strategy.init=random_orthogonal"],
    "lora_fair": [],
    "rolora": [],
    "fedsa_lora": [],
    "fedex_lora": [],
    "hetlora": ["adapter.client_ranks=[2,4,4]"],
    "flexlora": ["adapter.client_ranks=[2,4,4]"],
    "flora": ["adapter.client_ranks=[2,4,4]"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_methods_messages_are_counted_exactly(
    method,
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811 - the fixture
):
    cfg = experiment(tiny_bert, method, *METHODS[method])
    first = federated_round(cfg, client_frozen)
    second = federated_round(cfg, client_frozen, previous=first)  # what changed
    for rnd in (first, second):
        messages = [*rnd.messages, *rnd.replies]
        assert messages
        for msg in messages:
            assert payload_bytes(msg.content) == deflated_bytes(msg.content)
        entry = rnd.strategy.round_log[rnd.server_round]
        assert entry["bytes_up"] == sum(deflated_bytes(m.content) for m in rnd.replies)
        assert entry["bytes_down"] == sum(
            deflated_bytes(m.content) for m in rnd.messages
        )
