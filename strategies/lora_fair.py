"""LoRA-FAIR: average the factors, then correct ``B`` on the server so that
``(Bbar + dB) Abar`` points along the clients' average update.

Paper: Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025, https://arxiv.org/abs/2411.14961.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora.aggregation import lora_fair
from fedlora.errors import ConfigError
from fedlora.fair import MAX_ITER, SOLVERS, SolverInfo, summarise
from strategies.fedavg_lora import FedAvgLoRA, State

log = logging.getLogger(__name__)


class LoRAFAIR(FedAvgLoRA):
    """``A <- Abar``, ``B <- Bbar + dB*``; clients restart from these factors.

    Each round's ``round_log[r]["lora_fair"]`` records what the solver did over all
    layers (:func:`fedlora.fair.summarise`): ``unconverged`` layers (those that hit
    ``max_iter``, also logged as a warning), ``iterations_max``, the objective at
    ``dB = 0`` and at the result (``objective_start``/``objective_end``, means over
    layers), the cosines to the clients' average product and ``db_ratio``
    (``||dB|| / ||Bbar||``).

    Parameters
    ----------
    solver : str
        ``gd`` (the paper's cosine objective, scale-free, solved to convergence,
        the product's scale fitted by least squares; see
        :func:`fedlora.fair.gd_solve`) or ``ridge`` (closed form of the
        least-squares variant).
    lam : float
        Regularisation ``lambda`` (paper: 0.01). For ``gd`` it weighs
        ``||dB||_F^2 / ||Bbar||_F^2``; for ``ridge``, ``||dB||_F^2``.
    max_iter : int
        The ``gd`` solver's step limit per layer (paper: 1000).
    """

    name = "lora_fair"

    def __init__(
        self,
        *,
        solver: str = "gd",
        lam: float = 0.01,
        max_iter: int = MAX_ITER,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if solver not in SOLVERS:
            raise ConfigError(
                "strategy.solver", solver, f"choose {' or '.join(SOLVERS)}"
            )
        if lam < 0:
            raise ConfigError("strategy.lam", lam, "lambda must be >= 0")
        if int(max_iter) < 1:
            raise ConfigError("strategy.max_iter", max_iter, "must be >= 1")
        self.solver, self.lam, self.max_iter = solver, float(lam), int(max_iter)
        self.solver_record: dict[str, Any] | None = None  # the latest aggregation's

    def aggregate_states(self, states: Sequence[State], weights: np.ndarray) -> State:
        """Average, then the per-layer correction of ``B``; keeps the solver's
        record in :attr:`solver_record`."""
        infos: list[SolverInfo] = []
        out = lora_fair(
            states,
            weights,
            self.lam,
            self.solver,
            max_iter=self.max_iter,
            diagnostics=infos,
        )
        self.solver_record = summarise(infos)
        self.solver_record["unconverged_layers"] = [
            i["layer"] for i in infos if not i["converged"]
        ]
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg-LoRA's round, with the solver's record in ``round_log``."""
        self.solver_record = None
        result = super().aggregate_train(server_round, replies)
        record, self.solver_record = self.solver_record, None
        if record is None:  # too few updates: nothing was aggregated
            return result
        real_round = server_round + self.round_offset
        self.round_log.setdefault(real_round, {})["lora_fair"] = record
        if record.get("unconverged"):
            log.warning(
                "round %s: LoRA-FAIR's %s solver hit its step limit (%s) on %s of %s "
                "layers (largest gradient norm %.3g; e.g. %s); the best iterate "
                "reached was applied (mean objective %.6g at dB=0, %.6g applied)",
                real_round,
                self.solver,
                self.max_iter,
                record["unconverged"],
                record["layers"],
                record["grad_norm_max"],
                ", ".join(record["unconverged_layers"][:3]),
                record["objective_start"],
                record["objective_end"],
            )
        return result
