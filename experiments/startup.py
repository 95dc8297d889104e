"""What a deployed ClientApp process spends before it trains, in CPU seconds by phase.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message, so a
deployment pays this twice per node and round (train and evaluate). One child
interpreter per measurement does what such a process does before training:

1. ``process``: the interpreter starts and imports Flower's ClientApp runtime (the
   ``flwr-clientapp`` entry point's module);
2. ``imports``: ``import clients.client_app`` (the app itself);
3. ``model``: the ClientApp's ``_setup`` (settings, labels, the model built by
   ``fedlora.build.build_cached``, the global adapter loaded from the message's
   arrays, the trainable set);
4. ``data``: ``fedlora.data.client_examples`` with the node's ``<data-dir>/cache``.

CPU seconds are ``time.process_time`` of the child (all its threads) at the phase
boundaries; ``total`` is the child's CPU when training would start.

    python -m experiments.startup [--model minilm|tiny] [--repeats 3] [overrides...]
"""

from __future__ import annotations

import time

_T0 = time.process_time()  # noqa: E402  (before any other import of this module)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHASES = ("process", "imports", "model", "data")
#: the issue's goal for one ClientApp process's CPU before it trains (seconds)
GOAL_S = 3.0
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def child_main(request: Path) -> dict[str, Any]:
    """One ClientApp process's work before training (in a fresh interpreter):
    CPU seconds by phase, and the modules it imported that training never needs."""
    marks = {"start": _T0}
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (flwr-clientapp's own)

    marks["process"] = time.process_time()
    from clients import client_app

    marks["imports"] = time.process_time()
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.wire import (
        KEY_ARRAYS,
        KEY_CONFIG,
        KEY_EXPERIMENT,
        KEY_ROUND,
        KEY_RUN_ID,
        state_to_record,
    )

    args = json.loads(request.read_text())
    # as Flower's pull_task_input sets them before the app runs
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    with np.load(args["arrays"]) as saved:
        arrays = {k: saved[k] for k in saved.files}
    config = ConfigRecord(
        {
            KEY_EXPERIMENT: args["settings"],
            KEY_ROUND: 1,
            KEY_RUN_ID: "startup",
        }
    )
    content = {KEY_CONFIG: config, KEY_ARRAYS: state_to_record(arrays)}
    msg = Message(content=RecordDict(content), dst_node_id=1, message_type="train")
    node = {
        "partition-id": args["partition"],
        "num-partitions": args["partitions"],
        "data-dir": args["data_dir"],
    }
    context = Context(
        run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}
    )
    marks["message"] = time.process_time()  # stands in for Flower's pull (untimed)
    cfg, *_, tokenizer, _, pid, num_parts = client_app._setup(msg, context)
    marks["model"] = time.process_time()
    examples, _ = client_app.client_examples(
        cfg, tokenizer, pid, num_parts, client_app._cache_dir(context)
    )
    marks["data"] = time.process_time()
    phases = {
        "process": marks["process"],
        "imports": marks["imports"] - marks["process"],
        "model": marks["model"] - marks["message"],
        "data": marks["data"] - marks["model"],
    }
    unused = ("opacus", "matplotlib", "mlflow", "optuna", "ray", "hydra", "omegaconf")
    unused += ("pandas",)  # only to read or partition data (cached after the first)
    return {
        "cpu_s": phases,
        "total_s": sum(phases.values()),
        "examples": len(examples),
        "imported_unused": sorted(m for m in unused if m in sys.modules),
    }


def _run_child(request: Path, tree: Path = REPO) -> dict[str, Any]:
    """:func:`child_main` in a fresh interpreter that imports the code of ``tree``
    (this checkout, or an older one to compare against)."""
    path = os.pathsep.join(p for p in (str(tree), ENV.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(request)],
        cwd=tree,
        env={**ENV, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"startup child failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_torch_cpu() -> float:
    """CPU seconds of a fresh interpreter that only imports torch: the floor under
    any ClientApp that trains with it."""
    code = "import time, torch; print(time.process_time())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def measure_startup(
    overrides: list[str], work: Path, repeats: int = 3, against: Path | None = None
) -> dict[str, Any]:
    """A ClientApp process's CPU before training, by phase: the first process on a
    node (no cached partition: ``cold``), then ``repeats`` later ones (``warm``, the
    per-message cost; per phase the median), against a bare ``import torch`` measured
    between them. The node holds partition 0 of ``federation.num_clients``.

    ``against``: another checkout (e.g. ``git archive`` of an older commit) whose
    ClientApp is measured the same way, its processes interleaved with ours on a
    node of its own; ``against_ratio`` is ours over its (warm totals).
    """
    import numpy as np

    from fedlora.build import build, initial_state
    from fedlora.data import resolve_labels
    from strategies.server_app import compose_settings

    work.mkdir(parents=True, exist_ok=True)
    s = resolve_labels(compose_settings(overrides))  # as the server sends them
    model, _ = build(s)
    np.savez(work / "arrays.npz", **initial_state(model))
    trees = {"ours": REPO} if against is None else {"ours": REPO, "against": against}
    requests = {}
    for name in trees:  # a node (data-dir) per checkout
        requests[name] = work / f"request-{name}.json"
        requests[name].write_text(
            json.dumps(
                {
                    "settings": json.dumps(s.to_dict()),
                    "arrays": str(work / "arrays.npz"),
                    "partition": 0,
                    "partitions": int(s.federation.num_clients),
                    "data_dir": str(work / f"node-{name}"),
                }
            )
        )
    cold = {name: _run_child(requests[name], tree) for name, tree in trees.items()}
    warm: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    torch_only = []
    for _ in range(repeats):
        for name, tree in trees.items():
            warm[name].append(_run_child(requests[name], tree))
        torch_only.append(bare_torch_cpu())
    floor = float(np.median(torch_only))

    def summary(name: str) -> dict[str, Any]:
        runs = warm[name]
        total = float(np.median([w["total_s"] for w in runs]))
        return {
            "cold": cold[name],
            "warm_cpu_s": {
                p: float(np.median([w["cpu_s"][p] for w in runs])) for p in PHASES
            },
            "warm_total_s": total,
            "warm_runs": [w["total_s"] for w in runs],
            "imported_unused": runs[-1]["imported_unused"],
        }

    ours = summary("ours")
    out = {
        "overrides": overrides,
        **ours,
        "bare_torch_cpu_s": floor,
        "ratio": ours["warm_total_s"] / floor,  # over a process importing torch only
        "goal": f"<= {GOAL_S} s of CPU",
        "met": ours["warm_total_s"] <= GOAL_S,
    }
    if against is not None:
        out["against"] = {"tree": str(against), **summary("against")}
        out["against_ratio"] = ours["warm_total_s"] / out["against"]["warm_total_s"]
    return out


def startup_table(name: str, res: dict[str, Any]) -> str:
    """One row per phase: cold (first process on the node) and warm (the median)."""
    lines = [
        f"ClientApp start-up, {name} (CPU s): phase | first process | later (median)",
    ]
    for p in PHASES:
        lines.append(
            f"  {p:8s} | {res['cold']['cpu_s'][p]:6.2f} | {res['warm_cpu_s'][p]:6.2f}"
        )
    total = res["warm_total_s"]
    lines.append(
        f"  {'total':8s} | {res['cold']['total_s']:6.2f} | {total:6.2f}"
        f"   (goal <= {GOAL_S}: {'met' if total <= GOAL_S else 'not met'})"
    )
    if "bare_torch_cpu_s" in res:
        lines.append(f"  a bare `import torch`: {res['bare_torch_cpu_s']:.2f}")
    if res["imported_unused"]:
        lines.append(f"  imported but unused: {', '.join(res['imported_unused'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm", help="minilm, tiny or a folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--against",
        type=Path,
        help="another checkout to measure the same way, interleaved (its ClientApp "
        "before a change: git archive <commit> | tar -x -C DIR)",
    )
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="fedlora-startup-") as tmp:
        work = Path(tmp)
        name = args.model
        if name == "tiny":
            from fedlora.testing import save_tiny_bert

            name = str(save_tiny_bert(work / "tiny_bert"))
        res = measure_startup(
            [f"model.name={name}", *overrides], work / "run", args.repeats, args.against
        )
    print(startup_table(args.model, res))
    if "against" in res:
        print(startup_table(f"{args.model}, {args.against}", res["against"]))
        print(f"ours / against (later processes): {res['against_ratio']:.3f}")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
