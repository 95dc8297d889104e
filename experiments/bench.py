"""Performance benchmark suite: every figure is a ratio against a baseline measured
in the same invocation (these machines are noisy; absolute times are context).

    HF_HUB_OFFLINE=1 python -m experiments.bench [--out results/bench.json]
    HF_HUB_OFFLINE=1 python -m experiments.bench --quick    # toy sizes, CI smoke

Measurements (``--only name,name`` runs a subset):

1. ``trainer``: examples/s of our client trainer (``fedlora.train.train_local``) over
   a minimal PyTorch + PEFT loop (``DataLoader`` + ``DataCollatorWithPadding`` +
   AdamW) on the same PEFT model, examples, batch size and number of steps.
2. ``dp``: our DP-SGD trainer (Opacus) over the same trainer without DP, same
   examples and batches (Poisson sampling off for the comparison); and a logical
   batch of 256 run as physical batches of 64 sorted by length (ours) over the same
   batches cut in sampling order (Opacus' ``BatchMemoryManager``).
3. ``simulation``: a 10-client x 3-round MiniLM simulation (one Ray worker with all
   cores, so clients run one after another) against the pure training and
   evaluation time measured inside it (clients' ``train_time`` + ``eval_time``
   and the server's evaluation); the start-up (process start to round 0's metrics
   row) and the share of the rounds that is not compute, with the Ray worker
   warmed as it starts (the default) and without (``simulation.warm_workers=
   false``), one after the other.
4. ``server``: the server's work per round on Llama-2-7B-shaped adapters (32 layers;
   q, k, v, o, gate, up, down; r = 16, Fed-SB r = 200), per strategy: the method's
   aggregation against a plain numpy weighted mean over the same arrays, and the
   whole ``aggregate_train`` (decode, checks, aggregation, diagnostics, encode).
   Then a rank per client (ranks 8, 16, 32, 64, one client each; global rank 64):
   fedavg_lora (zero-padding), hetlora, flexlora and flora, the whole
   ``aggregate_train`` against a numpy weighted mean of the same updates padded to
   rank 64 (``aggregate_train_over_mean``). ``--server-arms`` picks arms by name.
5. ``bytes``: bytes on the wire (serialized Flower message) per client per round
   over the raw bytes of the communicated parameters, per strategy, at MiniLM size
   and Llama-2-7B shapes.
6. ``memory``: peak RSS of a client process training MiniLM against the same
   process running the plain loop; of a server process aggregating Llama-shaped
   adapters against the raw size of the client updates it holds.
7. ``scale``: a 100-client simulation (10% sampled per round) of a tiny BERT:
   seconds per round and peak RSS of the process tree, against a 10-client
   simulation training the same 10 clients per round.
8. ``scale_memory``: peak RSS of the server's process (the ServerApp and
   Flower's simulation engine) and of the process tree with 1,000 registered
   clients against 100, 10 trained per round in both (goal: ratio <= 1.1).
9. ``causal_lm``: tokens/s of our trainer on a Llama-shaped causal LM (4 layers,
   hidden 512, up to 128 tokens) over a plain PyTorch + PEFT loop on the very same
   batches (``experiments/bench_lm.py``).
10. ``gradient_checkpointing``: activation memory (peak RSS of the training steps
    above the RSS before them, a fresh process per arm) and seconds of the same
    Llama's training with ``train.gradient_checkpointing=true`` over without.
11. ``wire16``: bytes of a FedAvg-LoRA round (r = 16) through the real strategy
    with ``wire.dtype=bfloat16`` and ``float16`` over ``float32``, the train message
    (down) and the reply (up) apart, at MiniLM's and Llama-2-7B's shapes.
12. ``deployment``: a deployed ClientApp process's CPU before it trains (process
    start, imports, model build, data; ``experiments/startup.py``) against a bare
    ``import torch``, on the tiny BERT and MiniLM; seconds per round of the loopback
    deployment (``deploy.launch``) against the simulation of the same experiment.
    ``--quick``: the tiny BERT's start-up only.

SST-2 is read from ``--data`` (default ``../shared/data/sst2``); without it the
built-in synthetic task is used.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("fedavg_lora", "ffa_lora", "fedsb", "lora_fair")  # the server arms
#: server arms whose whole round (``aggregate_train``) has a goal: <= 2x the mean
ROUND_GOAL_ARMS = ("fedavg_lora_r16", "ffa_lora_r16", "fedsb_r16")
ROUND_GOAL = 2.0
#: rounds of the default schedule (``diagnostics.every=auto``) whose mean
#: ``aggregate_train`` is the server arms' ``round_ratio``, after a first round
AUTO_ROUNDS = 20
#: server arms with a rank per client (fedavg_lora: the zero-padding baseline)
HETERO_STRATEGIES = ("fedavg_lora", "hetlora", "flexlora", "flora")
#: the adapted modules of a decoder layer, in fedlora.comm.MODEL_SHAPES' order
MODULES = {
    "llama-2-7b": ("q_proj", "k_proj", "v_proj", "o_proj")
    + ("gate_proj", "up_proj", "down_proj"),
    "mistral-7b": ("q_proj", "k_proj", "v_proj", "o_proj")
    + ("gate_proj", "up_proj", "down_proj"),
    "minilm": ("query", "value"),
}
MEASUREMENTS = (
    "trainer",
    "dp",
    "simulation",
    "server",
    "bytes",
    "memory",
    "scale",
    "scale_memory",
    "causal_lm",
    "gradient_checkpointing",
    "wire16",
    "deployment",
)
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}


# --- helpers -------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def data_overrides(data: Path | None) -> list[str]:
    """SST-2 from ``data`` when it is there, else the synthetic task."""
    if data is not None and (data / "train.tsv").is_file():
        return ["data=sst2", f"data.path={data}"]
    return ["data=synthetic"]


def plain_settings(overrides: list[str]) -> dict[str, Any]:
    """The validated settings the front door would build from ``overrides``, on the
    CPU."""
    from fedlora.settings import with_
    from strategies.server_app import compose_settings

    return with_(compose_settings(overrides), "train.device", "cpu")


def _status_mb(field: str, pid: int | str = "self") -> float:
    """A memory ``field`` of ``/proc/<pid>/status`` (MB)."""
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{status} has no {field}")


def reset_peak_rss() -> float:
    """Restart this process's peak-RSS mark (Linux); returns the current RSS (MB).

    ``getrusage``'s ``ru_maxrss`` is no use here: it survives fork and exec, so a
    child started by a large parent reports the parent's peak.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set size (MB) since :func:`reset_peak_rss`."""
    return _status_mb("VmHWM")


class _Sampler:
    """Calls :meth:`sample` every ``every`` seconds on a background thread while
    the context is active, until it returns False."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Any:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and self.sample():
            self._stop.wait(self.every)

    def sample(self) -> bool:
        raise NotImplementedError


class TreeMemory(_Sampler):
    """Samples the summed RSS of a process and its descendants in the background;
    ``root_peak``: the process's own peak RSS (its kernel mark ``VmHWM``, exact up
    to the last sample, Linux)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(every)
        self.pid, self.peak, self.root_peak = pid, 0, 0

    def sample(self) -> bool:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return False
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak = max(self.peak, total)
        try:
            hwm = _status_mb("VmHWM", self.pid) * 2**20
        except (OSError, RuntimeError):  # gone, or a zombie: no memory fields
            hwm = 0
        self.root_peak = max(self.root_peak, hwm)
        return True


class FirstRow(_Sampler):
    """Watches for a run directory's first metrics row (round 0 done) in the
    background; ``seconds``: from entering to when it appeared (None: never)."""

    def __init__(self, run_dir: Path, every: float = 0.05) -> None:
        super().__init__(every)
        self.path = run_dir / "metrics.jsonl"
        self.seconds: float | None = None

    def sample(self) -> bool:
        try:
            complete = b"\n" in self.path.read_bytes()
        except OSError:
            complete = False
        if complete:
            self.seconds = time.perf_counter() - self._start
        return not complete


def run_front_door(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """``python -m experiments.run`` in a subprocess; wall time, peak tree RSS, rows,
    and the seconds from its start to round 0's metrics row (``first_row``)."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        *overrides,
        "quiet=true",
        f"hydra.run.dir={run_dir}",
    ]
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # round 0's row: this run's
    start = time.perf_counter()
    with (
        FirstRow(run_dir) as first,
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
    ):
        with TreeMemory(proc.pid) as mem:
            out, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return {
        "wall": wall,
        "peak_rss_mb": mem.peak / 2**20,
        "server_peak_rss_mb": mem.root_peak / 2**20,
        "first_row": first.seconds,
        "rows": metrics_rows(run_dir),
    }


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run directory's ``metrics.jsonl``."""
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


def child(
    kind: str, args: dict[str, Any], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``_child_<kind>`` in a fresh interpreter (clean peak-RSS figures), with
    ``env`` added to its environment."""
    cmd = [sys.executable, "-m", "experiments.bench", "--child", kind, json.dumps(args)]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


# --- 1. trainer ----------------------------------------------------------------------
def plain_peft_loop(
    model: Any,
    examples: list[dict[str, Any]],
    tokenizer: Any,
    steps: int,
    cfg: Any,
    seed: int = 0,
    collator: Any = None,
) -> float:
    """The baseline: what a user would write with PyTorch, transformers and PEFT,
    on the same shuffled batches as our trainer without length grouping (and the
    same dropout draws: the global seed set as our trainer sets it). ``collator``:
    transformers' ``DataCollatorWithPadding`` by default (classification)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from fedlora.train import batch_indices

    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    order = batch_indices(
        [len(r["input_ids"]) for r in rows],
        int(cfg.batch_size),
        torch.Generator().manual_seed(seed),
    )
    loader = DataLoader(
        rows,
        batch_sampler=order,
        collate_fn=collator or DataCollatorWithPadding(tokenizer),
        generator=torch.Generator(),  # not the global one: that draws dropout
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay)
    )
    torch.manual_seed(seed)
    model.train()
    start, done = time.perf_counter(), 0
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
    return time.perf_counter() - start


def trainer_setup(base: list[str], n: int) -> tuple[Any, Any, Any, list]:
    """Settings, MiniLM PEFT model, tokenizer and ``n`` tokenised training examples."""
    from fedlora.build import build
    from fedlora.data import client_examples

    plain = plain_settings(
        base + [f"data.max_train_examples={n}", "data.client_eval_fraction=0"]
    )
    model, tok = build(plain)
    examples, _ = client_examples(plain, tok, 0, 1)
    return plain, model, tok, examples


def measure_trainer(base: list[str], n: int, repeats: int) -> dict[str, Any]:
    """Examples/s of ``train_local`` (default: length-grouped batches, and without
    grouping) over the plain PEFT loop: median of repeats, interleaved so all see
    the same machine load."""
    import torch

    from fedlora.train import train_local

    plain, model, tok, examples = trainer_setup(base, n)
    steps = math.ceil(len(examples) / int(plain.train.batch_size))
    cfg = replace(plain.train, local_steps=steps)
    ungrouped = replace(cfg, group_by_length=False)
    cpu = torch.device("cpu")
    speed: dict[str, list[float]] = {"ours": [], "ungrouped": [], "baseline": []}
    for rep in range(repeats + 1):  # the first round warms up
        times = {
            "ours": train_local(model, examples, cfg, cpu, tok.pad_token_id, rep)[
                "train_time"
            ],
            "ungrouped": train_local(
                model, examples, ungrouped, cpu, tok.pad_token_id, rep
            )["train_time"],
            "baseline": plain_peft_loop(model, examples, tok, steps, cfg, rep),
        }
        if rep:
            for k, t in times.items():
                speed[k].append(len(examples) / t)
    ratio = median(speed["ours"]) / median(speed["baseline"])
    return {
        "examples": len(examples),
        "steps": steps,
        "batch_size": int(cfg.batch_size),
        "threads": torch.get_num_threads(),
        "ours_examples_per_s": median(speed["ours"]),
        "ours_ungrouped_examples_per_s": median(speed["ungrouped"]),
        "baseline_examples_per_s": median(speed["baseline"]),
        "ratio": ratio,
        "ratio_ungrouped": median(speed["ungrouped"]) / median(speed["baseline"]),
        "goal": ">= 0.95",
        "met": ratio >= 0.95,
    }


# --- 2. DP ---------------------------------------------------------------------------
def dp_epoch_seconds(
    model: Any,
    examples: list,
    train_cfg: Any,
    privacy_cfg: Any,
    pad_id: int,
    poisson: bool = True,
) -> float:
    """Seconds of one local epoch of our DP-SGD trainer, with a fresh accountant
    (``poisson=False``: fixed batches in the given order, for timing only)."""
    import torch

    from fedlora import privacy

    p = privacy.plan(privacy_cfg, train_cfg, len(examples), 1)
    start = time.perf_counter()
    privacy.train_local_dp(
        model,
        examples,
        train_cfg,
        privacy_cfg,
        p,
        privacy.make_accountant(p.accountant),
        torch.device("cpu"),
        pad_id,
        poisson=poisson,
    )
    return time.perf_counter() - start


def dp_overhead(base: list[str], n: int, repeats: int = 5) -> dict[str, Any]:
    """Seconds of one local epoch with DP-SGD over the same epoch without DP: the
    fastest of ``repeats`` epochs each, interleaved so both see the same load."""
    import torch

    from fedlora.train import batch_indices, train_local

    plain, model, tok, examples = trainer_setup(base + ["privacy=dp_sgd"], n)
    cpu = torch.device("cpu")
    same_batches = replace(plain.train, group_by_length=False)
    # Without Poisson sampling DP-SGD takes fixed batches in data order: hand it the
    # examples in the plain epoch's shuffled order, so both pad the very same batches.
    lengths = [len(e["input_ids"]) for e in examples]
    batches = batch_indices(
        lengths, int(same_batches.batch_size), torch.Generator().manual_seed(0)
    )
    in_plain_order = [examples[i] for idx in batches for i in idx]
    train_local(model, examples[:32], same_batches, cpu, tok.pad_token_id, seed=0)
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(repeats):
        times["plain"].append(
            train_local(model, examples, same_batches, cpu, tok.pad_token_id, seed=0)[
                "train_time"
            ]
        )
        times["dp"].append(
            dp_epoch_seconds(
                model,
                in_plain_order,
                plain.train,
                plain.privacy,
                tok.pad_token_id,
                poisson=False,
            )
        )
    t_plain, t_dp = min(times["plain"]), min(times["dp"])
    return {
        "examples": len(examples),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "plain_s": t_plain,
        "dp_s": t_dp,
        "padded_tokens": sum(
            len(idx) * max(lengths[i] for i in idx) for idx in batches
        ),
        "plain_all_s": times["plain"],
        "dp_all_s": times["dp"],
        "ratio": t_dp / t_plain,
        "goal": "report",
        "met": None,
        "physical": dp_physical(plain, model, tok, examples),
    }


def dp_physical(plain: Any, model: Any, tok: Any, examples: list) -> dict[str, Any]:
    """A large logical batch in physical batches: ours (sorted by length) over the
    same batches cut in sampling order; one epoch each, twice, interleaved."""

    from fedlora import privacy

    quick = len(examples) < 256
    logical, physical = (32, 8) if quick else (256, 64)
    cfg = replace(plain.train, batch_size=logical)
    dp = replace(plain.privacy, max_physical_batch_size=physical)

    def epoch() -> float:
        # fixed batches in data order: both variants cut the very same batches
        return dp_epoch_seconds(
            model, examples, cfg, dp, tok.pad_token_id, poisson=False
        )

    times: dict[str, list[float]] = {"sorted": [], "unsorted": []}
    original = privacy.physical_batches
    for _ in range(2):
        times["sorted"].append(epoch())
        privacy.physical_batches = functools.partial(original, by_length=False)
        try:
            times["unsorted"].append(epoch())
        finally:
            privacy.physical_batches = original
    ours, base = min(times["sorted"]), min(times["unsorted"])
    return {
        "logical": logical,
        "physical": physical,
        "sorted_s": ours,
        "unsorted_s": base,
        "ratio": ours / base,
        "goal": "report",
    }


# --- 3. simulation overhead ----------------------------------------------------------
#: the simulation's goals (issue 19): start-up (process start to round 0 done,
#: seconds) and the share of the rounds' wall time that is not compute
STARTUP_GOAL_S = 10.0
ROUNDS_OVERHEAD_GOAL = 0.05


def measure_simulation(
    base: list[str], clients: int, rounds: int, n: int, work: Path
) -> dict[str, Any]:
    """Run wall time against the pure compute inside it (clients one at a time),
    with the Ray worker warmed as it starts (the default) and, after it in the same
    invocation, without (``simulation.warm_workers=false``: ``cold``)."""
    cores = os.cpu_count() or 1
    overrides = base + [
        f"federation.num_clients={clients}",
        f"federation.min_train_clients={clients}",
        f"federation.rounds={rounds}",
        "federation.fraction_evaluate=1.0",
        f"data.max_train_examples={n}",
        f"data.max_eval_examples={max(n // 5, 32)}",
        "data.client_eval_fraction=0.1",
        "simulation.ray_num_cpus=1",  # one worker: clients run one at a time
        f"train.num_threads={cores}",  # ... with all the cores
    ]
    warm = simulation_figures(run_front_door(overrides, work / "simulation"))
    cold = simulation_figures(
        run_front_door(
            overrides + ["simulation.warm_workers=false"], work / "simulation_cold"
        )
    )
    return {
        "clients": clients,
        "rounds": rounds,
        "train_examples": n,
        **warm,
        "goal": "overhead <= 10% of the run",
        "met": warm["overhead_share_of_run"] <= 0.10,
        "startup": {
            "seconds": warm["startup_s"],
            "cold_seconds": cold["startup_s"],
            "goal": STARTUP_GOAL_S,
            "met": warm["startup_s"] <= STARTUP_GOAL_S,
        },
        "rounds_overhead": {
            "ratio": warm["overhead_share_of_rounds"],
            "cold_ratio": cold["overhead_share_of_rounds"],
            "goal": ROUNDS_OVERHEAD_GOAL,
            "met": warm["overhead_share_of_rounds"] <= ROUNDS_OVERHEAD_GOAL,
        },
        "cold": cold,
    }


def simulation_figures(res: dict[str, Any]) -> dict[str, Any]:
    """A simulation's wall times against the compute inside it (the clients'
    training and evaluation, the server's evaluation): of the whole run, of the
    rounds (round 0's row to the last) and its start-up (process start to round
    0's row)."""
    rows = res["rows"]
    compute = {"client_train": 0.0, "client_eval": 0.0, "server_eval": 0.0}
    for row in rows:
        compute["client_train"] += sum(
            c.get("train_time", 0.0) for c in row.get("client_replies") or []
        )
        compute["client_eval"] += float(row.get("client_eval_time") or 0.0)
        compute["server_eval"] += float(row.get("server_eval_time") or 0.0)
    total = sum(compute.values())
    rounds_wall = rows[-1]["wall_time"] - rows[0]["wall_time"]
    rounds_compute = total - float(rows[0].get("server_eval_time") or 0.0)
    return {
        "process_wall_s": res["wall"],
        "server_wall_s": rows[-1]["wall_time"],
        "startup_s": res["first_row"],
        "rounds_wall_s": rounds_wall,
        "compute_s": compute,
        "ratio": res["wall"] / total,
        "overhead_share_of_run": 1 - total / res["wall"],
        "overhead_share_of_rounds": 1 - rounds_compute / rounds_wall,
        "server_aggregate_s": sum(
            float(r.get("server_aggregate_time") or 0.0) for r in rows
        ),
        "final_eval_accuracy": rows[-1].get("eval_accuracy"),
        "final_eval_loss": rows[-1].get("eval_loss"),
    }


# --- 4. server aggregation -----------------------------------------------------------
def llm_states(
    method: str,
    r: int,
    clients: int,
    layers: int,
    seed: int = 0,
    ranks: Sequence[int] | None = None,
    model: str = "llama-2-7b",
) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Client updates, the sent global state and the frozen factors of an adapter
    of ``model``'s shapes (:data:`fedlora.comm.MODEL_SHAPES`; ``layers`` decoder
    layers; float32). With ``ranks`` (one per client, at most ``r``), client
    ``k``'s update is at rank ``ranks[k]``: the global factors truncated to it
    (:class:`fedlora.ranks.RankPlan`, scale ``alpha = r``) plus noise."""
    from fedlora.comm import MODEL_SHAPES

    _, per_layer = MODEL_SHAPES[model]
    names = MODULES[model]
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    sent: dict[str, np.ndarray] = {}
    frozen: dict[str, np.ndarray] = {}
    for i in range(layers):
        for name, (d_out, d_in) in zip(names, per_layer, strict=True):
            layer = f"model.layers.{i}.{name}"
            a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
            # no model at these sizes: the two parametrisations that freeze
            # factors are spelled out; every other method trains A and B
            if method == "ffa_lora":
                frozen[a], sent[b] = rand(r, d_in), rand(d_out, r)
            elif method == "fedsb":  # B and A frozen, R (r x r) sent
                frozen[a], frozen[b] = rand(r, d_in), rand(d_out, r)
                sent[f"{layer}.lora_R.weight"] = rand(r, r)
            else:
                sent[a], sent[b] = rand(r, d_in), rand(d_out, r)
    if ranks is None:
        starts = [sent] * clients
    else:
        plan = rank_plan(r)
        starts = [plan.to_client(sent, rank) for rank in ranks]
    states = [{k: v + rand(*v.shape) for k, v in start.items()} for start in starts]
    return states, sent, frozen


def rank_plan(r: int) -> Any:
    """The benchmark's global rank ``r`` and scale rule (``alpha = r``)."""
    from fedlora.ranks import RankPlan

    return RankPlan(r, float(r))


def rank_of_state(state: dict[str, np.ndarray]) -> int:
    """The LoRA rank of a wire state."""
    from fedlora.ranks import rank_of

    r = rank_of(state)
    if r is None:
        raise ValueError("no LoRA factors in the state")
    return r


def numpy_mean(states: Sequence[dict[str, np.ndarray]], p: np.ndarray) -> dict:
    """The baseline: a plain numpy weighted mean, key by key."""
    return {
        k: np.average(np.stack([s[k] for s in states]), axis=0, weights=p)
        for k in states[0]
    }


def make_strategy(
    method: str,
    frozen: dict[str, np.ndarray],
    *,
    diagnostics_every: int = 1,
    wire_dtype: str = "float32",
    **params,
) -> Any:
    """The Flower strategy around the method called ``method`` (its defaults;
    Fed-SB with the data-free init), holding ``frozen``; the aggregation-error
    diagnostic every ``diagnostics_every`` rounds (1, the default: every round);
    the adapters on the wire in ``wire_dtype``."""
    from fedlora.methods import available
    from strategies.strategy import LoRAStrategy

    if method == "fedsb":
        params.setdefault("init", "random_orthogonal")
    strategy = LoRAStrategy(
        available()[method](**params),
        min_available_nodes=1,
        diagnostics_every=diagnostics_every,
        wire_dtype=wire_dtype,
    )
    strategy.frozen = frozen
    return strategy


def replies(
    states: list[dict[str, np.ndarray]],
    sent: dict[str, np.ndarray],
    frozen: dict[str, np.ndarray],
    ranks: Sequence[int],
    dtype: str = "float32",
) -> list:
    """Flower reply messages carrying ``states`` (in the wire ``dtype``), as the
    ClientApp reports them (a fake run identity): the digest of the ``frozen``
    factors the clients trained with, each client's rank (``ranks``) and base
    weights without folds (round 0, as a node reports it in round 1)."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlora.adapters import FROZEN_CRC_KEY, frozen_digest
    from fedlora.ranks import RANK_KEY
    from strategies.wire import KEY_BASE_ROUND, state_to_record

    fake_identity()
    sent_record = state_to_record(sent)
    crc = frozen_digest(frozen)
    out = []
    for node, state in enumerate(states, start=1):
        msg = Message(
            content=RecordDict({"arrays": sent_record}),
            dst_node_id=node,
            message_type="train",
        )
        content = RecordDict(
            {
                "arrays": state_to_record(state, dtype),
                "metrics": MetricRecord(
                    {
                        "num-examples": 100 + node,
                        "partition-id": node,
                        FROZEN_CRC_KEY: crc,
                        RANK_KEY: int(ranks[node - 1]),
                        KEY_BASE_ROUND: 0,
                    }
                ),
            }
        )
        reply = Message(content=content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        out.append(reply)
    return out


def fake_identity() -> None:
    """The run identity Flower's runtime would set, which its messages need."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_task_id", "_node_id"):
        setattr(TaskIdentity, field, 1)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def mean_and_aggregate(
    method: Any,
    states: list[dict[str, np.ndarray]],
    ranks: Sequence[int] | None,
    sent: dict[str, np.ndarray],
    p: np.ndarray,
    repeats: int,
) -> tuple[float, float]:
    """Median seconds of the numpy weighted mean (at least 5 times: it is the
    baseline, and short) and of ``method.aggregate`` over the same updates in the
    server's shapes (with ``ranks``, padded to the rank of ``sent``; the padded
    copies are dropped on return)."""
    if ranks is not None:
        plan = rank_plan(rank_of_state(sent))
        states = [plan.from_client(s, k) for s, k in zip(states, ranks, strict=True)]
    t_mean = timed(lambda: numpy_mean(states, p), max(repeats, 5))
    t_agg = timed(lambda: method.aggregate(states, p, sent), repeats)
    return t_mean, t_agg


def server_arm(
    method: str,
    r: int,
    solver: str | None,
    clients: int,
    layers: int,
    repeats: int,
    ranks: Sequence[int] | None = None,
    model: str = "llama-2-7b",
) -> dict[str, Any]:
    """One strategy's server round on LLM shapes, against a numpy weighted mean.

    With ``ranks`` (one per client, global rank ``r``), the clients send their own
    ranks' factors and the baseline is the numpy mean of the same updates padded
    to ``r`` (the server's shapes, which the method aggregates)."""
    from fedlora.aggregation import client_weights
    from fedlora.base_delta import FoldLog
    from strategies.wire import record_to_state, state_to_record

    states, sent, frozen = llm_states(
        method, r, clients, layers, ranks=ranks, model=model
    )
    params: dict[str, Any] = {"solver": solver} if solver else {}
    if ranks is not None:
        params["ranks"] = rank_plan(r)
    strategy = make_strategy(method, frozen, **params)
    p = client_weights([100 + k for k in range(1, clients + 1)], "num_examples")
    t_mean, t_agg = mean_and_aggregate(strategy.method, states, ranks, sent, p, repeats)
    msgs = replies(states, sent, frozen, ranks or [r] * clients)

    def server_round(strategy: Any) -> float:
        """Seconds of one ``aggregate_train`` (round 1 again, set up untimed)."""
        strategy.begin_round(1, record_to_state(state_to_record(sent)))
        strategy.round_log = {1: {"clients_sampled": clients}}
        strategy.folds = FoldLog()  # each repeat the same round 1 (FLoRA)
        strategy.holdings.folds_sent = dict.fromkeys(range(1, clients + 1), 0)
        start = time.perf_counter()
        strategy.aggregate_train(1, msgs)
        return time.perf_counter() - start

    hetero = ranks is not None
    # the diagnostic every round (diagnostics.every=1), never (0) and as the
    # default schedules it (auto: a run of rounds, averaged), interleaved so that
    # all three see the same load
    quiet = make_strategy(method, frozen, diagnostics_every=0, **params)
    auto = make_strategy(method, frozen, diagnostics_every="auto", **params)
    auto_rounds = 0 if hetero else AUTO_ROUNDS if repeats > 1 else 2
    rounds: dict[str, list[float]] = {"every": [], "no_diagnostic": [], "auto": []}
    for warm in [] if hetero else [strategy, quiet, auto]:  # a run's first round:
        server_round(warm)  # once-a-run set-up (the frozen factors' QR), and auto's
        # first diagnostic, which it always runs to learn the cost
    for i in range(max(repeats, auto_rounds)):
        if i < repeats:
            rounds["every"].append(server_round(strategy))
        if i < repeats and not hetero:
            rounds["no_diagnostic"].append(server_round(quiet))
        if i < auto_rounds:
            rounds["auto"].append(server_round(auto))
    t_round = median(rounds["every"])
    measured = auto.diagnostics.measured - (not hetero)  # the first round's
    entry = strategy.round_log[1]
    if entry.get("rejected"):
        raise RuntimeError(f"server {method}: replies rejected: {entry['rejected']}")
    name = f"{method}_r{r}" + (f"_{solver}" if solver else "")
    goal = ROUND_GOAL if name in ROUND_GOAL_ARMS and not hetero else None

    def round_ratio(
        seconds: list[float], diagnostic: str, average: Callable = median
    ) -> dict[str, Any]:
        ratio = average(seconds) / t_mean
        return {
            "ratio": ratio,
            "aggregate_train_s": average(seconds),
            "numpy_mean_s": t_mean,
            "diagnostic": diagnostic,
            "goal": goal if goal is not None else "report",
            "met": None if goal is None else ratio <= goal,
        }

    return {
        **({"ranks": list(ranks), "model": model, "layers": layers} if hetero else {}),
        "mb_per_client": sum(v.nbytes for s in states for v in s.values())
        / clients
        / 2**20,
        "numpy_mean_s": t_mean,
        "aggregate_s": t_agg,
        "ratio": t_agg / t_mean,
        "aggregate_train_s": t_round,
        "aggregate_train_over_mean": t_round / t_mean,
        "aggregation_error": entry.get("aggregation_error"),
        # only where the replies' ranks differ (a rank per client)
        "aggregation_error_by_rank": entry.get("aggregation_error_by_rank"),
        "goal": "ratio <= 2" if not (solver or hetero) else "report (s/round)",
        "met": (t_agg / t_mean <= 2.0) if not (solver or hetero) else None,
        # the whole aggregate_train against the numpy mean (issue 19)
        **(
            {}
            if hetero
            else {
                # the default: the mean of a run of rounds (the diagnostic's
                # first round included), as a run's server time averages them
                "round_ratio": {
                    **round_ratio(
                        rounds["auto"],
                        f"auto, the default: measured in {measured} of "
                        f"{auto_rounds} rounds after the first",
                        fmean,
                    ),
                    "rounds": auto_rounds,
                    "measured_rounds": measured,
                },
                "round_ratio_every_round": round_ratio(
                    rounds["every"], "every round (diagnostics.every=1)"
                ),
                "round_ratio_no_diagnostic": round_ratio(
                    rounds["no_diagnostic"], "never (diagnostics.every=0)"
                ),
            }
        ),
    }


@dataclass(frozen=True)
class RankCase:
    """The server arms with a rank per client: one client per rank in ``ranks``
    (global rank the largest), ``layers`` decoder layers of ``model``'s shapes,
    median of ``repeats``."""

    model: str
    layers: int
    ranks: tuple[int, ...]
    repeats: int


def measure_server(
    layers: int,
    clients: int,
    repeats: int,
    hetero: RankCase | None = None,
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Per strategy: aggregation vs numpy mean, and the whole aggregate_train; then
    (``hetero``) the methods for a rank per client against the numpy mean of the
    same updates padded to the global rank. ``only``: just the arms whose names
    start with one of these."""
    out: dict[str, Any] = {"layers": layers, "clients": clients}
    arms: dict[str, Callable[[], dict[str, Any]]] = {}
    for method, r, solver in [(m, 16, None) for m in STRATEGIES[:3]] + [
        ("fedsb", 200, None),
        ("lora_fair", 16, "ridge"),
        ("lora_fair", 16, "gd"),
    ]:
        name = f"{method}_r{r}" + (f"_{solver}" if solver else "")
        arms[name] = functools.partial(
            server_arm, method, r, solver, clients, layers, repeats
        )
    if hetero is not None:
        tag = "-".join(map(str, hetero.ranks))
        for method in HETERO_STRATEGIES:
            arms[f"{method}_r{tag}"] = functools.partial(
                server_arm,
                method,
                max(hetero.ranks),
                None,
                len(hetero.ranks),
                hetero.layers,
                hetero.repeats,
                hetero.ranks,
                hetero.model,
            )
    for name, arm in arms.items():
        if only and not name.startswith(tuple(only)):
            continue
        v = arm()
        out[name] = v
        say(
            f"server {name}: mean {v['numpy_mean_s']:.3f}s, aggregate "
            f"{v['aggregate_s']:.3f}s ({v['ratio']:.2f}x), aggregate_train "
            f"{v['aggregate_train_s']:.3f}s ({v['aggregate_train_over_mean']:.2f}x)"
        )
    return out


# --- 5. bytes on the wire ------------------------------------------------------------
def wire_ratio(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """Serialized reply (arrays + metrics) over raw bytes of the arrays."""
    from flwr.app import MetricRecord, RecordDict

    from fedlora.comm import raw_bytes
    from strategies.wire import payload_bytes, state_to_record

    content = RecordDict(
        {
            "arrays": state_to_record(state),
            "metrics": MetricRecord({"num-examples": 100, "train_loss": 0.5}),
        }
    )
    wire, raw = payload_bytes(content), raw_bytes(state)
    ratio = wire / raw
    big = raw >= 2**20
    return {
        "raw_bytes": raw,
        "wire_bytes": wire,
        "ratio": ratio,
        "overhead_bytes": wire - raw,
        "overhead_bytes_per_array": (wire - raw) / max(len(state), 1),
        "goal": "<= 1.02" if big else "report overhead",
        "met": ratio <= 1.02 if big else None,
    }


def measure_bytes(base: list[str], layers: int) -> dict[str, Any]:
    """Every shipped method's upload at MiniLM size (its real trainable state) and
    LLM shapes (round 1; RoLoRA also round 2), and FedEx-LoRA's residual."""
    from fedlora.adapters import get_state
    from fedlora.build import build
    from fedlora.methods import from_settings

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for name in available_strategies():
        plain = plain_settings(base + [f"strategy={name}"])
        method = from_settings(plain)
        model, _ = build(plain)
        # as after training: B (zero at init) no longer repeats, nothing dedups
        trained = {
            k: v + rng.standard_normal(v.shape, dtype=np.float32) * 0.01
            for k, v in get_state(model).items()
        }
        r = 200 if name == "fedsb" else 16
        states, _, _ = llm_states(name, r, 1, layers)
        for server_round in (1, 2) if name == "rolora" else (1,):
            tag = f"_round{server_round}" if name == "rolora" else ""
            out[f"minilm_{name}{tag}"] = wire_ratio(
                uploaded(method, trained, server_round)
            )
            out[f"llama_{name}_r{r}{tag}"] = wire_ratio(
                uploaded(method, states[0], server_round)
            )
    out["llama_fedex_residual_r16_k10"] = fedex_residual_bytes(layers)
    return out


def available_strategies() -> list[str]:
    """Every method with a YAML in conf/strategy/ (the shipped ones)."""
    return sorted(p.stem for p in (REPO / "conf/strategy").glob("[!_]*.yaml"))


def uploaded(method: Any, state: dict[str, np.ndarray], server_round: int) -> dict:
    """What a client of ``method`` sends up in ``server_round``."""
    return {
        k: v
        for k, v in state.items()
        if method.trains(k, server_round) and not method.keeps_local(k)
    }


def fedex_residual_bytes(layers: int, clients: int = 10, r: int = 16) -> dict:
    """FedEx-LoRA's residual for one round of ``clients`` on Llama-2-7B shapes:
    measured wire bytes of the factored fold of one decoder layer (as the strategy
    sends it) against the dense matrices it replaces, both scaled to ``layers``."""
    from flwr.app import RecordDict

    from fedlora.aggregation import client_weights
    from fedlora.base_delta import BaseDelta
    from fedlora.methods.fedex_lora import FedExLoRA
    from strategies.wire import payload_bytes, state_to_record

    states, sent, _ = llm_states("fedex_lora", r, clients, 1)
    p = client_weights([100 + k for k in range(clients)], "num_examples")
    fold = FedExLoRA(scaling=2.0).fold(states, p, sent)
    delta = BaseDelta()
    delta.add(fold)
    factored = payload_bytes(RecordDict({"base": state_to_record(delta.to_state())}))
    dense_raw = sum(
        sent[k.replace("lora_A", "lora_B")].shape[0] * v.shape[1] * 4
        for k, v in sent.items()
        if "lora_A" in k
    )
    adapter = sum(v.nbytes for v in sent.values())
    return {
        "clients": clients,
        "r": r,
        "factored_bytes": factored * layers,
        "dense_raw_bytes": dense_raw * layers,
        "adapter_raw_bytes": adapter * layers,
        "ratio": factored / dense_raw,
        "over_adapter": factored / adapter,
        "goal": "report (factored / dense)",
        "met": None,
    }


# --- 10. 16-bit adapters on the wire -------------------------------------------------
WIRE16_GOAL = 0.52  # bytes in 16 bits over float32: half, plus the framing that
#   does not shrink (a few hundred bytes an array, the settings in a train message)


class OneNode:
    """A grid of one connected node, as far as a strategy's sampling needs one."""

    def get_node_ids(self) -> list[int]:
        return [1]


def wire16_round(
    model: str, layers: int, dtype: str, config: dict[str, Any]
) -> dict[str, int]:
    """One FedAvg-LoRA round (r = 16) of one client on ``model``'s shapes through
    the real strategy with ``wire.dtype=dtype``: its measured ``bytes_down`` (the
    train message: the global adapter and the experiment ``config``) and
    ``bytes_up`` (the client's reply, aggregated)."""
    from flwr.app import ConfigRecord

    from strategies.wire import KEY_EXPERIMENT, state_to_record

    states, sent, frozen = llm_states("fedavg_lora", 16, 1, layers, model=model)
    strategy = make_strategy(
        "fedavg_lora", frozen, diagnostics_every=0, wire_dtype=dtype
    )
    strategy.min_train_nodes = 1  # Flower's default, 2, would wait for another
    fake_identity()
    record = ConfigRecord({KEY_EXPERIMENT: json.dumps(config)})
    list(strategy.configure_train(1, state_to_record(sent), record, OneNode()))
    new, _ = strategy.aggregate_train(1, replies(states, sent, frozen, [16], dtype))
    if new is None:
        raise RuntimeError(f"wire16 {model} {dtype}: the reply was not aggregated")
    log = strategy.round_log[1]
    return {"bytes_down": int(log["bytes_down"]), "bytes_up": int(log["bytes_up"])}


def measure_wire16(layers: int) -> dict[str, Any]:
    """Bytes of a round's train message (down) and reply (up) with the adapters in
    bfloat16 and float16 over float32 (``wire.dtype``), measured by the strategy
    (Flower's serialization, :mod:`strategies.wire_size`), at MiniLM's shapes
    (6 layers, query and value) and Llama-2-7B's (``layers`` decoder layers)."""
    from fedlora.settings import WIRE_DTYPES  # float32 first: the baseline

    config = plain_settings(["data=synthetic"]).to_dict()
    out: dict[str, Any] = {}
    for model, n in (("minilm", 6), ("llama-2-7b", layers)):
        sizes = {d: wire16_round(model, n, d, config) for d in WIRE_DTYPES}
        tag = "llama" if model.startswith("llama") else model
        for dtype in WIRE_DTYPES[1:]:
            for way in ("down", "up"):
                full, half = (
                    sizes["float32"][f"bytes_{way}"],
                    sizes[dtype][f"bytes_{way}"],
                )
                out[f"{tag}_r16_{way}_{dtype}"] = {
                    "layers": n,
                    "bytes": half,
                    "float32_bytes": full,
                    "ratio": half / full,
                    "goal": f"<= {WIRE16_GOAL}",
                    "met": half / full <= WIRE16_GOAL,
                }
    return out


# --- 6. memory -----------------------------------------------------------------------
def _child_client(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fedlora.train import train_local

    plain, model, tok, examples = trainer_setup(args["base"], args["n"])
    before = reset_peak_rss()
    if args["mode"] == "ours":
        train_local(
            model, examples, plain.train, torch.device("cpu"), tok.pad_token_id, 0
        )
    else:
        steps = math.ceil(len(examples) / int(plain.train.batch_size))
        plain_peft_loop(model, examples, tok, steps, plain.train)
    return {"peak_rss_mb": peak_rss_mb(), "before_training_mb": before}


def _child_server(args: dict[str, Any]) -> dict[str, Any]:
    from strategies.wire import record_to_state, state_to_record

    states, sent, frozen = llm_states(
        args["method"], args["r"], args["clients"], args["layers"]
    )
    strategy = make_strategy(args["method"], frozen)
    msgs = replies(states, sent, frozen, [args["r"]] * args["clients"])
    raw = sum(v.nbytes for s in states for v in s.values()) / 2**20
    del states  # the server holds the replies, not our copies
    before = reset_peak_rss()
    strategy.begin_round(1, record_to_state(state_to_record(sent)))
    strategy.round_log = {1: {"clients_sampled": args["clients"]}}
    strategy.aggregate_train(1, msgs)
    return {"peak_rss_mb": peak_rss_mb(), "before_mb": before, "updates_mb": raw}


def measure_memory(base: list[str], n: int, layers: int, clients: int) -> dict:
    """Peak RSS: client (ours vs plain loop); server (vs raw updates it holds)."""
    ours = child("client", {"base": base, "n": n, "mode": "ours"})
    plain = child("client", {"base": base, "n": n, "mode": "plain"})
    server = child(
        "server",
        {"method": "fedavg_lora", "r": 16, "clients": clients, "layers": layers},
    )
    return {
        "client_peak_rss_mb": ours["peak_rss_mb"],
        "client_before_training_mb": ours["before_training_mb"],
        "client_plain_loop_peak_rss_mb": plain["peak_rss_mb"],
        "client_ratio": ours["peak_rss_mb"] / plain["peak_rss_mb"],
        "server_peak_rss_mb": server["peak_rss_mb"],
        "server_before_round_mb": server["before_mb"],
        "server_updates_mb": server["updates_mb"],
        "server_round_extra_over_updates": (
            (server["peak_rss_mb"] - server["before_mb"]) / server["updates_mb"]
        ),
        "goal": "report",
        "met": None,
    }


# --- 7. scale ------------------------------------------------------------------------
#: the server's peak RSS with 10x the registered clients, over the smaller run's
SCALE_MEMORY_GOAL = 1.1


def scale_run(
    model: Path, num: int, sampled: int, rounds: int, per_client: int, run_dir: Path
) -> dict[str, Any]:
    """A simulation of ``num`` clients of the tiny BERT ``model`` (``per_client``
    synthetic examples each), ``sampled`` of them trained per round: seconds per
    round, the peak RSS of the server's process (the ServerApp with Flower's
    simulation engine) and of the whole process tree (Ray and its workers)."""
    res = run_front_door(
        [
            f"model.name={model}",
            "data=synthetic",
            f"data.num_examples={num * per_client}",
            "data.num_eval_examples=64",
            "data.client_eval_fraction=0",
            f"federation.num_clients={num}",
            f"federation.fraction_train={sampled / num}",
            f"federation.min_train_clients={sampled}",
            "federation.fraction_evaluate=0",
            f"federation.rounds={rounds}",
            "train.batch_size=16",
        ],
        run_dir,
    )
    rows = res["rows"]
    per_round = (rows[-1]["wall_time"] - rows[0]["wall_time"]) / rounds
    return {
        "per_round_s": per_round,
        # without round 1, whose time includes the Ray workers' start
        "later_rounds_s": (rows[-1]["wall_time"] - rows[1]["wall_time"]) / (rounds - 1)
        if rounds > 1
        else None,
        "peak_rss_mb": res["peak_rss_mb"],
        "server_peak_rss_mb": res["server_peak_rss_mb"],
        "process_wall_s": res["wall"],
        "clients_per_round": [r.get("clients") for r in rows[1:]],
    }


def measure_scale(clients: int, rounds: int, per_client: int, work: Path) -> dict:
    """Seconds per round and peak memory with ``clients`` nodes, 10% sampled,
    against ``clients // 10`` nodes all sampled (the same work per round)."""
    from fedlora.testing import save_tiny_bert

    model = save_tiny_bert(work / "tiny_bert")
    sampled = max(clients // 10, 2)
    big = scale_run(model, clients, sampled, rounds, per_client, work / "scale_big")
    small = scale_run(model, sampled, sampled, rounds, per_client, work / "scale_small")
    return {
        "clients": clients,
        "sampled_per_round": sampled,
        "rounds": rounds,
        "big": big,
        "baseline": small,
        "ratio": big["per_round_s"] / small["per_round_s"],
        "memory_ratio": big["peak_rss_mb"] / small["peak_rss_mb"],
        "goal": "completes",
        "met": all(c == sampled for c in big["clients_per_round"]),
    }


def measure_scale_memory(
    clients: int, sampled: int, rounds: int, per_client: int, work: Path
) -> dict:
    """The server's peak RSS with ``clients`` registered clients against
    ``clients // 10``, ``sampled`` trained per round in both (the same work per
    round): what the server holds per registered client that it need not."""
    from fedlora.testing import save_tiny_bert

    model = save_tiny_bert(work / "tiny_bert")
    fewer = clients // 10
    runs = {
        n: scale_run(model, n, sampled, rounds, per_client, work / f"scale_mem_{n}")
        for n in (fewer, clients)
    }
    big, small = runs[clients], runs[fewer]
    ratio = big["server_peak_rss_mb"] / small["server_peak_rss_mb"]
    return {
        "clients": clients,
        "baseline_clients": fewer,
        "sampled_per_round": sampled,
        "rounds": rounds,
        "big": big,
        "baseline": small,
        "ratio": ratio,
        "tree_ratio": big["peak_rss_mb"] / small["peak_rss_mb"],
        "per_round_ratio": big["per_round_s"] / small["per_round_s"],
        "goal": f"<= {SCALE_MEMORY_GOAL:g}",
        "met": ratio <= SCALE_MEMORY_GOAL
        and all(c == sampled for r in runs.values() for c in r["clients_per_round"]),
    }


# --- 12. deployment -------------------------------------------------------------------
#: the deployment's experiment (the deploy tests' task, on the tiny BERT): 2 SuperNodes
DEPLOY_TASK = [
    "data=synthetic",
    "data.num_examples=240",
    "data.num_eval_examples=60",
    "federation.num_clients=2",
    "federation.min_train_clients=2",
    "train.lr=5e-3",
    "train.batch_size=16",
]


def round_seconds(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds of each round after the first (the first pays one-time starts: Ray,
    the SuperNodes' first ClientApp processes)."""
    wall = [float(r["wall_time"]) for r in rows]
    return [b - a for a, b in zip(wall[1:], wall[2:], strict=False)]


def run_deployment(overrides: list[str], work: Path) -> dict[str, Any]:
    """``python -m deploy.launch`` (SuperLink + SuperNodes on 127.0.0.1) in a
    subprocess; wall time and the metrics rows."""
    out = work / "run"
    cmd = [sys.executable, "-m", "deploy.launch", "--work", str(work / "services")]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--out", str(out), *overrides],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        log = work / "services" / "run.log"
        run_log = log.read_text()[-3000:] if log.is_file() else ""
        raise RuntimeError(
            f"deploy.launch failed:\n{proc.stdout[-3000:]}\nrun.log:\n{run_log}"
        )
    return {"wall": time.perf_counter() - start, "rows": metrics_rows(out)}


def measure_deployment(base: list[str], quick: bool, work: Path) -> dict[str, Any]:
    """A deployed ClientApp process's CPU before it trains, by phase
    (:mod:`experiments.startup`), on the tiny BERT and (full run) MiniLM on
    ``base``'s data; then (full run) seconds per round of the loopback deployment
    against the simulation of the same experiment (tiny BERT, 2 clients x 3
    rounds). ``quick``: the tiny BERT's start-up only, one later process."""
    from experiments.startup import measure_startup
    from fedlora.testing import save_tiny_bert

    tiny = save_tiny_bert(work / "deploy_tiny_bert")
    task = [*DEPLOY_TASK, f"model.name={tiny}"]
    out: dict[str, Any] = {
        "startup_tiny": measure_startup(task, work / "startup_tiny", 1 if quick else 3)
    }
    if quick:
        return out
    minilm = [*base, "model.name=minilm", "federation.num_clients=10"]
    out["startup_minilm"] = measure_startup(minilm, work / "startup_minilm", 3)
    experiment = [*task, "federation.rounds=3"]
    sim = run_front_door(experiment, work / "deploy_sim")
    dep = run_deployment(experiment, work / "deploy_loopback")
    sim_round, dep_round = (
        median(round_seconds(sim["rows"])),
        median(round_seconds(dep["rows"])),
    )
    out["rounds"] = {
        "experiment": experiment,
        "simulation_round_s": round_seconds(sim["rows"]),
        "deployment_round_s": round_seconds(dep["rows"]),
        "simulation_wall_s": sim["wall"],
        "deployment_wall_s": dep["wall"],
        "ratio": dep_round / sim_round,
        "goal": "report",
        "met": None,
    }
    return out


# --- report --------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    """One markdown row per figure: value, baseline, ratio, goal, met."""
    lines = [
        "| measurement | ours | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, ours: str, base: str, ratio: float, goal: str, met: Any):
        mark = "-" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {ours} | {base} | {ratio:.3f} | {goal} | {mark} |")

    if "trainer" in results:
        t = results["trainer"]
        row(
            "trainer throughput (ex/s)",
            f"{t['ours_examples_per_s']:.1f}",
            f"{t['baseline_examples_per_s']:.1f} (plain PEFT loop)",
            t["ratio"],
            t["goal"],
            t["met"],
        )
        row(
            "... without length grouping",
            f"{t['ours_ungrouped_examples_per_s']:.1f}",
            f"{t['baseline_examples_per_s']:.1f} (plain PEFT loop)",
            t["ratio_ungrouped"],
            t["goal"],
            t["ratio_ungrouped"] >= 0.95,
        )
    if "dp" in results:
        d = results["dp"]
        row(
            "DP-SGD epoch (s)",
            f"{d['dp_s']:.1f}",
            f"{d['plain_s']:.1f} (no DP)",
            d["ratio"],
            "report",
            None,
        )
        if "physical" in d:
            ph = d["physical"]
            row(
                f"DP-SGD logical {ph['logical']} in physical {ph['physical']} (s)",
                f"{ph['sorted_s']:.1f} (length-sorted)",
                f"{ph['unsorted_s']:.1f} (sampling order)",
                ph["ratio"],
                "report",
                None,
            )
    if "simulation" in results:
        s = results["simulation"]
        row(
            f"simulation {s['clients']}x{s['rounds']} wall (s)",
            f"{s['process_wall_s']:.1f}",
            f"{sum(s['compute_s'].values()):.1f} (compute inside)",
            s["ratio"],
            f"overhead {s['overhead_share_of_run']:.0%} of run "
            f"({s['overhead_share_of_rounds']:.0%} of rounds); <= 10%",
            s["met"],
        )
        if "startup" in s:
            st, ro = s["startup"], s["rounds_overhead"]
            row(
                "simulation start-up: process to round 0 (s)",
                f"{st['seconds']:.1f} (warm workers)",
                f"{st['cold_seconds']:.1f} (cold: warm_workers=false)",
                st["seconds"] / st["cold_seconds"],
                f"<= {st['goal']:g} s",
                st["met"],
            )
            row(
                "simulation rounds not compute (share)",
                f"{ro['ratio']:.3f} (warm workers)",
                f"{ro['cold_ratio']:.3f} (cold)",
                ro["ratio"] / ro["cold_ratio"] if ro["cold_ratio"] > 0 else math.nan,
                f"<= {ro['goal']:g}",
                ro["met"],
            )
    if "server" in results:
        for name, v in results["server"].items():
            if not isinstance(v, dict):
                continue
            hetero = "ranks" in v  # the whole round against the padded mean
            shape = f"{v['model']} x{v['layers']} layers, " if hetero else ""
            row(
                f"server {name} ({shape}{v['mb_per_client']:.1f} MB/client)",
                f"{v['aggregate_s']:.3f} s agg; {v['aggregate_train_s']:.2f} s round",
                f"{v['numpy_mean_s']:.3f} s (numpy mean"
                + (", padded)" if hetero else ")"),
                v["aggregate_train_over_mean"] if hetero else v["ratio"],
                "report (round / mean)" if hetero else v["goal"],
                v["met"],
            )
            for key in (
                "round_ratio",
                "round_ratio_every_round",
                "round_ratio_no_diagnostic",
            ):
                if key not in v:
                    continue
                rr = v[key]
                goal = rr["goal"] if rr["goal"] == "report" else f"<= {rr['goal']:g}"
                row(
                    f"server {name} whole round, diagnostic {rr['diagnostic']}",
                    f"{rr['aggregate_train_s']:.3f} s aggregate_train",
                    f"{rr['numpy_mean_s']:.3f} s (numpy mean)",
                    rr["ratio"],
                    goal,
                    rr["met"],
                )
    if "bytes" in results:
        for name, v in results["bytes"].items():
            if "factored_bytes" in v:  # FedEx-LoRA's residual
                row(
                    f"bytes {name} (factored vs dense)",
                    f"{v['factored_bytes']:,}",
                    f"{v['dense_raw_bytes']:,} (dense raw)",
                    v["ratio"],
                    f"{v['goal']}; {v['over_adapter']:.1f}x the adapter",
                    v["met"],
                )
                continue
            row(
                f"bytes {name}",
                f"{v['wire_bytes']:,}",
                f"{v['raw_bytes']:,} (raw)",
                v["ratio"],
                f"{v['goal']} (+{v['overhead_bytes']:,} B)",
                v["met"],
            )
    if "memory" in results:
        m = results["memory"]
        row(
            "client peak RSS (MB)",
            f"{m['client_peak_rss_mb']:.0f}",
            f"{m['client_plain_loop_peak_rss_mb']:.0f} (plain loop)",
            m["client_ratio"],
            "report",
            None,
        )
        row(
            "server round extra RSS (MB)",
            f"{m['server_peak_rss_mb'] - m['server_before_round_mb']:.0f}",
            f"{m['server_updates_mb']:.0f} (updates held)",
            m["server_round_extra_over_updates"],
            f"report (peak {m['server_peak_rss_mb']:.0f} MB)",
            None,
        )
    if "scale" in results:
        c = results["scale"]
        row(
            f"scale {c['clients']} clients, s/round",
            f"{c['big']['per_round_s']:.2f} ({c['big']['peak_rss_mb']:.0f} MB)",
            f"{c['baseline']['per_round_s']:.2f} ({c['baseline']['peak_rss_mb']:.0f}"
            f" MB, {c['sampled_per_round']} clients)",
            c["ratio"],
            "completes",
            c["met"],
        )
    if "scale_memory" in results:
        c = results["scale_memory"]
        big, small = c["big"], c["baseline"]
        row(
            f"server peak RSS, {c['clients']} clients ({c['sampled_per_round']} a "
            "round) (MB)",
            f"{big['server_peak_rss_mb']:.0f} (tree {big['peak_rss_mb']:.0f}; "
            f"{big['per_round_s']:.2f} s/round)",
            f"{small['server_peak_rss_mb']:.0f} (tree {small['peak_rss_mb']:.0f}; "
            f"{small['per_round_s']:.2f} s/round; {c['baseline_clients']} clients)",
            c["ratio"],
            f"{c['goal']} (tree {c['tree_ratio']:.3f})",
            c["met"],
        )
    if "causal_lm" in results:
        c = results["causal_lm"]
        row(
            f"causal LM tokens/s ({c['model']})",
            f"{c['ours_tokens_per_s']:.0f}",
            f"{c['plain_tokens_per_s']:.0f} (plain PEFT loop)",
            c["ratio"],
            c["goal"],
            c["met"],
        )
    if "gradient_checkpointing" in results:
        g = results["gradient_checkpointing"]
        row(
            "gradient checkpointing: training RSS above model (MB)",
            f"{g['with_extra_mb']:.0f} (peak {g['with_peak_mb']:.0f})",
            f"{g['without_extra_mb']:.0f} (peak {g['without_peak_mb']:.0f}; off)",
            g["ratio"],
            g["goal"],
            g["met"],
        )
        row(
            "gradient checkpointing: seconds of the same steps",
            f"{g['with_s']:.2f}",
            f"{g['without_s']:.2f} (off)",
            g["time_ratio"],
            "report",
            None,
        )
    for name, v in results.get("wire16", {}).items():
        row(
            f"wire16 {name} ({v['layers']} layers)",
            f"{v['bytes']:,}",
            f"{v['float32_bytes']:,} (float32)",
            v["ratio"],
            v["goal"],
            v["met"],
        )
    for name, res in results.get("deployment", {}).items():
        if name.startswith("startup_"):
            cpu = res["warm_cpu_s"]
            row(
                f"deployed ClientApp CPU before training, {name[8:]} (s)",
                f"{res['warm_total_s']:.2f} (process {cpu['process']:.2f}, imports "
                f"{cpu['imports']:.2f}, model {cpu['model']:.2f}, data "
                f"{cpu['data']:.2f})",
                f"{res['bare_torch_cpu_s']:.2f} (bare `import torch`)",
                res["ratio"],
                res["goal"],
                res["met"],
            )
            if "forwarded" in res:  # the deployment's ClientApp: a node's worker
                fwd, cpu = res["forwarded"], res["forwarded"]["warm_cpu_s"]
                row(
                    f"deployed ClientApp CPU, forwarded to the node's worker, "
                    f"{name[8:]} (s)",
                    f"{fwd['warm_total_s']:.2f} (process {cpu['process']:.2f}, "
                    f"imports {cpu['imports']:.2f}, exchange {cpu['exchange']:.2f}; "
                    f"worker per message {median(fwd['worker_cpu_s'][1:]):.2f})",
                    f"{res['warm_total_s']:.2f} (in-process ClientApp)",
                    fwd["ratio"],
                    res["goal"],
                    fwd["met"],
                )
        elif name == "rounds":
            row(
                "loopback deployment, s/round (tiny BERT, 2 nodes)",
                f"{median(res['deployment_round_s']):.1f}",
                f"{median(res['simulation_round_s']):.2f} (simulation)",
                res["ratio"],
                res["goal"],
                res["met"],
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fedlora performance benchmarks.")
    ap.add_argument("--out", type=Path, default=REPO / "results/bench.json")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/sst2")
    ap.add_argument("--quick", action="store_true", help="toy sizes, seconds")
    ap.add_argument(
        "--only", default="", help=f"comma list of {','.join(MEASUREMENTS)}"
    )
    ap.add_argument(
        "--server-arms",
        default="",
        help="comma list: only the server arms whose names start with these "
        "(e.g. fedavg_lora_r8-,hetlora,flexlora,flora)",
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # an internal measurement process
        from experiments.bench_lm import child_lm_memory

        fn = {
            "client": _child_client,
            "server": _child_server,
            "lm_memory": child_lm_memory,
        }[args.child[0]]
        print(json.dumps(fn(json.loads(args.child[1]))))
        return
    only = [m for m in args.only.split(",") if m] or list(MEASUREMENTS)
    unknown = sorted(set(only) - set(MEASUREMENTS))
    if unknown:
        raise SystemExit(f"--only {unknown}: choose from {', '.join(MEASUREMENTS)}")
    q = args.quick
    base = data_overrides(args.data)
    say(f"data: {base}; quick={q}")
    sizes = {
        "trainer_n": 64 if q else 512,
        "repeats": 1 if q else 3,
        "dp_n": 64 if q else 512,
        "sim": (2, 1, 80) if q else (10, 3, 1000),
        "layers": 2 if q else 32,
        "server_clients": 3 if q else 4,
        # toy shapes in --quick; one Llama decoder layer (7 matrices) in the full
        # run: the hetero diagnostic takes minutes per layer (docs/performance.md)
        "server_ranks": RankCase("minilm", 6, (2, 4, 8), 1)
        if q
        else RankCase("llama-2-7b", 1, (8, 16, 32, 64), 1),
        "scale": (20, 1, 10) if q else (100, 3, 20),
        # registered clients (against a tenth of them), sampled, rounds, examples
        "scale_memory": (100, 2, 1, 10) if q else (1000, 10, 3, 20),
    }
    from experiments import bench_lm

    lm_case = bench_lm.QUICK if q else bench_lm.FULL
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        work = Path(tmp)
        steps: dict[str, Callable[[], Any]] = {
            "trainer": lambda: measure_trainer(
                base, sizes["trainer_n"], sizes["repeats"]
            ),
            "dp": lambda: dp_overhead(base, sizes["dp_n"], 1 if q else 5),
            "simulation": lambda: measure_simulation(base, *sizes["sim"], work),
            "server": lambda: measure_server(
                sizes["layers"],
                sizes["server_clients"],
                sizes["repeats"],
                sizes["server_ranks"],
                [a for a in args.server_arms.split(",") if a],
            ),
            "bytes": lambda: measure_bytes(base, sizes["layers"]),
            "memory": lambda: measure_memory(
                base, sizes["trainer_n"], sizes["layers"], sizes["server_clients"]
            ),
            "scale": lambda: measure_scale(*sizes["scale"], work),
            "scale_memory": lambda: measure_scale_memory(*sizes["scale_memory"], work),
            "causal_lm": lambda: bench_lm.measure_causal_lm(work, lm_case),
            "gradient_checkpointing": lambda: bench_lm.measure_checkpointing(
                work, lm_case
            ),
            "wire16": lambda: measure_wire16(sizes["layers"]),
            "deployment": lambda: measure_deployment(base, q, work),
        }
        for name in only:
            say(f"{name} ...")
            t0 = time.perf_counter()
            results[name] = steps[name]()
            say(f"{name} done in {time.perf_counter() - t0:.1f}s")
    report = {
        "machine": machine(),
        "quick": q,
        "data": base,
        "seconds": time.perf_counter() - started,
        "results": results,
        "table": table(results),
    }
    print(report["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    say(f"written: {args.out} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
