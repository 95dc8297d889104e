"""What each node holds of the server's state between rounds, and the messages
that bring it up to date.

A node keeps what the server sends only when it lacks it: the shipped frozen
factors (Fed-SB's ``B`` and ``A``), the base-weight folds up to some round
(FedEx-LoRA's residuals, :mod:`fedlora.base_delta`), and, for methods whose rounds
change only part of the global state (RoLoRA), the global state it last received,
so that only what changed since goes down. With a rank per client, it also keeps
the rank each node's replies report, so that a node gets the global factors at its
own rank only. The server cannot see a node's state, so it keeps its belief here
and errs towards sending again: a node that failed, was rejected for the state it
held, or is new (a restarted SuperNode has a new node id) gets everything; a
resumed run starts believing nothing (and relearns the ranks from the replies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedlora.adapters import FROZEN_DIFFER, FROZEN_MISSING
from fedlora.base_delta import FoldLog
from strategies.replies import reported_rank
from strategies.wire import (
    KEY_ARRAYS,
    KEY_BASE,
    KEY_BASE_FROM,
    KEY_BASE_SYNC,
    KEY_BASE_TO,
    KEY_FROZEN,
    KEY_GLOBAL_SYNC,
    exact_record,
    payload_bytes,
    state_to_record,
)


class Holdings:
    """The server's belief of what each node holds.

    Attributes
    ----------
    frozen : set of int
        Nodes that hold the shipped frozen factors.
    folds : dict
        ``{node: round}``: the node holds the base-weight folds up to that round.
    folds_sent : dict
        ``{node: round}``: the folds the last train messages brought each node up to
        (what its reply must report).
    globals : dict
        ``{node: round}``: the node holds the global state that round's train
        message carried.
    ranks : dict
        ``{node: rank}``: the LoRA rank the node's last accepted reply reported
        (not checkpointed: relearned after a resume).
    """

    def __init__(self) -> None:
        self.frozen: set[int] = set()
        self.folds: dict[int, int] = {}
        self.folds_sent: dict[int, int] = {}
        self._folds_sent_eval: dict[int, int] = {}
        self.globals: dict[int, int] = {}
        self.ranks: dict[int, int] = {}

    def forget(self) -> None:
        """Believe no node holds anything (a new Flower run: nodes start empty)."""
        self.frozen, self.folds, self.globals, self.ranks = set(), {}, {}, {}

    # --- outgoing ------------------------------------------------------------------
    def with_frozen(self, msg: Message, frozen: ArrayRecord) -> Message:
        """``msg`` plus the frozen factors, for a node that does not hold them."""
        if msg.metadata.dst_node_id in self.frozen:
            return msg
        return with_records(msg, {KEY_FROZEN: frozen})

    def with_folds(
        self, messages: list[Message], log: FoldLog, train: bool
    ) -> list[Message]:
        """``messages`` plus the base-weight folds each one's node lacks (their sum
        from round 0 for a node the server knows nothing of)."""
        sent = self.folds_sent if train else self._folds_sent_eval
        sent.clear()
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            start, delta = log.since(self.folds.get(node))
            sent[node] = log.latest
            sync = ConfigRecord({KEY_BASE_FROM: start, KEY_BASE_TO: log.latest})
            records = {KEY_BASE: exact_record(delta.to_state()), KEY_BASE_SYNC: sync}
            out.append(with_records(msg, records))
        return out

    def with_changes(
        self,
        messages: list[Message],
        sent: dict[str, Any],
        changed: dict[str, int],
        server_round: int,
        encode: Callable[[dict[str, Any]], ArrayRecord] = state_to_record,
    ) -> list[Message]:
        """``messages`` carrying, as arrays, only the keys of ``sent`` that changed
        (``changed[key]``: the round whose aggregation last set it, 0: never) since
        the global state each one's node holds; all of them for a node the server
        knows nothing of. Nodes holding the same round share one record,
        ``encode`` making it (default float32)."""
        records: dict[int, ArrayRecord] = {}
        out = []
        for msg in messages:
            start = self.globals.get(msg.metadata.dst_node_id, 0)
            if start not in records:
                keys = [k for k in sent if start == 0 or changed.get(k, 0) >= start]
                records[start] = encode({k: sent[k] for k in keys})
            sync = ConfigRecord({KEY_BASE_FROM: start, KEY_BASE_TO: server_round})
            out.append(
                with_records(msg, {KEY_ARRAYS: records[start], KEY_GLOBAL_SYNC: sync})
            )
        return out

    def at_ranks(
        self, messages: list[Message], cut: Callable[[int], ArrayRecord | None]
    ) -> list[Message]:
        """``messages`` carrying, as arrays, ``cut(r)`` for a node known to train
        rank ``r`` (``cut`` gives None to keep the arrays as they are); a node
        whose rank is unknown gets them as they are."""
        out = []
        for msg in messages:
            rank = self.ranks.get(msg.metadata.dst_node_id)
            record = None if rank is None else cut(rank)
            out.append(
                msg if record is None else with_records(msg, {KEY_ARRAYS: record})
            )
        return out

    # --- incoming ------------------------------------------------------------------
    def after_train(
        self,
        sampled: list[int],
        ok: list[Message],
        rejected: list[dict[str, Any]],
        ships_frozen: bool,
        folds: bool,
        server_round: int | None = None,
    ) -> None:
        """Update the belief from a round's train replies: nodes that replied hold
        the frozen factors, except those rejected for other ones; nodes whose
        update was accepted hold the folds sent to them, and any other sampled node
        (failed, rejected) gets the whole sum next time; with ``server_round``
        (the method's nodes keep the global state), likewise the global state of
        that round. A node whose update was accepted trains the rank its reply
        reports (if any); any other sampled node's rank is forgotten."""
        accepted = {m.metadata.src_node_id for m in ok} - {r["node"] for r in rejected}
        for node in set(sampled) - accepted:
            self.ranks.pop(node, None)
        for m in ok:
            rank = reported_rank(m)
            if m.metadata.src_node_id in accepted and rank is not None:
                self.ranks[m.metadata.src_node_id] = rank
        if server_round is not None:
            for node in sampled:
                self.globals.pop(node, None)
            for node in accepted & set(sampled):
                self.globals[node] = server_round
        if ships_frozen:
            self.frozen.update(m.metadata.src_node_id for m in ok)
            for r in rejected:
                if str(r["reason"]).startswith((FROZEN_DIFFER, FROZEN_MISSING)):
                    self.frozen.discard(r["node"])
        if folds:
            refused = {r["node"] for r in rejected}
            for node in sampled:
                self.folds.pop(node, None)
            for m in ok:
                node = m.metadata.src_node_id
                if node not in refused and node in self.folds_sent:
                    self.folds[node] = self.folds_sent[node]

    def after_evaluate(self, replies: list[Message]) -> None:
        """Nodes that evaluated hold the folds their evaluate messages carried;
        those that failed may have lost their state."""
        for m in replies:
            node = m.metadata.src_node_id
            if m.has_error():
                self.folds.pop(node, None)
            elif node in self._folds_sent_eval:
                self.folds[node] = self._folds_sent_eval[node]


def fold_bytes(messages: list[Message]) -> int:
    """Measured bytes of the base-weight folds ``messages`` carry."""
    return sum(
        payload_bytes(RecordDict({k: m.content[k] for k in (KEY_BASE, KEY_BASE_SYNC)}))
        for m in messages
        if KEY_BASE in m.content
    )


def with_records(msg: Message, records: dict[str, Any]) -> Message:
    """A copy of the outgoing ``msg`` with ``records`` added to its content."""
    return Message(
        content=RecordDict({**dict(msg.content.items()), **records}),
        message_type=msg.metadata.message_type,
        dst_node_id=msg.metadata.dst_node_id,
    )
