"""LoRA-FAIR: average the factors, then correct ``B`` on the server so that
``(Bbar + dB) Abar`` comes closer to the clients' average product.

Paper: Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025, https://arxiv.org/abs/2411.14961.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.aggregation import weighted_average
from fedlora.errors import ConfigError
from fedlora.fair import MAX_ITER, SOLVERS, SolverInfo, correction, summarise
from fedlora.methods.base import Method, State

log = logging.getLogger("fedlora")


class LoRAFAIR(Method):
    """``A <- Abar``, ``B <- Bbar + dB*`` per layer; clients restart from these.

    ``dB*`` comes from :func:`fedlora.fair.correction`: ``gd`` (the paper's cosine
    objective made scale-free, ``1 - cos(ideal, (Bbar + dB) Abar) + lambda
    ||dB||^2 / ||Bbar||^2`` with ``ideal = sum p_k B_k A_k``, solved to convergence,
    the product's scale fitted by least squares) or ``ridge`` (closed form of
    ``min ||ideal - (Bbar + dB) Abar||^2 + lambda ||dB||^2``). Each aggregation's
    :meth:`round_record` says what the solver did over all layers
    (:func:`fedlora.fair.summarise`, plus ``unconverged_layers``).

    Parameters
    ----------
    solver : str
        ``gd`` or ``ridge``.
    lam : float
        ``lambda`` (paper: 0.01); ``gd`` weighs ``||dB||^2 / ||Bbar||^2``, ``ridge``
        ``||dB||^2``.
    max_iter : int
        The ``gd`` solver's step limit per layer (paper: 1000).
    """

    name = "lora_fair"
    aggregates_by_mean = False  # the correction reads every client's factors
    sums_only = False  # the correction reads every client's factors

    def __init__(
        self,
        *,
        solver: str = "gd",
        lam: float = 0.01,
        max_iter: int = MAX_ITER,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if solver not in SOLVERS:
            raise ConfigError(
                "strategy.solver", solver, f"choose {' or '.join(SOLVERS)}"
            )
        if lam < 0:
            raise ConfigError("strategy.lam", lam, "lambda must be >= 0")
        if int(max_iter) < 1:
            raise ConfigError("strategy.max_iter", max_iter, "must be >= 1")
        self.solver, self.lam, self.max_iter = solver, float(lam), int(max_iter)
        self._record: dict[str, Any] = {}

    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """``A <- Abar``, ``B <- Bbar + dB*`` per layer; the head averaged."""
        out = weighted_average(states, weights)
        infos: list[SolverInfo] = []
        for layer, (a_key, b_key) in lora_layers(out).items():
            db, info = correction(
                [s[b_key] for s in states],
                [s[a_key] for s in states],
                weights,
                self.lam,
                self.solver,
                self.max_iter,
            )
            out[b_key] = (out[b_key] + db).astype(out[b_key].dtype)
            infos.append({"layer": layer, **info})
        self._record = summarise(infos)
        stuck = [i["layer"] for i in infos if not i["converged"]]
        self._record["unconverged_layers"] = stuck
        if stuck:
            log.warning(
                "LoRA-FAIR's %s solver hit its step limit (%s) on %s of %s layers "
                "(e.g. %s); the best iterate reached was applied",
                self.solver,
                self.max_iter,
                len(stuck),
                len(infos),
                ", ".join(stuck[:3]),
            )
        return out

    def round_record(self) -> dict[str, Any]:
        """The last aggregation's solver record, under ``lora_fair``."""
        return {"lora_fair": self._record} if self._record else {}
