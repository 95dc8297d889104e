"""RoLoRA: alternate the trained factor, ``B`` in odd rounds and ``A`` in even ones.

Paper: Chen et al., "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA", 2025, https://arxiv.org/abs/2502.01755.
"""

from __future__ import annotations

from fedlora.methods.base import Method

_A, _B = ".lora_A.", ".lora_B."


class RoLoRA(Method):
    """Odd rounds: ``A`` frozen, clients train ``B``, ``B <- sum p_k B_k``; even
    rounds: ``B`` frozen, clients train ``A``, ``A <- sum p_k A_k`` (the head
    every round). Each round is exact: with one factor shared by every client,
    ``sum p_k B_k A = Bbar A`` (or ``B Abar``). Round 1 trains ``B``: at
    PEFT's init ``B = 0``, so ``A`` would get no gradient.

    One factor a round each way (``r d_out``, then ``r d_in``): up, the one
    trained; down, the one the last round changed, since each node keeps the
    global state it last received (a node that missed rounds gets every factor
    changed since, a new or restarted one all of them).
    """

    name = "rolora"
    nodes_keep_global = True

    def trains(self, key: str, server_round: int) -> bool:
        """``B`` in odd rounds, ``A`` in even rounds, anything else always."""
        if _A in key:
            return server_round % 2 == 0
        if _B in key:
            return server_round % 2 == 1
        return True
