"""What a run prints: one line per round, a summary table at the end, and the
libraries' own chatter hushed unless ``verbose=true``.

``quiet=true`` prints nothing but errors and warnings; ``verbose=true`` shows
Flower's round logs and the libraries' warnings as they come. Between the two (the
default) a run prints its run directory, one line per round (clients, accuracy or
perplexity, loss, aggregation error, megabytes, elapsed time and an estimate of the
time left) and a short table at the end. Everything printed is also in the run
directory (``metrics.jsonl``, ``summary.json``).
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

MB = 1e6

#: warnings and log records that are known, understood and not the user's concern;
#: each is matched narrowly (category or logger, and the start of its message)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # transformers 5 renamed it; PEFT (0.21) still calls the old name when it
    # wraps a model: nothing a user can change
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
)
#: Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``
#: (the front door calls it on purpose; ``flwr run .`` is documented beside it), and
#: its notice that it stops the simulated clients' actors at the run's end
KNOWN_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("flwr", "DEPRECATED FEATURE: The `run_simulation` function"),
    # each simulated client's actor, stopped as the run ends (by design)
    ("flwr", "Manually terminating ClientAppActor"),
)


class _DropKnown(logging.Filter):
    """Drops the records of :data:`KNOWN_LOG_RECORDS` for one logger."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip()
        return not message.startswith(self.starts)


def hush_libraries(verbose: bool) -> None:
    """Quiet what the libraries print around our own lines, unless ``verbose``:
    Flower's INFO logs (its per-round narration and the config it echoes), the
    known warnings and notices above, transformers' progress bars and info logs.
    Warnings and errors that are not known stay visible."""
    if verbose:
        return
    for category, start in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=_regex(start), category=category)
    by_logger: dict[str, list[str]] = {}
    for name, start in KNOWN_LOG_RECORDS:
        by_logger.setdefault(name, []).append(start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(tuple(starts)))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _regex(start: str) -> str:
    import re

    return re.escape(start)


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Progress:
    """One line per evaluated round (round 0 is the initial model).

    The time left is the mean time of the rounds this process ran (round 0's
    start-up excluded) times the rounds still to run.

    Parameters
    ----------
    rounds : int
        The run's last round.
    quiet : bool
        Print nothing.
    stream : file, optional
        Where to print (default: standard output).
    """

    def __init__(self, rounds: int, quiet: bool = False, stream: TextIO | None = None):
        self.rounds = int(rounds)
        self.quiet = quiet
        self.stream = stream
        self._first: tuple[int, float] | None = None  # (round, wall time) seen first
        self._mb = 0.0

    def line(self, row: Mapping[str, Any]) -> str:
        """The line for one round's metrics row (``metrics.jsonl``)."""
        rnd, wall = int(row["round"]), float(row.get("wall_time") or 0.0)
        if self._first is None:
            self._first = (rnd, wall)
        self._mb += (row.get("bytes_up", 0) + row.get("bytes_down", 0)) / MB
        if "eval_accuracy" in row:
            score = f"acc {row['eval_accuracy']:.4f}"
        else:
            score = f"ppl {row.get('eval_perplexity', float('nan')):.3f}"
        parts = [f"[fedlora] round {rnd}/{self.rounds}:"]
        if rnd > 0:
            sampled = row.get("clients_sampled")
            ok = f"clients {row['clients']}" + (f"/{sampled}" if sampled else "")
            failed = row.get("failures", 0)
            parts.append(ok + (f" ok, {failed} failed |" if failed else " ok |"))
        parts.append(f"{score}, loss {row.get('eval_loss', float('nan')):.4f}")
        err = row.get("aggregation_error")
        if err is not None:
            parts.append(f"| agg_error {err:.3g}")
        if row.get("epsilon_max") is not None:
            parts.append(f"| eps {row['epsilon_max']:.2f}")
        for mode in ("central", "distributed"):  # client-level DP
            if row.get(f"{mode}_epsilon") is not None:
                parts.append(f"| {mode} eps {row[f'{mode}_epsilon']:.2f}")
        parts.append(f"| {self._mb:.2f} MB | {_fmt_seconds(wall)}")
        first_round, first_wall = self._first
        ran = rnd - first_round
        if ran > 0 and rnd < self.rounds:
            eta = (wall - first_wall) / ran * (self.rounds - rnd)
            parts.append(f"(ETA {_fmt_seconds(eta)})")
        return " ".join(parts)

    def __call__(self, row: Mapping[str, Any]) -> None:
        """Print the line for ``row`` (nothing when quiet)."""
        line = self.line(row)
        if not self.quiet:
            print(line, file=self.stream or sys.stdout, flush=True)


def summary_table(summary: Mapping[str, Any], run_dir: str) -> str:
    """A short table of ``summary.json``'s main figures and where the run is."""
    rows: list[tuple[str, str]] = []

    def add(label: str, value: Any, fmt: str = "{}") -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            rows.append((label, fmt.format(value)))

    add("method", summary.get("strategy"))
    add("rounds", summary.get("rounds"))
    for key, label in (
        ("final_eval_accuracy", "final accuracy"),
        ("best_eval_accuracy", "best accuracy"),
        ("final_eval_loss", "final loss"),
        ("final_eval_perplexity", "final perplexity"),
        ("final_federated_eval_accuracy", "clients' own accuracy"),
        ("final_validation_accuracy", "validation accuracy"),
    ):
        add(label, summary.get(key), "{:.4f}")
    add("mean aggregation error", summary.get("mean_aggregation_error"), "{:.3g}")
    up, down = summary.get("total_bytes_up"), summary.get("total_bytes_down")
    if up is not None and down is not None:
        rows.append(("traffic", f"{up / MB:.2f} MB up, {down / MB:.2f} MB down"))
    add("failed client rounds", summary.get("failures") or None)
    add("epsilon (max over clients)", summary.get("epsilon_max"), "{:.3f}")
    add("central epsilon", summary.get("central_epsilon"), "{:.3f}")
    add(
        "client-level epsilon (distributed)",
        summary.get("distributed_epsilon"),
        "{:.3f}",
    )
    add("wall time", summary.get("wall_time"), "{:.0f} s")
    rows.append(("run directory", str(run_dir)))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
