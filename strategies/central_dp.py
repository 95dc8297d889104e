"""Client-level (central) DP: Flower's server-side fixed-clipping wrapper around a
fedlora strategy, with the release accounted per round.

Each round every sampled client's update (reply - global, over all communicated
arrays) is clipped to ``clipping_norm``; the strategy aggregates (uniform mean), and
``N(0, (noise_multiplier * clipping_norm / m)^2)`` is added to the result, ``m`` the
number of sampled clients. That protects the plain weighted means (FedAvg-LoRA,
FFA-LoRA, Fed-SB). LoRA-FAIR's correction reads each client's factors beyond their
mean, so it is refused (see fedlora.validate).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from strategies.fedavg_lora import FedAvgLoRA


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's wrapper plus epsilon accounting; other attributes (``round_log``,
    ``initialize``, ``export``, ...) are the wrapped strategy's.

    Epsilon: one subsampled Gaussian release per round with sampling rate
    ``m / num_clients``, composed by Opacus' RDP accountant at ``delta``. A
    checkpoint keeps the accountant's history, so a resumed run goes on composing.
    """

    def __init__(
        self,
        strategy: FedAvgLoRA,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        num_clients: int,
        delta: float,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        from opacus.accountants import RDPAccountant

        self.rdp = RDPAccountant()
        self.sample_rate = num_sampled_clients / num_clients
        self.delta = float(delta)

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, aggregate, add noise (Flower); account the release (Opacus RDP)."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.rdp.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )
            epsilon = float(self.rdp.get_epsilon(self.delta))
            real_round = server_round + self.strategy.round_offset
            self.strategy.round_log.setdefault(real_round, {}).update(
                central_epsilon=epsilon,
                central_delta=self.delta,
                central_accountant="rdp",
            )
        return arrays, metrics

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The wrapped strategy's checkpoint state plus the RDP history."""
        arrays, state = self.strategy.checkpoint_state()
        state["central_rdp_history"] = [list(h) for h in self.rdp.history]
        return arrays, state

    def restore_state(self, arrays: dict[str, Any], state: dict[str, Any]) -> None:
        """Restore the wrapped strategy and the RDP history (releases so far)."""
        self.strategy.restore_state(arrays, state)
        self.rdp.history = [
            (float(sigma), float(q), int(steps))
            for sigma, q, steps in state.get("central_rdp_history", [])
        ]
