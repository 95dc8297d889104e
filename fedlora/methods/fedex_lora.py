"""FedEx-LoRA: average the factors as FedIT does, and fold what averaging the factors
loses into every party's base weights, so the aggregation is exact.

Paper: Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", ACL 2025, https://arxiv.org/abs/2410.09432.

Per adapted layer, with ``p_k`` the client weights, ``Bbar = sum p_k B_k``,
``Abar = sum p_k A_k`` and ``ideal = sum p_k B_k A_k``::

    res = s (ideal - Bbar Abar) = s sum_k p_k (B_k - Bbar)(A_k - Abar)

and ``W0 <- W0 + res`` on every party: the model after the round is
``W0 + s Bbar Abar + res = W0 + s ideal``. Since ``sum p_k (B_k - Bbar) = 0``, the
``A`` side may be centred on any one client instead of on ``Abar``; centred on the
last one, its term vanishes and ``K - 1`` blocks remain (:func:`residual_factors`)::

    res = U V,  U = s [p_1 (B_1 - Bbar), .., p_{K-1} (B_{K-1} - Bbar)]  (d_out, (K-1) r)
                V = [A_1 - A_K; ..; A_{K-1} - A_K]                      ((K-1) r, d_in)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.base_delta import Fold
from fedlora.errors import ConfigError
from fedlora.methods.base import Method, State
from fedlora.methods.merged_export import MergedExport

if TYPE_CHECKING:
    from fedlora.settings import Settings

log = logging.getLogger("fedlora")

#: ``auto``: per layer the factors where they hold fewer numbers than the matrix, else
#: the matrix; ``dense``: always the matrix. (No forced ``factored``:
#: :mod:`fedlora.base_delta` keeps, and sends, a fold dense wherever its factors are
#: no smaller, so it would be ``auto`` under another name.)
WIRES = ("auto", "dense")


def weighted_mean64(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_k p_k x_k``, accumulated in float64."""
    out = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for x, p in zip(arrays, weights, strict=True):
        out += float(p) * np.asarray(x, dtype=np.float64)
    return out


def residual_factors(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: np.ndarray,
    scaling: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)``, float64, with ``U V = s sum_k p_k (B_k - Bbar)(A_k - Abar)``.

    ``U = s [p_k (B_k - Bbar)]_{k<K}`` (``d_out x (K-1) r``) and
    ``V = [A_k - A_K]_{k<K}`` (``(K-1) r x d_in``): exact, since
    ``sum_k p_k (B_k - Bbar) = 0`` lets ``A_K`` replace ``Abar`` and removes the
    ``K``-th term. One client: ``(K-1) r = 0`` columns.
    """
    bbar = weighted_mean64(bs, weights)
    last = np.asarray(as_[-1], dtype=np.float64)
    u = [
        (scaling * float(p)) * (np.asarray(b, dtype=np.float64) - bbar)
        for b, p in zip(bs[:-1], weights[:-1], strict=True)
    ]
    v = [np.asarray(a, dtype=np.float64) - last for a in as_[:-1]]
    d_out, d_in = bbar.shape[0], last.shape[1]
    if not u:
        return np.zeros((d_out, 0)), np.zeros((0, d_in))
    return np.hstack(u), np.vstack(v)


def residual_sizes(d_out: int, d_in: int, r: int, clients: int) -> tuple[int, int]:
    """``(factored, dense)`` numbers of one layer's residual:
    ``(K-1) r (d_out + d_in)`` and ``d_out d_in``."""
    return max(clients - 1, 0) * r * (d_out + d_in), d_out * d_in


class FedExLoRA(MergedExport, Method):
    """``A <- Abar``, ``B <- Bbar`` (and the head averaged), and the residual
    ``s sum_k p_k (B_k - Bbar)(A_k - Abar)`` folded into every party's base
    weights: exact (see the module doc).

    The residual travels to the nodes in the next round's messages
    (:mod:`fedlora.base_delta`), per layer factored as :func:`residual_factors`
    (``(K-1) r (d_out + d_in)`` numbers) or dense (``d_out d_in``).

    Parameters
    ----------
    residual_wire : str
        ``auto``: per layer, the factors where they hold fewer numbers than the
        matrix, else the matrix; ``dense``: always the matrix (see :data:`WIRES`).
    scaling : float
        The LoRA scale ``s`` (:meth:`derived_arguments`: ``adapter.scaling``).

    The exported PEFT adapter (its rank: ``export.rank``, default ``adapter.r``)
    is the truncated SVD of the exact merged delta, base-weight folds plus
    ``s Bbar Abar`` (:class:`~fedlora.methods.merged_export.MergedExport`).
    """

    name = "fedex_lora"
    aggregates_by_mean = False  # the residual reads every client's factors
    sums_only = False  # the residual reads every client's factors
    folds_into_base = True
    accepts_server_optimizer = False  # W0 + s ideal holds for the mean only

    def __init__(
        self,
        *,
        residual_wire: str = "auto",
        scaling: float = 1.0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if residual_wire not in WIRES:
            raise ConfigError(
                "strategy.residual_wire", residual_wire, f"choose {', '.join(WIRES)}"
            )
        if not float(scaling) > 0:
            raise ConfigError("adapter.alpha", scaling, "the LoRA scale must be > 0")
        self.residual_wire = residual_wire
        self.scaling = float(scaling)
        self._record: dict[str, Any] = {}

    @classmethod
    def derived_arguments(cls, settings: Settings) -> dict[str, Any]:
        """``scaling``: the LoRA scale ``s`` of ``adapter`` (``alpha / r``, or
        ``alpha / sqrt(r)`` with rsLoRA)."""
        return {"scaling": settings.adapter.scaling}

    # --- the server ------------------------------------------------------------
    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """``A <- Abar``, ``B <- Bbar``, the head averaged: the float64 means,
        rounded once to the clients' dtype."""
        return {
            key: weighted_mean64([s[key] for s in states], weights).astype(
                np.asarray(states[0][key]).dtype
            )
            for key in states[0]
        }

    def fold(self, states: Sequence[State], weights: np.ndarray, sent: State) -> Fold:
        """Per layer, the residual ``s sum_k p_k (B_k - Bbar)(A_k - Abar)``:
        ``(U, V)`` of :func:`residual_factors`, or the dense ``U V`` (formed from
        the factors: no cancellation), as ``residual_wire`` says; float64 (the
        wire rounds it to float32). Records both sizes (:meth:`round_record`).
        One client: nothing to fold."""
        fold: Fold = {}
        factored_total = dense_total = sent_total = 0
        wires: set[str] = set()
        for layer, (a_key, b_key) in lora_layers(states[0]).items():
            bs, as_ = [s[b_key] for s in states], [s[a_key] for s in states]
            (d_out, r), d_in = np.shape(bs[0]), np.shape(as_[0])[1]
            factored, dense = residual_sizes(d_out, d_in, r, len(states))
            factored_total, dense_total = factored_total + factored, dense_total + dense
            if len(states) < 2:
                continue
            u, v = residual_factors(bs, as_, weights, self.scaling)
            smaller = "factored" if factored < dense else "dense"
            wire = smaller if self.residual_wire == "auto" else "dense"
            fold[layer] = (u, v) if wire == "factored" else u @ v
            sent_total += factored if wire == "factored" else dense
            wires.add(wire)
        used = sorted(wires)
        self._record = {
            "fedex": {
                "residual_params_factored": factored_total,
                "residual_params_dense": dense_total,
                "residual_params_sent": sent_total,
                "wire": (used[0] if len(used) == 1 else "mixed") if used else None,
            }
        }
        return fold

    def round_record(self) -> dict[str, Any]:
        """The last fold's sizes, summed over the layers, under ``fedex``:
        ``residual_params_factored``, ``residual_params_dense``,
        ``residual_params_sent`` and the ``wire`` used (``mixed`` when ``auto``
        chose differently for different layers; None with one client)."""
        return self._record
