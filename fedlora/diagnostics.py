"""The aggregation-error diagnostic every strategy reports each round.

With ``E`` a model's effective adapter delta per layer (``s B A``), ``E_k`` what
client k returned, ``E_old`` what the server sent and ``E_new`` what it sends next::

    aggregation_error = ||sum_k p_k E_k - E_new||_F / ||sum_k p_k E_k - E_old||_F

over all adapted layers together, and per module name (query, value, ...).

Each numerator/denominator is the norm of a sum of low-rank products
``sum_i c_i B_i A_i = U diag(c) V`` with ``U = [B_1 .. B_m]`` (d_out, m r) and
``V = [A_1; ..; A_m]`` (m r, d_in). We never form the d_out x d_in matrix:

- general methods: ``||U diag(c) V||_F^2 = c^T T c`` with
  ``T[i, j] = <B_i^T B_j, A_i A_j^T>``, from one float64 Gram product per side,
  shared by numerator and denominator (``O(d (m r)^2)`` in matrix products). Where
  the sum cancels (an exact aggregation) this loses digits, so that case is redone
  from thin QR factors, ``||U V||_F = ||R_u R_v^T||_F``, which reads ~1e-16;
- methods whose outer factors are frozen and shared (FFA-LoRA, Fed-SB):
  :func:`shared_factor_error`, ``O(d r^2)`` or ``O(r^3)`` per layer and round.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.adapters import lora_layers, module_name

Factors = tuple[np.ndarray, np.ndarray]  # (B: (d_out, r), A: (r, d_in))


def sum_of_products_sqnorm(
    terms: Sequence[tuple[float, np.ndarray, np.ndarray]],
) -> float:
    """``||sum_i c_i B_i A_i||_F^2`` computed in float64 from the factors."""
    u = np.concatenate([c * b.astype(np.float64) for c, b, _ in terms], axis=1)
    v = np.concatenate([a.astype(np.float64) for _, _, a in terms], axis=0)
    # U = Q_u R_u, V^T = Q_v R_v  =>  ||U V||_F = ||R_u R_v^T||_F (no squaring of
    # the condition number, so exact methods read ~1e-16 in float64, not ~1e-8)
    r_u = np.linalg.qr(u, mode="r")
    r_v = np.linalg.qr(v.T, mode="r")
    return float(np.sum((r_u @ r_v.T) ** 2))


def layer_factors(state: dict[str, np.ndarray]) -> dict[str, Factors]:
    """``{layer: (B, A)}`` of a full LoRA state (keys ``...lora_A.weight`` etc.)."""
    return {layer: (state[b], state[a]) for layer, (a, b) in lora_layers(state).items()}


class _Buffers:
    """Two float64 buffers reused from layer to layer: writing the stacked factors
    into fresh memory each time (page faults) costs more than the Gram products."""

    def __init__(self) -> None:
        self._flat = [np.empty(0), np.empty(0)]

    def take(self, which: int, rows: int, cols: int) -> np.ndarray:
        if self._flat[which].size < rows * cols:
            self._flat[which] = np.empty(rows * cols)
        return self._flat[which][: rows * cols].reshape(rows, cols)


def _stacked_traces(
    factors: Sequence[Factors], buffers: _Buffers | None = None
) -> np.ndarray | None:
    """``T[i, j] = <B_i^T B_j, A_i A_j^T>`` for equal-rank factors, so that
    ``||sum_i c_i B_i A_i||_F^2 = c^T T c`` for any coefficients ``c``; None when the
    ranks differ. One float64 Gram product (``X X^T``, a BLAS syrk) of the stacked
    ``B_i^T`` and of the stacked ``A_i``."""
    ranks = {b.shape[1] for b, _ in factors}
    if len(ranks) != 1:
        return None
    r, m = ranks.pop(), len(factors)
    buffers = buffers or _Buffers()
    bt = buffers.take(0, m * r, factors[0][0].shape[0])  # [B_1^T; ..; B_m^T]
    a = buffers.take(1, m * r, factors[0][1].shape[1])  # [A_1; ..; A_m]
    for i, (b_i, a_i) in enumerate(factors):
        bt[i * r : (i + 1) * r] = b_i.T
        a[i * r : (i + 1) * r] = a_i
    prod = (bt @ bt.T) * (a @ a.T)
    return prod.reshape(m, r, m, r).sum(axis=(1, 3))


def _sqnorm(
    traces: np.ndarray | None,
    coeffs: np.ndarray,
    factors: Sequence[Factors],
) -> float:
    """``||sum_i c_i B_i A_i||_F^2`` from the traces; recomputed with the thin-QR
    form when the sum cancels to below 1e-8 of its terms (an exact method), where
    ``c^T T c`` would have lost its digits to round-off."""
    if traces is not None:
        value = float(coeffs @ traces @ coeffs)
        scale = float(np.abs(coeffs) @ np.abs(traces) @ np.abs(coeffs))
        if value > 1e-8 * scale:
            return value
    terms = [(c, b, a) for c, (b, a) in zip(coeffs, factors, strict=True) if c != 0]
    return sum_of_products_sqnorm(terms) if terms else 0.0


def aggregation_error(
    clients: Sequence[dict[str, Factors]],
    weights: np.ndarray,
    old: dict[str, Factors],
    new: dict[str, Factors],
    scaling: float,
) -> tuple[float, dict[str, float]]:
    """Aggregation error overall and per module name (see module docstring).

    Every argument maps layer -> ``(B, A)``; a method whose effective delta has
    more factors (Fed-SB's ``B R A``) passes ``(B R, A)``. Returns 0.0 where the
    round's average update is exactly zero.
    """
    num: dict[str, float] = defaultdict(float)
    den: dict[str, float] = defaultdict(float)
    c_num = np.concatenate([scaling * np.asarray(weights, float), [-scaling, 0.0]])
    c_den = np.concatenate([scaling * np.asarray(weights, float), [0.0, -scaling]])
    buffers = _Buffers()
    for layer in new:
        factors = [c[layer] for c in clients] + [new[layer], old[layer]]
        # shared by the numerator and the denominator
        traces = _stacked_traces(factors, buffers)
        mod = module_name(layer)
        num[mod] += _sqnorm(traces, c_num, factors)
        den[mod] += _sqnorm(traces, c_den, factors)
    return _ratios(num, den)


def shared_factor_error(
    clients: Sequence[dict[str, np.ndarray]],
    weights: np.ndarray,
    old: dict[str, np.ndarray],
    new: dict[str, np.ndarray],
    triangles: dict[str, tuple[np.ndarray | None, np.ndarray]],
) -> tuple[float, dict[str, float]]:
    """The aggregation error when every party shares the frozen outer factors:
    a layer's delta is ``s L X R`` with ``L`` (or none) and ``R`` frozen and ``X``
    communicated (FFA-LoRA: ``X = B``, ``R = A``; Fed-SB: ``L = B``, ``X = R``,
    ``R = A``). With ``L = Q_L T_L`` and ``R^T = Q_R T_R`` (thin QR, computed once:
    :func:`frozen_triangles`), ``||L D R||_F = ||T_L D T_R^T||_F``: each round costs
    ``O(d r^2)`` or ``O(r^3)`` per layer, and the difference ``D = sum p_k X_k - X``
    is formed directly, so exact methods read their true round-off. The scale ``s``
    cancels in the ratio. Without ``L`` (FFA-LoRA, ``D`` of ``d_out`` rows),
    ``||D T_R^T||_F^2 = tr(T_R (D^T D) T_R^T)``: one ``r x r`` Gram product of ``D``
    (a BLAS syrk, steady on a loaded machine where a thin ``d x r`` product is
    not), ``D`` formed in two float64 buffers reused from layer to layer.
    """
    num: dict[str, float] = defaultdict(float)
    den: dict[str, float] = defaultdict(float)
    p = [float(w) for w in weights]
    buffers = _Buffers()
    small = [ly for ly, (t_left, _) in triangles.items() if t_left is not None]
    if small:  # Fed-SB: every layer's r x r products at once
        _small_layers(small, clients, p, old, new, triangles, num, den)
    for layer, (t_left, t_right) in triangles.items():
        if t_left is not None:
            continue
        xs = [c[layer] for c in clients]
        total = buffers.take(0, *xs[0].shape)
        part = buffers.take(1, *xs[0].shape)
        # sum_k p_k X_k in float64 (dtype: not a float32 product cast up)
        np.multiply(xs[0], p[0], out=total, dtype=np.float64)
        for x, w in zip(xs[1:], p[1:], strict=True):
            np.multiply(x, w, out=part, dtype=np.float64)
            np.add(total, part, out=total)
        mod = module_name(layer)
        for acc, ref in ((num, new), (den, old)):
            np.subtract(total, ref[layer], out=part)  # D
            acc[mod] += float(np.vdot(t_right @ (part.T @ part), t_right))
    return _ratios(num, den)


def _small_layers(
    layers: list[str],
    clients: Sequence[dict[str, np.ndarray]],
    p: list[float],
    old: dict[str, np.ndarray],
    new: dict[str, np.ndarray],
    triangles: dict[str, tuple[np.ndarray | None, np.ndarray]],
    num: dict[str, float],
    den: dict[str, float],
) -> None:
    """:func:`shared_factor_error`'s ``||T_L D T_R^T||_F^2`` of every layer with a
    left factor, as stacks (layers of one shape at a time): a few numpy calls
    instead of a dozen per layer, for Fed-SB's many ``r x r`` layers."""
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for layer in layers:
        by_shape[clients[0][layer].shape].append(layer)
    for group in by_shape.values():
        t_left, t_right_t, mods, index = _stacked_triangles(triangles, tuple(group))
        # sum_k p_k X_k in float64, (layers, r, r)
        total = sum(
            np.multiply(np.stack([c[ly] for ly in group]), w, dtype=np.float64)
            for c, w in zip(clients, p, strict=True)
        )
        for acc, ref in ((num, new), (den, old)):
            d = t_left @ (total - np.stack([ref[ly] for ly in group])) @ t_right_t
            per_layer = np.einsum("lij,lij->l", d, d)
            per_module = np.bincount(index, weights=per_layer, minlength=len(mods))
            for mod, value in zip(mods, per_module, strict=True):
                acc[mod] += float(value)


def _stacked_triangles(
    triangles: dict[str, tuple[np.ndarray | None, np.ndarray]], group: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """``group``'s ``T_L`` and ``T_R^T`` stacked, its modules and each layer's
    module index: frozen, so built once a run (kept with ``triangles``)."""
    stacks = getattr(triangles, "stacks", None)
    if stacks is not None and group in stacks:
        return stacks[group]
    t_left = np.stack([triangles[ly][0] for ly in group])
    t_right_t = np.stack([triangles[ly][1].T for ly in group])
    names = [module_name(ly) for ly in group]
    mods = list(dict.fromkeys(names))
    index = np.array([mods.index(m) for m in names], dtype=np.intp)
    out = (t_left, t_right_t, mods, index)
    if stacks is not None:
        stacks[group] = out
    return out


class FrozenTriangles(dict):
    """:func:`frozen_triangles`' ``{layer: (T_L, T_R)}``, with room for the
    stacks :func:`_small_layers` builds from them once (``stacks``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stacks: dict[tuple[str, ...], Any] = {}


def frozen_triangles(
    frozen: dict[str, np.ndarray], layers: dict[str, tuple[str | None, str]]
) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """``{layer: (T_L, T_R)}`` for :func:`shared_factor_error`, from the frozen
    factors named in ``layers`` (``{layer: (left key or None, right key)}``)."""
    out = FrozenTriangles()
    for layer, (left, right) in layers.items():
        t_right = np.linalg.qr(frozen[right].astype(np.float64).T, mode="r")
        t_left = (
            np.linalg.qr(frozen[left].astype(np.float64), mode="r")
            if left is not None
            else None
        )
        out[layer] = (t_left, t_right)
    return out


def _ratios(
    num: dict[str, float], den: dict[str, float]
) -> tuple[float, dict[str, float]]:
    def ratio(n: float, d: float) -> float:
        n, d = max(n, 0.0), max(d, 0.0)  # float round-off can dip below 0
        return 0.0 if d == 0.0 else float(np.sqrt(n / d))

    by_module = {m: ratio(num[m], den[m]) for m in sorted(num)}
    return ratio(sum(num.values()), sum(den.values())), by_module


#: ``diagnostics.every=auto``: a diagnostic that took at most this long the last
#: time it ran runs again in the next round, whatever the budget says
AUTO_FREE_SECONDS = 0.05
#: ``diagnostics.every=auto``: otherwise its seconds stay within this share of the
#: seconds of the rest of the server's aggregation (so on average the diagnostic
#: adds at most half to the server's aggregation time)
AUTO_SHARE = 0.5


@dataclass
class DiagnosticSchedule:
    """Which rounds measure the aggregation error (``diagnostics.every``).

    ``every`` N >= 1: rounds N, 2N, ...; 0: never; ``"auto"``: every round while
    the diagnostic costs the server little, otherwise as often as keeps the
    seconds it has spent within :data:`AUTO_SHARE` of the seconds the rest of the
    server's aggregation has (decoding, checks, the method's aggregation, byte
    accounting, encoding): on average the diagnostic adds at most half to the
    server's aggregation time. A diagnostic is due when it has not run yet, when
    its last run took at most :data:`AUTO_FREE_SECONDS`, or when its seconds so
    far are at most that share of the rest's.
    The seconds are measured (:meth:`record`), so with ``auto`` which rounds
    measure can differ from run to run: on a model of MiniLM's size it is every
    round; on LLM shapes, where one diagnostic costs seconds, fewer.
    """

    every: int | str
    free_seconds: float = AUTO_FREE_SECONDS
    share: float = AUTO_SHARE
    spent: float = 0.0  #: seconds of the diagnostics so far (``auto``)
    rest: float = 0.0  #: seconds of the rest of the aggregations so far
    last: float | None = None  #: seconds of the latest diagnostic
    measured: int = 0  #: rounds whose diagnostic ran

    @property
    def auto(self) -> bool:
        return self.every == "auto"

    def due(self, server_round: int) -> bool:
        """Whether the aggregation error is measured in ``server_round``."""
        if self.auto:
            return (
                self.last is None
                or self.last <= self.free_seconds
                or self.spent <= self.share * self.rest
            )
        assert isinstance(self.every, int)
        return self.every > 0 and server_round % self.every == 0

    def skipped(self) -> str:
        """Why a round that is not :meth:`due` records no aggregation error."""
        if self.auto:
            return (
                f"diagnostics.every=auto: skipped to keep the diagnostic's "
                f"{self.spent:.1f} s so far within {self.share:g} of the rest of "
                f"the server's aggregation ({self.rest:.1f} s; the last diagnostic "
                f"took {self.last:.2f} s); diagnostics.every=1 measures every round"
            )
        if self.every:
            return (
                f"diagnostics.every={self.every}: measured in rounds {self.every}, "
                f"{2 * self.every}, ..."
            )
        return "diagnostics.every=0: never measured"

    def record(self, total: float, diagnostic: float | None) -> None:
        """Account a server aggregation of ``total`` seconds, of which
        ``diagnostic`` (None: it did not run) were the diagnostic's."""
        if diagnostic is not None:
            self.spent += diagnostic
            self.last = diagnostic
            self.measured += 1
        self.rest += total - (diagnostic or 0.0)
