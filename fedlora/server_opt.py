"""Server optimizers (FedOpt): a step on the global tensors after the aggregation.

A method's aggregate ``y_t`` (for FedIT ``Abar`` and ``Bbar``, for FFA-LoRA ``Bbar``,
for Fed-SB ``Rbar``) is not taken as it is: its change from what the server sent,
``delta_t = y_t - x_t``, is a pseudo-gradient, and the server moves ``x_t`` along it
with momentum (FedAvgM), Adagrad, Adam or Yogi::

    x_{t+1} = step(x_t, y_t)                 # per key, for the aggregated keys only

The update rules are those of Flower 1.39's Message-API strategies
(``flwr.serverapp.strategy.FedAvgM``, ``FedAdagrad``, ``FedAdam``, ``FedYogi``),
re-implemented here so that ``fedlora`` does not import Flower, and computed with
the same operations in the same dtypes, so the results are bit-identical to
Flower's on float32 (wire) inputs (``tests/fedlora/test_server_opt.py``). Each
optimizer keeps its state per key; :meth:`ServerOptimizer.state_dict` holds all of
it (arrays and a JSON part), so a resumed run continues bit-for-bit.

The optimizer is chosen by ``conf/server_optimizer/<name>.yaml``, whose
``_target_`` names the class (null: none) and whose other keys are its arguments;
:func:`from_settings` builds it.

Paper: Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295; FedAvgM: Hsu et al., "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019,
https://arxiv.org/abs/1909.06335.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from fedlora.errors import ConfigError, build_target, load_target

State = dict[str, np.ndarray]
WIRE_DTYPE = np.float32  # what crosses the wire, and what step() returns
SECTION = "server_optimizer"  # the settings section (conf/server_optimizer/)
_EXAMPLE = "fedlora.server_opt.Adam, or choose server_optimizer=none"

__all__ = [
    "Adagrad",
    "Adam",
    "AvgM",
    "NoOptimizer",
    "ServerOptimizer",
    "Yogi",
    "from_settings",
    "load_class",
]


def _number(name: str, value: Any, rule: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a Python float (a weak scalar in numpy's arithmetic, as Flower's
    hyperparameters are), or a ConfigError naming ``server_optimizer.<name>``."""
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if not (math.isfinite(number) and ok(number)):
        raise ConfigError(f"{SECTION}.{name}", value, f"must be a number {rule}")
    return number


def _positive(name: str, value: Any) -> float:
    return _number(name, value, "> 0", lambda x: x > 0)


def _beta(name: str, value: Any) -> float:
    return _number(name, value, "in [0, 1)", lambda x: 0 <= x < 1)


class ServerOptimizer:
    """A server step ``x_{t+1} = step(x_t, y_t)`` on the aggregated tensors.

    Subclasses implement :meth:`_update` for one key and name their per-key state
    arrays in :attr:`slots`; this class checks the inputs, counts the steps each key
    has taken and saves and restores the state.
    """

    #: the option's name in ``conf/server_optimizer/`` (for logs and summaries)
    name: ClassVar[str] = ""
    #: per-key state arrays, by slot name: each is an attribute ``dict[str, ndarray]``
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}  # steps taken, per key
        for slot in self.slots:
            setattr(self, slot, {})

    # --- the step ------------------------------------------------------------------
    def step(
        self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, Any]
    ) -> State:
        """The new global values of the aggregated keys.

        Parameters
        ----------
        current : mapping of str to numpy.ndarray
            ``x_t``: the global tensors the server sent this round (it may hold
            more keys than ``aggregate``).
        aggregate : mapping of str to numpy.ndarray
            ``y_t``: the method's aggregate, only the keys it aggregated.

        Returns
        -------
        dict of str to numpy.ndarray
            ``x_{t+1}`` for exactly the keys of ``aggregate``, float32 (the wire
            dtype). Both inputs are taken as float32 first.

        Raises
        ------
        ValueError
            A key of ``aggregate`` missing from ``current``, or of another shape
            there (checked for every key before any state changes).
        """
        pairs = {}
        for key, new in aggregate.items():
            if key not in current:
                raise ValueError(
                    f"{self.name}: the aggregate holds {key!r}, which the server did "
                    "not send this round; delta_t = aggregate - current needs both"
                )
            x = np.asarray(current[key], dtype=WIRE_DTYPE)
            y = np.asarray(new, dtype=WIRE_DTYPE)
            if x.shape != y.shape:
                raise ValueError(
                    f"{self.name}: {key!r} was sent with shape {x.shape} and "
                    f"aggregated with shape {y.shape}; delta_t needs equal shapes"
                )
            pairs[key] = (x, y)
        out = {}
        for key, (x, y) in pairs.items():
            self.steps[key] = self.steps.get(key, 0) + 1
            out[key] = np.asarray(self._update(key, x, y), dtype=WIRE_DTYPE)
        return out

    def _update(self, key: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``x_{t+1}`` of one key from ``x_t`` and ``y_t`` (float32); updates the
        key's state. ``self.steps[key]`` already counts this step."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, float]:
        """The constructor's arguments (for logs and summaries)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # --- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> tuple[State, dict[str, Any]]:
        """What a checkpoint keeps: ``(arrays, json)``.

        ``arrays`` holds copies of the per-key state, keyed ``<slot>/<key>`` (e.g.
        ``m/<key>``, ``v/<key>``, float32); ``json`` the optimizer's class name and
        the steps each key has taken.
        """
        arrays = {
            f"{slot}/{key}": np.array(value, copy=True)
            for slot in self.slots
            for key, value in getattr(self, slot).items()
        }
        return arrays, {"kind": type(self).__name__, "steps": dict(self.steps)}

    def load_state_dict(
        self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]
    ) -> None:
        """Take back :meth:`state_dict` (instead of starting from zero).

        Raises
        ------
        ValueError
            The state was written by another optimizer, or its arrays do not fit
            it (an unknown slot, or a state array for a key without steps).
        """
        kind = state.get("kind") if isinstance(state, Mapping) else None
        if kind != type(self).__name__:
            raise ValueError(
                f"the checkpoint's server optimizer state is {kind!r}'s, not "
                f"{type(self).__name__!r}'s; resume with the run's own "
                f"{SECTION} settings"
            )
        steps = {str(k): int(v) for k, v in dict(state.get("steps", {})).items()}
        slots: dict[str, State] = {slot: {} for slot in self.slots}
        for name, value in arrays.items():
            slot, _, key = name.partition("/")
            if slot not in slots or key not in steps:
                raise ValueError(
                    f"the checkpoint's server optimizer state has {name!r}, which is "
                    f"not one of {type(self).__name__}'s arrays (<slot>/<key> with "
                    f"slot in {list(self.slots)} and a key that has taken steps)"
                )
            slots[slot][key] = np.array(value, dtype=WIRE_DTYPE, copy=True)
        self.steps = steps
        for slot, values in slots.items():
            setattr(self, slot, values)


class NoOptimizer(ServerOptimizer):
    """No server optimizer (``server_optimizer=none``): the method's aggregate is
    the new global state, as it is."""

    name = "none"

    def step(
        self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, Any]
    ) -> State:
        """``aggregate`` itself (its arrays, not copies); ``current`` is unused."""
        return dict(aggregate)


class AvgM(ServerOptimizer):
    """Server momentum (FedAvgM), Flower's ``FedAvgM``.

    With the pseudo-gradient ``g_t = x_t - y_t`` (note the sign)::

        v_t     = g_t                  (first step; v_t = g_t for momentum 0)
        v_t     = momentum v_{t-1} + g_t
        x_{t+1} = x_t - lr v_t

    ``server_learning_rate=1, server_momentum=0`` (Flower's defaults) returns the
    aggregate unchanged, as Flower does (no arithmetic at all).

    Parameters
    ----------
    server_learning_rate : float
        ``lr > 0`` (Flower's default 1.0).
    server_momentum : float
        ``momentum >= 0`` (Flower's default 0.0; Flower ignores a negative one,
        which is refused here).
    """

    name = "avgm"
    slots = ("momentum",)

    def __init__(
        self, server_learning_rate: float = 1.0, server_momentum: float = 0.0
    ) -> None:
        super().__init__()
        self.server_learning_rate = _positive(
            "server_learning_rate", server_learning_rate
        )
        self.server_momentum = _number(
            "server_momentum", server_momentum, ">= 0", lambda x: x >= 0
        )
        self.momentum: State
        # Flower's switch: with lr 1 and no momentum the aggregate stays as it is
        self.active = self.server_learning_rate != 1.0 or self.server_momentum != 0.0

    def hyperparameters(self) -> dict[str, float]:
        """``server_learning_rate`` and ``server_momentum``."""
        return {
            "server_learning_rate": self.server_learning_rate,
            "server_momentum": self.server_momentum,
        }

    def _update(self, key: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if not self.active:
            return y
        g = x - y  # Flower's pseudo-gradient: old - new
        if self.server_momentum > 0.0:
            if key in self.momentum:
                g = self.server_momentum * self.momentum[key] + g
            self.momentum[key] = g
        return x - self.server_learning_rate * g


class _Adaptive(ServerOptimizer):
    """The shared part of Flower's FedOpt (Adagrad, Adam, Yogi), per key::

        delta_t = y_t - x_t
        m_t     = beta_1 m_{t-1} + (1 - beta_1) delta_t        (m_0 = 0)
        v_t     = <the subclass's second moment>              (v_0 = 0)
        x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau)

    ``eta_t`` is ``eta`` except for Adam's bias correction. Every array is float32
    as in Flower (its hyperparameters are Python floats, weak scalars in numpy's
    arithmetic); Adam's corrected ``eta_t`` is a float64 scalar there, so its step
    ``eta_t m_t / (...)`` is float64 before the float32 result.
    """

    slots = ("m", "v")
    beta_1: float

    def __init__(self, eta: float, eta_l: float, tau: float) -> None:
        super().__init__()
        self.eta = _positive("eta", eta)
        self.eta_l = _positive("eta_l", eta_l)  # unused, as in Flower
        self.tau = _positive("tau", tau)
        self.m: State
        self.v: State

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _eta(self, t: int) -> float | np.floating[Any]:
        """The server learning rate of the key's step ``t`` (1, 2, ...)."""
        return self.eta

    def _update(self, key: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        delta = y - x
        if key not in self.m:  # Flower's m_0 = v_0 = 0, in the aggregate's dtype
            self.m[key], self.v[key] = np.zeros_like(y), np.zeros_like(y)
        m, v = self.m[key], self.v[key]
        m = self.beta_1 * m + (1 - self.beta_1) * delta
        v = self._second_moment(v, delta)
        self.m[key], self.v[key] = m, v
        return x + self._eta(self.steps[key]) * m / (np.sqrt(v) + self.tau)


class Adagrad(_Adaptive):
    """FedAdagrad, Flower's ``FedAdagrad``: ``m_t = delta_t`` (``beta_1 = 0``),
    ``v_t = v_{t-1} + delta_t^2``.

    Parameters
    ----------
    eta : float
        Server learning rate (Flower's default 0.1).
    eta_l : float
        The clients' learning rate in Flower's signature (default 0.1); unused
        (the clients' is ``train.lr``).
    tau : float
        Adaptivity, ``> 0`` (default 1e-3): the step is ``eta m / (sqrt(v) + tau)``.
    """

    name = "adagrad"
    beta_1 = 0.0  # Flower's FedAdagrad passes beta_1 = beta_2 = 0 to FedOpt

    def __init__(
        self, eta: float = 1e-1, eta_l: float = 1e-1, tau: float = 1e-3
    ) -> None:
        super().__init__(eta, eta_l, tau)

    def hyperparameters(self) -> dict[str, float]:
        """``eta``, ``eta_l`` and ``tau``."""
        return {"eta": self.eta, "eta_l": self.eta_l, "tau": self.tau}

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + (delta**2)


class _WithBetas(_Adaptive):
    def __init__(
        self, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float
    ) -> None:
        super().__init__(eta, eta_l, tau)
        self.beta_1 = _beta("beta_1", beta_1)
        self.beta_2 = _beta("beta_2", beta_2)

    def hyperparameters(self) -> dict[str, float]:
        """``eta``, ``eta_l``, ``beta_1``, ``beta_2`` and ``tau``."""
        return {
            "eta": self.eta,
            "eta_l": self.eta_l,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "tau": self.tau,
        }


class Adam(_WithBetas):
    """FedAdam, Flower's ``FedAdam``::

        v_t   = beta_2 v_{t-1} + (1 - beta_2) delta_t^2
        eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))

    The bias correction is Flower's, exponent ``t + 1``, where Flower's ``t`` is
    the server round (1, 2, ...) and ours the number of steps the key has taken,
    this one included: the same whenever every round from round 1 aggregates (a
    round that aggregates nothing moves Flower's exponent but no moment; here it
    moves neither).

    Parameters
    ----------
    eta : float
        Server learning rate (Flower's default 0.1).
    eta_l : float
        Unused (Flower's signature; default 0.1).
    beta_1, beta_2 : float
        Moment decay rates in ``[0, 1)`` (defaults 0.9, 0.99).
    tau : float
        Adaptivity, ``> 0`` (default 1e-3).
    """

    name = "adam"

    def __init__(
        self,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta, eta_l, beta_1, beta_2, tau)

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * (delta**2)

    def _eta(self, t: int) -> np.floating[Any]:
        # np.power of Python floats is a float64 scalar: the step is float64, as
        # in Flower, before step() rounds x_{t+1} to float32
        return (
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, t + 1.0))
            / (1 - np.power(self.beta_1, t + 1.0))
        )


class Yogi(_WithBetas):
    """FedYogi, Flower's ``FedYogi``: the second moment moves towards
    ``delta_t^2`` by at most ``(1 - beta_2) delta_t^2``::

        v_t = v_{t-1} - (1 - beta_2) delta_t^2 sign(v_{t-1} - delta_t^2)

    Parameters
    ----------
    eta : float
        Server learning rate (Flower's default 1e-2).
    eta_l : float
        Unused (Flower's signature; default 0.0316).
    beta_1, beta_2 : float
        Moment decay rates in ``[0, 1)`` (defaults 0.9, 0.99).
    tau : float
        Adaptivity, ``> 0`` (default 1e-3).
    """

    name = "yogi"

    def __init__(
        self,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta, eta_l, beta_1, beta_2, tau)

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * (delta**2) * np.sign(v - delta**2)


# --- construction from the settings -------------------------------------------------
def load_class(target: str) -> type[ServerOptimizer]:
    """The :class:`ServerOptimizer` subclass at the dotted path ``target``."""
    return load_target(target, ServerOptimizer, f"{SECTION}._target_", _EXAMPLE)


def from_settings(section: Mapping[str, Any] | None) -> ServerOptimizer:
    """The server optimizer of the ``server_optimizer`` settings section.

    Parameters
    ----------
    section : mapping or None
        ``_target_`` naming the class (null: :class:`NoOptimizer`) and its
        arguments; None (settings written before the section existed) is
        :class:`NoOptimizer` too.

    Raises
    ------
    ConfigError
        Not a mapping, no ``_target_``, a target that is not a ServerOptimizer, an
        argument the class does not take (naming ``server_optimizer.<key>``) or a
        bad value.
    """
    if section is None:
        return NoOptimizer()
    return build_target(
        section,
        ServerOptimizer,
        SECTION,
        _EXAMPLE,
        NoOptimizer,
    )
