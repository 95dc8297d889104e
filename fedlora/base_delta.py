"""A delta folded into the frozen base weights: ``W0 <- W0 + D`` on every party.

Methods that make their aggregation exact through the base weights (FedEx-LoRA's
residual, FLoRA's merged stack) produce, each round, a *fold* per adapted layer:
factors ``(U, V)`` with ``U @ V`` the ``d_out x d_in`` matrix to add to that layer's
``W0`` (scale included, untransposed: PEFT and ``nn.Linear`` weights are
``(d_out, d_in)``). Every party must hold the sum of all folds so far, so a node that
missed rounds (not sampled, restarted, joined late) receives what it lacks.

:class:`BaseDelta` keeps such a sum per layer, as stacked factors
``[U_1 U_2 ...] @ [V_1; V_2; ...]`` while that is smaller than the dense matrix, and
dense (float64) from then on. The server and every node use this one class, so both
agree on the wire form (:meth:`BaseDelta.to_state`, :meth:`BaseDelta.from_state`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

State = dict[str, np.ndarray]
#: one round's fold: ``{layer: (U, V)}``, ``W0 += U @ V``, or ``{layer: D}`` dense
Fold = dict[str, "tuple[np.ndarray, np.ndarray] | np.ndarray"]

_U, _V, _D = ".base_U", ".base_V", ".base_D"


class BaseDelta:
    """The sum of folds per layer (see the module doc).

    A layer is ``("factored", U, V)`` (float32 factors, as they travel) or
    ``("dense", D)`` (float64), whichever is smaller: ``(d_out + d_in) * rank``
    against ``d_out * d_in`` numbers.
    """

    def __init__(self) -> None:
        self._layers: dict[str, tuple[np.ndarray, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self._layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def copy(self) -> BaseDelta:
        """An independent copy."""
        out = BaseDelta()
        out._layers = {k: tuple(a.copy() for a in v) for k, v in self._layers.items()}
        return out

    def add(self, fold: Fold) -> None:
        """Add one fold: ``{layer: (U, V)}`` (factored) or ``{layer: D}`` (dense)."""
        for layer, value in fold.items():
            if isinstance(value, np.ndarray):
                self._add_dense(layer, value)
                continue
            u, v = value
            u = np.ascontiguousarray(u, dtype=np.float32)
            v = np.ascontiguousarray(v, dtype=np.float32)
            if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
                raise ValueError(
                    f"{layer}: a fold needs U (d_out x k) and V (k x d_in), got "
                    f"{u.shape} and {v.shape}"
                )
            held = self._layers.get(layer)
            if held is None:
                self._layers[layer] = (u, v)
            elif len(held) == 1:
                self._layers[layer] = (held[0] + u.astype(np.float64) @ v,)
            else:
                self._layers[layer] = (np.hstack([held[0], u]), np.vstack([held[1], v]))
            self._densify_if_smaller(layer)

    def add_delta(self, other: BaseDelta) -> None:
        """Add every layer of ``other``."""
        self.add(
            {
                layer: (held[0], held[1]) if len(held) == 2 else held[0]
                for layer, held in other._layers.items()
            }
        )

    def _add_dense(self, layer: str, dense: np.ndarray) -> None:
        dense = np.asarray(dense, dtype=np.float64)
        if layer in self._layers:
            dense = self.matrix(layer) + dense
        self._layers[layer] = (dense,)

    def matrix(self, layer: str) -> np.ndarray:
        """The layer's summed delta, dense, float64."""
        held = self._layers[layer]
        if len(held) == 1:
            return held[0]
        return held[0].astype(np.float64) @ held[1].astype(np.float64)

    def matrices(self) -> dict[str, np.ndarray]:
        """Every layer's summed delta, dense, float64."""
        return {layer: self.matrix(layer) for layer in self._layers}

    def factors(self, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The layer's stacked ``(U, V)``, or None once it is dense."""
        held = self._layers[layer]
        return (held[0], held[1]) if len(held) == 2 else None

    def norm(self) -> float:
        """Frobenius norm of all layers' summed deltas together (factored layers
        through their small Gram matrices: ``||U V||^2 = tr(U^T U V V^T)``)."""
        total = 0.0
        for held in self._layers.values():
            if len(held) == 1:
                total += float(np.sum(held[0] ** 2))
            else:
                u, v = (a.astype(np.float64) for a in held)
                total += float(np.sum((u.T @ u) * (v @ v.T)))
        return float(np.sqrt(max(total, 0.0)))

    def num_parameters(self) -> int:
        """Numbers its wire form holds."""
        return int(sum(a.size for held in self._layers.values() for a in held))

    def to_state(self) -> State:
        """The wire form: ``<layer>.base_U``/``.base_V`` or ``<layer>.base_D``."""
        out: State = {}
        for layer, held in self._layers.items():
            if len(held) == 2:
                out[layer + _U], out[layer + _V] = held
            else:
                out[layer + _D] = held[0]
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> BaseDelta:
        """Take back :meth:`to_state`.

        Raises
        ------
        ValueError
            A key that is not a base-delta key, or a ``U`` without its ``V``.
        """
        out = cls()
        for key, value in state.items():
            if key.endswith(_D):
                out._layers[key[: -len(_D)]] = (np.asarray(value, dtype=np.float64),)
            elif key.endswith(_U):
                layer = key[: -len(_U)]
                if layer + _V not in state:
                    raise ValueError(f"base delta: {key} has no {layer + _V}")
                out._layers[layer] = (
                    np.asarray(value, dtype=np.float32),
                    np.asarray(state[layer + _V], dtype=np.float32),
                )
            elif not key.endswith(_V):
                raise ValueError(f"base delta: unexpected key {key!r}")
        return out

    def _densify_if_smaller(self, layer: str) -> None:
        held = self._layers[layer]
        if len(held) == 2:
            (d_out, k), d_in = held[0].shape, held[1].shape[1]
            if (d_out + d_in) * k >= d_out * d_in:
                self._layers[layer] = (self.matrix(layer),)


class FoldLog:
    """The server's record of folds: the cumulative delta, and each round's fold,
    so a node that holds the folds up to round ``t`` gets only the later ones.

    Attributes
    ----------
    total : BaseDelta
        Every fold so far.
    latest : int
        The round of the last fold (0: none).
    """

    def __init__(self) -> None:
        self.total = BaseDelta()
        self.latest = 0
        self._rounds: list[tuple[int, Fold]] = []

    def add(self, server_round: int, fold: Fold) -> None:
        """Record round ``server_round``'s fold (an empty fold is a no-op)."""
        if not fold:
            return
        self.total.add(fold)
        self._rounds.append((int(server_round), fold))
        self.latest = int(server_round)

    def since(self, held: int | None) -> tuple[int, BaseDelta]:
        """``(from, delta)`` for a node holding the folds up to round ``held``
        (None: nothing, e.g. a new or restarted node): the later folds
        (``from = held``), or the whole sum (``from = 0``) where that is no larger."""
        if held is None or held <= 0:
            return 0, self.total
        later = BaseDelta()
        for r, fold in self._rounds:
            if r > held:
                later.add(fold)
        if later.num_parameters() >= self.total.num_parameters():
            return 0, self.total
        return held, later

    def restart(self, total: BaseDelta, latest: int) -> None:
        """Start from a checkpoint's cumulative delta (per-round folds are gone,
        so every node gets the whole sum first)."""
        self.total, self.latest, self._rounds = total, int(latest), []
