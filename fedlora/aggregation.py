"""Aggregation math on wire states (``dict[str, ndarray]``), framework-free.

Client weights: ``p_k = n_k / sum(n)`` (``num_examples``) or ``p_k = 1/K``
(``uniform``). The arrays keep their dtype: float32 states are accumulated in
float32 (no up-casting of large adapters), float64 states in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.errors import ConfigError
from fedlora.fair import MAX_ITER, SolverInfo, correction

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


def weighted_average(states: Sequence[State], weights: np.ndarray) -> State:
    """``sum_k p_k x_k`` for every key, in the dtype of the inputs."""
    out: State = {}
    for key in states[0]:
        acc = np.zeros_like(states[0][key])
        for state, p in zip(states, weights, strict=True):
            acc += state[key] * acc.dtype.type(p)
        out[key] = acc
    return out


def fedavg_lora(states: Sequence[State], weights: np.ndarray) -> State:
    """FedAvg-LoRA (FedIT): ``A <- Abar``, ``B <- Bbar``, head averaged.

    Inexact: ``sum p_k B_k A_k - Bbar Abar = sum p_k (B_k - Bbar)(A_k - Abar)``.
    """
    return weighted_average(states, weights)


def ffa_lora(states: Sequence[State], weights: np.ndarray) -> State:
    """FFA-LoRA: ``B <- sum p_k B_k`` (A frozen and shared, never sent).

    Exact: ``sum p_k B_k A = Bbar A``.
    """
    return weighted_average(states, weights)


def fedsb(states: Sequence[State], weights: np.ndarray) -> State:
    """Fed-SB: ``R <- sum p_k R_k`` (B, A frozen and shared).

    Exact: ``B Rbar A = sum p_k B R_k A``.
    """
    return weighted_average(states, weights)


def lora_fair(
    states: Sequence[State],
    weights: np.ndarray,
    lam: float,
    solver: str,
    *,
    max_iter: int = MAX_ITER,
    diagnostics: list[SolverInfo] | None = None,
) -> State:
    """LoRA-FAIR: ``A <- Abar``, ``B <- Bbar + dB*`` per layer (see fedlora.fair).

    ``max_iter`` bounds the ``gd`` solver's steps per layer; if ``diagnostics`` is
    a list, each layer's solver record (with its ``layer`` name) is appended to it.
    """
    out = weighted_average(states, weights)
    for layer, (a_key, b_key) in lora_layers(out).items():
        db, info = correction(
            [s[b_key] for s in states],
            [s[a_key] for s in states],
            weights,
            lam,
            solver,
            max_iter,
        )
        out[b_key] = (out[b_key] + db).astype(out[b_key].dtype)
        if diagnostics is not None:
            diagnostics.append({"layer": layer, **info})
    return out
