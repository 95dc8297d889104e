"""Turn a Hydra multirun directory into a comparison table and plots.

    python -m experiments.report multirun/2026-11-28/13-30-00 [--out DIR]

Reads every run below the directory (``summary.json``, ``metrics.jsonl``,
``config.yaml``), groups runs by strategy, and writes ``report.md`` (mean +- std
over seeds of final and best accuracy, total MB sent, mean aggregation error, wall
time) and ``accuracy_vs_round.png`` / ``accuracy_vs_mb.png`` (one line per strategy,
mean over seeds).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.results import read_metrics


def load_runs(root: Path) -> dict[str, list[dict[str, Any]]]:
    """``{strategy: [run, ...]}``; a run is its summary plus its metric rows."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for summary_file in sorted(root.rglob("summary.json")):
        summary = json.loads(summary_file.read_text())
        runs[summary["strategy"]].append(
            {
                "summary": summary,
                "rows": read_metrics(summary_file.parent),
                "dir": str(summary_file.parent),
            }
        )
    if not runs:
        raise SystemExit(f"no runs (summary.json) found under {root}")
    return dict(runs)


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    arr = np.asarray([v for v in values if v is not None], dtype=float) * scale
    if arr.size == 0:
        return "-"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


def markdown(runs: dict[str, list[dict[str, Any]]]) -> str:
    """The comparison table (accuracy in %, traffic in MB up + down)."""
    lines = [
        "| strategy | runs | final acc (%) | best acc (%) | MB sent (up+down) | "
        "mean aggregation error | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, group in runs.items():
        s = [g["summary"] for g in group]
        err = [
            x["mean_aggregation_error"]
            for x in s
            if x["mean_aggregation_error"] is not None
        ] or [0.0]
        megabytes = [(x["total_bytes_up"] + x["total_bytes_down"]) / 1e6 for x in s]
        err_cell = (
            _mean_std(err, digits=3) if max(err) > 1e-3 else f"{max(err):.1e} (max)"
        )
        lines.append(
            f"| {name} | {len(group)} "
            f"| {_mean_std([x['final_eval_accuracy'] for x in s], 100, 1)} "
            f"| {_mean_std([x['best_eval_accuracy'] for x in s], 100, 1)} "
            f"| {_mean_std(megabytes, digits=1)} "
            f"| {err_cell} "
            f"| {_mean_std([x['wall_time'] for x in s], digits=0)} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """Accuracy vs round and vs cumulative MB, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for xkey, xlabel in (("round", "round"), ("mb", "cumulative MB (up + down)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, group in runs.items():
            n = min(len(g["rows"]) for g in group)
            acc = np.mean(
                [[r["eval_accuracy"] for r in g["rows"][:n]] for g in group], 0
            )
            if xkey == "round":
                xs = [r["round"] for r in group[0]["rows"][:n]]
            else:
                xs = np.mean(
                    [
                        np.cumsum(
                            [
                                (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6
                                for r in g["rows"][:n]
                            ]
                        )
                        for g in group
                    ],
                    0,
                )
            ax.plot(xs, acc, marker="o", label=name)
        if xkey == "mb":
            ax.set_xscale("symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("server accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"accuracy_vs_{xkey}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    """Parse arguments and write the report."""
    ap = argparse.ArgumentParser(
        description="Compare the runs of a multirun directory."
    )
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the root itself")
    args = ap.parse_args()
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(args.root)
    text = markdown(runs)
    (out / "report.md").write_text(text)
    plot(runs, out)
    print(text)
    print(
        f"written: {out / 'report.md'}, {out / 'accuracy_vs_round.png'}, "
        f"{out / 'accuracy_vs_mb.png'}"
    )


if __name__ == "__main__":
    main()
