"""GPU check: one QLoRA federated round on a Llama-shaped model.

    python -m experiments.gpu_check [--out gpu_check.json] [--layers 4]
        [--hidden 1024] [--steps 4] [--quantization 4bit] [override ...]

Builds a Llama-shaped model from a config (random weights, nothing downloaded:
``--layers`` decoder layers of hidden ``--hidden``, MiniLM's vocabulary) in a
temporary folder, then runs one federated round as the simulation does: for each
of 2 clients the ClientApp's own ``train`` handler (the global adapter in, this
node's partition of the synthetic task, ``--steps`` local steps, the trained
adapter out), then the method's aggregation of the two replies. The model loads
with ``model.quantization`` (``--quantization``, default 4bit; ``none`` for none),
bfloat16 base weights and gradient checkpointing; further Hydra overrides may
follow (e.g. ``train.gradient_checkpointing=false``).

Prints, per client, the peak GPU memory of its round and its training tokens/s
(the tokens of the examples it trained on, padding left out, over its
``train_time``), and writes them with the setup to ``--out``.

Exit status: 0 when the round ran; 3 (:data:`EXIT_NO_CUDA`) on a machine without
a CUDA device, where it prints why and runs nothing; 2 on a configuration error
(e.g. bitsandbytes not installed: ``pip install 'fedlora[gpu]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

EXIT_NO_CUDA = 3
CLIENTS = 2
#: every linear layer of a Llama decoder layer, as QLoRA adapts them
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def overrides(args: argparse.Namespace, folder: Path) -> list[str]:
    """The experiment: the saved model, causal LM on the synthetic task, 2
    clients, ``--steps`` local steps, then the caller's own overrides."""
    quant = "null" if args.quantization == "none" else args.quantization
    return [
        f"model.name={folder}",
        "model.task=causal_lm",
        "model.dtype=bfloat16",
        f"model.quantization={quant}",
        "adapter.r=16",
        "adapter.alpha=32",
        f"adapter.target_modules=[{','.join(MODULES)}]",
        f"federation.num_clients={CLIENTS}",
        f"federation.min_train_clients={CLIENTS}",
        "federation.rounds=1",
        f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        "train.max_length=64",
        "train.device=cuda",
        "train.gradient_checkpointing=true",
        "data.num_examples=400",
        *args.overrides,
    ]


def client_round(cfg: Any, state: dict[str, Any], pid: int) -> dict[str, Any]:
    """Client ``pid``'s round through the ClientApp's ``train`` handler: its reply's
    trained state and metrics, with its peak GPU memory and tokens/s."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from clients.client_app import train
    from fedlora.build import build_cached
    from fedlora.data import client_examples
    from strategies.wire import (
        KEY_ARRAYS,
        KEY_CONFIG,
        KEY_EXPERIMENT,
        KEY_METRICS,
        KEY_ROUND,
        KEY_RUN_ID,
        record_to_state,
        state_to_record,
    )

    config = {
        KEY_EXPERIMENT: json.dumps(cfg.to_dict()),
        KEY_ROUND: 1,
        KEY_RUN_ID: "gpu-check",
    }
    msg = Message(
        content=RecordDict(
            {KEY_CONFIG: ConfigRecord(config), KEY_ARRAYS: state_to_record(state)}
        ),
        dst_node_id=pid + 1,
        message_type="train",
    )
    node = Context(
        run_id=1,
        node_id=pid + 1,
        node_config={"partition-id": pid, "num-partitions": CLIENTS},
        state=RecordDict(),
        run_config={},
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    reply = train(msg, node)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if reply.has_error():
        raise RuntimeError(f"client {pid}: {reply.error.reason}")
    metrics = dict(reply.content[KEY_METRICS])
    _, tokenizer = build_cached(cfg)  # the model the handler used: no new load
    examples, _ = client_examples(cfg, tokenizer, pid, CLIENTS, None)
    mean_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
    tokens = float(metrics["num-examples"]) * mean_tokens
    return {
        "state": record_to_state(reply.content[KEY_ARRAYS]),
        "partition": pid,
        "steps": int(metrics["steps"]),
        "examples": int(metrics["num-examples"]),
        "train_loss": float(metrics["train_loss"]),
        "train_time_s": float(metrics["train_time"]),
        "round_time_s": wall,
        "tokens_per_s": tokens / float(metrics["train_time"]),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Save the model, check the settings as the front door does, run one round
    and aggregate it; returns the report."""
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.aggregation import client_weights
    from fedlora.build import build_cached, initial_state
    from fedlora.methods import from_settings
    from fedlora.preflight import preflight
    from fedlora.testing import save_tiny_llama
    from strategies.server_app import compose_settings

    for field in ("_run_id", "_task_id", "_node_id"):  # a message needs a run
        setattr(TaskIdentity, field, 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_llama(Path(tmp), hidden=args.hidden, layers=args.layers)
        cfg = compose_settings(overrides(args, folder))
        preflight(cfg, data=True)
        model, _ = build_cached(cfg)  # the clients' model; the global adapter's start
        sent = initial_state(model)
        params = sum(p.numel() for p in model.parameters())
        clients = [client_round(cfg, sent, pid) for pid in range(CLIENTS)]
    method = from_settings(cfg)
    weights = client_weights([c["examples"] for c in clients], method.weighting)
    new = method.aggregate([c.pop("state") for c in clients], weights, sent)
    change = float(np.sqrt(sum(float(np.sum((new[k] - sent[k]) ** 2)) for k in new)))
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "parameters": int(params),
            "quantization": cfg.model.quantization,
            "dtype": cfg.model.dtype,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
        },
        "adapter_parameters": int(sum(v.size for v in sent.values())),
        "clients": clients,
        "global_update_norm": change,
        "peak_gpu_memory_mb": max(c["peak_gpu_memory_mb"] for c in clients),
        "tokens_per_s": sum(c["tokens_per_s"] for c in clients) / len(clients),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the check; the exit status (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--quantization", choices=("4bit", "8bit", "none"), default="4bit"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "[gpu_check] no CUDA device is visible on this machine: the QLoRA "
            "round needs one, so nothing was run (exit status "
            f"{EXIT_NO_CUDA}). Run it on a machine with an NVIDIA GPU and "
            "pip install 'fedlora[gpu]'.",
            flush=True,
        )
        return EXIT_NO_CUDA
    from fedlora.errors import ConfigError

    try:
        report = run(args)
    except ConfigError as exc:
        print(f"[gpu_check] configuration error: {exc}", file=sys.stderr)
        return 2
    for c in report["clients"]:
        print(
            f"[gpu_check] client {c['partition']}: {c['steps']} steps, "
            f"{c['tokens_per_s']:.0f} tokens/s, peak GPU memory "
            f"{c['peak_gpu_memory_mb']:.0f} MB, loss {c['train_loss']:.3f}",
            flush=True,
        )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"[gpu_check] {report['device']}: peak {report['peak_gpu_memory_mb']:.0f} "
        f"MB, {report['tokens_per_s']:.0f} tokens/s per client; wrote {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
