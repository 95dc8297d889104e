"""Does secure aggregation cost accuracy? FedAvg-LoRA on SST-2, plain against
``secure_aggregation=secaggplus``, on the same seeds, data split and learning rate.

    HF_HUB_OFFLINE=1 python -m experiments.secagg_sst2 [--out results/secagg_sst2]
    HF_HUB_OFFLINE=1 python -m experiments.secagg_sst2 --quick    # smoke, synthetic

Runs through :mod:`experiments.compare` (its folders, resume and ``compare.json``)
with two arms, ``fedavg_lora`` and the variant ``fedavg_lora+secagg``, at one
learning rate (3e-3, FedAvg-LoRA's tuned one in docs/results.md): MiniLM, 1,000
SST-2 phrases over 5 clients by Dirichlet(0.5), 3 rounds, batch 16, the server's
accuracy on the whole dev set. Client evaluation is off (it is not what is
compared). Then prints and saves (``<out>/secagg_sst2.json``) the per-seed final
accuracies, mean ± std of each arm and of the per-seed difference (secure - plain).
Options and trailing Hydra overrides are those of ``experiments.compare`` and come
after these defaults, so they win.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments import compare, report
from fedlora.errors import ConfigError

PLAIN, SECURE = "fedavg_lora", "fedavg_lora+secagg"
DEFAULTS = [
    f"--methods={PLAIN}",
    f"--variant={SECURE}:secure_aggregation=secaggplus",
    "--lrs=3e-3",
    "--seeds=0,1,2",
    "--out=" + str(compare.REPO / "results/secagg_sst2"),
]
FULL = ["--rounds=3", "--examples=1000", "--clients=5"]
RUN = [
    "train.batch_size=16",
    "data.client_eval_fraction=0",
    "federation.fraction_evaluate=0",
]


def paired(result: dict[str, Any]) -> dict[str, Any]:
    """Per-seed final accuracy of both arms and their difference (secure - plain),
    each summarised by :func:`experiments.report.stats`."""
    acc: dict[str, dict[int, float | None]] = {PLAIN: {}, SECURE: {}}
    for rec in result["runs"]:
        acc[rec["label"]][rec["seed"]] = rec.get("final_acc")
    seeds = result["settings"]["seeds"]
    diff = [
        None
        if acc[PLAIN].get(s) is None or acc[SECURE].get(s) is None
        else acc[SECURE][s] - acc[PLAIN][s]
        for s in seeds
    ]
    return {
        "seeds": seeds,
        "plain": report.stats([acc[PLAIN].get(s) for s in seeds]),
        "secure": report.stats([acc[SECURE].get(s) for s in seeds]),
        "difference": report.stats(diff),
    }


def markdown(table: dict[str, Any]) -> str:
    """The per-seed table (accuracy in %) with a mean ± std row."""
    lines = ["| seed | plain | secaggplus | secure - plain |", "|---|---|---|---|"]
    cols = [table[k]["values"] for k in ("plain", "secure", "difference")]
    for i, seed in enumerate(table["seeds"]):
        cells = [f"{100 * c[i]:.2f}" if i < len(c) else "-" for c in cols]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [report.mean_std(c, scale=100) for c in cols]
    lines.append("| mean ± std | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def main(
    argv: Sequence[str] | None = None, launcher: compare.Launcher | None = None
) -> None:
    """Run (or resume) both arms, then print and save the paired table
    (``launcher``: :func:`experiments.compare.launch` unless given)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = "--quick" in argv
    full = [*DEFAULTS, *([] if quick else FULL)]
    try:
        args = compare.parse_args([*full, *argv])
        args.overrides = [*RUN, *args.overrides]  # the user's come last and win
        args.argv = [*full, *argv]
        result = compare.compare(args, launcher)
    except ConfigError as exc:
        print(f"[secagg_sst2] configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    table = paired(result)
    text = markdown(table)
    print("\nFinal server accuracy (%), plain vs secure aggregation\n\n" + text)
    out = {
        "command": shlex.join(["python", "-m", "experiments.secagg_sst2", *argv]),
        "compare_command": result["command"],
        "overrides": result["settings"]["overrides"]
        + result["settings"]["extra_overrides"],
        "table": table,
        "markdown": text,
        "runs": result["runs"],
    }
    path = Path(args.out) / "secagg_sst2.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[secagg_sst2] wrote {path}")
    if result["failed"]:
        raise SystemExit(f"[secagg_sst2] {len(result['failed'])} run(s) failed")


if __name__ == "__main__":
    main()
