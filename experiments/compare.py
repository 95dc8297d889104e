"""Compare the federated LoRA methods, each at its own tuned learning rate, over seeds.

    python -m experiments.compare             # every shared-rank method on SST-2
    python -m experiments.compare --quick     # toy size on synthetic data (smoke)
    python -m experiments.compare --methods fedavg_lora,rolora --lrs 1e-3,1e-2 \\
        --variant "fedavg_lora+adam:server_optimizer=adam,server_optimizer.eta=1e-3" \\
        train.local_epochs=2                  # trailing words: Hydra overrides

1. **Learning-rate sweep** (phase 1): every method at every ``--lrs`` value, on the
   first seed. A method's learning rate is the one with the best final accuracy,
   judged by its *main metric* (``summary.json``'s ``main_metric``: the server's
   ``eval_accuracy``, or FedSA-LoRA's personalised ``federated_eval_accuracy``);
   ties go to the first in ``--lrs`` order, and a choice at the sweep's edge is
   flagged (widen ``--lrs``).
2. **Seeds** (phase 2): every method at its chosen learning rate on the other seeds
   (the first seed's run is phase 1's).

Every run goes through the front door, ``python -m experiments.run`` in a
subprocess, into ``<out>/runs/<method>/lr<lr>_seed<seed>/`` (its log in
``<out>/logs/``). A run whose ``summary.json`` exists is not run again, so an
interrupted comparison resumes; one made with other settings is refused. Then
``<out>/compare.json`` (every run's figures, the sweep, the chosen learning rates,
the final table), ``compare.md`` and ``accuracy_vs_round.png`` /
``accuracy_vs_mb.png`` (mean over seeds, one line per method; tables and plots from
:mod:`experiments.report`).

One evaluation rule for every method: each client holds out
``data.client_eval_fraction`` = 0.1 of its examples and every client evaluates every
round (``federation.fraction_evaluate=1``). So all methods train on the same
examples, FedSA-LoRA gets its main metric, and the others' global models are scored
on the same client slices (``federated_eval_accuracy`` in the rows). Evaluation
traffic is not counted in the MB. Trailing overrides win over all of this.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import report
from fedlora.errors import ConfigError
from fedlora.results import SUMMARY_FILE

REPO = Path(__file__).resolve().parent.parent
#: the comparison of docs/results.md: 2,000 SST-2 phrases over 5 clients by
#: Dirichlet(0.5), 3 rounds, three learning rates, three seeds
FULL: dict[str, Any] = {
    "lrs": "1e-3,3e-3,1e-2",
    "seeds": "0,1,2",
    "rounds": 3,
    "examples": 2000,
    "eval_examples": None,  # SST-2's whole dev set (872)
    "clients": 5,
    "alpha": 0.5,
    "methods": None,  # every shared-rank method
}
#: smoke size: 2 methods x 2 lrs x 2 seeds, 1 round, synthetic data
QUICK: dict[str, Any] = {
    "lrs": "1e-3,1e-2",
    "seeds": "0,1",
    "rounds": 1,
    "examples": 200,
    "eval_examples": 60,
    "clients": 2,
    "alpha": 0.5,
    "methods": "fedavg_lora,ffa_lora",
}
CLIENT_EVAL_FRACTION = 0.1
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"  # Hydra's record of a run's


@dataclass(frozen=True)
class Arm:
    """One line of the comparison: a method, or a variant of one.

    Attributes
    ----------
    label : str
        Its name in tables, plots and folders (``fedavg_lora``,
        ``fedavg_lora+adam``).
    strategy : str
        The ``strategy=`` option it runs.
    overrides : tuple of str
        Hydra overrides of the variant (empty for a plain method).
    """

    label: str
    strategy: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    """One run: an arm at a learning rate (as written in ``--lrs``) and a seed."""

    arm: Arm
    lr: str
    seed: int

    def run_dir(self, out: Path) -> Path:
        """``<out>/runs/<label>/lr<lr>_seed<seed>``."""
        return out / "runs" / self.arm.label / f"lr{self.lr}_seed{self.seed}"

    def log_file(self, out: Path) -> Path:
        """``<out>/logs/<label>/lr<lr>_seed<seed>.log``: the run's output."""
        return out / "logs" / self.arm.label / f"lr{self.lr}_seed{self.seed}.log"

    def __str__(self) -> str:
        return f"{self.arm.label} lr={self.lr} seed {self.seed}"


# --- arguments --------------------------------------------------------------------
def split_list(text: str) -> list[str]:
    """The items of a comma-separated list, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def split_overrides(text: str) -> list[str]:
    """Split ``a=1,b=[x,y],c='p,q'`` at the commas outside brackets and quotes."""
    out, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            out.append(current.strip())
            current = ""
            continue
        current += char
    out.append(current.strip())
    return [o for o in out if o]


def parse_variant(text: str) -> Arm:
    """``NAME+TAG:override,override`` -> an :class:`Arm` running strategy ``NAME``
    with those overrides, labelled ``NAME+TAG``."""
    label, sep, rest = text.partition(":")
    label = label.strip()
    strategy = label.split("+", 1)[0]
    if not sep or "+" not in label or not strategy or not split_overrides(rest):
        raise ConfigError(
            "--variant",
            text,
            "write METHOD+TAG:OVERRIDE[,OVERRIDE...], e.g. "
            '"fedavg_lora+adam:server_optimizer=adam,server_optimizer.eta=1e-3"',
        )
    if not re.fullmatch(r"[\w+.-]+", label):
        raise ConfigError(
            "--variant", label, "a label may hold letters, digits and _ + . - only"
        )
    return Arm(label, strategy, tuple(split_overrides(rest)))


def _lr_value(lr: str) -> float:
    try:
        value = float(lr)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError("--lrs", lr, "every learning rate must be a number > 0")
    return value


def learning_rates(text: str) -> list[str]:
    """The distinct positive learning rates of ``--lrs``, as written."""
    lrs = split_list(text)
    values = [_lr_value(lr) for lr in lrs]
    if not lrs or len(set(values)) != len(values):
        raise ConfigError("--lrs", text, "give one or more distinct learning rates")
    return lrs


def seed_list(text: str) -> list[int]:
    """The distinct integer seeds of ``--seeds``."""
    try:
        seeds = [int(s) for s in split_list(text)]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds", text, "give one or more distinct integers")
    return seeds


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, with the ``--quick`` or full defaults filled in."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Trailing words are Hydra overrides given to every run.",
    )
    ap.add_argument(
        "--methods",
        help="comma-separated strategies (default: every method of "
        "fedlora.methods.available() that trains one rank on every client)",
    )
    ap.add_argument(
        "--variant",
        "--variants",
        dest="variants",
        action="append",
        default=[],
        metavar="NAME+TAG:OVERRIDES",
        help="a method with overrides, e.g. "
        '"fedavg_lora+adam:server_optimizer=adam,server_optimizer.eta=1e-3" '
        "(repeatable)",
    )
    ap.add_argument("--lrs", help=f"learning rates to sweep (default {FULL['lrs']})")
    ap.add_argument("--seeds", help=f"seeds (default {FULL['seeds']})")
    ap.add_argument("--rounds", type=int, help=f"default {FULL['rounds']}")
    ap.add_argument("--examples", type=int, help="training examples in all")
    ap.add_argument("--eval-examples", type=int, help="server evaluation examples")
    ap.add_argument("--clients", type=int, help=f"default {FULL['clients']}")
    ap.add_argument(
        "--alpha", type=float, help="Dirichlet concentration of the split (0.5)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "results/compare")
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO / "../shared/data/sst2",
        help="SST-2 folder (train.tsv, dev.tsv); unused with --quick",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="toy size on synthetic data: "
        + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_intermixed_args(list(argv))
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- the plan -----------------------------------------------------------------------
def base_overrides(args: argparse.Namespace) -> list[str]:
    """Every run's overrides before its method, learning rate and seed."""
    n = int(args.clients)
    if args.quick:
        data = ["data=synthetic", f"data.num_examples={int(args.examples)}"]
    else:
        if not (args.data / "train.tsv").is_file():
            raise ConfigError(
                "--data",
                str(args.data),
                "no train.tsv there; give the SST-2 folder (train.tsv, dev.tsv)",
            )
        data = ["data=sst2", f"data.path={_path(args.data)}"]
    evals = "null" if args.eval_examples is None else int(args.eval_examples)
    return [
        *data,
        f"data.max_train_examples={int(args.examples)}",
        f"data.max_eval_examples={evals}",
        f"data.client_eval_fraction={CLIENT_EVAL_FRACTION}",
        f"federation.num_clients={n}",
        f"federation.min_train_clients={n}",
        f"federation.rounds={int(args.rounds)}",
        "federation.fraction_train=1.0",
        "federation.fraction_evaluate=1",
        "partition.type=dirichlet",
        f"partition.alpha={float(args.alpha)}",
        "quiet=true",
    ]


def _path(path: Path) -> str:
    """An absolute path as a Hydra override value (quoted when it needs it)."""
    text = str(Path(path).resolve())
    return text if re.fullmatch(r"[\w/.+-]+", text) else "'" + text + "'"


def run_overrides(spec: Spec, base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The overrides of one run (the user's ``extra`` last, so they win)."""
    return [
        *base,
        f"strategy={spec.arm.strategy}",
        f"train.lr={spec.lr}",
        f"federation.seed={spec.seed}",
        *spec.arm.overrides,
        *extra,
    ]


def per_client_rank(overrides: Sequence[str]) -> bool:
    """Whether the method these overrides compose gives clients their own rank
    (its ``client_overrides`` set ``r`` for some client)."""
    from fedlora.methods import from_settings
    from strategies.server_app import compose_settings

    settings = compose_settings(list(overrides))
    method = from_settings(settings)
    n = int(settings.federation.num_clients)
    return any("r" in method.client_overrides(p) for p in range(n))


def default_methods(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Every method of :func:`fedlora.methods.available` with a
    ``conf/strategy/`` option that trains one shared rank on every client."""
    from fedlora.methods import available
    from strategies.server_app import CONF_DIR

    out = []
    for name in sorted(available()):
        if not (Path(CONF_DIR) / "strategy" / f"{name}.yaml").is_file():
            print(f"[compare] leaving out {name}: no conf/strategy/{name}.yaml")
        elif per_client_rank([*base, f"strategy={name}", *extra]):
            print(f"[compare] leaving out {name}: its clients train their own ranks")
        else:
            out.append(name)
    return out


def check(
    arms: Sequence[Arm], lr: str, base: Sequence[str], extra: Sequence[str]
) -> None:
    """Compose every arm's configuration (at learning rate ``lr``) before any run;
    raise one error that lists every problem."""
    from hydra.errors import HydraException

    from strategies.server_app import compose

    problems = []
    for arm in arms:
        try:
            compose(run_overrides(Spec(arm, lr, 0), base, extra))
        except (ValueError, HydraException) as exc:  # ConfigError is a ValueError
            problems.append(f"{arm.label}: {exc}")
    if problems:
        raise ConfigError(
            "the runs' configuration",
            f"{len(problems)} arm(s)",
            "fix these before anything runs:\n  " + "\n  ".join(problems),
        )


# --- running ------------------------------------------------------------------------
Launcher = Callable[[Spec, list[str], Path, Path], int]


def launch(spec: Spec, overrides: list[str], run_dir: Path, log: Path) -> int:
    """Run ``python -m experiments.run`` for one spec; return its exit status."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        *overrides,
        f"hydra.run.dir={_path(run_dir)}",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(shlex.join(cmd) + "\n")
        fh.flush()
        return subprocess.run(
            cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT
        ).returncode


def recorded_overrides(run_dir: Path) -> list[str] | None:
    """The overrides Hydra recorded for a run (None when it recorded none)."""
    path = run_dir / OVERRIDES_FILE
    if not path.is_file():
        return None
    import yaml

    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


class Runner:
    """Runs (or finds) specs one after another, printing ``run i/n`` progress.

    Parameters
    ----------
    out : Path
        The comparison's folder.
    base, extra : list of str
        Every run's overrides (:func:`base_overrides`) and the user's own.
    total : int
        The planned number of runs (for the progress lines).
    launcher : callable
        ``launcher(spec, overrides, run_dir, log) -> exit status`` (tests fake it).
    """

    def __init__(
        self,
        out: Path,
        base: list[str],
        extra: list[str],
        total: int,
        launcher: Launcher = launch,
    ) -> None:
        self.out, self.base, self.extra = out, base, extra
        self.total, self.launcher, self.done = total, launcher, 0
        self.records: list[dict[str, Any]] = []

    def __call__(self, spec: Spec, phase: int) -> report.Run | None:
        """The run of ``spec`` (None when it failed); run it unless it is done."""
        self.done += 1
        overrides = run_overrides(spec, self.base, self.extra)
        run_dir = spec.run_dir(self.out)
        head = f"[compare] run {self.done}/{self.total}: {spec}"
        started = time.perf_counter()
        if (run_dir / SUMMARY_FILE).is_file():
            self._same_settings(run_dir, overrides)
            status = "found"
        else:
            if run_dir.exists():  # an interrupted run: start it again
                import shutil

                shutil.rmtree(run_dir)
            print(f"{head} ...", flush=True)
            code = self.launcher(spec, overrides, run_dir, spec.log_file(self.out))
            status = "ran" if code == 0 and (run_dir / SUMMARY_FILE).is_file() else ""
            if not status:
                log = spec.log_file(self.out)
                print(f"{head} FAILED (exit {code}); its output: {log}", flush=True)
                self.records.append(_record(spec, phase, None, "failed", 0.0, log))
                return None
        seconds = time.perf_counter() - started
        run = report.load_run(run_dir)
        acc = report.final_accuracy(run["summary"])
        shown = "no " + report.main_metric(run["summary"]) if acc is None else ""
        shown = shown or f"{100 * acc:.1f}%"
        when = "already done" if status == "found" else f"in {seconds:.0f} s"
        print(f"{head} ... {shown} {when}", flush=True)
        self.records.append(_record(spec, phase, run, status, seconds, None))
        return run

    def _same_settings(self, run_dir: Path, overrides: list[str]) -> None:
        found = recorded_overrides(run_dir)
        if found is not None and found != overrides:
            changed = sorted(set(found) ^ set(overrides))
            raise ConfigError(
                "--out",
                str(self.out),
                f"{run_dir} was run with other settings (differing overrides: "
                f"{', '.join(changed)}); use another --out, or delete that folder",
            )


def _record(
    spec: Spec,
    phase: int,
    run: report.Run | None,
    status: str,
    seconds: float,
    log: Path | None,
) -> dict[str, Any]:
    """One run's entry in ``compare.json``."""
    out: dict[str, Any] = {
        "label": spec.arm.label,
        "strategy": spec.arm.strategy,
        "lr": spec.lr,
        "seed": spec.seed,
        "phase": phase,
        "status": status,  # ran | found (an earlier invocation ran it) | failed
        "process_seconds": round(seconds, 1) if status == "ran" else None,
    }
    if run is None:
        return {**out, "log": str(log)}
    s = run["summary"]
    rounds, mb, acc = report.curve(run)
    return {
        **out,
        "dir": run["dir"],
        "main_metric": report.main_metric(s),
        "final_acc": report.final_accuracy(s),
        "best_acc": report.best_accuracy(s),
        "server_final_acc": s.get("final_eval_accuracy"),
        "mb": report.megabytes(s),
        "mean_aggregation_error": s.get("mean_aggregation_error"),
        "wall_time": s.get("wall_time"),
        "curve": {"round": rounds, "cumulative_mb": mb, "accuracy": acc},
    }


# --- selection and tables -----------------------------------------------------------
def choose_lr(scores: dict[str, float | None]) -> str | None:
    """The learning rate with the highest score (ties: the first in order; None
    scores, failed or missing runs, never win); None when no score exists."""
    best, best_score = None, float("-inf")
    for lr, score in scores.items():
        if score is not None and score > best_score:
            best, best_score = lr, score
    return best


def at_edge(lr: str, lrs: Sequence[str]) -> bool:
    """Whether ``lr`` is the smallest or largest of a sweep of 3 or more values."""
    values = sorted(_lr_value(x) for x in lrs)
    return len(values) >= 3 and _lr_value(lr) in (values[0], values[-1])


def sweep_scores(
    sweep: dict[str, dict[str, report.Run | None]],
) -> dict[str, dict[str, float | None]]:
    """``{label: {lr: final main-metric accuracy}}`` of phase 1 (None: failed)."""
    return {
        label: {
            lr: None if run is None else report.final_accuracy(run["summary"])
            for lr, run in by_lr.items()
        }
        for label, by_lr in sweep.items()
    }


def sweep_markdown(scores: dict[str, dict[str, float | None]], seed: int) -> str:
    """The sweep table: final accuracy (%) per method and learning rate, the chosen
    one in bold."""
    lrs = list(dict.fromkeys(lr for by_lr in scores.values() for lr in by_lr))
    lines = [
        f"| method (seed {seed}) | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for label, by_lr in scores.items():
        chosen = choose_lr(by_lr)
        cells = []
        for lr in lrs:
            value = by_lr.get(lr)
            cell = "failed" if value is None else f"{100 * value:.1f}"
            cells.append(f"**{cell}**" if lr == chosen else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def final_tables(
    groups: dict[str, list[report.Run]], chosen: dict[str, str]
) -> tuple[dict[str, Any], str]:
    """``({label: figures}, markdown)`` of phase 2: each method at its chosen
    learning rate, mean ± std over seeds (:func:`experiments.report.markdown`)."""
    figures = {
        label: {"lr": chosen[label], **report.group_figures(runs)}
        for label, runs in groups.items()
    }
    table = report.markdown(groups, extra={"lr": dict(chosen)})
    return figures, table


# --- the comparison -----------------------------------------------------------------
def compare(
    args: argparse.Namespace, launcher: Launcher | None = None
) -> dict[str, Any]:
    """Run (or resume) the comparison of ``args`` and write its files; return what
    ``compare.json`` holds (``launcher``: :func:`launch` unless given)."""
    lrs, seeds = learning_rates(args.lrs), seed_list(args.seeds)
    base, extra, out = base_overrides(args), list(args.overrides), args.out
    names = split_list(args.methods) if args.methods else default_methods(base, extra)
    arms = [Arm(n, n) for n in names] + [parse_variant(v) for v in args.variants]
    labels = [a.label for a in arms]
    if not arms or len(set(labels)) != len(labels):
        raise ConfigError("--methods/--variant", labels, "give distinct methods")
    check(arms, lrs[0], base, extra)
    total = len(arms) * (len(lrs) + len(seeds) - 1)
    print(
        f"[compare] {total} runs into {out}: {len(arms)} methods ({', '.join(labels)})"
        f" x lrs {', '.join(lrs)} on seed {seeds[0]}, then x {len(seeds) - 1} more "
        "seeds at each method's best lr",
        flush=True,
    )
    run = Runner(out, base, extra, total, launcher or launch)

    # 1. the learning-rate sweep on the first seed
    sweep = {a.label: {lr: run(Spec(a, lr, seeds[0]), 1) for lr in lrs} for a in arms}
    scores = sweep_scores(sweep)
    chosen = {label: choose_lr(by_lr) for label, by_lr in scores.items()}
    for label, lr in chosen.items():
        if lr is None:
            print(f"[compare] {label}: no learning rate gave a result; left out")
        elif at_edge(lr, lrs):
            print(f"[compare] {label}: lr {lr} is at the sweep's edge; widen --lrs")

    # 2. the other seeds at each method's chosen learning rate
    groups: dict[str, list[report.Run]] = {}
    for arm in arms:
        lr = chosen[arm.label]
        if lr is None:
            run.done += len(seeds) - 1
            continue
        found = [sweep[arm.label][lr]]
        found += [run(Spec(arm, lr, seed), 2) for seed in seeds[1:]]
        groups[arm.label] = [r for r in found if r is not None]

    # 3. tables, plots, JSON
    final, table = final_tables(groups, {k: v for k, v in chosen.items() if v})
    result = {
        "command": shlex.join(
            ["python", "-m", "experiments.compare", *getattr(args, "argv", [])]
        ),
        "settings": {
            "methods": labels,
            "variants": {a.label: list(a.overrides) for a in arms if a.overrides},
            "lrs": lrs,
            "seeds": seeds,
            "overrides": base,
            "extra_overrides": extra,
            "selection": "per method, the lr with the best final main-metric "
            f"accuracy on seed {seeds[0]} (ties: the first in --lrs order)",
        },
        "runs": run.records,
        "sweep": scores,
        "chosen_lr": chosen,
        "chosen_lr_at_edge": {
            k: v is not None and at_edge(v, lrs) for k, v in chosen.items()
        },
        "final": final,
        "failed": [r for r in run.records if r["status"] == "failed"],
    }
    write(out, result, sweep_markdown(scores, seeds[0]), table, groups)
    return result


def write(
    out: Path,
    result: dict[str, Any],
    sweep_md: str,
    final_md: str,
    groups: dict[str, list[report.Run]],
) -> None:
    """Write ``compare.json``, ``compare.md`` and the plots into ``out``; print the
    tables."""
    out.mkdir(parents=True, exist_ok=True)
    s = result["settings"]
    text = (
        "# Method comparison\n\n"
        f"`{result['command']}`\n\n"
        f"Runs' overrides: `{' '.join(s['overrides'] + s['extra_overrides'])}`.\n\n"
        f"## Learning-rate sweep (final accuracy, %, seed {s['seeds'][0]})\n\n"
        f"{sweep_md}\n"
        f"## Each method at its best learning rate, seeds "
        f"{', '.join(map(str, s['seeds']))}\n\n"
        f"{final_md}"
    )
    by_rank = report.rank_markdown(groups) if groups else ""
    if by_rank:
        text += f"\n### Traffic by client rank (seeds at the chosen lr)\n\n{by_rank}"
    edges = [k for k, v in result["chosen_lr_at_edge"].items() if v]
    if edges:
        text += f"\nChosen at the sweep's edge (widen `--lrs`): {', '.join(edges)}.\n"
    if result["failed"]:
        failed = ", ".join(
            f"{r['label']} lr={r['lr']} seed {r['seed']}" for r in result["failed"]
        )
        text += f"\nFailed runs (left out): {failed}.\n"
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    plots = report.plot(groups, out) if groups else []
    print("\n" + text)
    print(f"[compare] wrote {out / 'compare.json'}, {out / 'compare.md'}", end="")
    print("".join(f", {p}" for p in plots))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.compare``: parse, run, write; exit 1 when a run
    failed, 2 on a configuration error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        args.argv = argv
        result = compare(args)
    except ConfigError as exc:
        print(f"[compare] configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["failed"]:
        raise SystemExit(f"[compare] {len(result['failed'])} run(s) failed; see above")


if __name__ == "__main__":
    main()
