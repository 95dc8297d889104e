"""16-bit adapters on the wire (``wire.dtype``): the casts against torch's and a
float64 reference, the bytes by Flower's own serialization, float32 unchanged, the
setting's checks, and rounds of the real ClientApp and strategy in 16 bits (what
must stay exact stays so; a float16 overflow stops the run with the fix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict
from flwr.common import serde

from fedlora.comm import raw_bytes
from fedlora.errors import ConfigError
from fedlora.settings import Settings, with_
from fedlora.validate import validate
from strategies.wire import (
    KEY_ARRAYS,
    KEY_BASE,
    KEY_FROZEN,
    KEY_NUM_EXAMPLES,
    deflated_bytes,
    payload_bytes,
    record_to_state,
    record_to_views,
    state_to_record,
)
from tests.fedlora.methods.test_methods import experiment, federated_round

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: half the spacing of a 16-bit float's values relative to the value: the most a
#: round to nearest may move a normal value
HALF_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
#: ... and half the spacing of the subnormals, the most it may move a tiny one
HALF_SUBNORMAL = {"bfloat16": 2.0**-134, "float16": 2.0**-25}


def awkward_values() -> np.ndarray:
    """float32 values a cast can get wrong: ties between two 16-bit values (both
    parities), the largest values, subnormals, signed zeros, infinities, NaN."""
    rng = np.random.default_rng(0)
    bulk = rng.standard_normal(3000).astype(np.float32) * 0.05
    bits = rng.integers(0, 2**16, 200, dtype=np.uint32) << np.uint32(16)
    ties = (bits | np.uint32(0x8000)).view(np.float32)  # exactly halfway (bf16)
    ties = ties[np.isfinite(ties)]
    # halfway between two float16 values in [0.5, 1), whose spacing is 2^-11
    f16_ties = 0.5 + (np.arange(200, dtype=np.float32) * 2 + 1) * np.float32(2**-12)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, 3.3e38, -3.3e38, 1e-40, -1e-41, 6e-8, 1e-5]
        + [65504.0, 65519.0, -65504.0, 2.0**-24, 2.0**-25, 1.0 + 2.0**-8],
        dtype=np.float32,
    )
    return np.concatenate([bulk, ties, f16_ties, special])


def through_flower(record) -> dict[str, np.ndarray]:
    """``record`` serialised and read back by Flower's own protobuf serde."""
    content = RecordDict({KEY_ARRAYS: record})
    back = serde.recorddict_from_proto(serde.recorddict_to_proto(content))
    return record_to_state(back[KEY_ARRAYS])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_round_trip_is_torchs_cast(dtype):
    values = awkward_values()
    if dtype == "float16":  # beyond float16's range: refused (its own test)
        values = values[~np.isfinite(values) | (np.abs(values) <= 65519)]
    nans = np.array([np.nan, -np.nan], np.float32)
    nans = np.append(nans, np.uint32([0x7FFFFFFF, 0xFFFFFFFF]).view(np.float32))
    state = {"a.lora_A.weight": values, "nan": nans}
    back = through_flower(state_to_record(state, dtype))
    assert back["a.lora_A.weight"].dtype == np.float32
    reference = torch.from_numpy(values).to(TORCH[dtype]).to(torch.float32).numpy()
    np.testing.assert_array_equal(back["a.lora_A.weight"], reference)
    # the sign bit too: -0.0 stays -0.0, a tiny negative rounds to -0.0
    assert (np.signbit(back["a.lora_A.weight"]) == np.signbit(reference)).all()
    assert np.isnan(back["nan"]).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_round_trip_is_within_half_a_step_of_float64(dtype):
    """Against float64 numpy: every value moves by at most half the spacing of the
    16-bit values around it (round to nearest), and not at all where it is one of
    them already."""
    rng = np.random.default_rng(1)
    x64 = rng.standard_normal((40, 300)) * 0.05
    state = {"w": x64.astype(np.float32)}
    back = through_flower(state_to_record(state, dtype))["w"].astype(np.float64)
    x32 = state["w"].astype(np.float64)
    bound = np.maximum(HALF_ULP[dtype] * np.abs(x32), HALF_SUBNORMAL[dtype])
    assert (np.abs(back - x32) <= bound).all()
    again = through_flower(state_to_record({"w": back}, dtype))["w"]
    np.testing.assert_array_equal(again, back)  # 16-bit values travel exactly
    assert np.abs(back - x64).max() > 0  # it did round


def test_float16_overflow_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="overflows float16.*bfloat16"):
        state_to_record({"b": np.float32([1.0, 7e4])}, "float16")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        state_to_record({"b": np.float32([1.0])}, "float8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_bytes_are_half_by_flowers_serialization(dtype):
    rng = np.random.default_rng(2)
    state = {
        f"l{i}.lora_{ab}.weight": rng.standard_normal(shape).astype(np.float32)
        for i in range(3)
        for ab, shape in (("A", (16, 384)), ("B", (384, 16)))
    }
    full = RecordDict({KEY_ARRAYS: state_to_record(state)})
    half = RecordDict({KEY_ARRAYS: state_to_record(state, dtype)})
    # wire_size's exact count is Flower's own: every distinct object deflated
    assert payload_bytes(half) == deflated_bytes(half)
    ratio = deflated_bytes(half) / deflated_bytes(full)
    assert 0.5 < ratio < 0.52
    # one big array: the per-array overhead vanishes, 5 MiB chunks included
    big = {"w": rng.standard_normal((2048, 1536)).astype(np.float32)}
    big_half = RecordDict({KEY_ARRAYS: state_to_record(big, dtype)})
    assert payload_bytes(big_half) == deflated_bytes(big_half)
    big_full = RecordDict({KEY_ARRAYS: state_to_record(big)})
    assert payload_bytes(big_half) / payload_bytes(big_full) == pytest.approx(
        0.5, abs=1e-4
    )


def test_float32_is_the_default_and_unchanged():
    rng = np.random.default_rng(3)
    state = {"a": rng.standard_normal((5, 7)), "b": rng.standard_normal(3)}  # float64
    record = state_to_record(state)
    for k, v in state.items():
        before = Array(np.ascontiguousarray(v, dtype=np.float32))  # Flower's own
        assert record[k].dtype == "float32" and record[k].data == before.data
        assert state_to_record(state, "float32")[k].data == before.data
    views = record_to_views(record)
    assert not views["a"].flags.writeable  # still a view of the bytes, no copy


def test_a_bfloat16_tag_on_other_data_is_refused():
    wrong = Array(np.float32([1.0, 2.0]))
    wrong.dtype = "bfloat16"
    with pytest.raises(ValueError, match="bfloat16 array carried as float32"):
        record_to_views({"x": wrong})


# --- settings --------------------------------------------------------------------
def test_wire_dtype_is_checked_and_refused_under_secure_aggregation(settings):
    assert with_(settings, "wire.dtype", "bfloat16").wire_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="wire.dtype='int8'"):
        validate(with_(settings, "wire.dtype", "int8"))
    secure = with_(
        settings,
        "secure_aggregation",
        {"mode": "secaggplus", "threshold": 0.5, "clip": 0.5, "max_weight": 1000},
        "wire.dtype",
        "float16",
    )
    with pytest.raises(ConfigError, match="wire.dtype='float16'.*masked"):
        validate(secure)


def test_settings_without_a_wire_section_travel_in_float32(settings):
    plain = settings.to_dict()
    plain.pop("wire", None)  # written before the section existed
    old = Settings.from_dict(plain)
    assert old.wire is None and old.wire_dtype == "float32"
    assert "wire" not in old.to_dict()


def arrays_bytes(msg) -> int:
    """Measured bytes of a message's arrays alone."""
    return payload_bytes(RecordDict({KEY_ARRAYS: msg.content[KEY_ARRAYS]}))


# --- the real path ---------------------------------------------------------------
@pytest.mark.usefixtures("task_identity")
def test_a_bfloat16_round_through_the_client_app_and_the_strategy(tiny_bert):
    """Both ways in bfloat16: the global goes down as bfloat16, each client starts
    from its cast and replies in bfloat16, the server averages the widened
    replies (against a float64 mean of torch's reading of the bits) and measures
    half the bytes of the same round in float32."""
    rounds = {
        dtype: federated_round(
            experiment(tiny_bert, "fedavg_lora", f"wire.dtype={dtype}"), []
        )
        for dtype in ("float32", "bfloat16")
    }
    rnd = rounds["bfloat16"]
    for msg in rnd.messages:
        assert {a.dtype for a in msg.content[KEY_ARRAYS].values()} == {"bfloat16"}
    decoded, weights = [], []
    for reply in rnd.replies:
        record = reply.content[KEY_ARRAYS]
        assert {a.dtype for a in record.values()} == {"bfloat16"}
        decoded.append(
            {
                k: torch.from_numpy(np.array(a.numpy()).view(np.int16))
                .view(torch.bfloat16)
                .to(torch.float64)
                .numpy()
                for k, a in record.items()
            }
        )
        weights.append(float(reply.content["metrics"][KEY_NUM_EXAMPLES]))
    p = np.array(weights) / sum(weights)
    for k in decoded[0]:
        mean = sum(w * d[k] for w, d in zip(p, decoded, strict=True))
        np.testing.assert_allclose(rnd.new[k], mean, rtol=1e-5, atol=1e-7)
    # the clients trained: their replies are not the global they were sent
    sent = rnd.sent
    assert any(not np.array_equal(decoded[0][k], sent[k]) for k in decoded[0])
    # the bytes: measured on the 16-bit messages; the arrays' data halved
    log = rnd.strategy.round_log[1]
    assert log["bytes_down"] == sum(payload_bytes(m.content) for m in rnd.messages)
    assert log["bytes_up"] == sum(payload_bytes(m.content) for m in rnd.replies)
    for way in ("messages", "replies"):
        pairs = zip(*(getattr(r, way) for r in rounds.values()), strict=True)
        for full, half in pairs:
            saved = arrays_bytes(full) - arrays_bytes(half)
            # Flower sends identical arrays once (B is zero at the start)
            state = record_to_state(full.content[KEY_ARRAYS])
            raw = raw_bytes({v.tobytes(): v for v in state.values()})
            n = len(full.content[KEY_ARRAYS])
            assert abs(saved - raw / 2) <= 2 * n + 8, (way, saved, raw)
    # the server's own state stays float32: what it returns is not rounded
    assert all(v.dtype == np.float32 for v in rnd.new.values())


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ["fedsb", "rolora", "fedex_lora"])
def test_what_must_match_bit_for_bit_stays_exact(tiny_bert, method):
    """Two bfloat16 rounds of methods that ship more than the adapter: Fed-SB's
    frozen factors stay float32 (the clients' digests match: nothing rejected),
    FedEx-LoRA's base-weight folds as the server holds them, RoLoRA's changes go
    as bfloat16."""
    extra = ["strategy.init=random_orthogonal"] if method == "fedsb" else []
    cfg = experiment(tiny_bert, method, "wire.dtype=bfloat16", *extra)
    first = federated_round(cfg, [])
    second = federated_round(cfg, [], previous=first)
    for rnd in (first, second):
        log = rnd.strategy.round_log[rnd.server_round]
        assert rnd.new is not None and log["rejected"] == [] and log["clients"] == 3
        for msg in rnd.messages:
            dtypes = {a.dtype for a in msg.content[KEY_ARRAYS].values()}
            assert dtypes == {"bfloat16"}
            if KEY_FROZEN in msg.content:
                frozen = {a.dtype for a in msg.content[KEY_FROZEN].values()}
                assert frozen == {"float32"}
            if KEY_BASE in msg.content and len(msg.content[KEY_BASE]):
                # in the dtype the server holds them (exact_record), never cast
                folds = {a.dtype for a in msg.content[KEY_BASE].values()}
                assert folds and folds <= {"float32", "float64"}
        for reply in rnd.replies:
            dtypes = {a.dtype for a in reply.content[KEY_ARRAYS].values()}
            assert dtypes == {"bfloat16"}
    if method == "fedsb":
        assert any(KEY_FROZEN in m.content for m in first.messages)
    if method == "fedex_lora":  # the second round carries the first's folds
        assert any(len(m.content[KEY_BASE]) for m in second.messages)


@pytest.mark.usefixtures("task_identity")
def test_a_float16_overflow_stops_the_run_with_the_key_and_the_fix(
    tiny_bert, monkeypatch
):
    """A client whose update leaves float16's range replies with a configuration
    error naming ``wire.dtype``; with every client so, the run stops with it."""
    from clients import client_app
    from fedlora.errors import ClientConfigError

    real = client_app.get_state

    def huge(model):  # an update beyond float16's range (a diverged client)
        return {k: v + 1e5 for k, v in real(model).items()}

    monkeypatch.setattr(client_app, "get_state", huge)
    cfg = experiment(tiny_bert, "fedavg_lora", "wire.dtype=float16")
    with pytest.raises(ClientConfigError, match=r"wire.dtype='float16'.*bfloat16"):
        federated_round(cfg, [])
