"""Communication accounting: analytic parameter counts and raw payload sizes.

What crosses the wire is measured by the strategies from the serialized messages;
this module gives the reference figures those measurements are compared against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def num_parameters(state: dict[str, np.ndarray]) -> int:
    """Number of scalars in a state."""
    return int(sum(np.size(v) for v in state.values()))


def raw_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays' data alone (no names, headers or framing)."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def fold_parameters(d_out: int, d_in: int, k: int) -> int:
    """Numbers a rank-``k`` base-weight fold of one layer travels as: the factors
    ``U`` (``d_out x k``) and ``V`` (``k x d_in``) while they are fewer than the
    dense ``d_out x d_in`` matrix, else the dense matrix
    (:class:`fedlora.base_delta.BaseDelta`'s rule)."""
    return min((d_out + d_in) * k, d_out * d_in)


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


def client_traffic(
    shapes: list[tuple[int, int]], r: int, ranks: Sequence[int], method: Any
) -> tuple[int, int]:
    """``(up, down)`` parameters of a client of rank ``r`` in one round whose
    clients train ``ranks`` (one entry per client, every client in every round),
    by the method's own count per layer (``Method.round_traffic``), from the
    second round on (the first carries no fold yet). Heads are not included."""
    pairs = [method.round_traffic(d_out, d_in, r, ranks) for d_out, d_in in shapes]
    return int(sum(u for u, _ in pairs)), int(sum(d for _, d in pairs))


def spread_ranks(ranks: Sequence[int], clients: int) -> list[int]:
    """The rank of each of ``clients`` clients for the rank list ``ranks``: the
    list itself when it has one rank per client, else its tiers spread in order
    (client ``k`` of ``N`` takes tier ``k T // N``, as ``adapter.client_ranks``)."""
    if len(ranks) == clients:
        return [int(r) for r in ranks]
    return [int(ranks[k * len(ranks) // clients]) for k in range(clients)]


def fold_sizes(shapes: list[tuple[int, int]], k: int) -> dict[str, int]:
    """A rank-``k`` fold of every layer (a stack of replies whose ranks sum to
    ``k``): its numbers ``stacked`` (every layer as factors), ``dense`` (every
    layer dense), ``sent`` (each layer the smaller, :func:`fold_parameters`), and
    ``dense_layers``, the layers that travel dense."""
    return {
        "stacked": int(sum((d_out + d_in) * k for d_out, d_in in shapes)),
        "dense": int(sum(d_out * d_in for d_out, d_in in shapes)),
        "sent": int(sum(fold_parameters(d_out, d_in, k) for d_out, d_in in shapes)),
        "dense_layers": sum(
            (d_out + d_in) * k >= d_out * d_in for d_out, d_in in shapes
        ),
    }


def dense_from(d_out: int, d_in: int) -> int:
    """The smallest fold rank at which a ``d_out x d_in`` layer travels dense."""
    return -(-(d_out * d_in) // (d_out + d_in))
