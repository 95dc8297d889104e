"""FFA-LoRA: ``A`` frozen at its shared seeded init; only ``B`` (and the head) is
trained, sent and averaged.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024, https://arxiv.org/abs/2403.12313.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.methods.base import Method, State

if TYPE_CHECKING:
    import torch

_B = ".lora_B.weight"


class FFALoRA(Method):
    """``B <- sum p_k B_k``; exact, ``sum p_k B_k A = Bbar A``, since every party
    builds the same ``A`` from ``federation.seed`` and nobody trains it. ``A`` never
    crosses the wire: ``r d_out`` a layer, half of LoRA's on square layers. Under
    DP the noise enters linearly (``xi_B A``), not as LoRA's ``xi_B xi_A``."""

    name = "ffa_lora"

    def parametrise(self, model: torch.nn.Module) -> None:
        """Freeze every ``lora_A``: it stays at its seeded init."""
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)

    def shared_layers(self, sent: State) -> dict[str, tuple[str | None, str, str]]:
        """Every layer's delta is ``s B A`` with ``A`` frozen and shared."""
        return {
            key[: -len(_B)]: (None, f"{key[: -len(_B)]}.lora_A.weight", key)
            for key in sent
            if key.endswith(_B)
        }

    def round_parameters(self, d_out: int, d_in: int, r: int) -> int:
        """``B`` only: ``r d_out``."""
        return r * d_out
