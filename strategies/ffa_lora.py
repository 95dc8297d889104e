"""FFA-LoRA: A frozen at its shared seeded init; only B (and the head) trained, sent
and averaged.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024, https://arxiv.org/abs/2403.12313.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.aggregation import ffa_lora
from strategies.fedavg_lora import FedAvgLoRA, State


class FFALoRA(FedAvgLoRA):
    """``B <- sum p_k B_k``; exact because every client shares the same ``A``.

    Clients build ``A`` from ``federation.seed`` (``adapter.parametrisation=ffa``),
    so ``A`` never crosses the wire: half of LoRA's traffic on square layers.
    """

    name = "ffa_lora"

    def aggregate_states(self, states: Sequence[State], weights: np.ndarray) -> State:
        """Weighted mean of ``B`` and the head."""
        return ffa_lora(states, weights)

    def shared_layers(self) -> dict[str, tuple[str | None, str, str]]:
        """Every layer's delta is ``s B A`` with ``A`` frozen and shared."""
        out: dict[str, tuple[str | None, str, str]] = {}
        for key in self._sent:
            if key.endswith(".lora_B.weight"):
                layer = key[: -len(".lora_B.weight")]
                out[layer] = (None, f"{layer}.lora_A.weight", key)
        return out
