"""Hydra sweeps: one Ray head for all runs against a Ray per run.

    HF_HUB_OFFLINE=1 python -m experiments.bench_sweep [--out results/bench_sweep.json]
    HF_HUB_OFFLINE=1 python -m experiments.bench_sweep --quick     # 2 runs, 1 round

The same 4-run sweep (``federation.seed=0,1,2,3``, MiniLM on the synthetic task, 3
clients, 2 rounds) through the front door twice in one invocation: with
``simulation.shared_ray=false`` (each run starts and stops its own Ray, as Flower's
engine does) and with the default shared head. Figures: each sweep's wall time
(process start to exit), the runs' own time (``summary.json``'s ``wall_time``: from
the ServerApp's start to its end, the compute plus the run's start-up inside Ray),
``shared / per_run`` and ``shared / runs' own time``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def sweep(out: Path, runs: int, rounds: int, shared: bool) -> dict[str, Any]:
    """Run one sweep into ``out``; its wall time and its runs' own times."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "-m",
        f"hydra.sweep.dir={out}",
        f"federation.seed={','.join(str(i) for i in range(runs))}",
        "federation.num_clients=3",
        f"federation.rounds={rounds}",
        "data.num_examples=240",
        "data.num_eval_examples=60",
        "train.batch_size=16",
        "quiet=true",
        f"simulation.shared_ray={str(shared).lower()}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the sweep failed:\n{proc.stderr[-3000:]}")
    summaries = sorted(out.glob("*/summary.json"))
    own = [json.loads(p.read_text())["wall_time"] for p in summaries]
    if len(own) != runs:
        raise RuntimeError(f"{len(own)} of {runs} runs wrote a summary in {out}")
    return {"wall_s": wall, "runs_own_s": own, "runs_own_total_s": sum(own)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "results/bench_sweep.json")
    ap.add_argument("--quick", action="store_true", help="2 runs of 1 round")
    args = ap.parse_args(argv)
    runs, rounds = (2, 1) if args.quick else (4, 2)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[bench_sweep] {runs} runs x {rounds} rounds, a Ray per run ...")
        per_run = sweep(Path(tmp) / "per_run", runs, rounds, shared=False)
        print(f"[bench_sweep]   {per_run['wall_s']:.1f} s; one shared Ray head ...")
        shared = sweep(Path(tmp) / "shared", runs, rounds, shared=True)
        print(f"[bench_sweep]   {shared['wall_s']:.1f} s")
    ratio = shared["wall_s"] / per_run["wall_s"]
    over_own = shared["wall_s"] / shared["runs_own_total_s"]
    results = {
        "sweep": {
            "runs": runs,
            "rounds": rounds,
            "per_run_ray": per_run,
            "shared_ray": shared,
            "ratio": ratio,
            "goal": "< 1 (shared head faster than a Ray per run)",
            "met": ratio < 1,
            "shared_over_runs_own": over_own,
            "per_run_over_runs_own": per_run["wall_s"] / per_run["runs_own_total_s"],
        }
    }
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": args.quick,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    r = results["sweep"]
    print(
        f"| sweep of {runs} runs | shared head {shared['wall_s']:.1f} s | a Ray per "
        f"run {per_run['wall_s']:.1f} s | ratio {ratio:.3f} | runs' own time "
        f"{shared['runs_own_total_s']:.1f} s (sweep / own: shared "
        f"{r['shared_over_runs_own']:.2f}, per run {r['per_run_over_runs_own']:.2f}) |"
    )
    print(f"[bench_sweep] saved {args.out}")


if __name__ == "__main__":
    main()
