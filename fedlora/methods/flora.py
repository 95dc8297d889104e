"""FLoRA: stack the clients' factors (exact), fold the stack into every party's base
weights, and start every round from fresh factors.

Paper: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, https://arxiv.org/abs/2409.05976.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.aggregation import weighted_average
from fedlora.base_delta import Fold
from fedlora.comm import fold_parameters
from fedlora.heterogeneous import stack
from fedlora.methods.base import State
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.merged_export import MergedExport

if TYPE_CHECKING:
    from fedlora.settings import Settings


class FLoRA(MergedExport, FedAvgLoRA):
    """Every round client ``k`` starts from fresh factors at its own rank ``r_k``
    (``A`` as PEFT draws it, uniform in ``±1/sqrt(d_in)``, from a generator seeded
    by ``federation.seed``, the round and the partition; ``B = 0``), trains, and
    sends ``B_k``, ``A_k``. The server stacks them, per layer::

        B_st = [p_1 s_1 B_1, ..., p_K s_K B_K],  A_st = [A_1; ...; A_K]
        B_st A_st = sum_k p_k s_k B_k A_k = Delta   (exact)

    and every party adds ``Delta`` to its base weights (:meth:`fold`); the global
    adapter goes back to ``B = 0``. Each client keeps its own scale
    ``s_k = alpha / r_k`` (the official code mixes them: its issue #16). The
    downlink is the stack, ``(d_out + d_in) sum r_k`` a layer, and grows with the
    clients; a node that missed rounds gets the sum of the folds (dense once that
    is smaller). Known weakness (its issue #15): restarting from fresh factors every
    round can trail FFA-LoRA over many rounds.

    Parameters
    ----------
    seed : int
        ``federation.seed`` (derived): the fresh factors' generator.

    The exported PEFT adapter (its rank: ``export.rank``, default the global rank
    ``adapter.r``, :meth:`default_export_rank`) is the truncated SVD of the merged
    delta (:class:`~fedlora.methods.merged_export.MergedExport`).
    """

    name = "flora"
    folds_into_base = True
    aggregates_by_mean = False  # the stack keeps every client's factors
    sums_only = False  # the stack keeps every client's factors
    accepts_server_optimizer = False  # the step is a stack, not a mean

    def __init__(self, *, seed: int = 0, **common: Any) -> None:
        super().__init__(**common)
        self.seed = int(seed)
        self.scaling = self.ranks.scale(self.ranks.rank) if self.ranks else 1.0

    @classmethod
    def derived_arguments(cls, settings: Settings) -> dict[str, Any]:
        """``ranks`` (as FedAvg-LoRA) and ``seed``: ``federation.seed``."""
        return {**super().derived_arguments(settings), "seed": settings.federation.seed}

    @classmethod
    def default_export_rank(cls, settings: Settings) -> int:
        """``adapter.r``: the merged delta gathers every client's rank over the
        rounds, so the largest client rank is no bound on it."""
        return int(settings.adapter.r)

    def client_start(
        self, sent: State, initial: State, server_round: int, partition: int
    ) -> State:
        """Fresh factors at this client's rank (``B = 0``, ``A`` seeded by the
        round and the partition) and the global head."""
        rng = np.random.default_rng([self.seed, int(server_round), int(partition)])
        out = dict(sent)
        for key, value in initial.items():
            if ".lora_B." in key:
                out[key] = np.zeros_like(value)
            elif ".lora_A." in key:
                bound = 1.0 / math.sqrt(value.shape[1])  # PEFT's kaiming-uniform
                out[key] = rng.uniform(-bound, bound, value.shape).astype(value.dtype)
        return out

    def downlink(self, sent: State, rank: int) -> State:
        """The global state without the LoRA factors, for a node whose rank is
        known: it starts every round from fresh factors (:meth:`client_start`
        takes their shapes from its own model), and the round's update goes down
        as folds. A node whose rank is not known yet gets everything."""
        factors = {k for pair in lora_layers(sent).values() for k in pair}
        return {k: v for k, v in sent.items() if k not in factors}

    def aggregate(
        self, states: Sequence[State], weights: np.ndarray, sent: State
    ) -> State:
        """The head by ``p_k``; the adapter back to ``B = 0`` (its delta is in the
        fold), ``A`` as sent."""
        layers = lora_layers(states[0])
        out = weighted_average(states, weights)
        for a_key, b_key in layers.values():
            out[b_key] = np.zeros_like(states[0][b_key])
            out[a_key] = sent[a_key]
        return out

    def round_traffic(
        self, d_out: int, d_in: int, r: int, ranks: Sequence[int]
    ) -> tuple[int, int]:
        """Up: the client's factors, ``r (d_out + d_in)``. Down (from a node's
        second round, once its rank is known: :meth:`downlink`): no factors, the
        client restarts from fresh ones; only the last round's fold, the stack of
        every reply, ``(d_out + d_in) sum r_k``, or dense ``d_out d_in`` once that
        is smaller (:func:`fedlora.comm.fold_parameters`): it grows with the
        clients."""
        return r * (d_out + d_in), fold_parameters(d_out, d_in, sum(ranks))

    def fold(self, states: Sequence[State], weights: np.ndarray, sent: State) -> Fold:
        """Per layer the stack ``(B_st, A_st)`` of the replies (at the global scale
        after :meth:`from_client`; the rows a client's rank did not fill, all
        zero, left out)."""
        out: Fold = {}
        for layer, (a_key, b_key) in lora_layers(states[0]).items():
            bs, as_ = [s[b_key] for s in states], [s[a_key] for s in states]
            b_st, a_st = stack(bs, as_, weights, [self.scaling] * len(bs))
            keep = np.any(a_st != 0, axis=1)
            out[layer] = (b_st[:, keep], a_st[keep])
        return out
