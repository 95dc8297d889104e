"""Benchmark: federated LoRA vs centralised LoRA on SST-2, same data, same budget.

Measured, in one invocation:

* **federated**: FedAvg-LoRA, MiniLM, LoRA r=8 on query/value + head, 10 clients,
  4 rounds, Dirichlet(0.5) label partition of 8,000 SST-2 training phrases, 1 local
  epoch per round, batch 32, lr 1e-3, run on Flower's simulation engine (the real path:
  ``compose`` + ``simulate``); server accuracy on the full dev set (872) per round.
* **centralised**: the same model/adapter/optimiser settings trained on the union of
  exactly the clients' training examples, one pass of the union per "round", so
  both see the same number of examples; dev accuracy after each pass. It uses all
  cores (``--threads``), as the federation runs one 1-thread client per core.
* wall time of both, the final-accuracy ratio and the wall-time ratio
  (federated / centralised).

Run (from the repository root)::

    HF_HUB_OFFLINE=1 python -m experiments.bench_sst2 [--out results/bench_sst2.json]
    HF_HUB_OFFLINE=1 python -m experiments.bench_sst2 --quick   # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.run import simulate
from fedlora import results
from fedlora.build import build
from fedlora.data import client_examples, server_examples
from fedlora.models import resolve_device
from fedlora.settings import Settings
from fedlora.train import evaluate, train_local
from strategies.server_app import compose, settings

REPO = Path(__file__).resolve().parent.parent
FULL = {"clients": 10, "rounds": 4, "train": 8000, "dev": None}
QUICK = {"clients": 3, "rounds": 1, "train": 200, "dev": 100}


def overrides(data: Path, size: dict[str, Any]) -> list[str]:
    """The Hydra overrides of the federated run (the baseline reuses its settings)."""
    n, dev = size["clients"], "null" if size["dev"] is None else size["dev"]
    return [
        "data=sst2",
        f"data.path={data}",
        "data.client_eval_fraction=0",
        f"data.max_train_examples={size['train']}",
        f"data.max_eval_examples={dev}",
        f"federation.num_clients={n}",
        f"federation.min_train_clients={n}",
        f"federation.rounds={size['rounds']}",
        "federation.fraction_train=1.0",
        "federation.fraction_evaluate=0",
        "partition.type=dirichlet",
        "partition.alpha=0.5",
        "train.batch_size=32",
        "train.lr=1e-3",
        "train.local_epochs=1",
        "quiet=true",
    ]


def centralised(plain: Settings, rounds: int) -> dict[str, Any]:
    """LoRA on the union of the client partitions, one pass per round-equivalent."""
    model, tokenizer = build(plain)  # same seed -> same initial adapter and head
    device = resolve_device(plain.train.device)
    model.to(device)
    n = int(plain.federation.num_clients)
    parts = [client_examples(plain, tokenizer, pid, n)[0] for pid in range(n)]
    union = [e for part in parts for e in part]
    dev = server_examples(plain, tokenizer)
    pad, task = tokenizer.pad_token_id, plain.model.task
    bs = int(plain.train.eval_batch_size)
    started, rows = time.perf_counter(), []
    for rnd in range(rounds + 1):  # round 0: the untrained model, as the server does
        train = (
            {}
            if rnd == 0
            else train_local(
                model,
                union,
                plain.train,
                device,
                pad,
                int(plain.federation.seed) * 100_003 + rnd * 1_009,
            )
        )
        metrics = evaluate(model, dev, task, device, pad, bs)
        rows.append(
            {
                "round": rnd,
                **metrics,
                **train,
                "wall_time": time.perf_counter() - started,
            }
        )
        print(
            f"[bench] centralised pass {rnd}/{rounds}: acc "
            f"{metrics['eval_accuracy']:.4f} | {rows[-1]['wall_time']:.1f}s",
            flush=True,
        )
    return {
        "examples": len(union),
        "rows": rows,
        "wall_time": rows[-1]["wall_time"],
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results/bench_sst2.json")
    parser.add_argument("--data", type=Path, default=REPO / "../shared/data/sst2")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads of the baseline (default: all cores, as "
        "many as the federation's parallel 1-thread clients)",
    )
    parser.add_argument("--quick", action="store_true", help="toy size (smoke test)")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    load = {"start": os.getloadavg()}
    size = dict(QUICK if args.quick else FULL)
    if args.rounds:
        size["rounds"] = args.rounds

    # 1. compose and check the federated configuration (paths absolute, for Ray)
    run_dir = args.out.resolve().with_suffix("") / "federated"
    cfg = compose(overrides(args.data.resolve(), size))
    plain = Settings.from_dict(settings(cfg))  # compose validated it

    # 2. the federation, on Flower's simulation engine
    started = time.perf_counter()
    summary = simulate(cfg, run_dir)
    fed_total = time.perf_counter() - started
    fed_rows = results.read_metrics(run_dir)

    # 3. the centralised baseline on the union of the same partitions
    load["after_federated"] = os.getloadavg()
    torch.set_num_threads(args.threads)
    cen = centralised(plain, size["rounds"])
    load["end"] = os.getloadavg()

    # 4. table, ratios and JSON
    fed_acc = {r["round"]: r["eval_accuracy"] for r in fed_rows}
    cen_acc = {r["round"]: r["eval_accuracy"] for r in cen["rows"]}
    print(f"\n{'round':>5} | {'federated acc':>13} | {'centralised acc':>15}")
    for rnd in range(size["rounds"] + 1):
        print(
            f"{rnd:>5} | {fed_acc.get(rnd, float('nan')):>13.4f} | "
            f"{cen_acc[rnd]:>15.4f}"
        )
    fed_wall = float(summary["wall_time"])
    final_fed, final_cen = fed_acc.get(size["rounds"]), cen_acc[size["rounds"]]
    print(
        f"wall time: federated {fed_wall:.1f}s (rounds; {fed_total:.1f}s with Ray "
        f"start-up) | centralised {cen['wall_time']:.1f}s"
    )
    report = {
        "command": shlex.join(["python", "-m", "experiments.bench_sst2", *argv]),
        "quick": args.quick,
        "size": size,
        "config": plain.to_dict(),
        "load_average": load,
        "federated": {
            "accuracy": fed_acc,
            "wall_time": fed_wall,
            "steps": {
                r["round"]: sum(c["steps"] for c in r.get("client_replies", []))
                for r in fed_rows
            },
            "wall_time_with_startup": fed_total,
            "run_dir": str(run_dir),
            "summary": summary,
        },
        "centralised": {"accuracy": cen_acc, **cen},
        "accuracy_ratio": final_fed / final_cen if final_fed is not None else None,
        "wall_time_ratio": fed_wall / cen["wall_time"],
    }
    ratio = report["accuracy_ratio"]
    print(
        f"federated/centralised: final accuracy {ratio or float('nan'):.4f}, "
        f"wall time {report['wall_time_ratio']:.3f} | 1-min load average "
        f"{load['start'][0]:.2f} (start), {load['end'][0]:.2f} (end)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
