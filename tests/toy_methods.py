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
    """FedAvg-LoRA whose client ``p`` asks for rank ``2 + p`` through
    ``client_overrides`` (a method with a rank per client, for tools that must
    tell such methods apart)."""

    name = "toy_ranks"

    def client_overrides(self, partition):
        return {"r": 2 + partition}
