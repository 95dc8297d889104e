"""Export of methods whose final model lives partly in the base weights (the folds
of FedEx-LoRA and FLoRA): the exact merged delta as safetensors, and a PEFT adapter
of a chosen rank by truncated SVD of it, with the truncation error reported."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.errors import ConfigError
from fedlora.export import ExportPlan, truncation_record
from fedlora.methods.base import State

log = logging.getLogger("fedlora")

#: the exported exact merged delta, beside the PEFT adapter: ``{<layer>.weight: D}``
MERGED_FILE = "merged_delta.safetensors"


def truncated_lora(
    delta: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(B, A, tail, total)``: the rank-``rank`` truncated SVD of ``delta``,
    ``delta ~ U_k S_k V_k^T``, split evenly, ``B = U_k S_k^(1/2)``,
    ``A = S_k^(1/2) V_k^T`` (``B A`` is the best rank-``rank`` approximation), with
    ``tail = sum_{i>k} s_i^2`` and ``total = sum_i s_i^2 = ||delta||_F^2``.

    A rank above ``min(d_out, d_in)`` is zero-padded (and exact)."""
    u, sv, vt = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
    k = min(rank, sv.size)
    root = np.sqrt(sv[:k])
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vt[:k]
    return b, a, float(np.sum(sv[k:] ** 2)), float(np.sum(sv**2))


class MergedExport:
    """Mixin for a :class:`~fedlora.methods.base.Method` with ``scaling`` (its LoRA
    scale ``s``), ``export_plan`` (``export.rank``) and ``_export_record``
    attributes: the exported adapter is the truncated SVD of ``base folds + s B A``
    per layer, at any rank (the folds may give the delta a rank above ``R``)."""

    name: str
    scaling: float
    export_plan: ExportPlan | None
    _export_record: dict[str, Any]

    # --- export ------------------------------------------------------------------
    def merged_delta(
        self, state: State, frozen: State, base: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Each layer's exact delta over the pristine ``W0``, float64: the summed
        folds ``base`` plus ``s B A`` of the final global adapter."""
        full = {**frozen, **state}
        out = {}
        for layer, (a_key, b_key) in lora_layers(full).items():
            b = np.asarray(full[b_key], dtype=np.float64)
            delta = self.scaling * (b @ np.asarray(full[a_key], dtype=np.float64))
            if base and layer in base:
                delta += np.asarray(base[layer], dtype=np.float64)
            out[layer] = delta
        return out

    def export_overrides(self) -> dict[str, Any]:
        """The exported adapter has rank ``k`` (``export.rank``) and scale 1
        (``alpha = r``, no rsLoRA), so its ``B A`` is the delta itself."""
        if self.export_plan is None:
            raise ConfigError(
                "export.rank",
                None,
                f"{self.name}'s export needs a rank: build the method with "
                "fedlora.methods.from_settings (it passes export.rank, or the "
                "default), or pass export=ExportPlan(...)",
            )
        k = self.export_plan.rank
        return {"r": k, "alpha": float(k), "use_rslora": False}

    def export(
        self, state: State, frozen: State, base: dict[str, np.ndarray] | None = None
    ) -> State:
        """A plain PEFT LoRA adapter of rank ``k`` at scale 1 (see
        :meth:`export_overrides`): per layer the truncated SVD of the exact merged
        delta (:func:`truncated_lora`), and the head. Records (and logs) the
        relative truncation error over all layers together,
        ``sqrt(sum of the dropped s_i^2 / sum of all s_i^2)``, and the largest
        of any layer (:meth:`summary_notes`)."""
        k = int(self.export_overrides()["r"])
        lora = lora_layers({**frozen, **state})
        factor_keys = {key for pair in lora.values() for key in pair}
        out = {key: v for key, v in state.items() if key not in factor_keys}
        tails, totals = [], []
        for layer, delta in self.merged_delta(state, frozen, base).items():
            b, a, layer_tail, layer_total = truncated_lora(delta, k)
            a_key, b_key = lora[layer]
            out[b_key], out[a_key] = b.astype(np.float32), a.astype(np.float32)
            tails.append(layer_tail)
            totals.append(layer_total)
        self._export_record = truncation_record(k, tails, totals)
        log.info(
            "%s export: rank-%s adapter, relative truncation error %.3g "
            "(largest layer %.3g); the exact merged delta is in %s",
            self.name,
            k,
            self._export_record["export_truncation_error"],
            self._export_record["export_truncation_error_max_layer"],
            MERGED_FILE,
        )
        return out

    def export_files(
        self, state: State, frozen: State, base: dict[str, np.ndarray] | None = None
    ) -> dict[str, State]:
        """:data:`MERGED_FILE`: the exact merged delta per adapted layer,
        ``{<layer>.weight: base folds + s Bbar Abar}`` in float32 (``d_out x
        d_in``; add it to the base model's weight of that name; the head is in the
        PEFT adapter)."""
        merged = self.merged_delta(state, frozen, base)
        return {
            MERGED_FILE: {
                f"{layer}.weight": delta.astype(np.float32)
                for layer, delta in merged.items()
            }
        }

    def summary_notes(self) -> dict[str, Any]:
        """The last export's rank and relative truncation errors."""
        return dict(self._export_record)
