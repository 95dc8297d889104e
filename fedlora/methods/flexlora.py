"""FlexLoRA: a rank per client; the server forms the average of the clients' full
updates and hands each client its best approximation at its rank (truncated SVD).

Paper: Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024,
https://arxiv.org/abs/2402.11505.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.aggregation import weighted_average
from fedlora.heterogeneous import factored_svd, split_truncation, stack
from fedlora.methods.base import State
from fedlora.methods.fedavg_lora import FedAvgLoRA


class FlexLoRA(FedAvgLoRA):
    """Per layer, with the replies brought to the global rank ``R`` and scale
    ``s_R`` (:class:`fedlora.ranks.RankPlan`, so ``s_R B'_k A'_k = s_k B_k A_k``)::

        Delta = sum_k p_k s_k B_k A_k = U diag(S) V^T
        s_R B A = trunc_R(Delta),  B = U_R diag(sqrt(S_R)) / sqrt(s_R),
                                   A = diag(sqrt(S_R)) V_R^T / sqrt(s_R)

    and client ``k`` starts from the first ``r_k`` columns/rows at its own scale:
    exactly ``trunc_{r_k}(Delta)``, the best rank-``r_k`` approximation. The SVD
    comes from the factors (thin QR of the stacks, SVD of the small core:
    ``O((d_out + d_in)(sum r_k)^2)``), never the dense ``d_out x d_in`` matrix.
    Inexact by truncation: each round's ``flexlora`` record has, per rank ``r``,
    the share of ``Delta`` (all layers) a rank-``r`` client cannot hold.
    """

    name = "flexlora"
    sums_only = False  # the SVD of the stack reads every client's factors

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._record: dict[str, Any] = {}

    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """The head by ``p_k``; each layer's factors as the truncated SVD of
        ``Delta`` at the global rank, split evenly."""
        layers = lora_layers(states[0])
        factor_keys = {k for pair in layers.values() for k in pair}
        head = [{k: v for k, v in s.items() if k not in factor_keys} for s in states]
        out = weighted_average(head, weights) if head[0] else {}
        scale = self.ranks.scale(self.ranks.rank) if self.ranks else 1.0
        tails: np.ndarray | None = None
        for a_key, b_key in layers.values():
            rank = states[0][a_key].shape[0]
            bs, as_ = [s[b_key] for s in states], [s[a_key] for s in states]
            u, s, vt = factored_svd(*stack(bs, as_, weights, [scale] * len(bs)))
            b, a = split_truncation(u, s, vt, rank, scale)
            out[b_key] = b.astype(states[0][b_key].dtype)
            out[a_key] = a.astype(states[0][a_key].dtype)
            # what a rank-r approximation leaves out, r = 1..R (squared)
            sq = np.concatenate([s**2, np.zeros(max(rank + 1 - s.size, 0))])
            tail = np.array([sq[r:].sum() for r in range(rank + 1)])
            tails = tail if tails is None else tails + tail
        if tails is not None and tails[0] > 0:
            self._record = {
                "truncation_share_by_rank": {
                    str(r): float(np.sqrt(tails[r] / tails[0]))
                    for r in range(1, tails.size)
                }
            }
        return out

    def round_record(self) -> dict[str, Any]:
        """The last aggregation's truncation share per client rank."""
        return {"flexlora": self._record} if self._record else {}
