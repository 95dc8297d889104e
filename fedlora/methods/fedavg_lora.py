"""FedAvg-LoRA (FedIT): every client trains ``A`` and ``B``; the server averages
each factor separately.

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", https://arxiv.org/abs/2305.05644.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora.methods.base import Method, State
from fedlora.ranks import RANK_KEY, RankPlan, rank_of

if TYPE_CHECKING:
    from fedlora.settings import Settings


class FedAvgLoRA(Method):
    """``A <- sum p_k A_k``, ``B <- sum p_k B_k``: the protocol's defaults.

    Inexact, by ``sum p_k (B_k - Bbar)(A_k - Abar)`` per layer (the cross term the
    ``aggregation_error`` diagnostic measures).

    With a rank per client (``adapter.client_ranks``), the zero-padding baseline:
    a client of rank ``r_k`` starts from the global factors truncated to ``r_k``
    and rescaled to its own scale (:class:`fedlora.ranks.RankPlan`), and the server
    pads its reply back to the global rank before the same weighted mean. Once a
    node has reported its rank, the server sends it only the truncation
    (:meth:`downlink`); the client rescales either way (:meth:`client_start`).

    Parameters
    ----------
    ranks : RankPlan or None
        The global rank and scale rule (derived from ``adapter``; None: every
        client trains the global rank).
    """

    name = "fedavg_lora"
    accepts_client_ranks = True

    def __init__(self, *, ranks: RankPlan | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.ranks = ranks

    @classmethod
    def derived_arguments(cls, settings: Settings) -> dict[str, Any]:
        """``ranks``: the adapter's global rank and scale rule."""
        return {"ranks": RankPlan.of(settings.adapter)}

    def client_start(
        self, sent: State, initial: State, server_round: int, partition: int
    ) -> State:
        """The global factors at this client's rank and scale, from the whole
        global state or from its truncation to this rank (:meth:`downlink`):
        truncated (a no-op on the latter) and scaled by ``c_k``, once."""
        r = rank_of(initial)
        if self.ranks is None or r is None:
            return sent
        if r == self.ranks.rank == rank_of(sent):  # the global rank: c = 1
            return sent
        return self.ranks.to_client(sent, r)

    def downlink(self, sent: State, rank: int) -> State:
        """The global factors' first ``rank`` rows (``A``) and columns (``B``),
        unscaled, and the head (``sent`` itself at the global rank)."""
        full = rank_of(sent)
        if self.ranks is None or full is None or rank >= full:
            return sent
        return self.ranks.truncate(sent, rank)

    def from_client(self, state: State, metrics: dict[str, Any]) -> State:
        """A reply padded back to the global rank and scale (from the rank the
        client reports)."""
        r = metrics.get(RANK_KEY)
        if self.ranks is None or r is None or int(r) == self.ranks.rank:
            return state
        return self.ranks.from_client(state, int(r))
