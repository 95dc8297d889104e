"""The exact serialized size of a Flower 1.39 message's content, from its layout.

Flower 1.39 ships a message as the tree of its *inflatable objects*, each deflated
to ``head + b"\\x00" + body`` and named by the SHA-256 of those bytes; an object
that occurs twice in the tree (an identical array chunk, array or record) is sent
once. The head is ``"<class> <child ids, comma separated> <len(body)>"``, a child
id being 64 hex digits. The bodies (``flwr/app/message/*.py``):

- ``ArrayChunk``: up to ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` (5 MiB) bytes of an
  ``Array``'s data, as they are;
- ``Array``: JSON ``{"dtype", "shape", "stype", "arraychunk_ids"}``, the last the
  index of each chunk among the array's distinct chunks;
- ``ArrayRecord``, ``RecordDict``: JSON ``{name: child id}``;
- ``ConfigRecord``, ``MetricRecord``: protobuf ``repeated Item items = 1`` with
  ``Item {string key = 1; <Config|Metric>RecordValue value = 2}`` and the value a
  ``oneof`` of scalars and packed (numeric) or repeated (string, bytes) lists.

:func:`content_bytes` computes the sum of the distinct objects' lengths without
deflating or hashing anything large: the JSON bodies are tiny and are written out
with a stand-in id of the right length, the protobuf bodies are sized from the
varint and length-delimited rules, and distinct chunks are told apart by their
bytes (a few sampled bytes first, then a full comparison only where those agree).
``tests/strategies/test_wire_size.py`` holds it equal to deflating every object
(:func:`strategies.wire.deflated_bytes`).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Hashable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

ID_LEN = 64  # an object id: SHA-256 in hex
_STAND_IN_ID = "0" * ID_LEN
INT64_MAX = (1 << 63) - 1
_SAMPLE = 32  # bytes of a chunk sampled at its start, middle and end
_SMALL = 4096  # a chunk of at most this many bytes is keyed by its bytes
_ONE_CHUNK = (0,)  # the chunk ids of an array of one chunk

# protobuf field numbers of ConfigRecordValue / MetricRecordValue (recorddict.proto)
_SCALAR_FIELD = {"double": 1, "sint64": 2, "uint64": 3, "bool": 4, "string": 5}
_SCALAR_FIELD["bytes"] = 6
_LIST_FIELD = {"double": 21, "sint64": 22, "uint64": 23, "bool": 24, "string": 25}
_LIST_FIELD["bytes"] = 26
_KIND = {bool: "bool", int: "sint64", float: "double", str: "string", bytes: "bytes"}
#: the types each record takes, in the order Flower tries them (bool first)
CONFIG_TYPES = (bool, int, float, str, bytes)
METRIC_TYPES = (float, int)


def varint_size(value: int) -> int:
    """Bytes of a non-negative integer as a protobuf varint (7 bits a byte)."""
    return max(1, (value.bit_length() + 6) // 7)


def tag_size(field_number: int) -> int:
    """Bytes of a field's tag, ``(field_number << 3) | wire_type``, as a varint."""
    return varint_size(field_number << 3)


def delimited_size(field_number: int, length: int) -> int:
    """Bytes of a length-delimited field holding ``length`` bytes."""
    return tag_size(field_number) + varint_size(length) + length


def zigzag(value: int) -> int:
    """A ``sint64``'s varint value: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ..."""
    return 2 * value if value >= 0 else -2 * value - 1


def _numeric_size(kind: str, value: Any) -> int:
    """Bytes of one numeric value of ``kind`` (without a tag)."""
    if kind == "double":
        return 8
    if kind == "bool":
        return 1
    if kind == "sint64":
        return varint_size(zigzag(int(value)))
    return varint_size(int(value))  # uint64


def _canonical(kind: str, value: Any) -> Hashable:
    """A value as its bytes on the wire tell it (so -0.0 is not 0.0, True is 1)."""
    if kind == "double":
        return struct.pack("<d", value)
    if kind in ("sint64", "uint64"):
        return int(value)
    return value


def _kind_of(value: Any, types: tuple[type, ...]) -> tuple[str, bool]:
    """``(kind, is_list)`` of a record value, chosen as Flower chooses it
    (``flwr.common.serde_utils._record_value_to_proto``): the first type in
    ``types`` the value, or every item of a list, is an instance of; an integer
    above the int64 range is ``uint64`` (a list, if any item is).

    Raises
    ------
    TypeError
        If no type fits, as Flower's serialisation would.
    """
    for t in types:
        if isinstance(value, t):
            kind = _KIND[t]
            if t is int and value > INT64_MAX:
                kind = "uint64"
            return kind, False
        if isinstance(value, list) and all(isinstance(v, t) for v in value):
            kind = _KIND[t]
            if t is int and any(v > INT64_MAX for v in value):
                kind = "uint64"
            return kind, True
    raise TypeError(f"a record value of type {type(value).__name__} is not allowed")


def value_size(value: Any, types: tuple[type, ...]) -> tuple[int, Hashable]:
    """Serialized bytes of one ``*RecordValue`` message and its canonical form."""
    kind, is_list = _kind_of(value, types)
    if not is_list:
        if kind in ("string", "bytes"):
            raw = value.encode("utf-8") if kind == "string" else value
            size = delimited_size(_SCALAR_FIELD[kind], len(raw))
        else:
            size = tag_size(_SCALAR_FIELD[kind]) + _numeric_size(kind, value)
        return size, (kind, _canonical(kind, value))
    if kind in ("string", "bytes"):  # repeated, not packed: a field per item
        raws = [v.encode("utf-8") if kind == "string" else v for v in value]
        inner = sum(delimited_size(1, len(r)) for r in raws)
    else:  # packed: one field holding every item (none when the list is empty)
        packed = sum(_numeric_size(kind, v) for v in value)
        inner = delimited_size(1, packed) if value else 0
    canonical = tuple(_canonical(kind, v) for v in value)
    return delimited_size(_LIST_FIELD[kind], inner), (kind, True, canonical)


def record_body_size(
    record: ConfigRecord | MetricRecord, types: tuple[type, ...]
) -> tuple[int, Hashable]:
    """Bytes of a ``ConfigRecord``'s or ``MetricRecord``'s protobuf body, and its
    canonical form (two records with equal forms serialize to equal bytes)."""
    size, items = 0, []
    for key, value in record.items():
        key_bytes = key.encode("utf-8")
        v_size, v_canonical = value_size(value, types)
        # Item: the key (proto3: left out when empty), then the value message
        item = delimited_size(1, len(key_bytes)) if key_bytes else 0
        item += delimited_size(2, v_size)
        size += delimited_size(1, item)
        items.append((key, v_canonical))
    return size, tuple(items)


def object_size(class_name: str, children: int, body: int) -> int:
    """Bytes of a deflated object: its head, the divider and its body."""
    ids = children * ID_LEN + max(children - 1, 0)  # comma-separated ids
    return len(class_name) + 1 + ids + 1 + len(str(body)) + 1 + body


def _json_size(body: dict[str, Any]) -> int:
    return len(json.dumps(body).encode("utf-8"))


@functools.lru_cache(maxsize=64)
def _json_str_size(text: str) -> int:
    """Bytes of a string as JSON (quoted, escaped as ``json.dumps`` escapes)."""
    return len(json.dumps(text).encode("utf-8"))


@functools.lru_cache(maxsize=4096)
def _array_size(
    dtype: str, shape: tuple[int, ...], stype: str, ids: tuple[int, ...], distinct: int
) -> int:
    """Bytes of a deflated ``Array`` (cached: a round repeats a few shapes)."""
    return object_size("Array", distinct, array_body_size(dtype, shape, stype, ids))


@functools.lru_cache(maxsize=4096)
def _chunk_size(n: int) -> int:
    return object_size("ArrayChunk", 0, n)


def array_body_size(
    dtype: str, shape: Any, stype: str, chunk_ids: tuple[int, ...] | list[int]
) -> int:
    """Bytes of an ``Array``'s body, ``json.dumps`` of ``{"dtype": .., "shape":
    [..], "stype": .., "arraychunk_ids": [..]}`` (default separators ``", "``
    and ``": "``), from the lengths of its parts."""

    def int_list(values: Any) -> int:  # "[a, b, c]"
        return 2 + sum(len(str(v)) for v in values) + 2 * max(len(values) - 1, 0)

    return (
        len('{"dtype": ')
        + _json_str_size(dtype)
        + len(', "shape": ')
        + int_list(shape)
        + len(', "stype": ')
        + _json_str_size(stype)
        + len(', "arraychunk_ids": ')
        + int_list(chunk_ids)
        + len("}")
    )


class _Objects:
    """The distinct objects of one message tree: a token for each, and its size.

    A token stands for an object id: two objects get the same token exactly when
    their deflated bytes are equal (SHA-256 collisions aside)."""

    def __init__(self) -> None:
        self.tokens: dict[Hashable, int] = {}  # an object's content -> token
        self.total = 0  # bytes of the distinct objects so far
        # chunks by (length, sampled bytes): [(data, token)]
        self.chunks: dict[Hashable, list[tuple[memoryview, int]]] = {}
        self.arrays: dict[int, int] = {}  # id(Array) -> token: an Array seen again

    def token(self, key: Hashable, size: int) -> int:
        """The token of the object with content ``key`` (counted if new)."""
        token = self.tokens.get(key)
        if token is None:
            token = self.tokens[key] = len(self.tokens)
            self.total += size
        return token

    def _small_chunk(self, data: bytes) -> int:
        """A chunk of at most :data:`_SMALL` bytes: its bytes are its key
        (hashed, compared by the dict)."""
        return self.token(("ArrayChunk", data), _chunk_size(len(data)))

    def chunk(self, data: memoryview) -> int:
        n = len(data)
        if n <= _SMALL:
            return self._small_chunk(bytes(data))
        half = n // 2
        sample = (n, bytes(data[:_SAMPLE]), bytes(data[half : half + _SAMPLE]))
        sample += (bytes(data[-_SAMPLE:]),)
        candidates = self.chunks.setdefault(sample, [])
        for seen, token in candidates:
            if _same_bytes(seen, data):
                return token
        token = self.token(("ArrayChunk", len(self.tokens)), _chunk_size(n))
        candidates.append((data, token))
        return token

    def array(self, array: Array) -> int:
        if id(array) in self.arrays:  # the same object again (a shared record)
            return self.arrays[id(array)]
        raw = array.data
        step = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
        if 0 < len(raw) <= _SMALL and type(raw) is bytes:  # one small chunk
            # (most arrays): its bytes are its key, as in chunk()
            chunks: tuple[int, ...] = (self._small_chunk(raw),)
            ids, distinct = _ONE_CHUNK, 1
        elif 0 < len(raw) <= step:  # one chunk
            chunks = (self.chunk(memoryview(raw)),)
            ids, distinct = _ONE_CHUNK, 1
        else:
            data = memoryview(raw)
            chunks = tuple(
                self.chunk(data[i : i + step]) for i in range(0, len(data), step)
            )
            unique = tuple(dict.fromkeys(chunks))
            index = {token: i for i, token in enumerate(unique)}
            ids, distinct = tuple(index[t] for t in chunks), len(unique)
        shape = array.shape if type(array.shape) is tuple else tuple(array.shape)
        size = _array_size(array.dtype, shape, array.stype, ids, distinct)
        key = ("Array", array.dtype, shape, array.stype, chunks)
        token = self.arrays[id(array)] = self.token(key, size)
        return token

    def refs(self, class_name: str, children: dict[str, int]) -> int:
        """An object whose body is JSON ``{name: child id}`` (ArrayRecord,
        RecordDict), its children's tokens given."""
        body = _json_size(dict.fromkeys(children, _STAND_IN_ID))
        size = object_size(class_name, len(set(children.values())), body)
        return self.token((class_name, tuple(children.items())), size)

    def record(self, record: Any) -> int:
        if isinstance(record, ArrayRecord):
            arrays = {name: self.array(a) for name, a in record.items()}
            return self.refs("ArrayRecord", arrays)
        if isinstance(record, ConfigRecord):
            name, types = "ConfigRecord", CONFIG_TYPES
        elif isinstance(record, MetricRecord):
            name, types = "MetricRecord", METRIC_TYPES
        else:
            raise TypeError(f"cannot size a record of type {type(record).__name__}")
        body, canonical = record_body_size(record, types)
        return self.token((name, canonical), object_size(name, 0, body))


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two equally long buffers hold the same bytes (memcmp speed)."""
    return bool(np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)))


def content_bytes(content: RecordDict) -> int:
    """Bytes of the distinct deflated objects of a message's ``content`` (see the
    module docstring): what Flower 1.39 pushes for it, computed from its layout."""
    objects = _Objects()
    records = {name: objects.record(r) for name, r in content.items()}
    objects.refs("RecordDict", records)
    return objects.total
