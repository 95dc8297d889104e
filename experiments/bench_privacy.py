"""Benchmark: the cost and the utility of DP-SGD.

1. **DP overhead**: local training time of our DP-SGD client (Opacus, hooks) over the
   same trainer without DP, same model (MiniLM, LoRA r=8 on query/value + head), same
   SST-2 examples and batches (Poisson sampling off for the comparison), in this
   process: the ratio ``t_dp / t_plain``.
2. **Privacy-utility sweep**: SST-2, MiniLM, 3 clients, Dirichlet(0.5), for
   target epsilon in {1, 3, 8} and no DP, strategies FedAvg-LoRA, FFA-LoRA and Fed-SB
   (1,200 training phrases, 2 rounds, lr 5e-3, 400 dev phrases;
   ``init=random_orthogonal`` in every arm: a data-free init keeps the arms
   comparable and the DP ones private), seeds 0..S-1; one Hydra multirun per arm.
   Reported: mean and standard deviation over seeds of the final dev accuracy.

    HF_HUB_OFFLINE=1 python -m experiments.bench_privacy [--seeds 3] [--out PATH]
    HF_HUB_OFFLINE=1 python -m experiments.bench_privacy --quick   # smoke test
    ... --set train.batch_size=2500 ++privacy.max_physical_batch_size=64 \
        data.max_train_examples=30000 federation.rounds=3 \
        --out results/dp_large.json  # where DP-SGD learns (README, Privacy)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import bench
from experiments.report import load_runs

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ["fedavg_lora", "ffa_lora", "fedsb"]
EPSILONS = [1.0, 3.0, 8.0]


def common(data: Path, quick: bool) -> list[str]:
    """Overrides shared by every run of the sweep."""
    size = (
        [
            "data.max_train_examples=150",
            "data.max_eval_examples=64",
            "federation.rounds=1",
        ]
        if quick
        else [
            "data.max_train_examples=1200",
            "data.max_eval_examples=400",
            "federation.rounds=2",
        ]
    )
    return [
        "data=sst2",
        f"data.path={data}",
        "data.client_eval_fraction=0",
        "federation.num_clients=3",
        "federation.min_train_clients=3",
        "federation.fraction_evaluate=0",
        "partition.type=dirichlet",
        "partition.alpha=0.5",
        "partition.min_partition_size=20",
        "train.lr=5e-3",  # learns SST-2 in 2 short rounds (1e-3 stays at chance)
        "quiet=true",
        *size,
    ]


def dp_overhead(data: Path, n: int, threads: int) -> dict[str, float]:
    """Seconds of one local epoch without and with DP-SGD, and their ratio."""
    torch.set_num_threads(threads)
    return bench.dp_overhead(common(data, True), n)


def sweep(
    data: Path, out: Path, seeds: int, quick: bool, extra_overrides: Sequence[str] = ()
) -> dict[str, list[float]]:
    """One multirun per privacy arm; returns final accuracies per (strategy, arm).

    ``extra_overrides`` (``--set``) go to every run after the sweep's own settings,
    e.g. a larger data set and logical batch for a machine with a GPU."""
    arms = {"none": ["privacy=none"]}
    for eps in EPSILONS[:1] if quick else EPSILONS:
        arms[f"eps={eps:g}"] = ["privacy=dp_sgd", f"privacy.target_epsilon={eps}"]
    accs: dict[str, list[float]] = {}
    for arm, extra in arms.items():
        arm_dir = out / arm.replace("=", "")  # "=" would break hydra.sweep.dir=...
        for strategy in STRATEGIES:  # one multirun each: only Fed-SB has strategy.init
            run_dir = arm_dir / strategy
            if any(run_dir.rglob("summary.json")):  # resumable: finished runs stay
                continue
            init = ["strategy.init=random_orthogonal"] if strategy == "fedsb" else []
            cmd = [
                sys.executable,
                "-m",
                "experiments.run",
                "-m",
                f"strategy={strategy}",
                f"federation.seed={','.join(str(s) for s in range(seeds))}",
                *common(data, quick),
                *init,
                *extra,
                *extra_overrides,
                f"hydra.sweep.dir={run_dir}",
            ]
            print(f"[bench] {arm} {strategy}: {seeds} runs", flush=True)
            subprocess.run(
                cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )
        for name, runs in load_runs(arm_dir).items():
            accs[f"{name} | {arm}"] = [
                r["summary"]["final_eval_accuracy"] for r in runs
            ]
    return accs


def report(accs: dict[str, list[float]]) -> str:
    """Markdown table: strategy x privacy arm, mean +- std of final dev accuracy."""
    arms = sorted({k.split(" | ")[1] for k in accs}, key=lambda a: (a != "none", a))
    lines = ["| strategy | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in STRATEGIES:
        cells = []
        for a in arms:
            v = np.asarray(accs.get(f"{s} | {a}", []), float) * 100
            cells.append(
                "-"
                if v.size == 0
                else f"{v.mean():.1f} ± {v.std(ddof=1) if v.size > 1 else 0:.1f}"
            )
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(accs: dict[str, list[float]], path: Path) -> None:
    """Accuracy vs epsilon (no DP drawn at the right), mean +- std per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in STRATEGIES:
        xs, means, stds = [], [], []
        for a in sorted({k.split(" | ")[1] for k in accs if k.startswith(s + " |")}):
            v = np.asarray(accs[f"{s} | {a}"]) * 100
            xs.append(32.0 if a == "none" else float(a.split("=")[1]))
            means.append(v.mean())
            stds.append(v.std(ddof=1) if v.size > 1 else 0.0)
        order = np.argsort(xs)
        ax.errorbar(
            np.array(xs)[order],
            np.array(means)[order],
            np.array(stds)[order],
            marker="o",
            capsize=3,
            label=s,
        )
    ax.set_xscale("log")
    ax.set_xlabel("target epsilon (32 = no DP)")
    ax.set_ylabel("final dev accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    """Run both measurements, print and save them."""
    ap = argparse.ArgumentParser(description="DP overhead and privacy-utility sweep.")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/sst2")
    ap.add_argument("--out", type=Path, default=REPO / "results/bench_privacy.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="toy sizes, seconds")
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for every run, after the sweep's own (pair with --out: "
        "finished arms under the output folder are reused)",
    )
    args = ap.parse_args()
    bad = [o for o in args.set if "=" not in o]
    if bad:
        raise SystemExit(f"--set {bad}: each override is KEY=VALUE")
    if not args.data.is_dir():
        raise SystemExit(
            f"--data {args.data}: no such folder (SST-2 train.tsv/dev.tsv)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "overhead": dp_overhead(args.data, 64 if args.quick else 512, threads=2)
    }
    print(f"[bench] DP overhead: {json.dumps(result['overhead'])}", flush=True)
    if not args.overhead_only:
        runs_dir = args.out.with_suffix("")
        accs = sweep(
            args.data,
            runs_dir,
            2 if args.quick else args.seeds,
            args.quick,
            args.set,
        )
        result["overrides"] = args.set
        result["final_accuracy"] = accs
        result["table"] = report(accs)
        plot(accs, args.out.with_suffix(".png"))
        print(result["table"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] written: {args.out}")


if __name__ == "__main__":
    main()
