"""ClientApp: load this node's partition, apply the global adapter, train/evaluate.

Everything a client needs arrives in each message (the experiment settings as JSON
under ``config["fedlora"]``); the node itself only says which partition it holds
(``node_config``: ``partition-id``, ``num-partitions``, optionally ``data-path``) and,
in a deployment, its data location ``data-dir``, where tokenised partitions are cached.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import privacy
from fedlora.adapters import get_frozen_state, get_state, set_frozen_state, set_state
from fedlora.build import build_cached
from fedlora.data import client_examples
from fedlora.lora_sb import gradient_sums
from fedlora.models import resolve_device
from fedlora.train import evaluate as evaluate_model
from fedlora.train import train_local
from strategies.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_EXPERIMENT,
    KEY_FROZEN,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_PHASE,
    KEY_ROUND,
    KEY_STATE_DP,
    KEY_STATE_FROZEN,
    PHASE_GRADIENT,
    record_to_state,
    state_to_record,
)

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[Any, ...]:
    """Settings, model (global adapter loaded), tokenizer, device, partition."""
    config = msg.content[KEY_CONFIG]
    cfg = json.loads(str(config[KEY_EXPERIMENT]))
    node = context.node_config
    pid = int(node["partition-id"])
    num_parts = int(node.get("num-partitions", cfg["federation"]["num_clients"]))
    if node.get("data-path"):  # a real site points at its own data
        cfg["data"]["path"] = str(node["data-path"])
    threads = int(cfg["train"].get("num_threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    model, tokenizer = build_cached(cfg)
    device = resolve_device(str(cfg["train"].get("device", "auto")))
    model.to(device)  # move before any optimizer exists (opacus#820)
    if KEY_FROZEN in msg.content:  # Fed-SB's B and A arrive once; keep them
        context.state[KEY_STATE_FROZEN] = msg.content[KEY_FROZEN]
    if KEY_STATE_FROZEN in context.state:
        set_frozen_state(model, record_to_state(context.state[KEY_STATE_FROZEN]))
    if KEY_ARRAYS in msg.content:
        set_state(model, record_to_state(msg.content[KEY_ARRAYS]))
    return cfg, model, tokenizer, device, pid, num_parts


def _cache_dir(context: Context) -> str | None:
    """``<data-dir>/cache`` when the node config names a data location, else None."""
    data_dir = context.node_config.get("data-dir")
    return f"{data_dir}/cache" if data_dir else None


def frozen_digest(model: Any) -> int:
    """CRC32 of the frozen LoRA factors: equal on every client iff they agree."""
    crc = 0
    for key, value in sorted(get_frozen_state(model).items()):
        crc = zlib.crc32(value.tobytes(), zlib.crc32(key.encode(), crc))
    return crc


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global adapter on this node's partition; reply with trained parts."""
    cfg, model, tokenizer, device, pid, num_parts = _setup(msg, context)
    examples, _ = client_examples(cfg, tokenizer, pid, num_parts, _cache_dir(context))
    if msg.content[KEY_CONFIG].get(KEY_PHASE) == PHASE_GRADIENT:
        return _gradient_reply(msg, cfg, model, tokenizer, device, examples)
    server_round = int(msg.content[KEY_CONFIG][KEY_ROUND])
    faults = cfg.get("faults") or {}
    if (
        faults.get("raise_partition") == pid
        and server_round % int(faults.get("raise_every", 1)) == 0
    ):
        raise RuntimeError(f"injected fault: partition {pid}, round {server_round}")
    seed = int(cfg["federation"]["seed"]) * 100_003 + server_round * 1_009 + pid
    extra: dict[str, Any] = {}
    if cfg["privacy"]["mode"] == "dp_sgd":
        result, extra = _train_dp(
            cfg, model, examples, device, tokenizer, seed, context
        )
        if result is None:  # the budget would be exceeded: decline this round
            return _declined(msg, pid, extra)
    else:
        result = train_local(
            model, examples, cfg["train"], device, tokenizer.pad_token_id, seed
        )
    metrics = MetricRecord(
        {
            KEY_NUM_EXAMPLES: int(result["num_examples"]),
            "train_loss": result["train_loss"],
            "steps": int(result["steps"]),
            "train_time": result["train_time"],
            "partition-id": pid,
            "frozen-crc": frozen_digest(model),
            **extra,
        }
    )
    content = RecordDict(
        {KEY_ARRAYS: state_to_record(get_state(model)), KEY_METRICS: metrics}
    )
    return Message(content=content, reply_to=msg)


def _train_dp(
    cfg: dict[str, Any],
    model: Any,
    examples: list[Any],
    device: Any,
    tokenizer: Any,
    seed: int,
    context: Context,
) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """DP-SGD with the accountant kept in ``context.state`` across rounds.

    Returns ``(None, info)`` when one more round would exceed the target epsilon.
    """
    saved = context.state.get(KEY_STATE_DP)
    dp_plan = (
        privacy.DPPlan.from_json(str(saved["plan"]))
        if saved
        else privacy.plan(
            cfg["privacy"], cfg["train"], len(examples), privacy.planned_rounds(cfg)
        )
    )  # calibrated once
    history = str(saved["accountant"]) if saved else None
    spent = (
        float(
            privacy.make_accountant(dp_plan.accountant, history).get_epsilon(
                dp_plan.delta
            )
        )
        if history
        else 0.0
    )
    info: dict[str, Any] = {
        "epsilon": spent,
        "delta": dp_plan.delta,
        "noise_multiplier": dp_plan.noise_multiplier,
    }
    if privacy.epsilon_after_round(dp_plan, history) > dp_plan.target_epsilon * (
        1 + 1e-9
    ):
        return None, info
    accountant = privacy.make_accountant(dp_plan.accountant, history)
    result = privacy.train_local_dp(
        model,
        examples,
        cfg["train"],
        cfg["privacy"],
        dp_plan,
        accountant,
        device,
        tokenizer.pad_token_id,
        seed,
    )
    context.state[KEY_STATE_DP] = ConfigRecord(
        {"plan": dp_plan.to_json(), "accountant": privacy.accountant_state(accountant)}
    )
    info["epsilon"] = float(accountant.get_epsilon(dp_plan.delta))
    return result, info


def _declined(msg: Message, pid: int, info: dict[str, Any]) -> Message:
    """Reply without arrays: this client sits the round out, with its reason."""
    reason = (
        f"privacy budget: epsilon spent {info['epsilon']:.3f}; one more round "
        "would exceed privacy.target_epsilon"
    )
    content = RecordDict(
        {
            KEY_METRICS: MetricRecord(
                {KEY_NUM_EXAMPLES: 0, "declined": 1, "partition-id": pid, **info}
            ),
            KEY_CONFIG: ConfigRecord({"reason": reason}),
        }
    )
    return Message(content=content, reply_to=msg)


def _gradient_reply(
    msg: Message,
    cfg: dict[str, Any],
    model: Any,
    tokenizer: Any,
    device: Any,
    examples: list[Any],
) -> Message:
    """Fed-SB init round: summed gradients of the adapted base weights."""
    calib = examples[: int(cfg["strategy"].get("calibration_examples", 64))]
    grads = gradient_sums(
        model, calib, int(cfg["train"]["batch_size"]), tokenizer.pad_token_id, device
    )
    content = RecordDict(
        {
            KEY_ARRAYS: state_to_record(grads),
            KEY_METRICS: MetricRecord({KEY_NUM_EXAMPLES: len(calib)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter on this node's held-out slice."""
    cfg, model, tokenizer, device, pid, num_parts = _setup(msg, context)
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
        cfg["model"]["task"],
        device,
        tokenizer.pad_token_id,
        int(cfg["train"].get("eval_batch_size", 64)),
    )
    metrics = {k: v for k, v in result.items() if k != "eval_examples"}
    metrics["eval_time"] = time.perf_counter() - start
    metrics[KEY_NUM_EXAMPLES] = int(result["eval_examples"])
    content = RecordDict({KEY_METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
