"""Turn a Hydra multirun directory into a comparison table and plots.

    python -m experiments.report multirun/2026-11-28/13-30-00 [--out DIR]

Reads every run below the directory (``summary.json``, ``metrics.jsonl``,
``config.yaml``), groups runs by strategy, and writes ``report.md`` (mean +- std
over seeds of final and best accuracy, total MB sent, mean aggregation error, wall
time) and ``accuracy_vs_round.png`` / ``accuracy_vs_mb.png`` (one line per strategy,
mean over seeds).

Accuracy is each run's *main metric*: the server's ``eval_accuracy``, unless the
method's ``summary.json`` names another ``main_metric`` (FedSA-LoRA: the clients'
personalised ``federated_eval_accuracy``); such rows are marked † and the table then
adds the server's final accuracy. ``experiments.compare`` builds its tables and plots
from the same functions.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.results import SUMMARY_FILE, read_metrics

#: the server's accuracy, every run's main metric unless its method names another
SERVER_METRIC = "eval_accuracy"

Run = dict[str, Any]  # {"summary": summary.json, "rows": metrics.jsonl, "dir": str}


def load_run(run_dir: Path) -> Run:
    """One run directory: its summary, its metric rows and its path."""
    run_dir = Path(run_dir)
    return {
        "summary": json.loads((run_dir / SUMMARY_FILE).read_text()),
        "rows": read_metrics(run_dir),
        "dir": str(run_dir),
    }


def load_runs(root: Path) -> dict[str, list[Run]]:
    """``{strategy: [run, ...]}`` of every run below ``root``."""
    runs: dict[str, list[Run]] = defaultdict(list)
    for summary_file in sorted(root.rglob(SUMMARY_FILE)):
        run = load_run(summary_file.parent)
        runs[run["summary"]["strategy"]].append(run)
    if not runs:
        raise SystemExit(f"no runs (summary.json) found under {root}")
    return dict(runs)


def main_metric(summary: dict[str, Any]) -> str:
    """The accuracy a run is judged by: its method's ``main_metric`` (FedSA-LoRA:
    ``federated_eval_accuracy``), else the server's ``eval_accuracy``."""
    return str(summary.get("main_metric") or SERVER_METRIC)


def final_accuracy(summary: dict[str, Any]) -> float | None:
    """The run's final main-metric accuracy (None when the run lacks it, e.g.
    federated evaluation was off for a method whose main metric needs it)."""
    return summary.get(f"final_{main_metric(summary)}")


def best_accuracy(summary: dict[str, Any]) -> float | None:
    """The run's best main-metric accuracy over its rounds (None when missing)."""
    return summary.get(f"best_{main_metric(summary)}")


def megabytes(summary: dict[str, Any]) -> float:
    """Traffic of the run, up plus down, in MB (10^6 bytes)."""
    return (summary["total_bytes_up"] + summary["total_bytes_down"]) / 1e6


def stats(values: list[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of the values that are not None (std
    with ``ddof=1``; None for fewer than two values, mean None for none)."""
    kept = [float(v) for v in values if v is not None]
    arr = np.asarray(kept, dtype=float)
    return {
        "mean": float(arr.mean()) if arr.size else None,
        "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "n": int(arr.size),
        "values": kept,
    }


def group_figures(group: list[Run]) -> dict[str, Any]:
    """The comparison's figures of one group of runs (a method's seeds): the main
    metric's final and best accuracy, the server's final accuracy, MB up + down,
    mean aggregation error and wall time, each as :func:`stats`."""
    s = [g["summary"] for g in group]
    return {
        "runs": len(group),
        "main_metric": sorted({main_metric(x) for x in s}),
        "final_acc": stats([final_accuracy(x) for x in s]),
        "best_acc": stats([best_accuracy(x) for x in s]),
        "server_final_acc": stats([x.get(f"final_{SERVER_METRIC}") for x in s]),
        "mb": stats([megabytes(x) for x in s]),
        "aggregation_error": stats([x.get("mean_aggregation_error") for x in s]),
        "wall_time": stats([x.get("wall_time") for x in s]),
    }


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of the values that are not None, times ``scale`` (one
    value: itself; none: ``-``)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float) * scale
    if arr.size == 0:
        return "-"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


def _error_cell(values: list[float]) -> str:
    if not values:
        return "-"  # no diagnostic (e.g. FedSA-LoRA's personal B)
    if max(values) > 1e-3:
        return mean_std(values, digits=3)
    return f"{max(values):.1e} (max)"  # round-off: the exact methods


def markdown(
    runs: dict[str, list[Run]], extra: dict[str, dict[str, str]] | None = None
) -> str:
    """The comparison table (accuracy in %, traffic in MB up + down).

    ``extra`` adds columns after the name: ``{column: {group name: cell}}``. Groups
    judged by another main metric than the server's accuracy are marked † and get
    the server's final accuracy in a column of its own.
    """
    extra = extra or {}
    figures = {name: group_figures(group) for name, group in runs.items()}
    other = {n for n, f in figures.items() if f["main_metric"] != [SERVER_METRIC]}
    head = ["strategy", *extra, "runs", "final acc (%)", "best acc (%)"]
    head += ["server final acc (%)"] if other else []
    head += ["MB sent (up+down)", "mean aggregation error", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, f in figures.items():
        mark = " †" if name in other else ""
        cells = [name, *(col.get(name, "-") for col in extra.values()), f["runs"]]
        cells += [
            mean_std(f["final_acc"]["values"], 100, 1) + mark,
            mean_std(f["best_acc"]["values"], 100, 1) + mark,
        ]
        if other:
            cells.append(mean_std(f["server_final_acc"]["values"], 100, 1))
        cells += [
            mean_std(f["mb"]["values"], digits=1),
            _error_cell(f["aggregation_error"]["values"]),
            mean_std(f["wall_time"]["values"], digits=0),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for name in sorted(other):
        metric = ", ".join(figures[name]["main_metric"])
        lines.append(f"\n† {name}: accuracy is its main metric, `{metric}`.")
    return "\n".join(lines) + "\n"


def rank_traffic(run: Run) -> dict[str, dict[str, float]]:
    """Traffic by client rank over the run (clients of different ranks,
    ``bytes_up_by_rank`` / ``bytes_down_by_rank`` of ``metrics.jsonl``):
    ``{rank: {"up_mb", "down_mb", "replies"}}``, MB (10^6 bytes) per reply of a
    client of that rank (one client in one round); empty for a run without them."""
    up: dict[str, float] = defaultdict(float)
    down: dict[str, float] = defaultdict(float)
    replies: dict[str, int] = defaultdict(int)
    for row in run["rows"]:
        for rank, size in (row.get("bytes_up_by_rank") or {}).items():
            up[rank] += size
        for rank, size in (row.get("bytes_down_by_rank") or {}).items():
            down[rank] += size
        for reply in row.get("client_replies") or []:
            if "adapter-rank" in reply:
                replies[str(int(reply["adapter-rank"]))] += 1
    return {
        rank: {
            "up_mb": up[rank] / n / 1e6,
            "down_mb": down[rank] / n / 1e6 if rank in down else None,
            "replies": n,
        }
        for rank, n in sorted(replies.items(), key=lambda kv: int(kv[0]))
        if rank in up
    }


def rank_markdown(runs: dict[str, list[Run]]) -> str:
    """Per method and client rank: MB up and down per client per round (mean over
    the group's runs); empty when no run has clients of different ranks."""
    lines = []
    for name, group in runs.items():
        tiers: dict[str, dict[str, list[float]]] = defaultdict(
            lambda: {"up_mb": [], "down_mb": []}
        )
        for run in group:
            for rank, fig in rank_traffic(run).items():
                for key in ("up_mb", "down_mb"):
                    if fig[key] is not None:
                        tiers[rank][key].append(fig[key])
        for rank, fig in tiers.items():
            up = mean_std(fig["up_mb"], digits=3)
            down = mean_std(fig["down_mb"], digits=3)
            lines.append(f"| {name} | {rank} | {up} | {down} |")
    if not lines:
        return ""
    head = (
        "| strategy | client rank | MB up per client-round | MB down per client-round |"
    )
    return "\n".join([head, "|---|---|---|---|", *lines]) + "\n"


def curve(run: Run) -> tuple[list[int], list[float], list[float]]:
    """``(rounds, cumulative MB, accuracy)`` of a run's main metric at the rounds
    that report it; the MB count every round's traffic (round 0: one-time costs)."""
    key, total, points = main_metric(run["summary"]), 0.0, []
    for row in run["rows"]:
        total += (row.get("bytes_up", 0) + row.get("bytes_down", 0)) / 1e6
        if row.get(key) is not None:
            points.append((row["round"], total, row[key]))
    return (
        [p[0] for p in points],
        [p[1] for p in points],
        [p[2] for p in points],
    )


def plot(runs: dict[str, list[Run]], out: Path) -> list[Path]:
    """Accuracy (main metric) vs round and vs cumulative MB, one line per group,
    the mean over its runs (at the rounds every run reports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for xkey, xlabel in (("round", "round"), ("mb", "cumulative MB (up + down)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, group in runs.items():
            curves = [curve(g) for g in group]
            n = min(len(c[0]) for c in curves)
            if n == 0:
                continue
            acc = np.mean([c[2][:n] for c in curves], 0)
            if xkey == "round":
                xs = curves[0][0][:n]
            else:
                xs = np.mean([c[1][:n] for c in curves], 0)
            metric = main_metric(group[0]["summary"])
            label = name if metric == SERVER_METRIC else f"{name} ({metric})"
            ax.plot(xs, acc, marker="o", label=label)
        if xkey == "mb":
            ax.set_xscale("symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (main metric)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"accuracy_vs_{xkey}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------- tuned sweeps
#: the file Hydra's Optuna sweeper leaves in a study's sweep folder
STUDY_FILE = "optimization_results.yaml"
#: the settings a tuned sweep may search, as config.yaml spells them
TUNED = ("train.lr", "train.local_epochs")


def trial(run: Run) -> dict[str, Any]:
    """One trial of a tuned sweep (a run with ``data.validation_fraction``): its
    number (Hydra's job number, the folder's prefix), its settings of
    :data:`TUNED` (from its ``config.yaml``), the final validation accuracy (the
    objective) and the final accuracy on the evaluation split (the reported one)."""
    from omegaconf import OmegaConf

    folder = Path(run["dir"])
    config = OmegaConf.load(folder / "config.yaml")
    number = folder.name.split("_", 1)[0]
    return {
        "trial": int(number) if number.isdigit() else None,
        **{key: OmegaConf.select(config, key) for key in TUNED},
        "validation_acc": run["summary"].get("final_validation_accuracy"),
        "test_acc": run["summary"].get(f"final_{SERVER_METRIC}"),
        "dir": str(folder),
    }


def tuned_studies(root: Path, runs: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Every tuned study among ``runs`` (:func:`load_runs` of ``root``: a folder of
    runs that held out a validation split), ``{"<strategy> (<folder>)": study}``:
    its trials in order, the best
    (highest validation accuracy, the earlier trial on a tie, as Optuna keeps it)
    and the sweeper's own ``optimization_results.yaml`` when present.
    """
    from omegaconf import OmegaConf

    folders: dict[tuple[str, Path], list[dict[str, Any]]] = defaultdict(list)
    for group in runs.values():
        for run in group:
            if run["summary"].get("final_validation_accuracy") is None:
                continue  # not tuned on a validation split
            key = (run["summary"]["strategy"], Path(run["dir"]).parent)
            folders[key].append(trial(run))
    studies = {}
    for (strategy, folder), trials in sorted(folders.items(), key=str):
        trials.sort(key=lambda x: (x["trial"] is None, x["trial"] or 0, x["dir"]))
        best = max(trials, key=lambda x: x["validation_acc"])  # first of ties
        results = folder / STUDY_FILE
        optuna = (
            OmegaConf.to_container(OmegaConf.load(results))
            if results.is_file()
            else None
        )
        where = folder.relative_to(root) if folder != root else Path(".")
        studies[f"{strategy} ({where})"] = {
            "strategy": strategy,
            "folder": str(folder),
            "trials": trials,
            "best": best,
            "optuna": optuna,
        }
    return studies


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tuned_markdown(studies: dict[str, dict[str, Any]]) -> str:
    """Each method at its best setting (chosen on validation accuracy, with the
    accuracy on the evaluation split it is reported by), then every trial."""
    head = "| study | trials | best trial | train.lr | train.local_epochs |"
    head += " validation acc (%) | test acc (%) |"
    lines = ["Each method at its best trial (chosen on the validation split):", ""]
    lines += [head, "|" + "---|" * 7]
    for name, study in studies.items():
        b = study["best"]
        cells = [name, len(study["trials"]), b["trial"], _value(b["train.lr"])]
        cells += [_value(b["train.local_epochs"])]
        cells += [_pct(b["validation_acc"]), _pct(b["test_acc"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Every trial:", ""]
    lines += [
        "| study | trial | train.lr | train.local_epochs | validation acc (%) "
        "| test acc (%) |",
        "|" + "---|" * 6,
    ]
    for name, study in studies.items():
        for x in study["trials"]:
            cells = [name, x["trial"], _value(x["train.lr"])]
            cells += [_value(x["train.local_epochs"])]
            cells += [_pct(x["validation_acc"]), _pct(x["test_acc"])]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


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
    studies = tuned_studies(args.root, runs)
    if studies:  # tuned sweeps: each method at its best trial, and every trial
        text = tuned_markdown(studies) + "\nAll runs:\n\n" + text
        (out / "tuned.json").write_text(json.dumps(studies, indent=2, default=str))
    (out / "report.md").write_text(text)
    plot(runs, out)
    print(text)
    print(
        f"written: {out / 'report.md'}, {out / 'accuracy_vs_round.png'}, "
        f"{out / 'accuracy_vs_mb.png'}"
    )


if __name__ == "__main__":
    main()
