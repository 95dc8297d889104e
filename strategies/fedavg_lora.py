"""FedAvg-LoRA (FedIT): average A and B separately.

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning" (FedIT), https://arxiv.org/abs/2305.05644.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.adapters import (
    FROZEN_CRC_KEY,
    FROZEN_DIFFER,
    FROZEN_MISSING,
    frozen_digest,
)
from fedlora.aggregation import client_weights, fedavg_lora
from fedlora.comm import num_parameters
from fedlora.diagnostics import (
    aggregation_error,
    frozen_triangles,
    layer_factors,
    shared_factor_error,
)
from fedlora.updates import check_update, update_norm_outliers
from strategies.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    payload_bytes,
    record_to_state,
    state_to_record,
)

log = logging.getLogger(__name__)
State = dict[str, np.ndarray]
GradientFn = Callable[[], dict[str, np.ndarray]]


class FedAvgLoRA(FedAvg):
    """Flower's FedAvg sampling and messaging, with LoRA-aware aggregation and
    per-round diagnostics.

    Server update: ``A <- sum p_k A_k``, ``B <- sum p_k B_k`` (and the head).
    Each round's ``round_log[r]`` holds ``bytes_down``/``bytes_up`` (measured from
    the serialized messages), ``params_down``/``params_up`` (analytic),
    ``aggregation_error`` overall and by module, client replies and failures.
    Subclasses change the method by overriding :meth:`aggregate_states`.

    Parameters
    ----------
    weighting : str
        ``num_examples`` (``p_k = n_k / sum n``) or ``uniform`` (``p_k = 1/K``).
    scaling : float
        LoRA scale ``s`` of the adapters (for the aggregation-error diagnostic).
    max_update_norm_ratio : float
        Reject an update whose norm exceeds this multiple of the round's median
        update norm (0 disables; needs 3 or more updates).
    min_replies : int
        Usable updates a round needs; with fewer, the global adapter is kept.
    max_failed_rounds : int
        Consecutive rounds below ``min_replies`` after which the run stops.

    Attributes
    ----------
    round_offset : int
        Rounds completed before Flower's loop started (a resumed run). Flower numbers
        its rounds from 1; every hook adds this offset first, so the messages'
        ``server-round`` (the clients' training seeds), ``round_log`` and the
        metrics carry the run's real round numbers.
    """

    name = "fedavg_lora"

    def __init__(
        self,
        *,
        weighting: str = "num_examples",
        scaling: float = 1.0,
        max_update_norm_ratio: float = 0.0,
        min_replies: int = 1,
        max_failed_rounds: int = 3,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.max_update_norm_ratio = float(max_update_norm_ratio)
        self.min_replies = int(min_replies)
        self.max_failed_rounds = int(max_failed_rounds)
        self._failed_rounds = 0  # consecutive rounds with too few usable updates
        client_weights([1.0], weighting)  # validates the name early
        self.weighting = weighting
        self.scaling = float(scaling)
        self.round_log: dict[int, dict[str, Any]] = {}
        self.frozen: State = {}  # frozen LoRA factors shared by all parties
        self._frozen_crc: tuple[State, int] | None = None  # (frozen, its digest)
        self.epsilon: dict[int, float] = {}  # latest epsilon spent per partition
        self._sent: State = {}
        self._sampled: list[int] = []  # node ids of this round's train messages
        self._triangles: tuple[State, dict[str, Any]] | None = None  # frozen QR
        self.round_offset = 0

    # --- the method ------------------------------------------------------------
    def aggregate_states(self, states: Sequence[State], weights: np.ndarray) -> State:
        """FedAvg-LoRA: weighted mean of every communicated tensor."""
        return fedavg_lora(states, weights)

    def initialize(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        frozen: State,
        config: ConfigRecord,
        server_gradient: GradientFn | None = None,
    ) -> ArrayRecord:
        """Called once by the ServerApp before round 1; returns the initial arrays.

        ``frozen`` holds the model's frozen LoRA factors (built from the shared seed).
        Methods with an initialisation protocol (Fed-SB) override this.
        """
        self.frozen = frozen
        return arrays

    def personalise(self, messages: list[Message]) -> list[Message]:
        """Adjust the sampled nodes' train messages (default: unchanged)."""
        return messages

    def export(self, state: State) -> tuple[State, dict[str, Any]]:
        """The final adapter as plain PEFT LoRA: ``(state, adapter overrides)``."""
        return {**self.frozen, **state}, {"parametrisation": "lora"}

    # --- checkpoints -------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, State], dict[str, Any]]:
        """What a checkpoint must keep to continue: ``(array groups, JSON state)``.

        Arrays: the frozen factors (``{"frozen": ...}``). JSON: the method's name,
        the latest epsilon per partition and the count of consecutive failed rounds.
        Subclasses extend both and :meth:`restore_state`.
        """
        return (
            {"frozen": dict(self.frozen)},
            {
                "name": self.name,
                "failed_rounds": self._failed_rounds,
                "epsilon": {str(k): v for k, v in sorted(self.epsilon.items())},
            },
        )

    def restore_state(self, arrays: dict[str, State], state: dict[str, Any]) -> None:
        """Take back what :meth:`checkpoint_state` saved (instead of ``initialize``).

        Raises
        ------
        ValueError
            If the checkpoint was written by another method.
        """
        if state.get("name") != self.name:
            raise ValueError(
                f"the checkpoint was written by strategy "
                f"{state.get('name')!r}, not {self.name!r}"
            )
        self.frozen = dict(arrays.get("frozen", {}))
        self._failed_rounds = int(state.get("failed_rounds", 0))
        self.epsilon = {int(k): float(v) for k, v in state.get("epsilon", {}).items()}

    # --- Flower hooks ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does; remember what was sent and its size."""
        server_round += self.round_offset
        messages = self.personalise(
            list(super().configure_train(server_round, arrays, config, grid))
        )
        self._sent = record_to_state(arrays)
        self._sampled = [m.metadata.dst_node_id for m in messages]
        self.round_log[server_round] = {
            "clients_sampled": len(messages),
            "bytes_down": sum(payload_bytes(m.content) for m in messages),
            "params_down": num_parameters(self._sent) * len(messages),
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies with :meth:`aggregate_states`; record metrics.

        Error replies count as failures; replies without arrays are clients that
        declined (privacy budget); malformed updates are rejected with their reason.
        """
        started = time.perf_counter()
        server_round += self.round_offset
        replies = list(replies)
        entry = self.round_log.setdefault(server_round, {})
        ok = [m for m in replies if not m.has_error()]
        missing = max(entry.get("clients_sampled", 0) - len(replies), 0)
        entry.update(
            failures=len(replies) - len(ok) + missing,
            failure_reasons=self._failures(replies, missing),
            bytes_up=sum(payload_bytes(m.content) for m in ok),
        )
        for failure in entry["failure_reasons"]:
            log.warning(
                "aggregate_train: node %s failed: %s",
                failure["node"],
                failure["reason"],
            )
        self._record_privacy(entry, ok)
        entry["declined"] = [
            {
                "partition-id": m.content[KEY_METRICS].get("partition-id"),
                "reason": (
                    m.content[KEY_CONFIG].get("reason", "")
                    if KEY_CONFIG in m.content
                    else ""
                ),
            }
            for m in ok
            if self._declined(m)
        ]
        states, client_metrics = self._accepted(
            [m for m in ok if not self._declined(m)], entry
        )
        entry["clients"] = len(states)
        if len(states) < max(self.min_replies, 1):
            self._failed_rounds += 1
            if self._failed_rounds >= self.max_failed_rounds:
                raise RuntimeError(
                    f"round {server_round}: {len(states)} usable updates, fewer than "
                    f"federation.min_replies={self.min_replies}, for "
                    f"{self._failed_rounds} rounds in a row; stopping. See "
                    "failure_reasons/rejected in metrics.jsonl; lower "
                    "federation.min_replies or fix the clients."
                )
            log.warning(
                "aggregate_train: %s usable updates in round %s (< %s); the "
                "global adapter is unchanged",
                len(states),
                server_round,
                self.min_replies,
            )
            return None, None
        self._failed_rounds = 0
        weights = client_weights(
            [c[KEY_NUM_EXAMPLES] for c in client_metrics], self.weighting
        )
        new = self.aggregate_states(states, weights)
        overall, by_module = self.diagnose(states, weights, new)
        entry.update(
            aggregation_error=overall,
            aggregation_error_by_module=by_module,
            params_up=sum(num_parameters(s) for s in states),
            client_replies=client_metrics,
        )
        summary = {"aggregation_error": overall}
        if all("train_loss" in c for c in client_metrics):  # not sent under DP-SGD
            summary["train_loss"] = float(
                np.dot(weights, [c["train_loss"] for c in client_metrics])
            )
        record = state_to_record(new)
        entry["server_aggregate_time"] = time.perf_counter() - started
        return record, MetricRecord(summary)

    def _failures(self, replies: list[Message], missing: int) -> list[dict[str, Any]]:
        """Who failed, why and when. An error the SuperLink wrote for a node (e.g.
        "Node Unavailable" for a dead SuperNode) does not come from that node, so
        such errors are matched to the sampled nodes that sent nothing usable."""
        now = time.time()
        sampled = self._sampled
        answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
        errors = [m for m in replies if m.has_error()]
        answered |= {m.metadata.src_node_id for m in errors}
        silent = iter(n for n in sampled if n not in answered)
        out = []
        for m in errors:
            node = m.metadata.src_node_id
            if node not in sampled:  # written by the SuperLink for a lost node
                node = next(silent, node)
            out.append({"node": node, "reason": m.error.reason, "time": now})
        for _ in range(missing):
            out.append(
                {
                    "node": next(silent, None),
                    "reason": "no reply within federation.round_timeout",
                    "time": now,
                }
            )
        return out

    @staticmethod
    def _declined(msg: Message) -> bool:
        return (
            KEY_ARRAYS not in msg.content
            and KEY_METRICS in msg.content
            and bool(msg.content[KEY_METRICS].get("declined"))
        )

    def _accepted(
        self, replies: list[Message], entry: dict[str, Any]
    ) -> tuple[list[State], list[dict[str, Any]]]:
        """Decode and check every reply; keep the well-formed ones, record the rest."""
        expected = {k: v.shape for k, v in self._sent.items()}
        decoded: list[tuple[int, State, dict[str, Any]]] = []
        rejected: list[dict[str, Any]] = []
        for m in replies:
            node = m.metadata.src_node_id
            try:  # whatever the bytes, decoding must not take the server down
                state = record_to_state(m.content[KEY_ARRAYS])
                metrics = dict(m.content[KEY_METRICS])
                reason = check_update(state, expected, metrics.get(KEY_NUM_EXAMPLES))
                reason = reason or self._frozen_mismatch(metrics)
            except Exception as exc:  # noqa: BLE001 - any malformed payload
                reason = f"undecodable reply: {type(exc).__name__}: {exc}"
            if reason is None:
                decoded.append((node, state, metrics))
            else:
                rejected.append({"node": node, "reason": reason})
        outliers = update_norm_outliers(
            [s for _, s, _ in decoded], self._sent, self.max_update_norm_ratio
        )
        for (node, _, _), reason in zip(decoded, outliers, strict=True):
            if reason is not None:
                rejected.append({"node": node, "reason": reason})
        kept = [
            d for d, reason in zip(decoded, outliers, strict=True) if reason is None
        ]
        # a fixed order (by partition) makes the float sums independent of arrival
        kept.sort(key=lambda d: (str(d[2].get("partition-id")), d[0]))
        for r in rejected:
            log.warning(
                "aggregate_train: update of node %s rejected: %s",
                r["node"],
                r["reason"],
            )
        entry["rejected"] = rejected
        return [s for _, s, _ in kept], [m for _, _, m in kept]

    def _frozen_mismatch(self, metrics: dict[str, Any]) -> str | None:
        """Why a reply's frozen factors are not the server's ``frozen`` (its
        ``frozen-crc`` differs or is absent), or None. Methods without frozen
        factors (``frozen`` empty) skip the check."""
        if not self.frozen:
            return None
        cached = self._frozen_crc
        if cached is None or cached[0] is not self.frozen:  # once per frozen set
            cached = self._frozen_crc = (self.frozen, frozen_digest(self.frozen))
        theirs = metrics.get(FROZEN_CRC_KEY)
        if theirs is None:
            return (
                f"{FROZEN_MISSING}: its frozen factors cannot be checked against "
                f"the server's (crc {cached[1]})"
            )
        if int(theirs) != cached[1]:
            return f"{FROZEN_DIFFER} (crc {int(theirs)} != {cached[1]})"
        return None

    def _record_privacy(self, entry: dict[str, Any], replies: list[Message]) -> None:
        """Keep each client's latest reported epsilon (DP-SGD) in the round log."""
        for m in replies:
            try:
                metrics = m.content[KEY_METRICS]
                self.epsilon[int(metrics["partition-id"])] = float(metrics["epsilon"])
            except (KeyError, TypeError, ValueError):  # no DP, or a malformed reply
                continue
        if self.epsilon:
            entry["epsilon"] = {str(k): v for k, v in sorted(self.epsilon.items())}
            entry["epsilon_max"] = max(self.epsilon.values())

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation messages, with the real round as ``server-round``."""
        return super().configure_evaluate(
            server_round + self.round_offset, arrays, config, grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's weighted mean of client evaluations, also kept in round_log,
        with the clients' summed evaluation time (``client_eval_time``)."""
        server_round += self.round_offset
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            entry = self.round_log.setdefault(server_round, {})
            entry.update(
                {
                    f"federated_{k}": v
                    for k, v in metrics.items()
                    if k != "eval_time"  # a weighted mean of times means nothing
                }
            )
            entry["client_eval_time"] = sum(
                float(m.content[KEY_METRICS].get("eval_time", 0.0))
                for m in replies
                if not m.has_error() and KEY_METRICS in m.content
            )
        return metrics

    # --- diagnostics -------------------------------------------------------------
    def shared_layers(self) -> dict[str, tuple[str | None, str, str]] | None:
        """For methods whose layer delta is ``s L X R`` with ``L`` (or none) and
        ``R`` frozen and shared, ``{layer: (L key or None, R key, X key)}``; None
        for methods without shared factors (the general diagnostic)."""
        return None

    def diagnose(
        self, states: Sequence[State], weights: np.ndarray, new: State
    ) -> tuple[float, dict[str, float]]:
        """The round's aggregation error, overall and by module (see
        :mod:`fedlora.diagnostics`), from the sent, returned and new states."""
        layers = self.shared_layers()
        if layers is None:
            return aggregation_error(
                [self.effective_factors(s) for s in states],
                weights,
                self.effective_factors(self._sent),
                self.effective_factors(new),
                self.scaling,
            )
        if self._triangles is None or self._triangles[0] is not self.frozen:
            outer = {layer: (left, right) for layer, (left, right, _) in layers.items()}
            self._triangles = (self.frozen, frozen_triangles(self.frozen, outer))

        def middle(state: State) -> dict[str, np.ndarray]:
            return {layer: state[x] for layer, (_, _, x) in layers.items()}

        return shared_factor_error(
            [middle(s) for s in states],
            weights,
            middle(self._sent),
            middle(new),
            self._triangles[1],
        )

    def effective_factors(
        self, state: State
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (B, A)}`` whose product is the layer's adapter delta / s."""
        return layer_factors({**self.frozen, **state})
