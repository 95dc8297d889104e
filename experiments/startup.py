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

The deployment's ClientApp (``clients.forward``) is measured too, interleaved: a
fresh interpreter does step 1, imports ``clients.forward`` (``imports``) and
forwards a real train message (``exchange``: encoding, the socket, the reply) to
the node's worker, which the first such process starts and later ones reuse. Its
``total`` is the whole fresh process's CPU (training, in the worker, included
nowhere in it); the worker's own CPU for the message (the ClientApp's setup, the
data, one local step, the reply) is reported beside it.

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
FORWARD_PHASES = ("process", "imports", "exchange")
#: the issue's goal for one ClientApp process's CPU before it trains (seconds)
GOAL_S = 3.0
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def _task(request: Path) -> tuple[Any, Any]:
    """The train message and the node's context a ClientApp process gets (as
    Flower's ``pull_task_input`` would give them)."""
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
    return msg, context


def child_forward(request: Path) -> dict[str, Any]:
    """One deployed ClientApp process (``clients.forward``) in a fresh
    interpreter: its CPU by phase; the worker's pid and CPU for the message."""
    marks = {"start": _T0}
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (flwr-clientapp's own)

    marks["process"] = time.process_time()
    from clients import forward

    marks["imports"] = time.process_time()
    msg, context = _task(request)
    marks["message"] = time.process_time()  # stands in for Flower's pull (untimed)
    reply = forward.app(msg, context)
    marks["exchange"] = time.process_time()
    if reply.has_error():
        raise RuntimeError(f"the worker replied with an error: {reply.error.reason}")
    phases = {
        "process": marks["process"],
        "imports": marks["imports"] - marks["process"],
        "exchange": marks["exchange"] - marks["message"],
    }
    heavy = ("torch", "transformers", "peft", "pandas")
    return {
        "cpu_s": phases,
        "total_s": sum(phases.values()),
        "worker_pid": forward.last["pid"],
        "worker_cpu_s": forward.last["cpu_s"],
        "worker_started": bool(forward.last.get("started")),
        "imported_unused": sorted(m for m in heavy if m in sys.modules),
    }


def child_main(request: Path) -> dict[str, Any]:
    """One ClientApp process's work before training (in a fresh interpreter):
    CPU seconds by phase, and the modules it imported that training never needs."""
    marks = {"start": _T0}
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (flwr-clientapp's own)

    marks["process"] = time.process_time()
    from clients import client_app

    marks["imports"] = time.process_time()
    msg, context = _task(request)
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


def _run_child(
    request: Path, tree: Path = REPO, mode: str = "--child"
) -> dict[str, Any]:
    """:func:`child_main` (``--child-forward``: :func:`child_forward`) in a fresh
    interpreter that imports the code of ``tree`` (this checkout, or an older one
    to compare against). The worker a forwarding child starts watches this
    process: it exits with it."""
    path = os.pathsep.join(p for p in (str(tree), ENV.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(request)],
        cwd=tree,
        env={**ENV, "PYTHONPATH": path, "FEDLORA_CLIENT_WORKER": "1"},
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
    overrides: list[str],
    work: Path,
    repeats: int = 3,
    against: Path | None = None,
    forward: bool = True,
) -> dict[str, Any]:
    """A ClientApp process's CPU before training, by phase: the first process on a
    node (no cached partition: ``cold``), then ``repeats`` later ones (``warm``, the
    per-message cost; per phase the median), against a bare ``import torch`` measured
    between them. The node holds partition 0 of ``federation.num_clients``.

    ``against``: another checkout (e.g. ``git archive`` of an older commit) whose
    ClientApp is measured the same way, its processes interleaved with ours on a
    node of its own; ``against_ratio`` is ours over its (warm totals).

    ``forward``: also the deployment's forwarding ClientApp of this checkout
    (``forwarded``), on a node of its own, its processes interleaved with the
    others: the first starts the node's worker, the later ones reuse it. Its
    message trains one local step (``train.local_steps=1``) in the worker.
    """
    import numpy as np

    from fedlora.build import build, initial_state
    from fedlora.data import resolve_labels
    from fedlora.settings import with_
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
    if forward:  # a node of its own; its message trains one step in the worker
        requests["forwarded"] = work / "request-forwarded.json"
        one_step = with_(s, "train.local_steps", 1)
        requests["forwarded"].write_text(
            json.dumps(
                {
                    **json.loads(requests["ours"].read_text()),
                    "settings": json.dumps(one_step.to_dict()),
                    "data_dir": str(work / "node-forwarded"),
                }
            )
        )
    fwd: list[dict[str, Any]] = []
    cold = {name: _run_child(requests[name], tree) for name, tree in trees.items()}
    if forward:
        fwd.append(_run_child(requests["forwarded"], REPO, "--child-forward"))
    warm: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    torch_only = []
    for _ in range(repeats):
        for name, tree in trees.items():
            warm[name].append(_run_child(requests[name], tree))
        if forward:
            fwd.append(_run_child(requests["forwarded"], REPO, "--child-forward"))
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
    if forward:
        out["forwarded"] = forwarded_summary(fwd, ours["warm_total_s"])
    return out


def forwarded_summary(runs: list[dict[str, Any]], in_process: float) -> dict[str, Any]:
    """The forwarding processes: the first (it started the worker) and the median
    of the later ones, with the worker's CPU per message; ``ratio`` is a later
    process's CPU over the in-process ClientApp's (``in_process``, warm)."""
    import numpy as np

    later = runs[1:]
    total = float(np.median([r["total_s"] for r in later]))
    return {
        "cold": runs[0],
        "warm_cpu_s": {
            p: float(np.median([r["cpu_s"][p] for r in later])) for p in FORWARD_PHASES
        },
        "warm_total_s": total,
        "warm_runs": [r["total_s"] for r in later],
        "worker_cpu_s": [r["worker_cpu_s"] for r in runs],
        "one_worker": len({r["worker_pid"] for r in runs}) == 1
        and not any(r["worker_started"] for r in later),
        "imported_unused": later[-1]["imported_unused"],
        "ratio": total / in_process,
        "met": total <= GOAL_S,
    }


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


def forwarded_table(res: dict[str, Any]) -> str:
    """The forwarding ClientApp's phases, its worker's CPU per message."""
    lines = [
        "Forwarding ClientApp (clients.forward), CPU s: phase | first process "
        "(starts the worker) | later (median)",
    ]
    for p in FORWARD_PHASES:
        lines.append(
            f"  {p:8s} | {res['cold']['cpu_s'][p]:6.2f} | {res['warm_cpu_s'][p]:6.2f}"
        )
    total = res["warm_total_s"]
    lines.append(
        f"  {'total':8s} | {res['cold']['total_s']:6.2f} | {total:6.2f}"
        f"   (goal <= {GOAL_S}: {'met' if res['met'] else 'not met'}; "
        f"{res['ratio']:.3f} of the in-process ClientApp's)"
    )
    cpu = ", ".join(f"{c:.2f}" for c in res["worker_cpu_s"])
    lines.append(
        f"  the worker, per message (setup, data, 1 local step, reply): {cpu}"
        f"; one worker served all: {res['one_worker']}"
    )
    if res["imported_unused"]:
        lines.append(f"  imported: {', '.join(res['imported_unused'])}")
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
    ap.add_argument(
        "--no-forward",
        action="store_true",
        help="skip the deployment's forwarding ClientApp (clients.forward)",
    )
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-forward", type=Path, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child)))
        return
    if args.child_forward:
        print(json.dumps(child_forward(args.child_forward)))
        return
    with tempfile.TemporaryDirectory(prefix="fedlora-startup-") as tmp:
        work = Path(tmp)
        name = args.model
        if name == "tiny":
            from fedlora.testing import save_tiny_bert

            name = str(save_tiny_bert(work / "tiny_bert"))
        res = measure_startup(
            [f"model.name={name}", *overrides],
            work / "run",
            args.repeats,
            args.against,
            not args.no_forward,
        )
    print(startup_table(args.model, res))
    if "forwarded" in res:
        print(forwarded_table(res["forwarded"]))
    if "against" in res:
        print(startup_table(f"{args.model}, {args.against}", res["against"]))
        print(f"ours / against (later processes): {res['against_ratio']:.3f}")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
