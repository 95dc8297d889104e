"""LoRA-FAIR: average the factors, then correct ``B`` on the server so that
``(Bbar + dB) Abar`` points along the clients' average update.

Paper: Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025, https://arxiv.org/abs/2411.14961.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlora.aggregation import lora_fair
from fedlora.errors import ConfigError
from fedlora.fair import SOLVERS
from strategies.fedavg_lora import FedAvgLoRA, State


class LoRAFAIR(FedAvgLoRA):
    """``A <- Abar``, ``B <- Bbar + dB*``; clients restart from these factors.

    Parameters
    ----------
    solver : str
        ``gd`` (the paper's cosine objective, Adam, up to 1000 steps) or ``ridge``
        (closed form of the least-squares variant).
    lam : float
        Regularisation ``lambda`` of ``||dB||_F^2`` (paper: 0.01).
    """

    name = "lora_fair"

    def __init__(self, *, solver: str = "gd", lam: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if solver not in SOLVERS:
            raise ConfigError(
                "strategy.solver", solver, f"choose {' or '.join(SOLVERS)}"
            )
        if lam < 0:
            raise ConfigError("strategy.lam", lam, "lambda must be >= 0")
        self.solver, self.lam = solver, float(lam)

    def aggregate_states(self, states: Sequence[State], weights: np.ndarray) -> State:
        """Average, then the per-layer correction of ``B``."""
        return lora_fair(states, weights, self.lam, self.solver)
