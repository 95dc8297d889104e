"""HetLoRA: a rank per client, zero-padding, and each layer's factors averaged with
weights proportional to the size of each client's update.

Paper: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, https://arxiv.org/abs/2401.06432.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.aggregation import weighted_average
from fedlora.heterogeneous import hetlora_aggregate, hetlora_weights
from fedlora.methods.base import State
from fedlora.methods.fedavg_lora import FedAvgLoRA


class HetLoRA(FedAvgLoRA):
    """Clients start from the global factors truncated to their rank at their own
    scale, and the server pads their replies back (as the zero-padding
    FedAvg-LoRA, :class:`fedlora.ranks.RankPlan`); then, per layer,

        w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F
        B <- sum_k w_k pad(B_k),   A <- sum_k w_k pad(A_k)

    (each norm from the ``r_k x r_k`` Gram matrices; all-zero updates: uniform).
    The head is averaged with the clients' ``p_k``. Inexact, like FedAvg-LoRA.
    Rank self-pruning (the paper's option) is not implemented: the paper's text
    does not specify its rule.
    """

    name = "hetlora"
    sums_only = False  # the weights w_k read every client's factors

    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """The head by ``p_k``; each layer's padded factors by its ``w_k``."""
        layers = lora_layers(states[0])
        factor_keys = {k for pair in layers.values() for k in pair}
        head = [{k: v for k, v in s.items() if k not in factor_keys} for s in states]
        out = weighted_average(head, weights) if head[0] else {}
        for a_key, b_key in layers.values():
            bs = [s[b_key] for s in states]
            as_ = [s[a_key] for s in states]
            w = hetlora_weights(bs, as_, np.ones(len(states)))  # padded: one scale
            b, a = hetlora_aggregate(bs, as_, w)
            out[b_key] = b.astype(states[0][b_key].dtype)
            out[a_key] = a.astype(states[0][a_key].dtype)
        return out
