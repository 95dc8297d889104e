"""The wire format: adapter states <-> Flower records, and payload sizes.

This is the only place where fedlora states meet Flower's records; the strategies
and the ClientApp both use it, so both sides agree on keys and dtypes.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora.ranks import RANK_KEY
from fedlora.settings import WIRE_DTYPES
from strategies.wire_size import content_bytes

KEY_ARRAYS = "arrays"  # the ArrayRecord of a message (Flower's default key)
KEY_CONFIG = "config"  # the ConfigRecord of a message
KEY_METRICS = "metrics"  # the MetricRecord of a reply
KEY_NUM_EXAMPLES = "num-examples"  # aggregation weight, in every train reply
KEY_ROUND = "server-round"  # injected by Flower's FedAvg into every config
KEY_EXPERIMENT = "fedlora"  # the experiment settings (JSON) in every config
KEY_PARTITION = "partition-id"  # in every reply's metrics: the client's partition
KEY_EPSILON = "epsilon"  # DP-SGD: the privacy a client has spent (its metrics)
KEY_DECLINED = "declined"  # a reply's metric: the client sat the round out
KEY_REASON = "reason"  # a declined reply's config: why
#: the error code of a client's reply when a configuration error (a ConfigError)
#: kept it from serving the message; the error's reason is its message. Flower's
#: own codes (``flwr.common.constant.ErrorCode``) are single digits
ERROR_CONFIG = 4001


#: the ``Array.dtype`` tag of a bfloat16 array: numpy has no bfloat16 (nor does
#: Flower's ``Array``), so its data is the ``.npy`` of the bits as uint16
BFLOAT16 = "bfloat16"


def state_to_record(
    state: dict[str, np.ndarray], dtype: str = "float32"
) -> ArrayRecord:
    """Wire state -> ArrayRecord (contiguous arrays, keys kept), each array cast
    to ``dtype`` (one of :data:`WIRE_DTYPES`; rounded to nearest, ties to even).

    Raises
    ------
    ValueError
        An unknown ``dtype``, or a value beyond float16's range (65504) when
        ``dtype`` is float16.
    """
    try:
        encode = _ENCODERS[dtype]
    except KeyError:
        raise ValueError(
            f"wire dtype {dtype!r}: choose one of {', '.join(WIRE_DTYPES)}"
        ) from None
    return _record({k: encode(k, v) for k, v in state.items()})


def _record(arrays: dict[str, Array]) -> ArrayRecord:
    """``ArrayRecord(arrays)`` without Flower's copy of every ``Array`` (its
    ``from_array_dict`` builds each one again: a third of a round's encoding time
    for Fed-SB's many small arrays)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """``Array(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)``: the
    same object, built in a fifth of the time where :data:`_FAST_ARRAY` holds
    (Flower's constructor sorts out its three call forms and marks each field
    as it is set: 5 us of a Fed-SB round's 224 arrays each)."""
    if not _FAST_ARRAY:
        return Array(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)
    return _direct_array(dtype, shape, data)


def _direct_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """An ``Array`` with the fields and the dirty flag Flower's constructor sets,
    set directly."""
    array = Array.__new__(Array)
    array.__dict__.update(
        _is_dirty=True, dtype=dtype, shape=shape, stype=SType.NUMPY, data=data
    )
    return array


def _fast_array_matches() -> bool:
    """Whether :func:`_direct_array` leaves what Flower's constructor leaves
    (checked once, at import, against the installed Flower): the same fields and
    flags, the same object id once deflated."""
    shape, data = (2,), b"\x93NUMPY-stand-in"
    flowers = Array(dtype="float32", shape=shape, stype=SType.NUMPY, data=data)
    ours = _direct_array("float32", shape, data)
    try:
        return ours.__dict__ == flowers.__dict__ and ours.object_id == (
            flowers.object_id
        )
    except Exception:  # noqa: BLE001 - a Flower that differs: its constructor
        return False


_FAST_ARRAY = _fast_array_matches()


def _float32(key: str, value: np.ndarray) -> Array:
    return to_array(np.ascontiguousarray(value, dtype=np.float32))


def _float16(key: str, value: np.ndarray) -> Array:
    value = np.asarray(value)
    with np.errstate(over="ignore"):
        half = np.ascontiguousarray(value, dtype=np.float16)
    overflow = np.isinf(half) & np.isfinite(value)
    if overflow.any():
        big = float(np.abs(value[overflow]).max())
        raise ValueError(
            f"{key}: an entry of magnitude {big:.4g} overflows float16 (largest "
            "65504); send it as bfloat16 (float32's range) or float32"
        )
    return to_array(half)


def _bfloat16(key: str, value: np.ndarray) -> Array:
    bits = to_array(bfloat16_bits(np.asarray(value, dtype=np.float32)))
    # tagged: its data is the .npy of the uint16 bits
    return Array(dtype=BFLOAT16, shape=bits.shape, stype=bits.stype, data=bits.data)


_ENCODERS = {"float32": _float32, "float16": _float16, "bfloat16": _bfloat16}


def bfloat16_bits(value: np.ndarray) -> np.ndarray:
    """float32 -> the bits of the nearest bfloat16 (ties to even) as uint16, a
    new C-contiguous array; NaN stays NaN, overflow gives infinity."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(value)
    if nan.any():  # the carry could turn a NaN's payload into a sign
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """The uint16 bits of bfloat16 values -> those values as float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def exact_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Wire state -> ArrayRecord, each array in its own dtype (float64 stays
    float64): for what every party must hold bit for bit, such as the summed
    base-weight folds, whose dense form is float64 (:mod:`fedlora.base_delta`)."""
    return _record({k: to_array(np.ascontiguousarray(v)) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> wire state (arrays of their own, writable; 16-bit floats
    widened to float32)."""
    return {k: decode_array(v, copy=True) for k, v in record.items()}


def record_to_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> wire state as read-only views of the record's bytes: no
    copy (the server reading a round's replies), but for 16-bit floats, widened
    to float32 arrays of their own."""
    return {k: decode_array(v) for k, v in record.items()}


def decode_array(array: Array, copy: bool = False) -> np.ndarray:
    """An adapter array as sent (:func:`state_to_record`): float16 and bfloat16
    (:data:`BFLOAT16`) widened to float32 (exactly), a new array; others as
    :func:`from_array` reads them, a read-only view of the bytes (``copy``: a
    writable copy).

    Raises
    ------
    ValueError
        A bfloat16 tag on data that is not uint16.
    """
    value = from_array(array)
    if array.dtype == BFLOAT16:
        if value.dtype != np.uint16:
            raise ValueError(f"a bfloat16 array carried as {value.dtype}, not uint16")
        return bfloat16_to_float32(value)
    if value.dtype == np.float16:
        return value.astype(np.float32)
    return value.copy() if copy else value


def to_array(value: np.ndarray) -> Array:
    """``Array(value)``, byte for byte (``.npy`` format), in one copy of the data
    instead of Flower's ``np.save`` into a buffer and ``getvalue()``."""
    if value.dtype.hasobject or not value.flags.c_contiguous:
        return Array(value)  # what the fast path does not cover
    header = _npy_header(value.dtype, value.shape)
    if header is None:  # a header too long for format 1.0 (np.save takes 2.0)
        return Array(value)
    body = memoryview(value).cast("B") if value.size else b""
    return _array(_dtype_name(value.dtype), value.shape, b"".join([header, body]))


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)`` (numpy builds it anew each time), cached."""
    return str(dtype)


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes | None:
    """The format-1.0 ``.npy`` header ``np.save`` writes for a C-ordered array of
    ``dtype`` and ``shape`` (None if it does not fit format 1.0); cached, as a
    round's states repeat a few shapes many times."""
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            },
        )
    except ValueError:
        return None
    return header.getvalue()


def from_array(array: Array) -> np.ndarray:
    """``array.numpy()`` as a read-only view of its bytes (``.npy`` format).

    Raises
    ------
    TypeError
        If the array is not serialised by numpy (``stype``).
    ValueError
        If its bytes are not a whole ``.npy`` array without Python objects.
    """
    if array.stype != SType.NUMPY:
        raise TypeError(f"an array serialised as {array.stype!r}, not numpy")
    data = array.data
    length = _npy_header_length(data[:10])
    if length is None:
        return array.numpy()  # the rare other .npy versions: numpy's reader
    shape, fortran, dtype, offset = _npy_layout(bytes(memoryview(data)[:length]))
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"an array of shape {shape} and dtype {dtype} needs "
            f"{count * dtype.itemsize} bytes of data, got {len(data) - offset}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


_NPY_MAGIC_1_0 = np.lib.format.magic(1, 0)


def _npy_header_length(start: bytes) -> int | None:
    """Length of a format-1.0 ``.npy`` header from its first 10 bytes (magic,
    version, little-endian length); None for another version or no magic."""
    if len(start) < 10 or start[:8] != _NPY_MAGIC_1_0:
        return None
    return 10 + int.from_bytes(start[8:10], "little")


@functools.lru_cache(maxsize=1024)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of a format-1.0 ``.npy``
    header; cached, as a round's replies repeat a few shapes many times.

    Raises
    ------
    ValueError
        If the header is malformed, or the array holds Python objects.
    """
    head = io.BytesIO(header)
    np.lib.format.read_magic(head)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    if dtype.hasobject:
        raise ValueError("an array of Python objects (pickled) is refused")
    return shape, fortran, dtype, head.tell()


def payload_bytes(content: RecordDict) -> int:
    """Bytes that cross the wire for one message's content.

    Flower 1.39 ships a message as its tree of deflated objects (records, arrays,
    5 MiB array chunks; identical objects once): we sum exactly those, computed
    from their layout (:func:`strategies.wire_size.content_bytes`) without
    serialising or hashing the arrays again.
    """
    return content_bytes(content)


def deflated_bytes(content: RecordDict) -> int:
    """:func:`payload_bytes` the slow way, the reference the tests hold it to:
    deflate every distinct object of the tree as Flower does (hashing each)."""
    return int(sum(len(o.deflate()) for o in get_all_nested_objects(content).values()))


KEY_FROZEN = "frozen"  # frozen LoRA factors (Fed-SB's B and A), sent once per node
KEY_PHASE = "phase"  # config key: what a train message asks for
PHASE_GRADIENT = "gradient"  # Fed-SB init round: reply with gradient sums
KEY_CALIBRATION = "calibration-examples"  # ... over this many of a client's examples
KEY_STATE_FROZEN = "fedlora.frozen"  # where a node keeps the frozen factors
KEY_RUN_ID = "fedlora-run"  # config key: the run's id (kept across a resume), which
#   keys each client's privacy ledger
KEY_BASE = "base"  # ArrayRecord: the base-weight folds a node lacks (base_delta wire)
KEY_BASE_SYNC = "base-sync"  # ConfigRecord beside it: KEY_BASE_FROM, KEY_BASE_TO
KEY_BASE_FROM = "from"  # the round the folds continue from (0: they are the whole sum)
KEY_BASE_TO = "to"  # the round of the last fold they hold
KEY_BASE_ROUND = "base-round"  # reply metric: the last fold round the node holds
KEY_STATE_BASE = "fedlora.base"  # where a node keeps its summed folds
KEY_STATE_BASE_ROUND = "fedlora.base-round"  # ... and the round they reach
KEY_STATE_LOCAL = "fedlora.local"  # where a node keeps its local keys (FedSA's B)
KEY_STATE_LOCAL_ROUNDS = "fedlora.local-rounds"  # ... and for how many rounds
KEY_LOCAL_ROUNDS = "local-rounds"  # reply metric: rounds the node has kept them
KEY_RANK = RANK_KEY  # reply metric: the LoRA rank the client trained
KEY_BASE_NORM = "base-norm"  # reply metric: Frobenius norm of the node's summed folds
KEY_GLOBAL_SYNC = "global-sync"  # ConfigRecord: the arrays are the changes since
#   KEY_BASE_FROM (0: all of them) up to KEY_BASE_TO, for nodes that keep the global
KEY_STATE_GLOBAL = "fedlora.global"  # where such a node keeps the global state
KEY_STATE_GLOBAL_ROUND = "fedlora.global-round"  # ... and the round it is from
# secure aggregation (strategies.secagg, clients.secagg): each stage's message type,
# its ConfigRecord, and where a node keeps its round's protocol secrets
SECAGG_KEYS = "secagg_keys"  # train action: fresh key pairs, public halves back
SECAGG_SHARE = "secagg_share"  # train action: encrypted secret shares back
SECAGG_UNMASK = "secagg_unmask"  # train action: one share per holder back
KEY_SECAGG = "secagg"  # ConfigRecord of every protocol message (and the masked
#   train message: the shares the node's neighbours sent it)
KEY_SECAGG_META = "secagg-meta"  # ArrayRecord of a masked reply: [weight, clipped
#   entries, clipped weight], masked with the update
KEY_STATE_SECAGG = "fedlora.secagg"  # where a node keeps its round's session


def no_empty(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without its empty lists, for a ConfigRecord (Flower cannot
    type an empty list; the reader takes a missing key as empty)."""
    return {k: v for k, v in values.items() if not (isinstance(v, list) and not v)}
