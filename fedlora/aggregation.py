"""Aggregation math on wire states (``dict[str, ndarray]``), framework-free.

Client weights: ``p_k = n_k / sum(n)`` (``num_examples``) or ``p_k = 1/K``
(``uniform``). The arrays keep their dtype: float32 states are accumulated in
float32 (no up-casting of large adapters), float64 states in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.errors import ConfigError

State = dict[str, np.ndarray]
WEIGHTINGS = ("num_examples", "uniform")


def client_weights(num_examples: Sequence[float], weighting: str) -> np.ndarray:
    """``p_k`` for each client: proportional to ``n_k`` or uniform; sums to 1."""
    n = np.asarray(num_examples, dtype=np.float64)
    if n.size == 0:
        raise ValueError("no client replies to weight")
    if weighting == "uniform":
        return np.full(n.size, 1.0 / n.size)
    if weighting != "num_examples":
        raise ConfigError(
            "strategy.weighting", weighting, f"choose one of {', '.join(WEIGHTINGS)}"
        )
    if np.any(n <= 0):
        raise ValueError(f"example counts must be positive, got {n.tolist()}")
    return n / n.sum()


#: arrays of at most this many entries are averaged stacked with the others of
#: their shape and dtype (one numpy call a client instead of two per array:
#: Fed-SB's hundreds of r x r matrices); larger ones one by one
SMALL_ENTRIES = 4096


def weighted_average(states: Sequence[State], weights: np.ndarray) -> State:
    """``sum_k p_k x_k`` for every key, in the dtype of the inputs (the same
    operations in the same order for each entry, stacked or not: the same bits).
    """
    out: State = {}
    small: dict[tuple, list[str]] = {}
    for key, first in states[0].items():
        if first.size <= SMALL_ENTRIES:
            small.setdefault((first.shape, first.dtype), []).append(key)
            continue
        acc = np.zeros_like(first)
        for state, p in zip(states, weights, strict=True):
            acc += state[key] * acc.dtype.type(p)
        out[key] = acc
    for (shape, dtype), keys in small.items():
        acc = np.zeros((len(keys), *shape), dtype)
        for state, p in zip(states, weights, strict=True):
            acc += np.stack([state[k] for k in keys]) * acc.dtype.type(p)
        out.update(zip(keys, acc, strict=True))
    return {key: out[key] for key in states[0]}  # the keys' order
