"""What the strategy does with a round's replies before the method sees them:
who failed and why, who declined, which updates are well formed, and what each
client reported of its privacy. Plain functions over Flower messages."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from fedlora.adapters import FROZEN_CRC_KEY, FROZEN_DIFFER, FROZEN_MISSING
from fedlora.updates import check_update, update_norm_outliers
from strategies.wire import (
    ERROR_CONFIG,
    KEY_ARRAYS,
    KEY_BASE_ROUND,
    KEY_CONFIG,
    KEY_DECLINED,
    KEY_EPSILON,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_PARTITION,
    KEY_RANK,
    KEY_REASON,
    record_to_views,
)

log = logging.getLogger(__name__)
#: how the reason for rejecting a reply whose base weights differ begins
FOLDS_DIFFER = "base-weight folds differ from the server's"
State = dict[str, Any]


def failures(
    replies: list[Message], sampled: list[int], missing: int
) -> list[dict[str, Any]]:
    """Who failed, why and when. An error the SuperLink wrote for a node (e.g.
    "Node Unavailable" for a dead SuperNode) does not come from that node, so such
    errors are matched to the sampled nodes that sent nothing usable; ``missing``
    sampled nodes sent nothing at all."""
    now = time.time()
    errors = [m for m in replies if m.has_error()]
    answered = {m.metadata.src_node_id for m in replies}
    silent = iter(n for n in sampled if n not in answered)
    out = []
    for m in errors:
        node = m.metadata.src_node_id
        if node not in sampled:  # written by the SuperLink for a lost node
            node = next(silent, node)
        out.append({"node": node, "reason": m.error.reason, "time": now})
    for _ in range(missing):
        out.append(
            {
                "node": next(silent, None),
                "reason": "no reply within federation.round_timeout",
                "time": now,
            }
        )
    by_reason: dict[str, list[Any]] = {}
    for failure in out:  # one line per reason, however many nodes gave it
        by_reason.setdefault(failure["reason"], []).append(failure["node"])
    for reason, nodes in by_reason.items():
        if len(nodes) == 1:
            log.warning("aggregate_train: node %s failed: %s", nodes[0], reason)
        else:
            log.warning("aggregate_train: %s nodes failed: %s", len(nodes), reason)
    return out


def config_errors(replies: list[Message]) -> list[str]:
    """The message of every error reply a client sent for a configuration error
    (code :data:`~strategies.wire.ERROR_CONFIG`), one per reply."""
    return [
        str(m.error.reason)
        for m in replies
        if m.has_error() and m.error.code == ERROR_CONFIG
    ]


def is_declined(msg: Message) -> bool:
    """A reply without arrays whose metrics say the client sat the round out."""
    return (
        KEY_ARRAYS not in msg.content
        and KEY_METRICS in msg.content
        and bool(msg.content[KEY_METRICS].get(KEY_DECLINED))
    )


def declined(replies: list[Message]) -> list[dict[str, Any]]:
    """``{partition-id, reason}`` of every client that declined the round."""
    return [
        {
            KEY_PARTITION: m.content[KEY_METRICS].get(KEY_PARTITION),
            KEY_REASON: (
                m.content[KEY_CONFIG].get(KEY_REASON, "")
                if KEY_CONFIG in m.content
                else ""
            ),
        }
        for m in replies
        if is_declined(m)
    ]


def epsilons(replies: list[Message]) -> dict[int, float]:
    """The epsilon each DP-SGD client reports, by partition (others: none)."""
    out = {}
    for m in replies:
        try:
            metrics = m.content[KEY_METRICS]
            out[int(metrics[KEY_PARTITION])] = float(metrics[KEY_EPSILON])
        except (KeyError, TypeError, ValueError):  # no DP, or a malformed reply
            continue
    return out


def reported_rank(msg: Message) -> int | None:
    """The LoRA rank a reply reports having trained (``adapter-rank``), or None
    (no rank, or not a positive whole number)."""
    metrics = msg.content[KEY_METRICS] if KEY_METRICS in msg.content else {}
    value = metrics.get(KEY_RANK)
    try:
        rank = float(value)
    except (TypeError, ValueError):
        return None
    return int(rank) if rank.is_integer() and rank >= 1 else None


def tally(
    sizes: Iterable[tuple[int | None, int]], into: dict[str, int] | None = None
) -> dict[str, int]:
    """``(rank, size)`` pairs summed by rank (None under ``"unknown"``), keyed by
    the rank as a string, added to ``into`` (default nothing)."""
    out = dict(into or {})
    for rank, size in sizes:
        key = "unknown" if rank is None else str(rank)
        out[key] = out.get(key, 0) + int(size)
    return dict(sorted(out.items()))


def by_rank(replies: list[Message], sizes: list[int]) -> dict[str, int]:
    """``sizes`` summed by the rank each reply reports (``adapter-rank``; replies
    without one under ``"unknown"``), keyed by the rank as a string."""
    return tally(
        (reported_rank(m), size) for m, size in zip(replies, sizes, strict=True)
    )


@dataclass
class Accepted:
    """The updates a round aggregates, in a fixed order (by partition, then node,
    so the float sums do not depend on arrival), and those it refused."""

    states: list[State] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    #: the parameters each accepted reply carried, as sent (before ``reshape``)
    received: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def frozen_mismatch(metrics: dict[str, Any], digest: int | None) -> str | None:
    """Why a reply's frozen factors are not the server's (its ``frozen-crc``
    differs from ``digest`` or is absent), or None; ``digest`` None: the method has
    no frozen factors."""
    if digest is None:
        return None
    theirs = metrics.get(FROZEN_CRC_KEY)
    if theirs is None:
        return (
            f"{FROZEN_MISSING}: its frozen factors cannot be checked against "
            f"the server's (crc {digest})"
        )
    if int(theirs) != digest:
        return f"{FROZEN_DIFFER} (crc {int(theirs)} != {digest})"
    return None


def fold_mismatch(metrics: dict[str, Any], sent_to: int | None) -> str | None:
    """Why a reply's base weights are not the server's (the last fold round it
    reports, ``base-round``, is not ``sent_to``, the one it was sent), or None."""
    theirs = metrics.get(KEY_BASE_ROUND)
    if theirs is None or sent_to is None or int(theirs) != int(sent_to):
        return (
            f"{FOLDS_DIFFER}: the node holds folds up to round {theirs}, the "
            f"server sent them up to round {sent_to}"
        )
    return None


def accept(
    replies: list[Message],
    sent: State,
    digest: int | None,
    max_ratio: float,
    folds_sent: dict[int, int] | None = None,
    reshape: Callable[[State, dict[str, Any]], State] | None = None,
) -> Accepted:
    """Decode and check every reply against what was ``sent``: keys, shapes, finite
    values, example count, frozen factors (``digest``), base-weight folds (the
    round sent to each node, ``folds_sent``; None: the method folds nothing), and
    the update-norm outlier rule (``max_ratio`` times the median; 0 turns it
    off). ``reshape(state, metrics)`` first brings a reply to the server's shapes
    (the method's :meth:`~fedlora.methods.base.Method.from_client`)."""
    expected = {k: v.shape for k, v in sent.items()}
    decoded: list[tuple[int, State, dict[str, Any], int]] = []
    out = Accepted()
    for m in replies:
        node = m.metadata.src_node_id
        try:  # whatever the bytes, decoding must not take the server down
            state = record_to_views(m.content[KEY_ARRAYS])
            metrics = dict(m.content[KEY_METRICS])
            received = sum(int(v.size) for v in state.values())
            if reshape is not None:
                state = reshape(state, metrics)
            reason = check_update(state, expected, metrics.get(KEY_NUM_EXAMPLES))
            reason = reason or frozen_mismatch(metrics, digest)
            if folds_sent is not None:
                reason = reason or fold_mismatch(metrics, folds_sent.get(node))
        except Exception as exc:  # noqa: BLE001 - any malformed payload
            reason = f"undecodable reply: {type(exc).__name__}: {exc}"
        if reason is None:
            decoded.append((node, state, metrics, received))
        else:
            out.rejected.append({"node": node, "reason": reason})
    outliers = update_norm_outliers([d[1] for d in decoded], sent, max_ratio)
    kept = []
    for item, reason in zip(decoded, outliers, strict=True):
        if reason is None:
            kept.append(item)
        else:
            out.rejected.append({"node": item[0], "reason": reason})
    kept.sort(key=lambda d: (str(d[2].get(KEY_PARTITION)), d[0]))
    out.states = [d[1] for d in kept]
    out.metrics = [d[2] for d in kept]
    out.received = [d[3] for d in kept]
    for r in out.rejected:
        log.warning(
            "aggregate_train: update of node %s rejected: %s", r["node"], r["reason"]
        )
    return out
