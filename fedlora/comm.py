"""Communication accounting: analytic parameter counts and raw payload sizes.

What crosses the wire is measured by the strategies from the serialized messages;
this module gives the reference figures those measurements are compared against.
"""

from __future__ import annotations

from collections.abc import Iterable

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
METHODS = ("fedavg_lora", "ffa_lora", "fedsb", "lora_fair")


def layer_shapes(model: str) -> list[tuple[int, int]]:
    """Every adapted layer's ``(d_out, d_in)`` for a named model shape."""
    layers, per_layer = MODEL_SHAPES[model]
    return per_layer * layers


def round_parameters(shapes: list[tuple[int, int]], r: int, method: str) -> int:
    """Parameters one client receives (and sends back) in one round.

    FedAvg-LoRA / LoRA-FAIR ``r (d_out + d_in)``; FFA-LoRA ``r d_out`` (B only);
    Fed-SB ``r^2`` per adapted layer. Heads are not included.
    """
    if method in ("fedavg_lora", "lora_fair"):
        return lora_parameters(shapes, r)
    if method == "ffa_lora":
        return int(sum(r * d_out for d_out, _ in shapes))
    if method == "fedsb":
        return int(r * r * len(shapes))
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def one_time_parameters(
    shapes: list[tuple[int, int]], r: int, method: str
) -> tuple[int, int]:
    """``(up, down)`` per client, once: Fed-SB's federated init (gradients of every
    ``W0`` up; ``B`` and ``A`` down). Zero for the other methods."""
    if method != "fedsb":
        return 0, 0
    return (
        int(sum(d_out * d_in for d_out, d_in in shapes)),
        lora_parameters(shapes, r),
    )
