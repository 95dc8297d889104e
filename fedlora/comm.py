"""Communication accounting: analytic parameter counts and raw payload sizes.

What crosses the wire is measured by the strategies from the serialized messages;
this module gives the reference figures those measurements are compared against.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def num_parameters(state: dict[str, np.ndarray]) -> int:
    """Number of scalars in a state."""
    return int(sum(np.size(v) for v in state.values()))


def raw_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays' data alone (no names, headers or framing)."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def lora_parameters(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """LoRA parameters sent per client per round: ``sum r (d_out + d_in)``.

    ``shapes`` lists ``(d_out, d_in)`` of every adapted layer.
    """
    return int(sum(r * (d_out + d_in) for d_out, d_in in shapes))


# (d_out, d_in) of q, k, v, o, gate, up, down per decoder layer, and the layer count
MODEL_SHAPES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    # hidden 4096, 8 KV heads of 128, MLP 14336: sum(d_out + d_in) = 81,920
    "mistral-7b": (
        32,
        [
            (4096, 4096),
            (1024, 4096),
            (1024, 4096),
            (4096, 4096),
            (14336, 4096),
            (14336, 4096),
            (4096, 14336),
        ],
    ),
    # hidden 4096, 32 KV heads, MLP 11008
    "llama-2-7b": (
        32,
        [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)],
    ),
    # all-MiniLM-L6-v2 with LoRA on query and value
    "minilm": (6, [(384, 384), (384, 384)]),
}


def layer_shapes(model: str) -> list[tuple[int, int]]:
    """Every adapted layer's ``(d_out, d_in)`` for a named model shape."""
    layers, per_layer = MODEL_SHAPES[model]
    return per_layer * layers


def round_parameters(shapes: list[tuple[int, int]], r: int, method: Any) -> int:
    """Parameters one client receives (and sends back) in one round, by the
    method's own count per layer (``Method.round_parameters``): FedAvg-LoRA /
    LoRA-FAIR ``r (d_out + d_in)``; FFA-LoRA ``r d_out`` (B only); Fed-SB ``r^2``.
    Heads are not included."""
    return int(sum(method.round_parameters(d_out, d_in, r) for d_out, d_in in shapes))


def one_time_parameters(
    shapes: list[tuple[int, int]], r: int, method: Any
) -> tuple[int, int]:
    """``(up, down)`` per client, once: Fed-SB's federated init (gradients of every
    ``W0`` up; ``B`` and ``A`` down). Zero for the other methods."""
    pairs = [method.one_time_parameters(d_out, d_in, r) for d_out, d_in in shapes]
    return int(sum(u for u, _ in pairs)), int(sum(d for _, d in pairs))
