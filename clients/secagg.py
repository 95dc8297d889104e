"""The client's side of SecAgg+ (:mod:`fedlora.secagg`): one handler per protocol
stage, and the masked reply of the train handler.

A round's secrets (key pairs, the self-mask seed, the shares held for the
neighbours) live in the node's ``context.state`` between the stages (in a
deployment each message runs in a fresh ClientApp process; the state stays on the
node) and are deleted when the node has revealed its shares.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fedlora import distributed_dp
from fedlora.adapters import FROZEN_CRC_KEY, check_state
from fedlora.secagg import (
    ClientSession,
    ProtocolError,
    Quantiser,
    encode_input,
    pack_ids,
    unpack_ids,
)
from fedlora.settings import Settings
from strategies.wire import (
    KEY_ARRAYS,
    KEY_EPSILON,
    KEY_LOCAL_ROUNDS,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_PARTITION,
    KEY_RANK,
    KEY_SECAGG,
    KEY_SECAGG_META,
    KEY_STATE_SECAGG,
    no_empty,
    to_array,
)

log = logging.getLogger("fedlora")

#: what a masked reply's metrics may say in plaintext: nothing computed from the
#: data (no example count, loss or timing), and of DP-SGD's figures only epsilon:
#: its default delta (0.1 / examples) and its noise multiplier (calibrated to the
#: sampling rate, batch / examples) would each give the example count away
PUBLIC_METRICS = (
    KEY_PARTITION,
    FROZEN_CRC_KEY,
    KEY_RANK,
    KEY_LOCAL_ROUNDS,
    KEY_EPSILON,
)


def _config(msg: Message) -> ConfigRecord:
    return msg.content[KEY_SECAGG]


def _session(context: Context, server_round: int) -> ClientSession:
    """This round's session from the node's state.

    Raises
    ------
    ProtocolError
        The node holds no session of this round (it restarted, or missed a stage).
    """
    if KEY_STATE_SECAGG not in context.state:
        raise ProtocolError("this node holds no secure-aggregation session")
    session = ClientSession.from_dict(dict(context.state[KEY_STATE_SECAGG]))
    if session.server_round != server_round:
        raise ProtocolError(
            f"this node's session is of round {session.server_round}, not "
            f"{server_round}"
        )
    return session


def _save(context: Context, session: ClientSession) -> None:
    context.state[KEY_STATE_SECAGG] = ConfigRecord(session.to_dict())


def _reply(msg: Message, values: dict[str, Any]) -> Message:
    """A reply carrying ``values`` (an empty list left out: see :func:`_bytes_list`)."""
    content = RecordDict({KEY_SECAGG: ConfigRecord(no_empty(values))})
    return Message(content, reply_to=msg)


def _bytes_list(config: ConfigRecord, key: str) -> list[bytes]:
    """A list of bytes a protocol record carries (absent: empty, as Flower's
    records do not type an empty list)."""
    return [bytes(b) for b in config.get(key, [])]


def keys(msg: Message, context: Context) -> Message:
    """Stage 0: fresh key pairs and mask seed for this round; reply with the two
    public keys. The threshold's fraction must be at least one half."""
    config = _config(msg)
    fraction = float(config["threshold"])
    if not 0.5 <= fraction < 1:
        raise ProtocolError(f"a share threshold of {fraction} of the holders (< 1/2)")
    session = ClientSession.start(context.node_id, int(config["round"]), fraction)
    _save(context, session)
    return _reply(msg, {"enc": session.enc.public, "mask": session.mask.public})


def share(msg: Message, context: Context) -> Message:
    """Stage 1: shares of the seed and the mask key for the holders the server
    lists (this node and its neighbours that sent keys), encrypted to each."""
    config = _config(msg)
    session = _session(context, int(config["round"]))
    nodes = unpack_ids(bytes(config["nodes"]))
    enc, mask = _bytes_list(config, "enc"), _bytes_list(config, "mask")
    public = {v: (e, m) for v, e, m in zip(nodes, enc, mask, strict=True)}
    mine = (session.enc.public, session.mask.public)
    if public.get(session.node) != mine:
        raise ProtocolError("the server listed other keys for this node")
    outbox = session.share(public)
    _save(context, session)
    to = sorted(outbox)
    return _reply(msg, {"to": pack_ids(to), "shares": [outbox[v] for v in to]})


def masked_reply(
    msg: Message,
    context: Context,
    cfg: Settings,
    start: dict[str, np.ndarray],
    update: dict[str, np.ndarray],
    public: dict[str, Any],
    weighting: str,
) -> Message:
    """Stage 2, after training: check the update ``update - start`` (shapes,
    finite values, ``secure_aggregation.max_update_norm``), then reply with it
    masked: ``[w (update - start), w]`` with ``w`` 1 (uniform weighting) or
    ``min(n_k, max_weight) / max_weight`` (under ``privacy=distributed``: the
    update clipped, rounded and noised by
    :meth:`~fedlora.distributed_dp.DistributedGaussian.encode`, and this node
    then reveals nothing for a sum of fewer survivors than its noise is
    calibrated for), as uint32 arrays of the update's
    shapes (the plain upload's size) and the three words of
    :data:`~strategies.wire.KEY_SECAGG_META`; the metrics only what
    :data:`PUBLIC_METRICS` allows.

    Raises
    ------
    ValueError
        An update of other shapes, with non-finite values or above the norm bound
        (the node then sends nothing; its peers recover the round without it).
    """
    sec = cfg.secure_aggregation
    assert sec is not None
    config = _config(msg)
    session = _session(context, int(config["round"]))
    senders = unpack_ids(bytes(config["from"]))
    session.receive(dict(zip(senders, _bytes_list(config, "shares"), strict=True)))
    check_state({k: v.shape for k, v in update.items()}, {k: start[k] for k in update})
    delta = {k: np.asarray(v, np.float64) - start[k] for k, v in update.items()}
    # the reasons below reach the server in the error reply: they name the check,
    # never a value of the update (its norm is logged on the client only)
    if not all(np.all(np.isfinite(d)) for d in delta.values()):
        raise ValueError("the update failed the client's own check; not sent")
    norm = float(np.sqrt(sum(np.sum(d * d) for d in delta.values())))
    if sec.max_update_norm is not None and norm > float(sec.max_update_norm):
        log.warning("update L2 norm %.4g above max_update_norm; not sent", norm)
        raise ValueError(
            "the update failed the client's own check; not sent (see the client's "
            f"log; secure_aggregation.max_update_norm={sec.max_update_norm})"
        )
    clients = int(config["clients"])
    noise = distributed_dp.for_round(cfg.privacy, sec, clients)
    if noise is not None:  # client-level DP: clip, round, add this node's noise
        vector, norm = noise.encode(delta)
        if norm > noise.clipping_norm:  # the client's own log only
            log.info("update L2 norm %.4g clipped to privacy.clipping_norm", norm)
        session.min_alive = noise.min_clients
    else:
        n_k = float(public[KEY_NUM_EXAMPLES])
        cap = float(sec.max_weight or 1)
        weight = 1.0 if weighting == "uniform" else min(n_k, cap) / cap
        vector, _ = encode_input(
            delta,
            weight,
            weighting != "uniform" and n_k > cap,
            Quantiser(float(sec.clip or 0), clients),
            Quantiser(1.0, clients),
        )
    masked = session.masked(vector)
    _save(context, session)
    arrays, at = {}, 0
    for key in sorted(delta):
        size = delta[key].size
        arrays[key] = to_array(masked[at : at + size].reshape(delta[key].shape))
        at += size
    metrics = {k: v for k, v in public.items() if k in PUBLIC_METRICS}
    content = RecordDict(
        {
            KEY_ARRAYS: ArrayRecord(arrays),
            KEY_SECAGG_META: ArrayRecord({"meta": to_array(masked[at:])}),
            KEY_METRICS: MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 3: one share per holder listed, of its seed if it is alive, of its
    mask key if it dropped (never both); then forget the round's secrets."""
    config = _config(msg)
    session = _session(context, int(config["round"]))
    alive = unpack_ids(bytes(config["alive"]))
    dropped = unpack_ids(bytes(config["dropped"]))
    survivors = int(config["survivors"]) if "survivors" in config else None
    try:
        shares = session.reveal(alive, dropped, survivors)
    finally:
        del context.state[KEY_STATE_SECAGG]
    of = sorted(shares)
    return _reply(msg, {"of": pack_ids(of), "shares": [shares[v] for v in of]})
