"""FedAvg-LoRA (FedIT): every client trains ``A`` and ``B``; the server averages
each factor separately.

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", https://arxiv.org/abs/2305.05644.
"""

from __future__ import annotations

from fedlora.methods.base import Method


class FedAvgLoRA(Method):
    """``A <- sum p_k A_k``, ``B <- sum p_k B_k``: the protocol's defaults.

    Inexact, by ``sum p_k (B_k - Bbar)(A_k - Abar)`` per layer (the cross term the
    ``aggregation_error`` diagnostic measures).
    """

    name = "fedavg_lora"
