"""The server's side of SecAgg+ (:mod:`fedlora.secagg`) on Flower's Message API.

A round in four exchanges, all through the strategy's grid:

0. ``train.secagg_keys``: each sampled node makes fresh key pairs; replies with
   the public halves;
1. ``train.secagg_share``: each node gets the public keys of its holders (itself
   and its neighbours on a shuffled ring that replied); replies with its secret
   shares encrypted to each;
2. the round's train messages (Flower sends them) carry each node the shares its
   neighbours sent it and ``K``; the node trains and replies with its masked input;
3. ``train.secagg_unmask``: each node whose input arrived is told which of its
   holders survived and which dropped; replies with one share per holder.

Then the server rebuilds the secrets it needs, removes the masks and decodes the
weighted mean of the survivors' updates. A node that fails or declines at any
stage is a dropout; too few shares end the round without an update.

Under ``privacy=distributed`` (:mod:`fedlora.distributed_dp`) the inputs are the
clients' clipped and noised updates: a round with fewer survivors than the noise
is calibrated for fails before any share is asked for, and each unmasked sum is
a release the accountant here composes.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedlora import distributed_dp
from fedlora.secagg import (
    META_WORDS,
    ProtocolError,
    Quantiser,
    decode_mean,
    pack_ids,
    ring,
    share_threshold,
    unmask,
    unpack_ids,
)
from fedlora.settings import PrivacySettings, SecureAggregationSettings
from strategies.holdings import with_records
from strategies.wire import (
    KEY_ARRAYS,
    KEY_SECAGG,
    KEY_SECAGG_META,
    SECAGG_KEYS,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    from_array,
    no_empty,
    payload_bytes,
)

log = logging.getLogger(__name__)
State = dict[str, np.ndarray]


def connected(alive: list[int], masked_with: dict[int, list[int]]) -> bool:
    """Whether the surviving nodes form one piece of the masking graph (an edge
    where two nodes masked with each other). Split, the pieces' pairwise masks
    cancel within each piece, and the revealed self-mask seeds would unmask each
    piece's sum on its own."""
    members, seen = set(alive), {alive[0]}
    stack = [alive[0]]
    while stack:
        for v in masked_with.get(stack.pop(), []):
            if v in members and v not in seen:
                seen.add(v)
                stack.append(v)
    return seen == members


@dataclass
class Pending:
    """A round's protocol state at the server between its stages."""

    server_round: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    holders: dict[int, list[int]] = field(default_factory=dict)
    masked_with: dict[int, list[int]] = field(default_factory=dict)
    clients: int = 0  # K: the nodes asked for a masked input
    record: dict[str, Any] = field(default_factory=dict)  # for metrics.jsonl


@dataclass
class SecureSum:
    """What the unmasking gave: the weighted mean update (None: the round
    failed) and what to record."""

    mean: State | None
    survivors: list[int]
    record: dict[str, Any]


class SecAggPlus:
    """SecAgg+ around a strategy's train round.

    Parameters
    ----------
    settings : SecureAggregationSettings
        ``secure_aggregation``: neighbours, threshold, clip, max_weight.
    timeout : float or None
        Seconds each protocol exchange waits for replies
        (``federation.round_timeout``).
    privacy : PrivacySettings or None
        ``privacy``; under ``distributed`` the clients' inputs carry their noise
        and :attr:`accountant` composes the releases.
    """

    def __init__(
        self,
        settings: SecureAggregationSettings,
        timeout: float | None = None,
        privacy: PrivacySettings | None = None,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self.privacy = privacy
        self.pending: Pending | None = None
        distributed = privacy is not None and privacy.mode == "distributed"
        self.accountant = (
            distributed_dp.ReleaseAccountant(float(privacy.target_delta))
            if distributed and privacy is not None
            else None
        )

    def _exchange(
        self, grid: Any, stage: str, requests: dict[int, dict[str, Any]]
    ) -> dict[int, Message]:
        """Send each node its request of ``stage``; the replies without error,
        by node (bytes both ways counted in the round's record)."""
        messages = [
            Message(
                RecordDict({KEY_SECAGG: ConfigRecord(no_empty(values))}),
                message_type=f"{MessageType.TRAIN}.{stage}",
                dst_node_id=node,
            )
            for node, values in requests.items()
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        record = self.pending.record if self.pending else {}
        record["secagg_bytes_down"] = record.get("secagg_bytes_down", 0) + sum(
            payload_bytes(m.content) for m in messages
        )
        record["secagg_bytes_up"] = record.get("secagg_bytes_up", 0) + sum(
            payload_bytes(m.content) for m in replies if not m.has_error()
        )
        out = {}
        for m in replies:
            node = m.metadata.src_node_id
            if m.has_error():
                record.setdefault("secagg_dropped", {}).setdefault(stage, []).append(
                    str(m.error.reason)[:200]
                )
            elif node in requests and KEY_SECAGG in m.content:
                out[node] = m
        return out

    def setup(
        self, grid: Any, messages: list[Message], server_round: int
    ) -> list[Message]:
        """Stages 0 and 1 for the nodes of ``messages`` (the round's train
        messages); returns those of the nodes still in, each with the shares its
        neighbours sent it."""
        started = time.perf_counter()
        self.pending = pending = Pending(server_round)
        order = [m.metadata.dst_node_id for m in messages]
        secrets.SystemRandom().shuffle(order)
        graph = ring(order, self.settings.neighbours)
        base = {"round": server_round, "threshold": float(self.settings.threshold)}
        replies = self._exchange(grid, SECAGG_KEYS, {u: base for u in order})
        for u, m in replies.items():
            config = m.content[KEY_SECAGG]
            pending.keys[u] = (bytes(config["enc"]), bytes(config["mask"]))
        requests = {}
        for u in pending.keys:
            holders = sorted(v for v in [u, *graph[u]] if v in pending.keys)
            pending.holders[u] = holders
            requests[u] = {
                "round": server_round,
                "nodes": pack_ids(holders),
                "enc": [pending.keys[v][0] for v in holders],
                "mask": [pending.keys[v][1] for v in holders],
            }
        replies = self._exchange(grid, SECAGG_SHARE, requests)
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in replies}
        for u, m in replies.items():
            config = m.content[KEY_SECAGG]
            to = unpack_ids(bytes(config["to"]))
            for v, ct in zip(to, config.get("shares", []), strict=True):
                if v in inbox and v in pending.holders[u]:
                    inbox[v][u] = bytes(ct)
        pending.clients = len(inbox)
        if self.accountant is not None and self.privacy is not None:  # distributed
            fraction = float(self.settings.threshold)
            t = distributed_dp.noise_clients(
                pending.clients, fraction, self.privacy.min_clients
            )
            if pending.clients < t:  # no sum could carry the noise: no training
                pending.record["secagg_failure"] = (
                    f"{pending.clients} clients completed the protocol's setup, "
                    f"fewer than the {t} the noise is calibrated for "
                    "(privacy.min_clients); the round trains nowhere"
                )
                return []
        out = []
        for msg in messages:
            u = msg.metadata.dst_node_id
            if u not in inbox:
                continue
            senders = sorted(inbox[u])
            pending.masked_with[u] = senders
            record = {
                "round": server_round,
                "clients": pending.clients,
                "from": pack_ids(senders),
                "shares": [inbox[u][v] for v in senders],
            }
            out.append(with_records(msg, {KEY_SECAGG: ConfigRecord(no_empty(record))}))
        pending.record["secagg_setup_time"] = time.perf_counter() - started
        return out

    def finish(self, grid: Any, replies: list[Message], expected: State) -> SecureSum:
        """Stage 3 and the decoding: the weighted mean of the update of each node
        whose masked input of ``expected``'s keys and shapes arrived (under
        ``privacy=distributed`` their noisy mean, accounted as a release)."""
        result = self._finish(grid, replies, expected)
        if self.accountant is not None:
            result.record.update(
                distributed_epsilon=self.accountant.epsilon,
                distributed_delta=self.accountant.delta,
                distributed_accountant="rdp",
                distributed_sample_rate=distributed_dp.SAMPLE_RATE,
                distributed_releases=self.accountant.releases,
            )
        return result

    def _finish(self, grid: Any, replies: list[Message], expected: State) -> SecureSum:
        started = time.perf_counter()
        pending = self.pending
        if pending is None:
            raise RuntimeError("finish() before setup()")
        self.pending = None
        record = pending.record
        shapes = {k: tuple(v.shape) for k, v in expected.items()}
        inputs = {}
        for m in replies:
            u = m.metadata.src_node_id
            if u in pending.masked_with and not m.has_error():
                vector = _masked_vector(m, shapes)
                if vector is not None:
                    inputs[u] = vector
        alive = sorted(inputs)
        dropped = sorted(set(pending.masked_with) - set(inputs))
        record.update(secagg_clients=pending.clients, secagg_dropouts=len(dropped))
        if len(alive) < 2:
            return self._failed(record, f"{len(alive)} masked inputs arrived", alive)
        if not connected(alive, pending.masked_with):
            # sparse neighbours and dropouts split the survivors: each piece's
            # masks would cancel on its own, so unmasking would reveal the
            # pieces' sums; fail before any share is asked for
            return self._failed(
                record,
                "the surviving clients' masking graph is split (too many "
                "neighbouring clients dropped); no share was asked for",
                alive,
            )
        noise = distributed_dp.for_round(self.privacy, self.settings, pending.clients)
        if noise is not None and len(alive) < noise.min_clients:
            return self._failed(
                record,
                f"{len(alive)} masked inputs arrived, fewer than the "
                f"{noise.min_clients} the clients' noise is calibrated for "
                "(privacy.min_clients); no share was asked for",
                alive,
            )
        total = np.zeros(next(iter(inputs.values())).size, dtype=np.uint32)
        for vector in inputs.values():
            total += vector
        if noise is not None and self.accountant is not None:
            # accounted before any share is asked for: whatever happens next
            # (too few shares, a sum that does not decode), the server may hold
            # the noisy sum from here on
            self.accountant.release(noise.effective_multiplier(len(alive)))
        requests = {}
        for u in alive:
            mine = set(pending.holders[u])
            requests[u] = {
                "round": pending.server_round,
                "alive": pack_ids([v for v in alive if v in mine]),
                "dropped": pack_ids([v for v in dropped if v in mine]),
                "survivors": len(alive),
            }
        shares: dict[int, list[bytes]] = {}
        for m in self._exchange(grid, SECAGG_UNMASK, requests).values():
            config = m.content[KEY_SECAGG]
            of = unpack_ids(bytes(config["of"]))
            for v, share in zip(of, config.get("shares", []), strict=True):
                shares.setdefault(v, []).append(bytes(share))
        fraction = float(self.settings.threshold)
        thresholds = {
            u: share_threshold(len(pending.holders[u]), fraction)
            for u in [*alive, *dropped]
        }
        try:
            codes = unmask(
                total,
                pending.server_round,
                alive,
                dropped,
                shares,
                thresholds,
                {u: pending.keys[u][1] for u in alive},
                pending.masked_with,
            )
        except ProtocolError as exc:
            return self._failed(record, str(exc), alive)
        if noise is not None:
            try:
                mean, info = noise.decode_mean(codes, shapes, len(alive))
            except ValueError as exc:
                return self._failed(record, str(exc), alive)
            record.update(
                info,
                # rounding to integer steps only; the noise is recorded apart
                secagg_error_bound=noise.step / 2,
                secagg_clipped=None,  # each client logs its own clipping
                secagg_unmask_time=time.perf_counter() - started,
            )
            return SecureSum(mean, alive, record)
        k = pending.clients
        mean, info = decode_mean(
            codes,
            shapes,
            len(alive),
            Quantiser(float(self.settings.clip), k),
            Quantiser(1.0, k),
        )
        record.update(
            secagg_error_bound=info["error_bound"],
            secagg_clipped=info["clipped"],
            secagg_clipped_weights=info["clipped_weights"],
            secagg_weight_sum=info["weight_sum"],
            secagg_unmask_time=time.perf_counter() - started,
        )
        return SecureSum(mean, alive, record)

    @staticmethod
    def _failed(record: dict[str, Any], why: str, alive: list[int]) -> SecureSum:
        why = record.setdefault("secagg_failure", why)  # the first cause stays
        log.warning("secure aggregation failed: %s; the global adapter is kept", why)
        return SecureSum(None, alive, record)


def _masked_vector(msg: Message, shapes: dict[str, tuple[int, ...]]) -> Any:
    """A reply's masked input as one uint32 vector (sorted keys, then the meta
    words); None when it is not one of ``shapes`` (a dropout)."""
    if KEY_ARRAYS not in msg.content or KEY_SECAGG_META not in msg.content:
        return None
    arrays = {k: from_array(v) for k, v in msg.content[KEY_ARRAYS].items()}
    meta = [from_array(v) for v in msg.content[KEY_SECAGG_META].values()]
    if set(arrays) != set(shapes) or len(meta) != 1 or meta[0].size != META_WORDS:
        return None
    if any(a.shape != shapes[k] or a.dtype != np.uint32 for k, a in arrays.items()):
        return None
    parts = [arrays[k].ravel() for k in sorted(shapes)]
    return np.concatenate([*parts, meta[0].astype(np.uint32).ravel()])
