"""The exported adapter's rank (``export.rank``) and the truncation to it.

At the end of a run the server saves the final model as a plain PEFT LoRA adapter
of rank ``k`` (``export.rank``; null: the method's default, the largest client
rank). Where the final delta of a layer is ``s B A`` (``B``: ``d_out x R``,
``A``: ``R x d_in``, the trained rank ``R = adapter.r`` at its scale ``s``) and
``k != R``, the exported factors are its rank-``k`` truncated SVD at scale 1,
computed from the factors (:func:`fedlora.heterogeneous.factored_svd`: thin QR of
``s B`` and ``A^T``, SVD of the ``R x R`` core; the dense ``d_out x d_in`` matrix
is never formed)::

    s B A = U diag(S) V^T,   B' = U_k diag(sqrt(S_k)),   A' = diag(sqrt(S_k)) V_k^T

so ``B' A'`` is the best rank-``k`` approximation of the delta (Eckart-Young), and
its relative error over all layers, ``sqrt(sum of the dropped S_i^2 / sum of all
S_i^2)``, is what the export reports (:func:`truncation_record`). A rank above the
delta's (at most ``R``) is padded with zero columns and rows: exact.

Nothing here imports Flower.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.errors import ConfigError
from fedlora.heterogeneous import factored_svd, split_truncation

if TYPE_CHECKING:
    from fedlora.settings import Settings

State = dict[str, np.ndarray]

#: the summary.json keys of an export's record
RECORD_KEYS = (
    "export_rank",
    "export_truncation_error",
    "export_truncation_error_max_layer",
)


@dataclass(frozen=True)
class ExportPlan:
    """The exported adapter's rank and the trained adapter it comes from.

    Attributes
    ----------
    rank : int
        ``k``, the exported adapter's rank.
    trained_rank : int
        ``R = adapter.r``, the rank of the final global adapter.
    scaling : float
        ``s``, the trained adapter's LoRA scale (``adapter.scaling``).
    requested : int or None
        ``export.rank`` as set (None: ``rank`` is the method's default).
    """

    rank: int
    trained_rank: int
    scaling: float
    requested: int | None = None

    @classmethod
    def of(cls, settings: Settings, default: int) -> ExportPlan:
        """The plan of the experiment ``settings``: ``export.rank``, or
        ``default`` where it is null (or the section absent: settings written
        before it existed).

        Raises
        ------
        ConfigError
            ``export.rank`` that is not a positive integer.
        """
        requested = settings.export.rank if settings.export is not None else None
        if requested is not None and (
            isinstance(requested, bool)
            or not isinstance(requested, int)
            or requested < 1
        ):
            raise ConfigError(
                "export.rank",
                requested,
                "must be a positive integer, the exported adapter's LoRA rank "
                f"(null: the method's default, here {default})",
            )
        return cls(
            rank=int(default if requested is None else requested),
            trained_rank=int(settings.adapter.r),
            scaling=float(settings.adapter.scaling),
            requested=requested,
        )

    @property
    def as_trained(self) -> bool:
        """The export keeps the trained adapter as it is (``k = R``)."""
        return self.rank == self.trained_rank


def truncation_record(
    rank: int, tails: Iterable[float], totals: Iterable[float]
) -> dict[str, Any]:
    """``summary.json``'s record of an export at ``rank`` from each layer's
    dropped and total squared singular values: ``export_truncation_error``,
    ``sqrt(sum tails / sum totals)`` over all layers together, and
    ``export_truncation_error_max_layer``, the largest ``sqrt(tail / total)`` of a
    single layer (0 where the delta is 0)."""
    tails, totals = list(tails), list(totals)
    tail, total = float(sum(tails)), float(sum(totals))
    worst = max(
        (float(np.sqrt(t / n)) for t, n in zip(tails, totals, strict=True) if n > 0),
        default=0.0,
    )
    return {
        "export_rank": int(rank),
        "export_truncation_error": float(np.sqrt(tail / total)) if total > 0 else 0.0,
        "export_truncation_error_max_layer": worst,
    }


def truncated_factors(
    b: np.ndarray, a: np.ndarray, scaling: float, rank: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(B', A', tail, total)``: the rank-``rank`` truncated SVD of ``s B A``
    from the factors, split evenly at scale 1 (``B' A' ~ s B A``), float64, with
    ``tail = sum_{i>k} S_i^2`` and ``total = sum_i S_i^2 = ||s B A||_F^2``.

    Cost ``O((d_out + d_in) R^2)``; a rank above the delta's gets zero columns
    and rows (and ``tail = 0``)."""
    u, s, vt = factored_svd(float(scaling) * np.asarray(b, dtype=np.float64), a)
    b_k, a_k = split_truncation(u, s, vt, int(rank), 1.0)
    return b_k, a_k, float(np.sum(s[rank:] ** 2)), float(np.sum(s**2))


def truncate_adapter(
    state: State, scaling: float, rank: int
) -> tuple[State, dict[str, Any]]:
    """A plain PEFT LoRA state at scale ``scaling`` (every layer's delta
    ``s B A``) as one of rank ``rank`` at scale 1 (:func:`truncated_factors` per
    layer, each factor in its own dtype; other tensors, the head, as they are),
    and its :func:`truncation_record`."""
    layers = lora_layers(state)
    factor_keys = {key for pair in layers.values() for key in pair}
    out = {key: value for key, value in state.items() if key not in factor_keys}
    tails, totals = [], []
    for a_key, b_key in layers.values():
        b, a = np.asarray(state[b_key]), np.asarray(state[a_key])
        b_k, a_k, tail, total = truncated_factors(b, a, scaling, rank)
        out[b_key], out[a_key] = b_k.astype(b.dtype), a_k.astype(a.dtype)
        tails.append(tail)
        totals.append(total)
    return out, truncation_record(rank, tails, totals)
