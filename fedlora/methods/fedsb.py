"""Fed-SB: federated LoRA-SB. Each layer's delta is ``s B R A`` with ``B`` and ``A``
frozen after a one-time initialisation; only the ``r x r`` matrix ``R`` (and the
head) is trained, sent and averaged.

Paper: Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning",
https://arxiv.org/abs/2502.15436; LoRA-SB: https://arxiv.org/abs/2411.19557.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.data import SERVER_DATA_KEY, SERVER_DATA_MISSING, server_data_file
from fedlora.errors import ConfigError
from fedlora.lora_sb import (
    add_r,
    init_from_gradient,
    init_random_orthogonal,
    keys,
    to_plain_lora,
)
from fedlora.methods.base import Factors, InitInputs, Method, State

if TYPE_CHECKING:
    import torch

    from fedlora.settings import Settings

INITS = ("federated_gradient", "server_data", "random_orthogonal")
_R = ".lora_R.weight"


class FedSB(Method):
    """``R <- sum p_k R_k``; exact, ``B Rbar A = sum p_k B R_k A``.

    Initialisation (once, before round 1), ``init``:

    - ``federated_gradient``: an init round; every client sends the summed gradient
      ``G_k`` of each adapted ``W0`` over its first ``calibration_examples``
      examples; ``G = sum_k G_k``; then LoRA-SB's ``B, R0, A`` from the rank-``r``
      truncated SVD of ``-eta sign(G)`` (the first Adam step of full fine-tuning).
    - ``server_data``: the same from the server's own calibration file
      ``server_data_path`` (its first ``calibration_examples`` rows), never the
      clients' data.
    - ``random_orthogonal``: orthonormal ``B``, ``A`` and ``R0 = 0``; no data.

    ``B`` and ``A`` reach each node once (:attr:`ships_frozen`); the node keeps
    them; after that only ``R`` and the head travel: ``r^2`` a layer.
    """

    name = "fedsb"
    ships_frozen = True

    def __init__(
        self,
        *,
        init: str = "federated_gradient",
        init_eta: float = 1e-4,
        calibration_examples: int = 64,
        server_data_path: str | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if init not in INITS:
            raise ConfigError(
                "strategy.init", init, f"choose one of {', '.join(INITS)}"
            )
        if init == "server_data" and not server_data_path:
            raise ConfigError(SERVER_DATA_KEY, server_data_path, SERVER_DATA_MISSING)
        if int(calibration_examples) < 1:
            raise ConfigError(
                "strategy.calibration_examples", calibration_examples, "must be >= 1"
            )
        self.init, self.init_eta, self.seed = init, float(init_eta), int(seed)
        self.server_data_path = server_data_path
        self.calibration_examples = int(calibration_examples)

    def problems(self, settings: Settings) -> list[ConfigError]:
        """Besides the common ones: no init round of private gradients under DP;
        ``server_data`` needs a file the server holds."""
        out = super().problems(settings)
        mode = settings.privacy.mode
        private = mode in ("dp_sgd", "central", "distributed")
        if private and self.init == "federated_gradient":
            out.append(
                ConfigError(
                    "strategy.init",
                    self.init,
                    f"with privacy={mode} the Fed-SB init round would release "
                    "unprotected gradients of private data; use "
                    "strategy.init=random_orthogonal (data-free), or "
                    "strategy.init=server_data with strategy.server_data_path set "
                    "to a calibration file the server itself holds (never the "
                    "clients' data)",
                )
            )
        quant = settings.model.quantization
        if quant and self.init != "random_orthogonal":
            out.append(
                ConfigError(
                    "strategy.init",
                    self.init,
                    f"with model.quantization={quant} the base weights are packed "
                    "and have no gradients for the Fed-SB init; use "
                    "strategy.init=random_orthogonal (data-free)",
                )
            )
        if settings.secure and self.init == "federated_gradient":
            out.append(
                ConfigError(
                    "strategy.init",
                    self.init,
                    "with secure_aggregation=secaggplus the Fed-SB init round would "
                    "send each client's gradient in plaintext; use "
                    "strategy.init=random_orthogonal or server_data",
                )
            )
        if self.init == "server_data":
            try:
                server_data_file(settings)
            except ConfigError as exc:
                out.append(exc)
        return out

    def parametrise(self, model: torch.nn.Module) -> None:
        """Insert a trainable ``R`` in every LoRA layer; freeze ``B`` and ``A``."""
        add_r(model)

    def initialize(self, inputs: InitInputs) -> tuple[State, State]:
        """LoRA-SB's ``B``, ``A`` (frozen) and ``R0`` (in the initial arrays)."""
        state = dict(inputs.arrays)
        layers = [k[: -len(_R)] for k in state if k.endswith(_R)]
        if self.init == "random_orthogonal":
            rng = np.random.default_rng(self.seed)
            factors = {
                layer: init_random_orthogonal(
                    inputs.frozen[keys(layer)[0]].shape[0],
                    inputs.frozen[keys(layer)[2]].shape[1],
                    state[keys(layer)[1]].shape[0],
                    rng,
                )
                for layer in layers
            }
        else:
            gradients = (
                inputs.server_gradients
                if self.init == "server_data"
                else inputs.federated_gradients
            )
            if gradients is None:
                raise ConfigError(
                    "strategy.init",
                    self.init,
                    "this server cannot provide the gradients it needs; use "
                    "strategy.init=random_orthogonal",
                )
            grads = gradients(self.calibration_examples)
            factors = {
                layer: init_from_gradient(
                    grads[layer], state[keys(layer)[1]].shape[0], self.init_eta
                )
                for layer in layers
            }
        frozen: State = {}
        for layer, (b, r0, a) in factors.items():
            b_key, r_key, a_key = keys(layer)
            frozen[b_key], frozen[a_key], state[r_key] = b, a, r0
        return state, frozen

    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """``R <- sum p_k R_k`` (and the head): exact, ``B`` and ``A`` shared."""
        return super().aggregate(states, weights, sent)

    def layer_factors(self, state: State, frozen: State) -> Factors:
        """``{layer: (B R, A)}``: the delta is ``s B R A``."""
        out = {}
        for key in state:
            if key.endswith(_R):
                b_key, r_key, a_key = keys(key[: -len(_R)])
                out[key[: -len(_R)]] = (
                    frozen[b_key].astype(np.float64) @ state[r_key],
                    frozen[a_key],
                )
        return out

    def shared_layers(self, sent: State) -> dict[str, tuple[str | None, str, str]]:
        """Every layer's delta is ``s B R A`` with ``B`` and ``A`` frozen, shared."""
        out: dict[str, tuple[str | None, str, str]] = {}
        for key in sent:
            if key.endswith(_R):
                b_key, r_key, a_key = keys(key[: -len(_R)])
                out[key[: -len(_R)]] = (b_key, a_key, r_key)
        return out

    def export(
        self, state: State, frozen: State, base: dict[str, np.ndarray] | None = None
    ) -> State:
        """Plain LoRA ``B' = B R``, ``A' = A`` with ``alpha = r`` (PEFT-loadable),
        at the export rank (:meth:`~fedlora.methods.base.Method.at_export_rank`:
        the truncated SVD of ``s B R A`` where ``export.rank`` is not ``r``)."""
        return self.at_export_rank(to_plain_lora(frozen, state))

    def state_dict(self) -> dict[str, Any]:
        """The init method (a resumed run must not initialise again)."""
        return {"init": self.init}

    def round_parameters(self, d_out: int, d_in: int, r: int) -> int:
        """``R`` only: ``r^2``."""
        return r * r

    def one_time_parameters(self, d_out: int, d_in: int, r: int) -> tuple[int, int]:
        """The federated init: each ``W0``'s gradient up; ``B`` and ``A`` down."""
        up = d_out * d_in if self.init == "federated_gradient" else 0
        return up, r * (d_out + d_in)
