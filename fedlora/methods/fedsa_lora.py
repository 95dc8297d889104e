"""FedSA-LoRA: share ``A``, keep ``B``: each client keeps its own ``B`` on its node.

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025, https://arxiv.org/abs/2410.01463.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError
from fedlora.methods.base import Method

if TYPE_CHECKING:
    from fedlora.settings import Settings

_B = ".lora_B."


class FedSALoRA(Method):
    """Clients train ``A``, ``B`` (and the head); only ``A`` (and the head, unless
    ``share_head`` is false) goes up, ``A <- sum p_k A_k``; each node keeps its own
    ``B`` between rounds, so every client ends with a personalised model
    ``W0 + s B_k Abar``. ``r d_in`` a layer each way.

    The main metric is the clients' federated evaluation of their own models on
    their held-out slices. The server holds no ``B`` but the seeded initial one
    (``0`` under PEFT's init), so its own evaluation measures ``A`` and the head
    without any ``B``: reported, labelled as such in ``summary.json``. A new node
    starts its ``B`` from that initial value and needs a few rounds of its own
    training to personalise it; a node with a data folder keeps its ``B`` there too
    (:mod:`fedlora.node_state`), so a restart or a resumed run reloads it.

    Parameters
    ----------
    share_head : bool
        Average the classification head (true) or keep it per client too.
    """

    name = "fedsa_lora"

    def __init__(self, *, share_head: bool = True, **common: Any) -> None:
        super().__init__(**common)
        self.share_head = bool(share_head)

    def keeps_local(self, key: str) -> bool:
        """``B``, and the head unless it is shared."""
        if _B in key:
            return True
        return not self.share_head and ".lora_" not in key

    def problems(self, settings: Settings) -> list[ConfigError]:
        """Central DP does not cover the personal ``B`` each node keeps and is
        evaluated with. (Under ``privacy=distributed`` federated evaluation is
        refused, so ``B`` never leaves its node: only the noised sum of ``A``
        does.)"""
        out = super().problems(settings)
        if settings.privacy.mode == "central":
            out.append(
                ConfigError(
                    "privacy",
                    "central",
                    "fedsa_lora keeps each client's B on its node, outside the "
                    "client-level DP noise, and the clients evaluate with "
                    "it; use privacy=dp_sgd (it covers B's training) or another "
                    "strategy",
                )
            )
        if settings.export is not None and settings.export.rank is not None:
            out.append(
                ConfigError(
                    "export.rank",
                    settings.export.rank,
                    "fedsa_lora's final model is personal: each client's own B "
                    "with the shared A, and the server holds no B to export at "
                    "another rank (its adapter's delta is the initial B's, 0); "
                    "leave export.rank null",
                )
            )
        return out

    def round_parameters(self, d_out: int, d_in: int, r: int) -> int:
        """``A`` only: ``r d_in``."""
        return r * d_in

    def summary_notes(self) -> dict[str, Any]:
        """The personalised evaluation is the main metric (and the export's
        record, :meth:`~fedlora.methods.base.Method.summary_notes`)."""
        return {
            **super().summary_notes(),
            "main_metric": "federated_eval_accuracy",
            "main_metric_note": (
                "personalised: each client's own B with the shared A and head, on "
                "its held-out slice"
            ),
            "server_eval_note": (
                "the server's eval_* use the initial B (no personal B): the shared "
                "A and head alone"
            ),
        }
