"""ClientApp: load this node's partition, apply the global adapter, train/evaluate.

Everything a client needs arrives in each message (the experiment settings as JSON
under ``config["fedlora"]``); the node itself only says which partition it holds
(``node_config``: ``partition-id``, ``num-partitions``, optionally ``data-path``) and,
in a deployment, its data location ``data-dir``, where tokenised partitions are cached.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients import secagg
from fedlora import privacy
from fedlora.adapters import (
    FROZEN_CRC_KEY,
    check_state,
    frozen_digest,
    get_state,
    load_state,
    set_base_delta,
    set_frozen_state,
    set_trainable,
)
from fedlora.base_delta import BaseDelta
from fedlora.build import build_cached, initial_state
from fedlora.console import hush_libraries
from fedlora.data import client_examples, resolve_labels
from fedlora.errors import ConfigError
from fedlora.lora_sb import gradient_sums
from fedlora.methods import Method, from_settings
from fedlora.models import resolve_device
from fedlora.node_state import NodeStore
from fedlora.settings import Settings
from fedlora.train import evaluate as evaluate_model
from fedlora.train import train_local
from strategies.wire import (
    ERROR_CONFIG,
    KEY_ARRAYS,
    KEY_BASE,
    KEY_BASE_FROM,
    KEY_BASE_NORM,
    KEY_BASE_ROUND,
    KEY_BASE_SYNC,
    KEY_BASE_TO,
    KEY_CALIBRATION,
    KEY_CONFIG,
    KEY_DECLINED,
    KEY_EPSILON,
    KEY_EXPERIMENT,
    KEY_FROZEN,
    KEY_GLOBAL_SYNC,
    KEY_LOCAL_ROUNDS,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_PARTITION,
    KEY_PHASE,
    KEY_RANK,
    KEY_REASON,
    KEY_ROUND,
    KEY_RUN_ID,
    KEY_SECAGG,
    KEY_STATE_BASE,
    KEY_STATE_BASE_ROUND,
    KEY_STATE_FROZEN,
    KEY_STATE_GLOBAL,
    KEY_STATE_GLOBAL_ROUND,
    KEY_STATE_LOCAL,
    KEY_STATE_LOCAL_ROUNDS,
    PHASE_GRADIENT,
    SECAGG_KEYS,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    exact_record,
    record_to_state,
    state_to_record,
)

app = ClientApp()
# secure aggregation's stages (clients/secagg.py); the masked input is the train
# handler's reply to a train message that carries the protocol's record
app.train(SECAGG_KEYS)(secagg.keys)
app.train(SECAGG_SHARE)(secagg.share)
app.train(SECAGG_UNMASK)(secagg.unmask)
log = logging.getLogger("fedlora")


def _setup(msg: Message, context: Context) -> tuple[Any, ...]:
    """Settings, method, model (the global adapter and this node's own state
    loaded, this round's trainable set), tokenizer, device, partition."""
    config = msg.content[KEY_CONFIG]
    cfg = Settings.from_dict(json.loads(str(config[KEY_EXPERIMENT])))
    hush_libraries(bool(cfg.verbose))  # as the server: known chatter only
    node = context.node_config
    pid = int(node["partition-id"])
    restarted = cfg.faults is not None and cfg.faults.forgets(
        pid, int(config.get(KEY_ROUND, 0))
    )
    if restarted and msg.metadata.message_type == MessageType.TRAIN:
        for key in list(context.state.keys()):  # a drill: the node restarted
            del context.state[key]
    num_parts = int(node.get("num-partitions", cfg.federation.num_clients))
    if node.get("data-path"):  # a real site points at its own data
        cfg = replace(cfg, data=replace(cfg.data, path=str(node["data-path"])))
    method = from_settings(cfg)
    rank = _client_rank(cfg, method, node, pid, num_parts)
    if rank != cfg.adapter.r:  # this node trains its own rank
        cfg = replace(cfg, adapter=replace(cfg.adapter, r=rank, client_ranks=None))
    overrides = method.client_overrides(pid)  # a method's own per-client settings
    if overrides:
        cfg = replace(cfg, adapter=replace(cfg.adapter, **overrides))
    cfg, model, tokenizer, device = node_model(cfg, _cache_dir(context))
    if KEY_FROZEN in msg.content:  # Fed-SB's B and A arrive once; keep them
        context.state[KEY_STATE_FROZEN] = msg.content[KEY_FROZEN]
    if KEY_STATE_FROZEN in context.state:
        set_frozen_state(model, record_to_state(context.state[KEY_STATE_FROZEN]))
    _load_adapter(msg, context, method, model, int(config.get(KEY_ROUND, 0)), pid)
    if method.folds_into_base:
        _sync_base(msg, context, model)
    return cfg, method, model, tokenizer, device, pid, num_parts


def node_model(
    cfg: Settings, cache_dir: str | None = None
) -> tuple[Settings, Any, Any, Any]:
    """This process's model for ``cfg`` (built once, :func:`build_cached`), on its
    device, with torch's threads set: ``(settings with labels, model, tokenizer,
    device)``. The labels come from ``cache_dir`` after the first message, so a
    fresh process neither reads the data nor imports pandas."""
    threads = int(cfg.train.num_threads or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = resolve_labels(cfg, cache_dir)  # as this node's data gives them
    model, tokenizer = build_cached(cfg)
    device = resolve_device(str(cfg.train.device))
    model.to(device)  # move before any optimizer exists (opacus#820)
    return cfg, model, tokenizer, device


def _client_rank(
    cfg: Settings, method: Method, node: Any, pid: int, num_parts: int
) -> int:
    """The rank this node trains: its node config's ``rank`` (a SuperNode states
    its own), else its entry of ``adapter.client_ranks``, else ``adapter.r``.

    Raises
    ------
    ConfigError
        A rank the method cannot take (it trains one rank everywhere), or one
        outside 1..``adapter.r`` (the global rank).
    """
    stated = node.get("rank")
    rank = int(stated) if stated is not None else cfg.adapter.rank_of(pid, num_parts)
    key = "node config rank" if stated is not None else "adapter.client_ranks"
    if rank != cfg.adapter.r and not method.accepts_client_ranks:
        raise ConfigError(
            key,
            rank,
            f"{method.name} trains one rank (adapter.r={cfg.adapter.r}) "
            "on every client; remove it or choose a method that takes a rank per "
            "client",
        )
    if not 1 <= rank <= int(cfg.adapter.r):
        raise ConfigError(
            key,
            rank,
            f"must be between 1 and the global rank adapter.r={cfg.adapter.r}",
        )
    return rank


def _load_adapter(
    msg: Message,
    context: Context,
    method: Method,
    model: Any,
    server_round: int,
    partition: int,
) -> None:
    """Load the global adapter (as the method starts a client's round from it)
    and this node's local keys (its own, or their seeded values for a node that
    has none), and train this round's keys only."""
    initial = initial_state(model)
    local = {k: v for k, v in initial.items() if method.keeps_local(k)}
    if local and KEY_STATE_LOCAL in context.state:
        local = record_to_state(context.state[KEY_STATE_LOCAL])
    elif local and (store := node_store(msg, context, partition)) is not None:
        # a new Flower run (a resume) or a restarted node: its copy on disk, from
        # before this round (an evaluation reads the round's own)
        evaluating = msg.metadata.message_type == MessageType.EVALUATE
        saved = store.load(before=server_round + int(evaluating))
        if saved is not None:
            local, kept = saved
            context.state[KEY_STATE_LOCAL] = state_to_record(local)
            kept_rounds = ConfigRecord({KEY_LOCAL_ROUNDS: kept})
            context.state[KEY_STATE_LOCAL_ROUNDS] = kept_rounds
    sent = record_to_state(msg.content[KEY_ARRAYS]) if KEY_ARRAYS in msg.content else {}
    if KEY_GLOBAL_SYNC in msg.content:  # the changes since this node's copy
        sent = _merge_global(msg, context, sent)
    if sent:  # all of it: a model reused across nodes holds another's values
        sent = method.client_start(sent, initial, server_round, partition)
        state = {**sent, **local}
        check_state({k: v.shape for k, v in initial.items()}, state)
        load_state(model, state)
    set_trainable(model, [k for k in initial if method.trains(k, server_round)])


def _merge_global(
    msg: Message, context: Context, changes: dict[str, Any]
) -> dict[str, Any]:
    """The whole global state from the changes a message carries since the copy
    this node keeps (all of it when they start from round 0); keep it.

    Raises
    ------
    RuntimeError
        The changes start from a round whose copy this node does not hold (it lost
        its state): the server then sends all of it next time.
    """
    sync = msg.content[KEY_GLOBAL_SYNC]
    start, end = int(sync[KEY_BASE_FROM]), int(sync[KEY_BASE_TO])
    if start > 0:
        held = context.state.get(KEY_STATE_GLOBAL_ROUND)
        held_round = int(held[KEY_BASE_TO]) if held is not None else None
        if held_round != start:
            raise RuntimeError(
                f"the global state's changes start from round {start}, but this "
                f"node holds the state of round {held_round}; the server will send "
                "all of it next time"
            )
        changes = {**record_to_state(context.state[KEY_STATE_GLOBAL]), **changes}
    context.state[KEY_STATE_GLOBAL] = state_to_record(changes)
    context.state[KEY_STATE_GLOBAL_ROUND] = ConfigRecord({KEY_BASE_TO: end})
    return changes


def _held_folds(context: Context) -> BaseDelta:
    """The summed base-weight folds this node holds (none: empty)."""
    if KEY_STATE_BASE not in context.state:
        return BaseDelta()
    return BaseDelta.from_state(record_to_state(context.state[KEY_STATE_BASE]))


def _sync_base(msg: Message, context: Context, model: Any) -> None:
    """Bring this node's summed base-weight folds up to date with the folds the
    message carries, keep them in the node's state, and set the base weights.

    Raises
    ------
    RuntimeError
        The folds continue from a round this node does not hold (it lost its
        state): the server then sends the whole sum next time.
    """
    held = _held_folds(context)
    held_round = 0
    if KEY_STATE_BASE in context.state:
        held_round = int(context.state[KEY_STATE_BASE_ROUND][KEY_BASE_TO])
    if KEY_BASE_SYNC in msg.content:
        sync = msg.content[KEY_BASE_SYNC]
        start, end = int(sync[KEY_BASE_FROM]), int(sync[KEY_BASE_TO])
        folds = BaseDelta.from_state(record_to_state(msg.content[KEY_BASE]))
        if start == 0:
            held = folds
        elif start == held_round:
            held.add_delta(folds)
        else:
            raise RuntimeError(
                f"base-weight folds continue from round {start}, but this node "
                f"holds them up to round {held_round}; the server will send the "
                "whole sum next time"
            )
        held_round = end
        context.state[KEY_STATE_BASE] = exact_record(held.to_state())
    set_base_delta(model, held.matrices())
    context.state[KEY_STATE_BASE_ROUND] = ConfigRecord({KEY_BASE_TO: held_round})


def _cache_dir(context: Context) -> str | None:
    """``<data-dir>/cache`` when the node config names a data location, else None."""
    data_dir = context.node_config.get("data-dir")
    return f"{data_dir}/cache" if data_dir else None


Handler = Callable[[Message, Context], Message]


def config_errors_reply(handler: Handler) -> Handler:
    """``handler``, replying to a ConfigError with an error reply (code
    :data:`~strategies.wire.ERROR_CONFIG`, the error's message as its reason)
    rather than raising it: no traceback per client, and the strategy stops the
    run with that message when too few usable updates come back."""

    @functools.wraps(handler)
    def serve(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ConfigError as exc:
            log.debug("configuration error, replied to the server: %s", exc)
            return Message(Error(code=ERROR_CONFIG, reason=str(exc)), reply_to=msg)

    return serve


@app.train()
@config_errors_reply
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on this node's partition; reply with trained parts."""
    cfg, method, model, tokenizer, device, pid, num_parts = _setup(msg, context)
    examples, _ = client_examples(cfg, tokenizer, pid, num_parts, _cache_dir(context))
    if msg.content[KEY_CONFIG].get(KEY_PHASE) == PHASE_GRADIENT:
        _refuse_under_dp(cfg, "send the summed gradients of its data (Fed-SB init)")
        return _gradient_reply(msg, cfg, model, tokenizer, device, examples)
    server_round = int(msg.content[KEY_CONFIG][KEY_ROUND])
    if cfg.faults is not None and cfg.faults.raises(pid, server_round):
        raise RuntimeError(f"injected fault: partition {pid}, round {server_round}")
    if cfg.faults is not None and cfg.faults.config_error_round == server_round:
        raise ConfigError(
            "faults.config_error_round",
            server_round,
            "an injected configuration error (a drill); drop +faults.*",
        )
    # secure aggregation masks the update from what the round started from
    start = get_state(model) if KEY_SECAGG in msg.content else {}
    # the public seed drives the data order of plain training; never DP noise
    seed = int(cfg.federation.seed) * 100_003 + server_round * 1_009 + pid
    if cfg.privacy.mode == "dp_sgd":
        ledger = privacy.Ledger(
            ledger_root(context), msg.content[KEY_CONFIG].get(KEY_RUN_ID), pid
        )
        noise_seed = None  # fresh OS entropy, drawn inside train_local_dp
        if cfg.privacy.reproducible_noise:
            noise_seed = seed
            log.warning(
                "privacy.reproducible_noise=true: DP-SGD noise from the public seed; "
                "the server can regenerate and remove it"
            )
        public = _train_dp(
            cfg, model, examples, device, tokenizer, noise_seed, ledger, server_round
        )
        if public.pop(KEY_DECLINED, False):  # the budget would be exceeded
            if KEY_SECAGG in msg.content:  # what a masked reply could say, no more
                public = {k: v for k, v in public.items() if k in secagg.PUBLIC_METRICS}
            return _declined(msg, pid, public)
    else:
        result = train_local(
            model, examples, cfg.train, device, tokenizer.pad_token_id, seed
        )
        public = {
            KEY_NUM_EXAMPLES: int(result["num_examples"]),
            "train_loss": result["train_loss"],
            "steps": int(result["steps"]),
            "train_time": result["train_time"],
        }
    trained = get_state(model)
    local = {k: v for k, v in trained.items() if method.keeps_local(k)}
    if local:  # kept in the node, never sent; how many rounds it has kept them
        context.state[KEY_STATE_LOCAL] = state_to_record(local)
        kept = context.state.get(KEY_STATE_LOCAL_ROUNDS)
        rounds = int(kept[KEY_LOCAL_ROUNDS]) + 1 if kept is not None else 1
        context.state[KEY_STATE_LOCAL_ROUNDS] = ConfigRecord({KEY_LOCAL_ROUNDS: rounds})
        public[KEY_LOCAL_ROUNDS] = rounds
        if (store := node_store(msg, context, pid)) is not None:
            store.save(server_round, local, rounds)  # before the reply
    public.update(
        {
            KEY_PARTITION: pid,
            FROZEN_CRC_KEY: frozen_digest(model),
            KEY_RANK: int(cfg.adapter.r),  # the node's own rank (config, not data)
        }
    )
    if method.folds_into_base:
        public[KEY_BASE_ROUND] = int(context.state[KEY_STATE_BASE_ROUND][KEY_BASE_TO])
        public[KEY_BASE_NORM] = _held_folds(context).norm()  # a fingerprint
    update = {k: v for k, v in trained.items() if k not in local}
    if KEY_SECAGG in msg.content:
        return secagg.masked_reply(
            msg, context, cfg, start, update, public, method.weighting
        )
    try:  # in wire.dtype: the server widens it back before aggregating
        arrays = state_to_record(update, cfg.wire_dtype)
    except ValueError as exc:  # float16's range
        raise ConfigError("wire.dtype", cfg.wire_dtype, str(exc)) from exc
    content = RecordDict({KEY_ARRAYS: arrays, KEY_METRICS: MetricRecord(public)})
    return Message(content=content, reply_to=msg)


def node_store(msg: Message, context: Context, pid: int) -> NodeStore | None:
    """This node's own state on its disk, ``<data-dir>/node-state`` (else
    ``$FEDLORA_CLIENT_DIR/node-state``), for the run the message names; None when
    the node has neither (it then keeps the state in its Flower context only)."""
    base = context.node_config.get("data-dir") or os.environ.get(privacy.CLIENT_DIR_ENV)
    run_id = msg.content[KEY_CONFIG].get(KEY_RUN_ID)
    if not base or run_id is None:
        return None
    return NodeStore(Path(str(base)).expanduser() / "node-state", str(run_id), pid)


def ledger_root(context: Context) -> Path:
    """Where this client keeps its privacy ledgers: ``<data-dir>/privacy-ledger``
    (a SuperNode's node config), else ``$FEDLORA_CLIENT_DIR/privacy-ledger`` (set
    by the simulation launcher), else ``~/.fedlora/privacy-ledger``. Never a
    location the server chooses."""
    data_dir = context.node_config.get("data-dir")
    base = data_dir or os.environ.get(privacy.CLIENT_DIR_ENV) or "~/.fedlora"
    return Path(str(base)).expanduser() / "privacy-ledger"


def _train_dp(
    cfg: Settings,
    model: Any,
    examples: list[Any],
    device: Any,
    tokenizer: Any,
    noise_seed: int | None,
    ledger: privacy.Ledger,
    server_round: int,
) -> dict[str, Any]:
    """One round of DP-SGD, accounted in the client's own ledger.

    Returns what may leave the client: the epsilon spent (covered by the
    accountant), the plan's public figures, and as the aggregation weight the
    planned expected examples (the Poisson counts and the loss are private).
    ``declined`` is set when one more round would exceed the target epsilon.
    """
    saved = ledger.load()
    if saved is None:  # the first round of this run: calibrate once, for the run
        dp_plan = privacy.plan(
            cfg.privacy, cfg.train, len(examples), cfg.dp_planned_rounds
        )
        history, rounds = None, []
    else:
        dp_plan, history, rounds = saved
    accountant = privacy.make_accountant(dp_plan.accountant, history)
    public: dict[str, Any] = {
        KEY_EPSILON: float(accountant.get_epsilon(dp_plan.delta)) if history else 0.0,
        "delta": dp_plan.delta,
        "noise_multiplier": dp_plan.noise_multiplier,
    }
    if privacy.epsilon_after_round(dp_plan, history) > dp_plan.target_epsilon * (
        1 + 1e-9
    ):
        return {**public, KEY_DECLINED: True}
    privacy.train_local_dp(
        model,
        examples,
        cfg.train,
        cfg.privacy,
        dp_plan,
        accountant,
        device,
        tokenizer.pad_token_id,
        noise_seed,
    )
    ledger.save(dp_plan, accountant, [*rounds, server_round])  # before any reply
    public[KEY_EPSILON] = float(accountant.get_epsilon(dp_plan.delta))
    return {
        **public,
        KEY_NUM_EXAMPLES: dp_plan.expected_examples(),
        "steps": dp_plan.steps_per_round,
    }


def _refuse_under_dp(cfg: Settings, what: str) -> None:
    """Raise when a DP-SGD client is asked to release an unaccounted statistic of
    its data (the server's config is checked too; this holds on the client)."""
    mode = cfg.privacy.mode
    if mode in ("dp_sgd", "distributed"):
        raise PermissionError(
            f"privacy.mode={mode}: this client will not {what}; the privacy "
            "accountant does not cover it (set federation.fraction_evaluate=0 and "
            "strategy.init=random_orthogonal)"
        )


def _declined(msg: Message, pid: int, info: dict[str, Any]) -> Message:
    """Reply without arrays: this client sits the round out, with its reason."""
    reason = (
        f"privacy budget: epsilon spent {info['epsilon']:.3f}; one more round "
        "would exceed privacy.target_epsilon"
    )
    content = RecordDict(
        {
            KEY_METRICS: MetricRecord(
                {KEY_NUM_EXAMPLES: 0, KEY_DECLINED: 1, KEY_PARTITION: pid, **info}
            ),
            KEY_CONFIG: ConfigRecord({KEY_REASON: reason}),
        }
    )
    return Message(content=content, reply_to=msg)


def _gradient_reply(
    msg: Message,
    cfg: Settings,
    model: Any,
    tokenizer: Any,
    device: Any,
    examples: list[Any],
) -> Message:
    """Fed-SB init round: summed gradients of the adapted base weights."""
    calib = examples[: int(msg.content[KEY_CONFIG][KEY_CALIBRATION])]
    grads = gradient_sums(
        model, calib, int(cfg.train.batch_size), tokenizer.pad_token_id, device
    )
    content = RecordDict(
        {
            KEY_ARRAYS: state_to_record(grads),
            KEY_METRICS: MetricRecord({KEY_NUM_EXAMPLES: len(calib)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@config_errors_reply
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter on this node's held-out slice."""
    cfg, _, model, tokenizer, device, pid, num_parts = _setup(msg, context)
    _refuse_under_dp(cfg, "report its exact loss and accuracy on its own examples")
    _, examples = client_examples(cfg, tokenizer, pid, num_parts, _cache_dir(context))
    if not examples:
        raise ValueError(
            f"partition {pid} holds no evaluation examples; raise "
            "data.client_eval_fraction or set federation.fraction_evaluate=0"
        )
    start = time.perf_counter()
    result = evaluate_model(
        model,
        examples,
        cfg.model.task,
        device,
        tokenizer.pad_token_id,
        int(cfg.train.eval_batch_size),
    )
    metrics = {k: v for k, v in result.items() if k != "eval_examples"}
    metrics["eval_time"] = time.perf_counter() - start
    metrics[KEY_NUM_EXAMPLES] = int(result["eval_examples"])
    content = RecordDict({KEY_METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
