"""Toy methods that exercise one protocol hook each (importable by dotted path, so
clients built from the settings find them)."""

from __future__ import annotations

import numpy as np

from fedlora.adapters import lora_layers
from fedlora.methods.base import Method


class ToyFold(Method):
    """FedAvg-LoRA that also folds, each round, ``0.5 * Bbar[:, :1] Abar[:1, :]``
    into every layer's base weight (a stand-in for FedEx-LoRA's residual)."""

    name = "toy_fold"
    folds_into_base = True

    def fold(self, states, weights, sent):
        mean = self.aggregate(states, weights, sent)
        return {
            layer: (0.5 * mean[b][:, :1], mean[a][:1, :])
            for layer, (a, b) in lora_layers(mean).items()
        }

    def export(self, state, frozen, base=None):
        return {**frozen, **state}


def toy_fold_matrix(mean: dict[str, np.ndarray], layer: str) -> np.ndarray:
    """ToyFold's fold of ``layer`` from the mean state, dense float64."""
    b = mean[f"{layer}.lora_B.weight"].astype(np.float64)
    a = mean[f"{layer}.lora_A.weight"].astype(np.float64)
    return 0.5 * b[:, :1] @ a[:1, :]


class ToyRanks(Method):
    """FedAvg-LoRA with zero-padding, whose client ``p`` trains rank ``2 + p`` (a
    stand-in for the heterogeneous-rank methods): a client starts from the global
    factors truncated to its rank, the server pads its reply back to the global
    rank ``adapter.r`` with zeros and averages."""

    name = "toy_ranks"

    def __init__(self, *, rank=None, **common):
        super().__init__(**common)
        self.rank = rank

    @classmethod
    def derived_arguments(cls, settings):
        return {"rank": int(settings.adapter.r)}

    def client_overrides(self, partition):
        return {"r": 2 + partition}

    def client_start(self, sent, initial, server_round, partition):
        return {k: _to_rank(k, v, _rank(k, initial[k])) for k, v in sent.items()}

    def from_client(self, state, metrics):
        return {k: _to_rank(k, v, self.rank) for k, v in state.items()}


def _rank(key, value):
    if ".lora_A." in key:
        return value.shape[0]
    return value.shape[1] if ".lora_B." in key else None


def _to_rank(key, value, rank):
    """A factor truncated or zero-padded to ``rank`` (other tensors as they are)."""
    if ".lora_A." in key:
        out = np.zeros((rank, value.shape[1]), value.dtype)
        out[: min(rank, value.shape[0])] = value[:rank]
        return out
    if ".lora_B." in key:
        out = np.zeros((value.shape[0], rank), value.dtype)
        out[:, : min(rank, value.shape[1])] = value[:, :rank]
        return out
    return value
