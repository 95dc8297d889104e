"""What a federated LoRA method is, independent of Flower: the method protocol.

A method says, in one object:

- how the client parametrises its adapter (:meth:`Method.parametrise`: what is
  trained, what is frozen; the frozen factors come from the shared seed or from the
  server),
- what travels: the trainable wire state down, minus what each node keeps for
  itself (:meth:`Method.keeps_local`, e.g. FedSA-LoRA's ``B``); up, what the client
  trained this round (:meth:`Method.trains`, e.g. RoLoRA's alternating factor); plus,
  when :attr:`Method.ships_frozen`, the frozen factors once per node (a node keeps
  them between rounds),
- the server step (:meth:`Method.aggregate`, a pure function of the clients' states,
  their weights and what was sent; its equation in the docstring), and what it folds
  into every party's base weights (:meth:`Method.fold`, e.g. FedEx-LoRA's residual;
  the strategy sends each node the folds it lacks, see :mod:`fedlora.base_delta`),
- any initialisation protocol (:meth:`Method.initialize`, e.g. Fed-SB's init round,
  reached through :class:`InitInputs`' callables),
- per-client settings (:meth:`Method.client_overrides`, e.g. a client's rank), and
  what a node of a known rank is sent (:meth:`Method.downlink`, e.g. the global
  factors truncated to it),
- the effective adapter for diagnostics (:meth:`Method.layer_factors`) and its
  export as plain PEFT LoRA at the rank ``export.rank`` (:meth:`Method.export`,
  :meth:`Method.at_export_rank`, :meth:`Method.default_export_rank`; the exported
  adapter's own settings, :meth:`Method.export_overrides`; tensor files beside
  it, :meth:`Method.export_files`; what the export reports,
  :meth:`Method.summary_notes`),
- constructor arguments derived from the experiment settings outside its
  ``strategy`` section (:meth:`Method.derived_arguments`, e.g. the LoRA scale),
- what it must keep in a checkpoint (:meth:`Method.state_dict`),
- what a round costs on the wire, analytically, per adapted layer
  (:meth:`Method.round_parameters`, and :meth:`Method.round_traffic` up and down for
  a client of a given rank; :mod:`fedlora.comm` sums them over a model's layers).

A node's own state between rounds (shipped frozen factors, its local keys, its base
delta) is kept by the ClientApp in the node's state, from what these hooks say.

:class:`Method` holds the defaults, which are FedAvg-LoRA's (train and average ``A``
and ``B``); a method overrides what it changes, in one file under
``fedlora/methods/``, and one YAML under ``conf/strategy/`` names its class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedlora.aggregation import client_weights, weighted_average
from fedlora.base_delta import Fold
from fedlora.diagnostics import layer_factors
from fedlora.errors import ConfigError
from fedlora.export import ExportPlan, truncate_adapter, truncation_record

if TYPE_CHECKING:
    import torch

    from fedlora.settings import Settings

log = logging.getLogger("fedlora")

State = dict[str, np.ndarray]
Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # {layer: (B, A)}, delta = s B A
GradientFn = Callable[[int], State]  # calibration examples -> summed W0 gradients


@dataclass(frozen=True)
class InitInputs:
    """What :meth:`Method.initialize` may use.

    Attributes
    ----------
    arrays : dict
        The trainable wire state of the model built from the shared seed.
    frozen : dict
        Its frozen LoRA factors (also from the shared seed).
    federated_gradients : callable or None
        ``f(n)`` runs an init round in which every client sends the summed loss
        gradient of each adapted ``W0`` over its first ``n`` examples; returns
        their sum.
    server_gradients : callable or None
        ``f(n)``: the same sums over the first ``n`` rows of the server's own
        calibration data.
    """

    arrays: State
    frozen: State
    federated_gradients: GradientFn | None = None
    server_gradients: GradientFn | None = None


class Method:
    """A federated LoRA method; the defaults are FedAvg-LoRA's.

    Parameters
    ----------
    weighting : str
        ``num_examples`` (``p_k = n_k / sum n``) or ``uniform`` (``p_k = 1/K``).
    max_update_norm_ratio : float
        The server rejects an update whose norm exceeds this multiple of the
        round's median update norm (0 disables; needs 3 or more updates).
    export : ExportPlan or None
        The exported adapter's rank (``export.rank``, or
        :meth:`default_export_rank` where null; :func:`fedlora.methods.from_settings`
        passes it); None: the adapter as trained.
    """

    #: the method's name in logs, metrics and checkpoints (its YAML's name)
    name: ClassVar[str] = ""
    #: the server step is the weighted mean of what the clients send, so
    #: client-level DP noise on that mean covers it (privacy=central)
    aggregates_by_mean: ClassVar[bool] = True
    #: the server step is a weighted sum of the clients' tensors (with weights
    #: that do not depend on the tensors), so it can run on their securely
    #: aggregated sum alone (``secure_aggregation=secaggplus``)
    sums_only: ClassVar[bool] = True
    #: the frozen factors travel to each node once (else every party rebuilds
    #: them from the shared seed)
    ships_frozen: ClassVar[bool] = False
    #: :meth:`fold` adds to the base weights: every party keeps the sum of the folds
    folds_into_base: ClassVar[bool] = False
    #: nodes keep the global state they last received, so only the keys changed
    #: since go down (for methods whose rounds change part of it: RoLoRA)
    nodes_keep_global: ClassVar[bool] = False
    #: clients may train different ranks (``adapter.client_ranks``; the method
    #: maps their factors with :meth:`client_start` and :meth:`from_client`)
    accepts_client_ranks: ClassVar[bool] = False
    #: a server optimizer may step on what :meth:`aggregate` returns
    accepts_server_optimizer: ClassVar[bool] = True

    def __init__(
        self,
        *,
        weighting: str = "num_examples",
        max_update_norm_ratio: float = 0.0,
        export: ExportPlan | None = None,
    ) -> None:
        client_weights([1.0], weighting)  # checks the name
        if max_update_norm_ratio < 0:
            raise ConfigError(
                "strategy.max_update_norm_ratio",
                max_update_norm_ratio,
                "must be >= 0 (0 turns the check off)",
            )
        self.weighting = weighting
        self.max_update_norm_ratio = float(max_update_norm_ratio)
        self.export_plan = export
        self._export_record: dict[str, Any] = {}

    @classmethod
    def derived_arguments(cls, settings: Settings) -> dict[str, Any]:
        """Constructor arguments computed from the experiment settings outside
        the ``strategy`` section, e.g. the LoRA scale ``s`` from ``adapter``
        (default none). :func:`fedlora.methods.from_settings` passes them and
        refuses a ``strategy`` key of the same name."""
        return {}

    @classmethod
    def default_export_rank(cls, settings: Settings) -> int:
        """The exported adapter's rank where ``export.rank`` is null: the largest
        client rank (``adapter.client_ranks``), ``adapter.r`` without them."""
        adapter = settings.adapter
        return int(max(adapter.client_ranks or (adapter.r,)))

    def problems(self, settings: Settings) -> list[ConfigError]:
        """What is wrong with running this method in the experiment ``settings``
        (its privacy mode, its data...); the validator reports them all at once."""
        out = []
        mode = settings.privacy.mode
        if mode == "central" and not self.aggregates_by_mean:
            out.append(
                ConfigError(
                    "privacy",
                    "central",
                    f"{self.name}'s server step uses every client's update, not "
                    "just their mean, so client-level DP noise on the mean does not "
                    "cover it; use privacy=dp_sgd or another strategy",
                )
            )
        if settings.secure and not self.sums_only:
            out.append(
                ConfigError(
                    "secure_aggregation",
                    "secaggplus",
                    f"{self.name}'s server step reads each client's update, not "
                    "only their weighted sum, and secure aggregation shows the "
                    "server the sum alone; use secure_aggregation=none, or a method "
                    "whose server step is a weighted sum (fedavg_lora, ffa_lora, "
                    "fedsb, rolora, fedsa_lora)",
                )
            )
        if settings.adapter.client_ranks and not self.accepts_client_ranks:
            out.append(
                ConfigError(
                    "adapter.client_ranks",
                    list(settings.adapter.client_ranks),
                    f"{self.name} trains one rank on every client; remove it, or "
                    "choose a method that takes a rank per client (fedavg_lora "
                    "pads to the global rank)",
                )
            )
        quant = settings.model.quantization
        if quant and self.folds_into_base:
            out.append(
                ConfigError(
                    "model.quantization",
                    quant,
                    f"{self.name} adds to the base weights every round, which "
                    "quantization packs into 4 or 8 bits; set "
                    "model.quantization=null (model.dtype=bfloat16 halves the "
                    "memory) or choose another strategy",
                )
            )
        optimizer = settings.server_optimizer
        if (
            not self.accepts_server_optimizer
            and optimizer is not None
            and optimizer.get("_target_") is not None
        ):
            out.append(
                ConfigError(
                    "server_optimizer",
                    optimizer["_target_"],
                    f"{self.name}'s server step is not a mean an optimizer can "
                    "step towards; use server_optimizer=none",
                )
            )
        if mode in ("central", "distributed") and self.weighting != "uniform":
            out.append(
                ConfigError(
                    "strategy.weighting",
                    self.weighting,
                    f"privacy={mode} needs strategy.weighting=uniform, or null, "
                    "which it turns into uniform (the noise scale assumes a "
                    "uniform average)",
                )
            )
        return out

    # --- the client --------------------------------------------------------------
    def parametrise(self, model: "torch.nn.Module") -> None:
        """Turn a freshly built PEFT LoRA model into this method's adapter, in
        place (default: train ``A``, ``B`` and the head)."""

    def trains(self, key: str, server_round: int) -> bool:
        """Whether clients train wire key ``key`` in round ``server_round`` (and
        send it, unless :meth:`keeps_local`); default every key, every round. A key
        not trained in a round stays frozen at the value the server sent."""
        return True

    def keeps_local(self, key: str) -> bool:
        """Whether wire key ``key`` stays on the node: trained there, kept in the
        node's state between rounds, never sent up or down (default none). A node
        without it (new, restarted) starts it from the seeded initial value."""
        return False

    def client_overrides(self, partition: int) -> dict[str, Any]:
        """``adapter.*`` settings a client overrides before building its model
        (e.g. its own rank); default none."""
        return {}

    def client_start(
        self, sent: State, initial: State, server_round: int, partition: int
    ) -> State:
        """The wire state a client starts its round from, given what the server
        sent and the seeded values of the client's own model (``initial``: every
        key it trains, in its own shapes); default what was sent. A method with a
        rank per client truncates here; one that restarts the factors every round
        returns fresh ones."""
        return sent

    def from_client(self, state: State, metrics: dict[str, Any]) -> State:
        """A client's reply in the server's shapes, from what the client reports in
        ``metrics`` (e.g. padded from its ``adapter-rank`` to the global rank);
        default as sent. The server checks the result against what it sent."""
        return state

    # --- the server --------------------------------------------------------------
    def downlink(self, sent: State, rank: int) -> State:
        """What a node whose replies report training rank ``rank`` is sent of the
        global state ``sent`` (default all of it, ``sent`` itself). A method with
        a rank per client returns less; the node's :meth:`client_start` must
        then give what it gives from the whole ``sent``."""
        return sent

    def weights(self, num_examples: Sequence[float]) -> np.ndarray:
        """The clients' aggregation weights ``p_k``."""
        return client_weights(num_examples, self.weighting)

    def initialize(self, inputs: InitInputs) -> tuple[State, State]:
        """``(initial global arrays, frozen factors)`` before round 1 (default: the
        seeded model's, no protocol)."""
        return dict(inputs.arrays), dict(inputs.frozen)

    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """FedAvg-LoRA: ``A <- sum p_k A_k``, ``B <- sum p_k B_k`` (and the head).

        Inexact: ``sum p_k B_k A_k - Bbar Abar = sum p_k (B_k - Bbar)(A_k - Abar)``.

        ``states`` hold the keys the clients sent this round, ``sent`` the global
        state they started from (the previous global, for server optimizers and
        residuals). Returns new values for any of ``sent``'s keys; the others keep
        theirs.
        """
        return weighted_average(states, weights)

    def fold(self, states: Sequence[State], weights: np.ndarray, sent: State) -> Fold:
        """``{layer: (U, V)}``: ``U @ V`` (scale included, ``d_out x d_in``) is
        added to that layer's base weight on every party after this round
        (default nothing). Needs :attr:`folds_into_base`."""
        return {}

    def round_record(self) -> dict[str, Any]:
        """What the last :meth:`aggregate` wants in the round's metrics (default
        nothing)."""
        return {}

    # --- diagnostics, export, checkpoints ---------------------------------------
    def layer_factors(self, state: State, frozen: State) -> Factors:
        """``{layer: (B, A)}`` whose product is the layer's delta over ``s``."""
        return layer_factors({**frozen, **state})

    def shared_layers(self, sent: State) -> dict[str, tuple[str | None, str, str]]:
        """For a delta ``s L X R`` with ``L`` (or none) and ``R`` frozen and shared,
        ``{layer: (L key or None, R key, X key)}`` (a cheaper exact diagnostic);
        empty when the outer factors are not shared."""
        return {}

    def export(
        self, state: State, frozen: State, base: dict[str, np.ndarray] | None = None
    ) -> State:
        """The final adapter as plain PEFT LoRA (``lora_A``/``lora_B`` and head)
        at the export rank (:meth:`at_export_rank`).

        ``base`` is the summed fold per layer (dense); a method that folds must
        override this to carry it into the export.
        """
        if base:
            raise NotImplementedError(
                f"{self.name} folds into the base weights but does not say how to "
                "export them"
            )
        return self.at_export_rank({**frozen, **state})

    def at_export_rank(self, plain: State) -> State:
        """A plain PEFT LoRA state at the trained rank ``R`` and scale ``s``
        (every layer's delta ``s B A``) at the export rank ``k``: as it is where
        ``k = R`` (exact), else the rank-``k`` truncated SVD of each layer's delta
        from its factors at scale 1 (:func:`fedlora.export.truncate_adapter`).
        Records the rank and the relative truncation errors
        (:meth:`summary_notes`)."""
        plan = self.export_plan
        if plan is None:
            return plain
        if plan.as_trained:  # the delta has rank <= R: nothing is dropped
            self._export_record = truncation_record(plan.rank, [], [])
            return plain
        out, self._export_record = truncate_adapter(plain, plan.scaling, plan.rank)
        log.info(
            "%s export: rank-%s adapter from the rank-%s one, relative truncation "
            "error %.3g (largest layer %.3g)",
            self.name,
            plan.rank,
            plan.trained_rank,
            self._export_record["export_truncation_error"],
            self._export_record["export_truncation_error_max_layer"],
        )
        return out

    def export_overrides(self) -> dict[str, Any]:
        """``adapter.*`` settings of the exported PEFT adapter where they differ
        from the training adapter's: none at the trained rank; at another rank
        ``k``, ``r = alpha = k`` without rsLoRA (scale 1, the truncation's)."""
        plan = self.export_plan
        if plan is None or plan.as_trained:
            return {}
        return {"r": plan.rank, "alpha": float(plan.rank), "use_rslora": False}

    def export_files(
        self, state: State, frozen: State, base: dict[str, np.ndarray] | None = None
    ) -> dict[str, State]:
        """Tensor files saved beside the exported adapter, ``{file name: tensors}``
        (safetensors; e.g. an exact merged delta), from the same arguments as
        :meth:`export` (default none)."""
        return {}

    def summary_notes(self) -> dict[str, Any]:
        """What ``summary.json`` should say about this method's results: how to
        read them (e.g. which metric is the main one), what the last
        :meth:`export` measured (default: the export's rank and relative
        truncation errors, :data:`fedlora.export.RECORD_KEYS`, once exported)."""
        return dict(self._export_record)

    def state_dict(self) -> dict[str, Any]:
        """JSON state a checkpoint keeps besides the arrays (default none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state_dict`."""

    # --- communication, analytically ---------------------------------------------
    def round_parameters(self, d_out: int, d_in: int, r: int) -> int:
        """Parameters of one adapted layer a client receives (and sends) a round."""
        return r * (d_out + d_in)

    def round_traffic(
        self, d_out: int, d_in: int, r: int, ranks: Sequence[int]
    ) -> tuple[int, int]:
        """``(up, down)`` parameters of one adapted layer for a client of rank ``r``
        in a round whose clients train ``ranks`` (each client's; every client takes
        part every round). Default :meth:`round_parameters` both ways: a client
        sends and receives its own rank's share (the downlink truncated to ``r``).
        A method whose downlink depends on the other clients (FLoRA's stack)
        overrides this."""
        n = self.round_parameters(d_out, d_in, r)
        return n, n

    def one_time_parameters(self, d_out: int, d_in: int, r: int) -> tuple[int, int]:
        """``(up, down)`` parameters of one layer per client, once (init)."""
        return 0, 0
