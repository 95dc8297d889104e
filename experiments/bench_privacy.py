"""Benchmark: the cost and the utility of DP-SGD.

1. **DP overhead**: local training time of our DP-SGD client (Opacus, hooks) over the
   same trainer without DP, same model (MiniLM, LoRA r=8 on query/value + head), same
   SST-2 examples and batches (Poisson sampling off for the comparison), in this
   process: the ratio ``t_dp / t_plain``.
2. **Privacy-utility sweep**: the settings of an experiment preset
   (``conf/experiment/dp_sweep.yaml`` by default: SST-2, MiniLM, 3 clients,
   Dirichlet(0.5), 1,200 training phrases, 2 rounds, lr 5e-3, 400 dev phrases) for
   target epsilon in {1, 3, 8} and no DP, strategies FedAvg-LoRA, FFA-LoRA and Fed-SB
   (``init=random_orthogonal`` in every arm: a data-free init keeps the arms
   comparable and the DP ones private), seeds 0..S-1; each run its own
   ``experiments.run -m`` process, so that a stopped sweep goes on where it stopped.
   Reported: mean and standard deviation over seeds of the final dev accuracy.

    HF_HUB_OFFLINE=1 python -m experiments.bench_privacy [--seeds 3] [--out PATH]
    HF_HUB_OFFLINE=1 python -m experiments.bench_privacy --quick   # smoke test
    ... --experiment dp_large --out results/dp_large.json --arms 8,3,none,1
        # where DP-SGD learns (conf/experiment/dp_large.yaml; docs/privacy.md);
        # stop it any time, run it again to go on
    ... --out results/dp_large.json --report-only   # table and plot of what finished
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


EXPERIMENT = "dp_sweep"  # conf/experiment/<name>.yaml: the sweep's fixed settings
QUICK = [
    "data.max_train_examples=150",
    "data.max_eval_examples=64",
    "federation.rounds=1",
]


def common(data: Path, quick: bool, experiment: str = EXPERIMENT) -> list[str]:
    """Overrides shared by every run of the sweep: the preset ``experiment`` (its
    settings: ``conf/experiment/<experiment>.yaml``), the data folder and, with
    ``quick``, toy sizes."""
    return [f"+experiment={experiment}", f"data.path={data}", *(QUICK if quick else [])]


def dp_overhead(data: Path, n: int, threads: int, repeats: int) -> dict[str, float]:
    """Seconds of one local epoch without and with DP-SGD, and their ratio."""
    torch.set_num_threads(threads)
    return bench.dp_overhead(common(data, True), n, repeats)


def arm_overrides(arm: str) -> list[str]:
    """The privacy overrides of one arm: ``none`` or a target epsilon (``8``)."""
    if arm == "none":
        return ["privacy=none"]
    try:
        eps = float(arm)
    except ValueError:
        raise SystemExit(
            f"--arms {arm!r}: each arm is 'none' or a target epsilon, e.g. none,1,3,8"
        ) from None
    return ["privacy=dp_sgd", f"privacy.target_epsilon={eps}"]


def arm_name(arm: str) -> str:
    return "none" if arm == "none" else f"eps={float(arm):g}"


def finished_seeds(run_dir: Path) -> set[int]:
    """Seeds with a complete run under ``run_dir``: a ``summary.json`` with no client
    failures (seed read from the run's config). A run that lost clients (a crash,
    out of memory) measured something else: it is run again."""
    from omegaconf import OmegaConf

    seeds = set()
    for summary in run_dir.rglob("summary.json"):
        config = summary.parent / "config.yaml"
        if not config.is_file():
            continue
        seed = int(OmegaConf.load(config).federation.seed)
        failures = json.loads(summary.read_text()).get("failures", 0)
        if failures:
            print(f"[bench] {summary.parent}: {failures} client failures, run again")
            continue
        seeds.add(seed)
    return seeds


def sweep(
    data: Path,
    out: Path,
    seeds: int,
    quick: bool,
    extra_overrides: Sequence[str] = (),
    arms: Sequence[str] = ("none", *(f"{e:g}" for e in EPSILONS)),
    run: bool = True,
    experiment: str = EXPERIMENT,
) -> dict[str, list[float]]:
    """One run per (arm, strategy, seed), in ``arms`` order; returns final accuracies
    per ``"strategy | arm"``.

    Resumable: a seed with a finished run (``summary.json``) anywhere under its
    ``out/<arm>/<strategy>/`` folder is not run again, so a long sweep can be stopped
    and restarted; ``run=False`` only collects what has finished.
    ``experiment`` names the preset of the sweep's fixed settings (``dp_large``: a
    larger data set and logical batch); ``extra_overrides`` (``--set``) go to every
    run after them and the grid's own."""
    accs: dict[str, list[float]] = {}
    for arm in arms:
        name = arm_name(arm)
        arm_dir = out / name.replace("=", "")  # "=" would break hydra.sweep.dir=...
        for strategy in STRATEGIES:
            run_dir = arm_dir / strategy
            init = ["strategy.init=random_orthogonal"] if strategy == "fedsb" else []
            done = finished_seeds(run_dir) if run_dir.is_dir() else set()
            for seed in range(seeds) if run else ():
                if seed in done:
                    continue
                seed_dir = run_dir / f"seed{seed}"  # a stopped run's leftovers go:
                shutil.rmtree(seed_dir, ignore_errors=True)
                cmd = [
                    sys.executable,
                    "-m",
                    "experiments.run",
                    "-m",
                    f"strategy={strategy}",
                    f"federation.seed={seed}",
                    *common(data, quick, experiment),
                    *init,
                    *arm_overrides(arm),
                    *extra_overrides,
                    f"hydra.sweep.dir={seed_dir}",
                ]
                print(f"[bench] {name} {strategy} seed {seed}", flush=True)
                subprocess.run(
                    cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
                )
        if not any(arm_dir.rglob("summary.json")):
            continue
        for strategy, runs in load_runs(arm_dir).items():
            accs[f"{strategy} | {name}"] = [
                r["summary"]["final_eval_accuracy"]
                for r in runs
                if not r["summary"].get("failures")  # lost clients: not a result
            ]
    return accs


NO_DP_X = 32.0  # where the no-DP arm is drawn on the epsilon axis


def arm_x(name: str) -> float:
    """An arm's target epsilon (``eps=8`` -> 8.0); ``NO_DP_X`` for ``none``."""
    return NO_DP_X if name == "none" else float(name.split("=")[1])


def report(accs: dict[str, list[float]]) -> str:
    """Markdown table: strategy x privacy arm, mean +- std of final dev accuracy
    (in parentheses: the number of seeds)."""
    arms = sorted(  # no DP, then the weakest privacy first (the README's order)
        {k.split(" | ")[1] for k in accs}, key=lambda a: (a != "none", -arm_x(a))
    )
    lines = ["| strategy | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in STRATEGIES:
        cells = []
        for a in arms:
            v = np.asarray(accs.get(f"{s} | {a}", []), float) * 100
            cells.append(
                "-"
                if v.size == 0
                else f"{v.mean():.1f} ± {v.std(ddof=1) if v.size > 1 else 0:.1f}"
                f" ({v.size})"
            )
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(accs: dict[str, list[float]], path: Path) -> None:
    """Accuracy vs epsilon (no DP at the right): each seed as a dot, mean +- std as
    a bar; the strategies side by side at each epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ticks: set[float] = set()
    for i, s in enumerate(STRATEGIES):
        shift = 1.08 ** (i - (len(STRATEGIES) - 1) / 2)  # side by side (log axis)
        points = []
        for a in {k.split(" | ")[1] for k in accs if k.startswith(s + " |")}:
            v = np.asarray(accs[f"{s} | {a}"], float) * 100
            if v.size == 0:
                continue
            ticks.add(arm_x(a))
            points.append((arm_x(a), v))
        if not points:
            continue
        points.sort(key=lambda p: p[0])
        xs = np.array([x for x, _ in points]) * shift
        line = ax.errorbar(
            xs,
            [v.mean() for _, v in points],
            [v.std(ddof=1) if v.size > 1 else 0.0 for _, v in points],
            marker="o",
            capsize=3,
            label=s,
        )
        for x, (_, v) in zip(xs, points, strict=True):
            ax.scatter(
                [x] * v.size, v, s=12, alpha=0.5, color=line[0].get_color(), zorder=3
            )
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels(["no DP" if t == NO_DP_X else f"{t:g}" for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon (dots: seeds; bars: mean ± std)")
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
    ap.add_argument(
        "--experiment",
        default=EXPERIMENT,
        help="the preset (conf/experiment/<name>.yaml) of the sweep's fixed "
        "settings: dp_sweep (default) or dp_large",
    )
    ap.add_argument("--quick", action="store_true", help="toy sizes, seconds")
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument(
        "--arms",
        default="none,1,3,8",
        help="privacy arms in the order to run them: 'none' or a target epsilon",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: tabulate and plot the runs finished under the output folder",
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for every run, after the preset's and the sweep's own "
        "(pair with --out: finished arms under the output folder are reused)",
    )
    args = ap.parse_args()
    bad = [o for o in args.set if "=" not in o]
    if bad:
        raise SystemExit(f"--set {bad}: each override is KEY=VALUE")
    presets = REPO / "conf" / "experiment"
    if not (presets / f"{args.experiment}.yaml").is_file():
        names = ", ".join(sorted(p.stem for p in presets.glob("*.yaml")))
        raise SystemExit(f"--experiment {args.experiment!r}: no such preset ({names})")
    if not args.data.is_dir():
        raise SystemExit(
            f"--data {args.data}: no such folder (SST-2 train.tsv/dev.tsv)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in arms:
        arm_overrides(arm)  # refuse a bad arm before hours of runs
    result: dict[str, Any] = {}
    if args.report_only and args.out.is_file():  # keep the overhead measured before
        result = json.loads(args.out.read_text())
    if not args.report_only:
        result["overhead"] = dp_overhead(
            args.data,
            64 if args.quick else 512,
            threads=2,
            repeats=1 if args.quick else 5,
        )
        print(f"[bench] DP overhead: {json.dumps(result['overhead'])}", flush=True)
    if not args.overhead_only:
        runs_dir = args.out.with_suffix("")
        accs = sweep(
            args.data,
            runs_dir,
            2 if args.quick else args.seeds,
            args.quick,
            args.set,
            arms[:2] if args.quick else arms,
            run=not args.report_only,
            experiment=args.experiment,
        )
        result["experiment"] = args.experiment
        result["overrides"] = args.set
        result["final_accuracy"] = accs
        result["table"] = report(accs)
        plot(accs, args.out.with_suffix(".png"))
        print(result["table"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] written: {args.out}")


if __name__ == "__main__":
    main()
