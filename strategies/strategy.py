"""The one Flower strategy: Flower's FedAvg sampling and messaging around a
federated LoRA method (:class:`fedlora.methods.base.Method`).

The strategy overrides Flower's hooks only; what the server computes is the
method's (:meth:`~fedlora.methods.base.Method.aggregate`), and the checks,
diagnostics and byte accounting are helpers (:mod:`strategies.replies`,
:mod:`fedlora.diagnostics`, :mod:`strategies.wire`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora import server_opt
from fedlora.adapters import frozen_digest, lora_layers, module_name
from fedlora.base_delta import BaseDelta, Fold, FoldLog
from fedlora.comm import num_parameters
from fedlora.diagnostics import (
    DiagnosticSchedule,
    aggregation_error,
    frozen_triangles,
    shared_factor_error,
)
from fedlora.errors import ClientConfigError, NodesUnavailableError
from fedlora.heterogeneous import hetero_aggregation_error, stack
from fedlora.methods import InitInputs, Method, from_settings
from fedlora.ranks import RANK_KEY, rank_of
from fedlora.settings import WIRE_DTYPES, DiagnosticsSettings, Settings
from strategies import replies as checks
from strategies.holdings import Holdings, fold_bytes
from strategies.nodes import Snapshot, wait_for_nodes
from strategies.secagg import SecAggPlus
from strategies.wire import (
    KEY_ARRAYS,
    KEY_CALIBRATION,
    KEY_CONFIG,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_PHASE,
    KEY_ROUND,
    PHASE_GRADIENT,
    payload_bytes,
    record_to_state,
    state_to_record,
)

log = logging.getLogger(__name__)
State = dict[str, np.ndarray]


class LoRAStrategy(FedAvg):
    """A federated LoRA method on Flower's FedAvg sampling and messaging.

    Each round's ``round_log[r]`` holds ``bytes_down``/``bytes_up`` (measured from
    the serialized messages; with a rank per client also by rank,
    ``bytes_down_by_rank``/``bytes_up_by_rank``), ``params_down``/``params_up``
    (analytic), the
    ``aggregation_error`` overall and by module, the client replies, failures,
    rejections, declines, epsilon and the method's own record. The ServerApp
    moves each entry into the round's metrics row and drops it, so the clients'
    records of past rounds are not kept.

    Parameters
    ----------
    method : Method
        What is trained, sent and aggregated.
    optimizer : ServerOptimizer or None
        A server optimizer stepping from the sent state towards the method's
        aggregate (``server_optimizer``; None: the aggregate as it is).
    scaling : float
        LoRA scale ``s`` of the adapters (for the aggregation-error diagnostic).
    min_replies : int
        Usable updates a round needs; with fewer, the global adapter is kept.
    max_failed_rounds : int
        Consecutive rounds below ``min_replies`` after which the run stops.
    wait_timeout : float or None
        Seconds a round waits for the nodes it needs before it samples
        (``federation.wait_timeout``); then it raises
        :class:`~fedlora.errors.NodesUnavailableError`. None: no limit, as Flower.
    secure : SecAggPlus or None
        Secure aggregation (``secure_aggregation=secaggplus``): the server sees
        only the clients' weighted sum (:mod:`strategies.secagg`); None: off.
    wire_dtype : str
        The dtype of the adapter arrays the train and evaluate messages carry
        (``wire.dtype``: float32, bfloat16 or float16; the server's own state
        stays float32). The frozen factors and base-weight folds go exact.
    diagnostics_every : int or "auto"
        Measure the aggregation error in every ``diagnostics_every``-th round
        (rounds N, 2N, ...; 0: never; ``"auto"``: every round while it is cheap,
        :class:`~fedlora.diagnostics.DiagnosticSchedule`). Other rounds record
        ``aggregation_error`` None and say why in ``aggregation_error_skipped``.
    **fedavg_kwargs
        Flower's FedAvg sampling settings (``fraction_train``, ``min_train_nodes``...).

    Attributes
    ----------
    frozen : dict
        The frozen LoRA factors every party shares (FFA's ``A``, Fed-SB's ``B``, ``A``).
    folds : FoldLog
        What the method folded into the base weights, in total and by round.
    current, sent : dict
        This round's whole global state, and what of it went down (without the
        keys nodes keep for themselves).
    round_offset : int
        Rounds completed before Flower's loop started (a resumed run). Flower numbers
        its rounds from 1; every hook adds this offset first, so the messages'
        ``server-round``, ``round_log`` and the metrics carry the real round numbers.
    """

    def __init__(
        self,
        method: Method,
        *,
        optimizer: server_opt.ServerOptimizer | None = None,
        scaling: float = 1.0,
        min_replies: int = 1,
        max_failed_rounds: int = 3,
        wait_timeout: float | None = None,
        diagnostics_every: int | str = 1,
        secure: SecAggPlus | None = None,
        wire_dtype: str = "float32",
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if diagnostics_every != "auto" and (
            isinstance(diagnostics_every, bool)
            or not isinstance(diagnostics_every, int)
            or diagnostics_every < 0
        ):
            raise ValueError(
                f"diagnostics_every={diagnostics_every!r}: give 'auto' or a whole "
                "number of rounds >= 0 (1: every round, 0: never)"
            )
        self.diagnostics = DiagnosticSchedule(diagnostics_every)
        self.method = method
        self.wait_timeout = None if wait_timeout is None else float(wait_timeout)
        self.optimizer = optimizer or server_opt.NoOptimizer()
        self.scaling = float(scaling)
        self.min_replies, self.max_failed_rounds = int(min_replies), max_failed_rounds
        self.round_log: dict[int, dict[str, Any]] = {}
        self.epsilon: dict[int, float] = {}  # latest epsilon spent per partition
        self.round_offset = 0
        self.failed_rounds = 0  # consecutive rounds with too few usable updates
        self.holdings = Holdings()  # what each node holds between rounds
        self._frozen: State = {}
        self._digest: int | None = None
        self._triangles: dict[str, Any] | None = None  # frozen factors' QR, cached
        self._diagnostic_setup = 0.0  # seconds the diagnostic spent computing them
        self.current: State = {}  # this round's global state, all of it
        self.sent: State = {}  # what of it this round's train messages carried
        self.expected: State = {}  # what of it the clients train and send back
        self.sampled: list[int] = []  # node ids of this round's train messages
        # node -> (its rank known when its train message went, or None; bytes)
        self.down_bytes: dict[int, tuple[int | None, int]] = {}
        self.folds = FoldLog()
        self.changed: dict[str, int] = {}  # key -> round whose aggregation set it
        self.secure = secure
        #: id(reply) -> its bytes as it arrived, measured by a wrapper that
        #: rewrites replies before this strategy sees them (central DP's clip)
        self.arrived: dict[int, int] = {}
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(
                f"wire_dtype={wire_dtype!r}: choose one of {', '.join(WIRE_DTYPES)}"
            )
        self.wire_dtype = wire_dtype
        self._grid: Any = None  # the round's grid, for secure aggregation's unmasking

    @classmethod
    def from_settings(cls, settings: Settings) -> LoRAStrategy:
        """The strategy of the experiment settings: the method of ``strategy``,
        Flower's sampling from ``federation``, the LoRA scale from ``adapter``."""
        fed = settings.federation
        diagnostics = settings.diagnostics or DiagnosticsSettings(every=1)
        return cls(
            from_settings(settings),
            optimizer=server_opt.from_settings(settings.server_optimizer),
            scaling=settings.adapter.scaling,
            min_replies=fed.min_replies,
            max_failed_rounds=fed.max_failed_rounds,
            wait_timeout=fed.wait_timeout,
            diagnostics_every=diagnostics.every,
            wire_dtype=settings.wire_dtype,
            secure=SecAggPlus(
                settings.secure_aggregation, fed.round_timeout, settings.privacy
            )
            if settings.secure and settings.secure_aggregation
            else None,
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=fed.min_train_clients,
            min_evaluate_nodes=fed.min_train_clients,
            min_available_nodes=fed.available_clients,
        )

    @property
    def name(self) -> str:
        """The method's name."""
        return self.method.name

    @property
    def frozen(self) -> State:
        """The frozen factors every party shares."""
        return self._frozen

    @frozen.setter
    def frozen(self, value: State) -> None:
        self._frozen = dict(value)
        self._digest = frozen_digest(self._frozen) if self._frozen else None
        self._triangles = None

    # --- before round 1 ----------------------------------------------------------
    def initialize(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        frozen: State,
        config: ConfigRecord,
        server_gradient: Any = None,
    ) -> ArrayRecord:
        """The method's initialisation (its init protocol, if any): sets
        :attr:`frozen` and returns the initial global arrays."""
        inputs = InitInputs(
            arrays=record_to_state(arrays),
            frozen=frozen,
            federated_gradients=lambda n: self._gradient_round(grid, config, n),
            server_gradients=server_gradient,
        )
        state, self.frozen = self.method.initialize(inputs)
        return state_to_record(state)

    def export(self, state: State) -> State:
        """The final adapter as plain PEFT LoRA."""
        return self.method.export(state, self.frozen, self._base())

    def export_files(self, state: State) -> dict[str, State]:
        """The tensor files the method saves beside the exported adapter."""
        return self.method.export_files(state, self.frozen, self._base())

    def _base(self) -> dict[str, np.ndarray] | None:
        """The summed base-weight folds per layer, dense (None: no fold)."""
        return self.folds.total.matrices() if self.folds.total else None

    # --- Flower hooks ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does, sending the global state but the keys
        nodes keep (at its rank to a node whose rank is known); ship frozen factors
        and base-weight folds to nodes lacking them; remember what was sent and its
        size."""
        server_round += self.round_offset
        method = self.method
        if self.begin_round(server_round, record_to_state(arrays)) or self.compresses:
            arrays = self.encode(self.sent)
        if self.fraction_train > 0:
            grid = self._wait(grid, self.min_train_nodes, f"round {server_round}")
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if method.accepts_client_ranks:
            messages = self._at_ranks(messages, arrays, self.sent)
        if method.ships_frozen:  # serialised once for every node lacking them
            frozen = state_to_record(self.frozen)
            messages = [self.holdings.with_frozen(m, frozen) for m in messages]
        if method.folds_into_base:
            messages = self.holdings.with_folds(messages, self.folds, train=True)
        if method.nodes_keep_global:  # only what changed since a node's last copy
            messages = self.holdings.with_changes(
                messages, self.sent, self.changed, server_round, self.encode
            )
        sampled = len(messages)
        if self.secure is not None:  # stages 0 and 1; the replies: masked inputs
            self._grid = grid
            messages = self.secure.setup(grid, messages, server_round)
        self.sampled = [m.metadata.dst_node_id for m in messages]
        self.down_bytes = {
            m.metadata.dst_node_id: (rank, payload_bytes(m.content))
            for m, rank in zip(messages, self._known_ranks(messages), strict=True)
        }
        self.round_log[server_round] = {
            "clients_sampled": sampled,
            "bytes_down": sum(size for _, size in self.down_bytes.values()),
            "params_down": sum(
                int(np.prod(a.shape))
                for m in messages
                for a in m.content[KEY_ARRAYS].values()
            ),
        }
        return messages

    def begin_round(self, server_round: int, state: State) -> bool:
        """Make ``state`` this round's global state: set :attr:`current`,
        :attr:`sent` (without the keys nodes keep) and :attr:`expected` (what the
        clients train and send back). Returns whether :attr:`sent` is smaller."""
        method = self.method
        self.current = dict(state)
        self.sent = {k: v for k, v in state.items() if not method.keeps_local(k)}
        self.expected = {
            k: v for k, v in self.sent.items() if method.trains(k, server_round)
        }
        return len(self.sent) < len(self.current)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, aggregate the usable updates with the method, record
        the round. Error replies count as failures; replies without arrays are
        clients that declined (privacy budget); malformed updates are rejected.
        Clients' configuration errors that leave too few usable updates stop the
        run (:class:`~fedlora.errors.ClientConfigError`)."""
        started = time.perf_counter()
        server_round += self.round_offset
        entry = self.round_log.setdefault(server_round, {})
        replies = list(replies)
        if self.secure is not None:
            return self._aggregate_secure(server_round, replies, entry, started)
        accepted = self._screen(server_round, replies, entry)
        if not self._enough(server_round, len(accepted.states), replies):
            return None, None
        method, states = self.method, accepted.states
        weights = method.weights([c[KEY_NUM_EXAMPLES] for c in accepted.metrics])
        new = {**self.current, **method.aggregate(states, weights, self.sent)}
        fold = method.fold(states, weights, self.sent)
        self.folds.add(server_round, fold)
        summary = self._record(server_round, entry, accepted, weights, new, fold)
        # the diagnostic above measures the method's aggregation; the server
        # optimizer then moves deliberately from the sent state towards it
        new.update(self.optimizer.step(self.sent, {k: new[k] for k in self.expected}))
        self.changed.update(dict.fromkeys(self.expected, server_round))
        record = state_to_record(new)
        entry["server_aggregate_time"] = time.perf_counter() - started
        setup = entry.get("diagnostic_setup_time", 0.0)  # once a run, not a round's
        self.diagnostics.record(
            entry["server_aggregate_time"] - setup,
            entry["diagnostic_time"] - setup if "diagnostic_time" in entry else None,
        )
        return record, MetricRecord(summary)

    def _aggregate_secure(
        self,
        server_round: int,
        replies: list[Message],
        entry: dict[str, Any],
        started: float,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure aggregation's end of a round: unmask the survivors' weighted
        mean update (:meth:`SecAggPlus.finish`) and apply the method's step to
        ``sent + mean``. The server's update checks and the aggregation-error
        diagnostic need each client's update: they do not run (each client checks
        its own); declined, failed and malformed replies are dropouts."""
        assert self.secure is not None
        ok = [m for m in replies if not m.has_error()]
        result = self.secure.finish(
            self._grid, [m for m in ok if not checks.is_declined(m)], self.expected
        )
        self._tally(entry, replies, ok)
        self.holdings.after_train(
            self.sampled,
            ok,
            [],
            self.method.ships_frozen,
            self.method.folds_into_base,
            server_round if self.method.nodes_keep_global else None,
        )
        usable = len(result.survivors) if result.mean is not None else 0
        entry.update(result.record)
        entry.update(
            secure_aggregation=True,
            clients=usable,
            rejected=[],
            bytes_up=entry["bytes_up"] + result.record.get("secagg_bytes_up", 0),
            bytes_down=entry.get("bytes_down", 0)
            + result.record.get("secagg_bytes_down", 0),
            aggregation_error=None,
            aggregation_error_by_module={},
            aggregation_error_skipped="secure aggregation: the server sees only "
            "the clients' weighted sum, not the updates the diagnostic compares",
            client_replies=[dict(m.content[KEY_METRICS]) for m in ok],
        )
        if not self._enough(server_round, usable, replies) or result.mean is None:
            return None, None
        mean = {k: self.sent[k].astype(np.float64) + v for k, v in result.mean.items()}
        new = {**self.current, **self.method.aggregate([mean], np.ones(1), self.sent)}
        new.update(self.optimizer.step(self.sent, {k: new[k] for k in self.expected}))
        self.changed.update(dict.fromkeys(self.expected, server_round))
        entry["server_aggregate_time"] = time.perf_counter() - started
        return state_to_record(new), MetricRecord({})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation messages, with the real round as ``server-round``
        (the global state at its rank to a node whose rank is known; and the
        base-weight folds each node lacks: a node keeps them for its next training
        round, so their measured bytes, ``bytes_down_folds_eval``, count in the
        round's ``bytes_down``). Without its nodes by :attr:`wait_timeout`, the
        round skips federated evaluation (which never changes the global adapter)
        rather than stop the run: its training is kept and checkpointed, and the
        next round's wait stops the run if the nodes are still missing."""
        server_round += self.round_offset
        if self.fraction_evaluate > 0:
            what = f"round {server_round} (evaluate)"
            try:
                grid = self._wait(grid, self.min_evaluate_nodes, what)
            except NodesUnavailableError as exc:
                skipped = (
                    f"{exc.connected} of the {exc.needed} nodes it needs were "
                    f"connected at federation.wait_timeout={self.wait_timeout:g} s"
                )
                log.warning("%s: %s; no federated evaluation", what, skipped)
                self.round_log.setdefault(server_round, {})["eval_skipped"] = skipped
                return []
        state = None
        if self.compresses:  # the global in the wire dtype, as for training
            state = record_to_state(arrays)
            arrays = self.encode(state)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if self.method.accepts_client_ranks:
            messages = self._at_ranks(messages, arrays, state)
        if self.method.folds_into_base:
            messages = self.holdings.with_folds(messages, self.folds, train=False)
            sizes = [fold_bytes([m]) for m in messages]
            entry = self.round_log.setdefault(server_round, {})
            entry["bytes_down_folds_eval"] = sum(sizes)
            entry["bytes_down"] = entry.get("bytes_down", 0) + sum(sizes)
            if self.method.accepts_client_ranks:
                entry["bytes_down_by_rank"] = checks.tally(
                    zip(self._known_ranks(messages), sizes, strict=True),
                    entry.get("bytes_down_by_rank"),
                )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's weighted mean of client evaluations, also kept in round_log,
        with the clients' summed evaluation time (``client_eval_time``); stops
        the run when every reply is an error and some are configuration errors."""
        server_round += self.round_offset
        replies = list(replies)
        if all(m.has_error() for m in replies):
            self._stop_on_config_errors(server_round, replies)
        if self.method.folds_into_base:  # who now holds the folds sent
            self.holdings.after_evaluate(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            entry = self.round_log.setdefault(server_round, {})
            entry.update(
                {f"federated_{k}": v for k, v in metrics.items() if k != "eval_time"}
            )
            entry["client_eval_time"] = sum(
                float(m.content[KEY_METRICS].get("eval_time", 0.0))
                for m in replies
                if not m.has_error() and KEY_METRICS in m.content
            )
        return metrics

    # --- checkpoints -------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, State], dict[str, Any]]:
        """What a checkpoint must keep to continue: ``(array groups, JSON state)``:
        the frozen factors, the summed base-weight folds and the server optimizer's
        moments; the method's name and state, the optimizer's step counts, the
        latest epsilon per partition and the count of consecutive failed rounds."""
        opt_arrays, opt_state = self.optimizer.state_dict()
        return (
            {
                "frozen": dict(self.frozen),
                "base": self.folds.total.to_state(),
                "server_opt": opt_arrays,
            },
            {
                "name": self.name,
                "server_opt": opt_state,
                "base_round": self.folds.latest,
                "method": self.method.state_dict(),
                "failed_rounds": self.failed_rounds,
                "epsilon": {str(k): v for k, v in sorted(self.epsilon.items())},
                **self._accountant_state(),
            },
        )

    def _accountant_state(self) -> dict[str, Any]:
        """The distributed-DP accountant's history (none without one)."""
        accountant = self.secure.accountant if self.secure is not None else None
        if accountant is None:
            return {}
        return {"distributed_rdp_history": accountant.history()}

    def restore_state(self, arrays: dict[str, State], state: dict[str, Any]) -> None:
        """Take back what :meth:`checkpoint_state` saved (instead of initialising).

        No node is assumed to hold shipped frozen factors or base-weight folds: a
        resumed run is a new Flower run whose nodes start with empty state, so each
        gets them again (the folds as their sum).

        Raises
        ------
        ValueError
            If the checkpoint was written by another method, or holds no frozen
            factors where the method ships them.
        """
        if state.get("name") != self.name:
            raise ValueError(
                f"the checkpoint was written by strategy "
                f"{state.get('name')!r}, not {self.name!r}"
            )
        self.frozen = dict(arrays.get("frozen", {}))
        if self.method.ships_frozen and not self.frozen:
            raise ValueError(f"the checkpoint holds no {self.name} frozen factors")
        self.method.load_state_dict(state.get("method", {}))
        if "server_opt" in state:  # checkpoints before server optimizers have none
            self.optimizer.load_state_dict(
                arrays.get("server_opt", {}), state["server_opt"]
            )
        self.failed_rounds = int(state.get("failed_rounds", 0))
        self.epsilon = {int(k): float(v) for k, v in state.get("epsilon", {}).items()}
        accountant = self.secure.accountant if self.secure is not None else None
        if accountant is not None:
            if "distributed_rdp_history" not in state:
                raise ValueError(
                    "the checkpoint holds no privacy=distributed ledger (it was "
                    "written under another privacy mode), so the privacy already "
                    "spent is unknown; start a new run instead"
                )
            accountant.load(state["distributed_rdp_history"])
        self.holdings.forget()
        base = BaseDelta.from_state(arrays.get("base", {}))
        self.folds.restart(base, int(state.get("base_round", 0)))

    # --- diagnostics -------------------------------------------------------------
    def diagnose(
        self,
        states: list[State],
        weights: np.ndarray,
        new: State,
        fold: Fold | None = None,
    ) -> tuple[float | None, dict[str, float]]:
        """The round's aggregation error, overall and by module (see
        :mod:`fedlora.diagnostics`), from the sent, returned and new states and
        the round's fold into the base weights; None where the server does not see
        the clients' whole adapters (keys nodes keep)."""
        if len(self.sent) < len(self.current):
            return None, {}
        states = [{**self.sent, **s} for s in states]  # keys frozen this round
        layers = self.method.shared_layers(self.sent)
        if not layers or fold:
            factors = self.method.layer_factors
            after = factors(new, self.frozen)
            for layer, value in (fold or {}).items():  # s (B A) + U V
                if isinstance(value, np.ndarray):  # dense: D = D I
                    value = (value, np.eye(value.shape[1]))
                (u, v), (b, a) = value, after[layer]
                after[layer] = (np.hstack([b, u / self.scaling]), np.vstack([a, v]))
            return aggregation_error(
                [factors(s, self.frozen) for s in states],
                weights,
                factors(self.sent, self.frozen),
                after,
                self.scaling,
            )
        if self._triangles is None:  # once a run: not the diagnostic's round cost
            started = time.perf_counter()
            outer = {layer: (left, right) for layer, (left, right, _) in layers.items()}
            self._triangles = frozen_triangles(self.frozen, outer)
            self._diagnostic_setup = time.perf_counter() - started

        def middle(state: State) -> dict[str, np.ndarray]:
            return {layer: state[x] for layer, (_, _, x) in layers.items()}

        return shared_factor_error(
            [middle(s) for s in states],
            weights,
            middle(self.sent),
            middle(new),
            self._triangles,
        )

    def diagnose_ranks(
        self,
        states: list[State],
        weights: np.ndarray,
        new: State,
        fold: Fold | None,
        ranks: list[int],
    ) -> tuple[float, dict[int, float], dict[str, float]]:
        """The aggregation error when clients hold adapters of different ranks:
        ``sqrt(sum p_k ||Delta - E_new,k||^2) / sqrt(sum p_k ||Delta - E_old,k||^2)``
        with ``Delta = sum p_k s_k B_k A_k`` and ``E_new,k`` / ``E_old,k`` what a
        rank-``r_k`` client starts from next round / started from this one (the
        global factors' first ``r_k`` columns and rows at the global scale, plus
        the round's fold); overall, by rank tier and by module, from the factors
        (:func:`fedlora.heterogeneous.hetero_aggregation_error`). ``states`` are
        the replies at the global rank and scale."""
        s = self.scaling
        layers = lora_layers(self.sent)

        def effective(state: State, r: int, extra: Fold | None) -> dict[str, Any]:
            out = {}
            for layer, (a_key, b_key) in layers.items():
                b = s * np.asarray(state[b_key], dtype=np.float64)[:, :r]
                a = np.asarray(state[a_key], dtype=np.float64)[:r]
                if extra and layer in extra:
                    value = extra[layer]
                    if isinstance(value, np.ndarray):  # dense: D = D I
                        value = (value, np.eye(value.shape[1]))
                    b, a = np.hstack([b, value[0]]), np.vstack([a, value[1]])
                out[layer] = (b, a)
            return out

        full = [{**self.sent, **st} for st in states]
        delta = {
            layer: stack(
                [st[b_key] for st in full],
                [st[a_key] for st in full],
                weights,
                [s] * len(full),
            )
            for layer, (a_key, b_key) in layers.items()
        }
        return hetero_aggregation_error(
            delta,
            [effective(new, r, fold) for r in ranks],
            [effective(self.sent, r, None) for r in ranks],
            weights,
            ranks,
            group=module_name,
        )

    # --- helpers -----------------------------------------------------------------
    def _screen(
        self, server_round: int, replies: list[Message], entry: dict[str, Any]
    ) -> checks.Accepted:
        """Sort a round's replies into failures, declines, rejections and the
        accepted updates; record them (and the privacy reported) in ``entry``."""
        ok = [m for m in replies if not m.has_error()]
        accepted = checks.accept(
            [m for m in ok if not checks.is_declined(m)],
            self.expected,
            self._digest,
            self.method.max_update_norm_ratio,
            self.holdings.folds_sent if self.method.folds_into_base else None,
            self.method.from_client,
        )
        self.holdings.after_train(
            self.sampled,
            ok,
            accepted.rejected,
            self.method.ships_frozen,
            self.method.folds_into_base,
            server_round if self.method.nodes_keep_global else None,
        )
        sizes = [self.arrived_bytes(m) for m in ok]
        if self.method.accepts_client_ranks:  # per rank tier, keyed by rank
            entry["bytes_up_by_rank"] = checks.by_rank(ok, sizes)
            # a message whose node's rank was unknown: the rank its reply reports
            reported = {m.metadata.src_node_id: checks.reported_rank(m) for m in ok}
            entry["bytes_down_by_rank"] = checks.tally(
                (reported.get(node) if rank is None else rank, size)
                for node, (rank, size) in self.down_bytes.items()
            )
        self._tally(entry, replies, ok, sizes)
        entry.update(rejected=accepted.rejected, clients=len(accepted.states))
        return accepted

    def _tally(
        self,
        entry: dict[str, Any],
        replies: list[Message],
        ok: list[Message],
        sizes: list[int] | None = None,
    ) -> None:
        """Record a round's failures (with the sampled nodes that never replied),
        declines, bytes up (``sizes``: of ``ok``'s payloads, if measured) and the
        privacy the clients reported."""
        missing = max(entry.get("clients_sampled", 0) - len(replies), 0)
        self.epsilon.update(checks.epsilons(ok))
        if sizes is None:
            sizes = [self.arrived_bytes(m) for m in ok]
        entry.update(
            failures=len(replies) - len(ok) + missing,
            failure_reasons=checks.failures(replies, self.sampled, missing),
            bytes_up=sum(sizes),
            declined=checks.declined(ok),
        )
        if self.epsilon:
            entry["epsilon"] = {str(k): v for k, v in sorted(self.epsilon.items())}
            entry["epsilon_max"] = max(self.epsilon.values())

    def _record(
        self,
        server_round: int,
        entry: dict[str, Any],
        accepted: checks.Accepted,
        weights: np.ndarray,
        new: State,
        fold: Fold | None = None,
    ) -> dict[str, float]:
        """Record the aggregation's diagnostics in ``entry`` (the aggregation
        error in the rounds ``diagnostics_every`` names); return the round's
        summary metrics (the mean training loss only where every client sent one:
        not under DP-SGD)."""
        ranks = [int(c.get(RANK_KEY, 0)) for c in accepted.metrics]
        started, due = time.perf_counter(), self.diagnostics.due(server_round)
        if not due:
            overall, by_module = None, {}
            entry["aggregation_error_skipped"] = self.diagnostics.skipped()
        elif self.method.accepts_client_ranks and set(ranks) != {rank_of(self.sent)}:
            overall, by_rank, by_module = self.diagnose_ranks(
                accepted.states, weights, new, fold, ranks
            )
            entry["aggregation_error_by_rank"] = {str(r): v for r, v in by_rank.items()}
        else:
            overall, by_module = self.diagnose(accepted.states, weights, new, fold)
        if due:
            entry["diagnostic_time"] = time.perf_counter() - started
            if self._diagnostic_setup:
                entry["diagnostic_setup_time"] = self._diagnostic_setup
                self._diagnostic_setup = 0.0
        entry.update(
            aggregation_error=overall,
            aggregation_error_by_module=by_module,
            params_up=sum(accepted.received),  # as sent, before padding
            client_replies=accepted.metrics,
            **self.method.round_record(),
        )
        summary = {} if overall is None else {"aggregation_error": overall}
        if all("train_loss" in c for c in accepted.metrics):
            summary["train_loss"] = float(
                np.dot(weights, [c["train_loss"] for c in accepted.metrics])
            )
        return summary

    def _at_ranks(
        self, messages: list[Message], arrays: ArrayRecord, state: State | None = None
    ) -> list[Message]:
        """``messages`` with the global ``arrays`` (``state``, decoded) as the
        method sends them to each node whose rank is known
        (:meth:`~fedlora.methods.base.Method.downlink`, one record per rank)."""
        whole = record_to_state(arrays) if state is None else state
        cuts: dict[int, ArrayRecord | None] = {}

        def cut(rank: int) -> ArrayRecord | None:
            if rank not in cuts:  # None: the method sends it all
                part = self.method.downlink(whole, rank)
                cuts[rank] = None if part is whole else self.encode(part)
            return cuts[rank]

        return self.holdings.at_ranks(messages, cut)

    def arrived_bytes(self, reply: Message) -> int:
        """Measured bytes of ``reply`` as it came over the wire (see
        :attr:`arrived`)."""
        size = self.arrived.pop(id(reply), None)
        return payload_bytes(reply.content) if size is None else size

    @property
    def compresses(self) -> bool:
        """Whether the adapter arrays travel in a 16-bit wire dtype."""
        return self.wire_dtype != "float32"

    def encode(self, state: State) -> ArrayRecord:
        """``state`` as the messages carry it, in :attr:`wire_dtype`."""
        return state_to_record(state, self.wire_dtype)

    def _known_ranks(self, messages: list[Message]) -> list[int | None]:
        """The rank the server knows each message's node to train (None: unknown)."""
        return [self.holdings.ranks.get(m.metadata.dst_node_id) for m in messages]

    def _enough(self, server_round: int, usable: int, replies: list[Message]) -> bool:
        """Whether ``usable`` updates make a round; stop after too many that don't,
        and at once when clients' configuration errors are among the ``replies``
        (a node's own bad setting alone does not stop a run its peers carry)."""
        if usable >= max(self.min_replies, 1):
            self.failed_rounds = 0
            return True
        self._stop_on_config_errors(server_round, replies)
        self.failed_rounds += 1
        if self.failed_rounds >= self.max_failed_rounds:
            raise RuntimeError(
                f"round {server_round}: {usable} usable updates, fewer than "
                f"federation.min_replies={self.min_replies}, for "
                f"{self.failed_rounds} rounds in a row; stopping. See "
                "failure_reasons/rejected in metrics.jsonl; lower "
                "federation.min_replies or fix the clients."
            )
        log.warning(
            "aggregate_train: %s usable updates in round %s (< %s); the global "
            "adapter is unchanged",
            usable,
            server_round,
            self.min_replies,
        )
        return False

    def _wait(self, grid: Grid, min_sampled: int, what: str) -> Any:
        """Wait, at most :attr:`wait_timeout` seconds, until the nodes Flower's
        sampling would wait for are connected (``min_available_nodes``, and at
        least ``min_sampled``); return the grid as the wait found it."""
        needed = max(self.min_available_nodes, min_sampled)
        keys = [  # the settings that ask for that many (min_train_clients sets both
            # min_train_nodes and min_evaluate_nodes)
            key
            for key, n in (
                ("federation.min_available_clients", self.min_available_nodes),
                ("federation.min_train_clients", min_sampled),
            )
            if n == needed
        ]
        nodes = wait_for_nodes(
            grid, needed, self.wait_timeout, what=what, keys=" and ".join(keys)
        )
        return Snapshot(grid, nodes)

    def _stop_on_config_errors(self, server_round: int, replies: list[Message]) -> None:
        """Raise :class:`~fedlora.errors.ClientConfigError` with the clients'
        messages when any of ``replies`` is a configuration error."""
        reasons = checks.config_errors(replies)
        if reasons:
            raise ClientConfigError(server_round, reasons, len(replies))

    def _gradient_round(self, grid: Grid, config: ConfigRecord, n: int) -> State:
        """An init round: every node sends its gradient sums over its first ``n``
        examples; returns their sum. Its traffic is reported as round 0."""
        snapshot = self._wait(grid, 0, f"{self.name} init round")  # all it finds
        node_ids, _ = sample_nodes(
            snapshot, self.min_available_nodes, len(snapshot.get_node_ids())
        )
        content = RecordDict(
            {
                KEY_CONFIG: ConfigRecord(
                    {
                        **dict(config),
                        KEY_ROUND: 0,
                        KEY_PHASE: PHASE_GRADIENT,
                        KEY_CALIBRATION: n,
                    }
                )
            }
        )
        messages = [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in node_ids
        ]
        answers = list(grid.send_and_receive(messages))
        replies = [m for m in answers if not m.has_error()]
        if not replies:
            self._stop_on_config_errors(0, answers)
            raise RuntimeError(
                f"{self.name} init round: no client returned its gradient; see the "
                "client logs, or use strategy.init=random_orthogonal"
            )
        grads = [record_to_state(m.content[KEY_ARRAYS]) for m in replies]
        self.round_log[0] = {
            "bytes_down": sum(payload_bytes(m.content) for m in messages),
            "bytes_up": sum(payload_bytes(m.content) for m in replies),
            "params_up": sum(num_parameters(s) for s in grads),
            "clients": len(replies),
            "failures": len(messages) - len(replies),
        }
        return {k: np.sum([g[k] for g in grads], axis=0) for k in grads[0]}
