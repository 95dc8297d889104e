"""The run directory: per-round metrics, summary, plots and the final PEFT adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.adapters import set_state

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one round's metrics as a JSON line (flushed, so a crash keeps it)."""
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rounds' metrics of a run directory."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(rounds: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Final/best accuracy (or loss), traffic totals, mean aggregation error."""
    trained = [r for r in rounds if r["round"] > 0]
    traffic = rounds  # round 0 carries one-time costs (Fed-SB's init round)
    key = "eval_accuracy" if any("eval_accuracy" in r for r in rounds) else "eval_loss"
    values = [r[key] for r in rounds if r.get(key) is not None]
    best = (max if key == "eval_accuracy" else min)(values) if values else None
    errors = [
        r["aggregation_error"]
        for r in trained
        if r.get("aggregation_error") is not None
    ]
    federated = [
        r["federated_eval_accuracy"]
        for r in trained
        if r.get("federated_eval_accuracy") is not None
    ]
    held = [r for r in rounds if r.get("validation_accuracy") is not None]
    if held:  # data.validation_fraction: the tuning objective, not the report
        extra = {
            **extra,
            "final_validation_accuracy": held[-1]["validation_accuracy"],
            "best_validation_accuracy": max(r["validation_accuracy"] for r in held),
        }
    if federated:  # the clients' own evaluation (FedSA-LoRA's main metric)
        extra = {
            **extra,
            "final_federated_eval_accuracy": federated[-1],
            "best_federated_eval_accuracy": max(federated),
        }
    return _jsonable(
        {
            **extra,
            "rounds": len(trained),
            f"final_{key}": values[-1] if values else None,
            f"best_{key}": best,
            "total_bytes_up": sum(r.get("bytes_up", 0) for r in traffic),
            "total_bytes_down": sum(r.get("bytes_down", 0) for r in traffic),
            "mean_aggregation_error": float(np.mean(errors)) if errors else None,
            "failures": sum(r.get("failures", 0) for r in trained),
            **_privacy_summary(rounds),
        }
    )


def _privacy_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final epsilon per client and its maximum (DP-SGD); client-level epsilon
    (central or distributed DP)."""
    out: dict[str, Any] = {}
    with_eps = [r for r in rounds if r.get("epsilon")]
    if with_eps:
        out["epsilon_per_client"] = with_eps[-1]["epsilon"]
        out["epsilon_max"] = with_eps[-1]["epsilon_max"]
    for mode in ("central", "distributed"):
        spent = [r for r in rounds if r.get(f"{mode}_epsilon") is not None]
        if spent:
            out[f"{mode}_epsilon"] = spent[-1][f"{mode}_epsilon"]
            out[f"{mode}_delta"] = spent[-1][f"{mode}_delta"]
    return out


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json``."""
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def plot_run(run_dir: Path, rounds: list[dict[str, Any]]) -> list[Path]:
    """Accuracy (or loss) vs round and vs cumulative megabytes, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "eval_accuracy" if any("eval_accuracy" in r for r in rounds) else "eval_loss"
    rows = [r for r in rounds if r.get(key) is not None]
    xs_round = [r["round"] for r in rows]
    cumulative, total = [], 0.0
    for r in rows:
        total += (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6
        cumulative.append(total)
    plots = Path(run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for xs, xlabel, name in (
        (xs_round, "round", "accuracy_vs_round"),
        (cumulative, "cumulative MB (up + down)", "accuracy_vs_mb"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, [r[key] for r in rows], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"server {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(plots / f"{name}.png")
    eps_rows = [r for r in rounds if r.get("epsilon_max") is not None]
    if eps_rows:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        clients = sorted({c for r in eps_rows for c in r["epsilon"]}, key=int)
        for c in clients:
            ax.plot(
                [r["round"] for r in eps_rows],
                [r["epsilon"].get(c) for r in eps_rows],
                marker=".",
                label=c,
            )
        ax.set_xlabel("round")
        ax.set_ylabel("epsilon spent (per client)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots / "epsilon_vs_round.png", dpi=100)
        plt.close(fig)
        written.append(plots / "epsilon_vs_round.png")
    return written


def save_adapter(
    model: torch.nn.Module, state: dict[str, np.ndarray], out: Path
) -> Path:
    """Save ``state`` in PEFT format (``PeftModel.from_pretrained`` loads it)."""
    set_state(model, state)
    model.save_pretrained(str(out))
    return Path(out)


def save_tensor_files(folder: Path, files: dict[str, dict[str, np.ndarray]]) -> None:
    """Save each ``{file name: tensors}`` entry as ``folder/<file name>``
    (safetensors, the arrays' own dtypes).

    Raises
    ------
    ValueError
        A file name that is not a plain name in ``folder``.
    """
    from safetensors.numpy import save_file

    for name, tensors in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(Path(folder) / name),
        )
