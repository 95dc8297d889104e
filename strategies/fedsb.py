"""Fed-SB: federated LoRA-SB. Only the r x r matrix ``R`` (and the head) is trained,
sent and averaged; ``B`` and ``A`` are fixed after a one-time initialisation.

Paper: Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning", https://arxiv.org/abs/2502.15436.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora.adapters import FROZEN_DIFFER, FROZEN_MISSING
from fedlora.aggregation import fedsb
from fedlora.data import SERVER_DATA_KEY, SERVER_DATA_MISSING
from fedlora.errors import ConfigError
from fedlora.lora_sb import (
    init_from_gradient,
    init_random_orthogonal,
    keys,
    to_plain_lora,
)
from strategies.fedavg_lora import FedAvgLoRA, GradientFn, State
from strategies.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_FROZEN,
    KEY_PHASE,
    KEY_ROUND,
    PHASE_GRADIENT,
    payload_bytes,
    record_to_state,
    state_to_record,
)

INITS = ("federated_gradient", "server_data", "random_orthogonal")


class FedSB(FedAvgLoRA):
    """``R <- sum p_k R_k`` (exact: ``B Rbar A = sum p_k B R_k A``).

    Initialisation (once, before round 1), ``init``:

    - ``federated_gradient``: an init round; every client sends the summed gradient
      ``G_k`` of each adapted ``W0`` over its first ``calibration_examples``
      examples; ``G = sum_k G_k``; then LoRA-SB's ``B, R0, A`` from ``-eta sign(G)``.
      Its traffic is reported as round 0.
    - ``server_data``: the same from the server's own calibration file
      ``server_data_path`` (its first ``calibration_examples`` rows; the ServerApp
      passes their gradient as ``server_gradient``), never the clients' data.
    - ``random_orthogonal``: orthonormal ``B``, ``A`` and ``R0 = 0``; no data.

    ``B`` and ``A`` reach each node once (in its first train message); after that
    only ``R`` and the head travel. A resumed run (:meth:`restore_state`) takes
    ``B`` and ``A`` from the checkpoint instead of initialising again, and sends them
    to every node once more: a new Flower run starts each node's state empty.
    A node whose update is rejected because its frozen factors are not the
    server's (see ``FedAvgLoRA._frozen_mismatch``) gets them again in its next
    train message.
    """

    name = "fedsb"

    def __init__(
        self,
        *,
        init: str = "federated_gradient",
        init_eta: float = 1e-4,
        calibration_examples: int = 64,
        server_data_path: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if init not in INITS:
            raise ConfigError(
                "strategy.init", init, f"choose one of {', '.join(INITS)}"
            )
        if init == "server_data" and not server_data_path:
            raise ConfigError(SERVER_DATA_KEY, server_data_path, SERVER_DATA_MISSING)
        self.init, self.init_eta, self.seed = init, float(init_eta), int(seed)
        self.server_data_path = server_data_path
        self.calibration_examples = int(calibration_examples)
        self._has_frozen: set[int] = set()

    def aggregate_states(self, states: Sequence[State], weights: np.ndarray) -> State:
        """Weighted mean of ``R`` and the head."""
        return fedsb(states, weights)

    def checkpoint_state(self) -> tuple[dict[str, State], dict[str, Any]]:
        """FedAvg-LoRA's state (``frozen`` holds ``B`` and ``A``), plus the init
        method and the ids of the nodes that hold ``B`` and ``A``."""
        arrays, state = super().checkpoint_state()
        state.update(init=self.init, has_frozen=sorted(self._has_frozen))
        return arrays, state

    def restore_state(self, arrays: dict[str, State], state: dict[str, Any]) -> None:
        """Take back ``B`` and ``A``; no node is assumed to hold them.

        The saved ``has_frozen`` is not restored on purpose: the resumed run is a
        new Flower run, whose nodes (same ids in a deployment, new ones in a
        simulation) start with empty state, so each gets ``B`` and ``A`` again in
        its first train message.

        Raises
        ------
        ValueError
            If the checkpoint holds no frozen factors (not a Fed-SB checkpoint).
        """
        super().restore_state(arrays, state)
        if not self.frozen:
            raise ValueError("the checkpoint holds no Fed-SB factors B and A")
        self._has_frozen = set()

    def initialize(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        frozen: State,
        config: ConfigRecord,
        server_gradient: GradientFn | None = None,
    ) -> ArrayRecord:
        """Compute the LoRA-SB factors; return the initial arrays (``R0``, head)."""
        state = record_to_state(arrays)
        layers = [
            k[: -len(".lora_R.weight")] for k in state if k.endswith(".lora_R.weight")
        ]
        if self.init == "random_orthogonal":
            rng = np.random.default_rng(self.seed)
            factors = {
                layer: init_random_orthogonal(
                    frozen[keys(layer)[0]].shape[0],
                    frozen[keys(layer)[2]].shape[1],
                    state[keys(layer)[1]].shape[0],
                    rng,
                )
                for layer in layers
            }
        else:
            if self.init == "server_data":
                if server_gradient is None:
                    raise ConfigError(
                        "strategy.init",
                        self.init,
                        "the server has no calibration data here",
                    )
                grads = server_gradient()
            else:
                grads = self._gradient_round(grid, config)
            factors = {
                layer: init_from_gradient(
                    grads[layer], state[keys(layer)[1]].shape[0], self.init_eta
                )
                for layer in layers
            }
        self.frozen = {}
        for layer, (b, r0, a) in factors.items():
            b_key, r_key, a_key = keys(layer)
            self.frozen[b_key], self.frozen[a_key], state[r_key] = b, a, r0
        return state_to_record(state)

    def _gradient_round(self, grid: Grid, config: ConfigRecord) -> State:
        """The init round: ask every node for its gradient sums and add them up."""
        node_ids, _ = sample_nodes(
            grid, self.min_available_nodes, len(list(grid.get_node_ids()))
        )
        content = RecordDict(
            {
                KEY_CONFIG: ConfigRecord(
                    {**dict(config), KEY_ROUND: 0, KEY_PHASE: PHASE_GRADIENT}
                )
            }
        )
        messages = [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in node_ids
        ]
        replies = [m for m in grid.send_and_receive(messages) if not m.has_error()]
        if not replies:
            raise RuntimeError(
                "Fed-SB init round: no client returned its gradient; "
                "see the client logs, or use strategy.init="
                "random_orthogonal"
            )
        grads = [record_to_state(m.content[KEY_ARRAYS]) for m in replies]
        self.round_log[0] = {
            "bytes_down": sum(payload_bytes(m.content) for m in messages),
            "bytes_up": sum(payload_bytes(m.content) for m in replies),
            "params_up": sum(int(sum(g.size for g in s.values())) for s in grads),
            "clients": len(replies),
            "failures": len(messages) - len(replies),
        }
        return {k: np.sum([g[k] for g in grads], axis=0) for k in grads[0]}

    def personalise(self, messages: list[Message]) -> list[Message]:
        """Add the frozen ``B`` and ``A`` to the message of a node that lacks them."""
        out = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._has_frozen:
                content = RecordDict(
                    {
                        **dict(msg.content.items()),
                        KEY_FROZEN: state_to_record(self.frozen),
                    }
                )
                msg = Message(
                    content=content,
                    message_type=msg.metadata.message_type,
                    dst_node_id=msg.metadata.dst_node_id,
                )
            out.append(msg)
        return out

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        """As FedAvg-LoRA; nodes that replied hold ``B`` and ``A`` from now on,
        except those whose update was rejected for other frozen factors."""
        replies = list(replies)
        self._has_frozen.update(
            m.metadata.src_node_id for m in replies if not m.has_error()
        )
        out = super().aggregate_train(server_round, replies)
        entry = self.round_log.get(server_round + self.round_offset, {})
        for rejected in entry.get("rejected", []):
            if str(rejected["reason"]).startswith((FROZEN_DIFFER, FROZEN_MISSING)):
                self._has_frozen.discard(rejected["node"])
        return out

    def shared_layers(self) -> dict[str, tuple[str | None, str, str]]:
        """Every layer's delta is ``s B R A`` with ``B`` and ``A`` frozen, shared."""
        out: dict[str, tuple[str | None, str, str]] = {}
        for key in self._sent:
            if key.endswith(".lora_R.weight"):
                layer = key[: -len(".lora_R.weight")]
                b_key, r_key, a_key = keys(layer)
                out[layer] = (b_key, a_key, r_key)
        return out

    def effective_factors(
        self, state: State
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (B R, A)}``: the delta is ``s B R A``."""
        out = {}
        for key in state:
            if key.endswith(".lora_R.weight"):
                b_key, r_key, a_key = keys(key[: -len(".lora_R.weight")])
                out[key[: -len(".lora_R.weight")]] = (
                    self.frozen[b_key].astype(np.float64) @ state[r_key],
                    self.frozen[a_key],
                )
        return out

    def export(self, state: State) -> tuple[State, dict[str, Any]]:
        """Plain LoRA ``B' = B R``, ``A' = A`` with ``alpha = r`` (PEFT-loadable)."""
        return to_plain_lora(self.frozen, state), {"parametrisation": "lora"}
