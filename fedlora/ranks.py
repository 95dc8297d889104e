"""A LoRA rank per client: which rank each client trains, and how its factors map
to and from the global adapter's.

Clients may train different ranks ``r_k`` (``adapter.client_ranks``, or a node's
own ``rank``), each at its own scale ``s_k = alpha / r_k`` (rsLoRA:
``alpha / sqrt(r_k)``). The global adapter has the largest rank ``R = adapter.r``
at scale ``s_R``. A client of rank ``r_k`` starts from the global factors truncated
to ``r_k`` and rescaled by ``c_k = sqrt(s_R / s_k)`` (both factors), so that its
effective delta ``s_k B_k A_k`` is exactly the global delta's truncation
``s_R B[:, :r_k] A[:r_k]``; the server divides its reply by ``c_k`` and pads it
with zeros back to ``R``. The truncation may happen on either side: once the server
knows a node's rank it sends only the first ``r_k`` rows/columns
(:meth:`RankPlan.truncate`, unscaled), and the client's :meth:`RankPlan.to_client`
of that is the same as of the whole global state. Never mixing scales is the
point: a padded factor averaged at another client's scale would be a different
update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

State = dict[str, np.ndarray]
#: the reply metric in which a client reports the rank it trained
RANK_KEY = "adapter-rank"
_A, _B = ".lora_A.", ".lora_B."


def rank_of(state: Mapping[str, np.ndarray]) -> int | None:
    """The LoRA rank of a wire state (its first ``lora_A``'s rows); None without
    LoRA factors."""
    for key, value in state.items():
        if _A in key:
            return int(np.shape(value)[0])
    return None


@dataclass(frozen=True)
class RankPlan:
    """The global rank and the scale rule of the adapter settings.

    Attributes
    ----------
    rank : int
        The global adapter's rank ``R`` (``adapter.r``, at least every client's).
    alpha : float
        LoRA's ``alpha``.
    rslora : bool
        ``s = alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    rank: int
    alpha: float
    rslora: bool = False

    @classmethod
    def of(cls, adapter: Any) -> RankPlan:
        """The plan of ``AdapterSettings``."""
        return cls(int(adapter.r), float(adapter.alpha), bool(adapter.use_rslora))

    def scale(self, r: int) -> float:
        """``s_r``: ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    def factor(self, r: int) -> float:
        """``c_r = sqrt(s_R / s_r)``: what a rank-``r`` client's factors are
        multiplied by on the way down (and divided by on the way up)."""
        return math.sqrt(self.scale(self.rank) / self.scale(r))

    def truncate(self, state: State, r: int) -> State:
        """The global state as a rank-``r`` node is sent it: ``A``'s first ``r``
        rows and ``B``'s first ``r`` columns, at the global scale (unscaled);
        other tensors as they are. :meth:`to_client` of the result equals
        :meth:`to_client` of ``state``."""
        self._check(r)
        return {k: _resize(k, v, r, 1.0) for k, v in state.items()}

    def to_client(self, state: State, r: int) -> State:
        """The global state as a rank-``r`` client starts from it: each factor
        truncated to ``r`` and times ``c_r``; other tensors as they are. ``state``
        may already be truncated to ``r`` (:meth:`truncate`) or to any rank above
        it, at the global scale.

        Raises
        ------
        ValueError
            If ``r`` is outside 1..R, or ``state``'s factors hold fewer than ``r``
            ranks (zero-padding them would start the client from factors whose
            extra ranks never train).
        """
        self._check(r)
        held = rank_of(state)
        if held is not None and held < r:
            raise ValueError(
                f"a rank-{r} client was sent factors of rank {held}; it needs the "
                f"global factors truncated to at least {r}"
            )
        c = self.factor(r)
        return {k: _resize(k, v, r, c) for k, v in state.items()}

    def from_client(self, state: State, r: int) -> State:
        """A rank-``r`` client's reply in the global shapes: each factor divided by
        ``c_r`` and zero-padded to ``R``."""
        self._check(r)
        c = 1.0 / self.factor(r)
        return {k: _resize(k, v, self.rank, c) for k, v in state.items()}

    def _check(self, r: int) -> None:
        if not 1 <= int(r) <= self.rank:
            raise ValueError(
                f"a client rank must be between 1 and the global rank adapter.r="
                f"{self.rank}, got {r}"
            )


def _resize(key: str, value: np.ndarray, r: int, c: float) -> np.ndarray:
    """Factor ``value`` at rank ``r`` (truncated or zero-padded) times ``c``."""
    value = np.asarray(value)
    if _A in key:
        out = np.zeros((r, value.shape[1]), dtype=value.dtype)
        n = min(r, value.shape[0])
        out[:n] = value[:n] * value.dtype.type(c)
        return out
    if _B in key:
        out = np.zeros((value.shape[0], r), dtype=value.dtype)
        n = min(r, value.shape[1])
        out[:, :n] = value[:, :n] * value.dtype.type(c)
        return out
    return value
