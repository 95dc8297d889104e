"""Causal-LM cases of the performance bench (``experiments.bench``): a Llama-shaped
model built in-process from a config (:func:`fedlora.testing.save_tiny_llama`).

- ``causal_lm``: tokens/s of our trainer (``fedlora.train.train_local``) over a plain
  PyTorch + PEFT loop (AdamW on the trainable parameters; forward with labels,
  backward, step, zero_grad) on the very same padded batches, steps and threads.
- ``gradient_checkpointing``: the activation memory of training steps with
  ``train.gradient_checkpointing=true`` over without (each arm in a fresh process,
  peak RSS above the RSS before the first step), and the time ratio.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.bench import (
    child,
    median,
    peak_rss_mb,
    plain_peft_loop,
    plain_settings,
    reset_peak_rss,
)

#: every linear layer of a Llama decoder layer
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
LLAMA_MODULES += ("down_proj",)
#: glibc: every block of 64 KiB or more mapped on its own and unmapped when freed
#: (no adaptive threshold), so RSS follows the tensors alive, not the heap's past
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
LM_GOAL = 0.95  # ours / plain loop, tokens/s
#: activation memory with checkpointing over without, at the full size (see
#: docs/performance.md: what checkpointing can save when the logits stay)
CHECKPOINT_GOAL = 0.7


@dataclass(frozen=True)
class LMCase:
    """The size of a causal-LM case."""

    hidden: int
    layers: int
    max_length: int
    batch_size: int
    steps: int  # optimizer steps per timed arm
    repeats: int  # timed rounds of both arms, after one warm-up round


FULL = LMCase(hidden=512, layers=4, max_length=128, batch_size=8, steps=8, repeats=3)
QUICK = LMCase(hidden=32, layers=2, max_length=32, batch_size=4, steps=2, repeats=1)


def lm_table(n: int, max_length: int, seed: int = 0) -> pd.DataFrame:
    """``n`` prompt/response rows of varied length from the synthetic task's
    sentences: prompts of 1 to ``max_length // 10`` sentences, responses of 1 to 3,
    so examples run from a few tokens to about ``max_length`` (about 8 word pieces a
    sentence) and batches need padding, as real instruction data does."""
    from fedlora.data import synthetic_table

    sentences = synthetic_table(n * 8, seed)["sentence"].tolist()
    rng = random.Random(seed)
    most = max(1, max_length // 10)
    rows = []
    for _ in range(n):
        prompt = ". ".join(rng.sample(sentences, rng.randint(1, most)))
        response = ". ".join(rng.sample(sentences, rng.randint(1, 3)))
        rows.append({"prompt": f"{prompt}\nSummary:", "response": f" {response}."})
    return pd.DataFrame(rows)


def lm_setup(
    folder: Path, case: LMCase, checkpointing: bool = False, seed: int = 0
) -> tuple[Any, Any, Any, list]:
    """Settings, PEFT Llama, tokenizer and tokenised examples for ``case``: LoRA
    r = 8 on every linear layer, batches without length grouping (so the plain loop
    can take the very same ones), ``local_steps = case.steps``. ``folder`` holds
    the model (saved there when absent)."""
    from fedlora.build import build
    from fedlora.data import tokenise
    from fedlora.testing import save_tiny_llama

    if not (folder / "config.json").is_file():
        save_tiny_llama(folder, hidden=case.hidden, layers=case.layers)
    plain = plain_settings(
        [
            f"model.name={folder}",
            "model.task=causal_lm",
            f"adapter.target_modules=[{','.join(LLAMA_MODULES)}]",
            f"train.batch_size={case.batch_size}",
            f"train.max_length={case.max_length}",
            f"train.local_steps={case.steps}",
            "train.group_by_length=false",
            f"train.gradient_checkpointing={str(checkpointing).lower()}",
        ]
    )
    model, tok = build(plain)
    n = case.batch_size * case.steps
    table = lm_table(n, case.max_length, seed)
    examples = tokenise(table, tok, plain.data, "causal_lm", case.max_length)
    return plain, model, tok, examples


def step_batches(examples: list, cfg: Any, seed: int) -> list[list[int]]:
    """The examples of each of the ``cfg.local_steps`` batches both arms run (our
    trainer's order without length grouping, cycling over the data)."""
    import torch

    from fedlora.train import batch_indices

    lengths = [len(e["input_ids"]) for e in examples]
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < int(cfg.local_steps):
        out += batch_indices(lengths, int(cfg.batch_size), gen)
    return out[: int(cfg.local_steps)]


def run_arm(
    arm: str, model: Any, examples: list, tok: Any, cfg: Any, seed: int
) -> float:
    """Seconds of ``cfg.local_steps`` steps of ``arm`` (``ours``: ``train_local``;
    ``plain``: the plain PEFT loop), from the same seed: the same batches, the same
    dropout draws."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from fedlora.train import train_local

    if arm == "ours":
        cpu = torch.device("cpu")
        return train_local(model, examples, cfg, cpu, tok.pad_token_id, seed)[
            "train_time"
        ]
    return plain_peft_loop(
        model,
        examples,
        tok,
        int(cfg.local_steps),
        cfg,
        seed,
        DataCollatorForSeq2Seq(tok, padding=True),
    )


def measure_causal_lm(work: Path, case: LMCase) -> dict[str, Any]:
    """Tokens/s of ``train_local`` over the plain PEFT loop: the same model (it
    trains on, which changes no timing), batches and steps; a warm-up round, then
    ``case.repeats`` rounds alternating which arm goes first; the ratio is the median
    of the rounds' ratios."""
    import torch

    plain, model, tok, examples = lm_setup(work / "lm", case)
    cfg = plain.train
    tokens = sum(
        len(examples[i]["input_ids"])
        for idx in step_batches(examples, cfg, 0)
        for i in idx
    )
    padded = sum(
        len(idx) * max(len(examples[i]["input_ids"]) for i in idx)
        for idx in step_batches(examples, cfg, 0)
    )
    speed: dict[str, list[float]] = {"ours": [], "plain": []}
    for rep in range(case.repeats + 1):
        arms = ("ours", "plain") if rep % 2 else ("plain", "ours")
        times = {arm: run_arm(arm, model, examples, tok, cfg, 0) for arm in arms}
        if rep:  # round 0 warms up
            for arm, t in times.items():
                speed[arm].append(tokens / t)
    # each round's two arms ran back to back, under the same load
    rounds = [o / b for o, b in zip(speed["ours"], speed["plain"], strict=True)]
    ratio = median(rounds)
    return {
        "model": f"Llama {case.layers} layers, hidden {case.hidden}",
        "lora": f"r={plain.adapter.r} on {','.join(LLAMA_MODULES)}",
        "batch_size": case.batch_size,
        "max_length": case.max_length,
        "steps": case.steps,
        "repeats": case.repeats,
        "tokens_per_arm": tokens,
        "padded_tokens_per_arm": padded,
        "threads": torch.get_num_threads(),
        "ours_tokens_per_s": median(speed["ours"]),
        "plain_tokens_per_s": median(speed["plain"]),
        "ours_all": speed["ours"],
        "plain_all": speed["plain"],
        "round_ratios": rounds,
        "ratio": ratio,
        "goal": f">= {LM_GOAL}",
        "met": ratio >= LM_GOAL,
    }


def child_lm_memory(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build the model (``checkpointing`` or not), run one
    warm-up step (one-time allocations: the optimizer's state, lazy imports and
    kernels), then the peak RSS of ``steps`` training steps above the RSS just
    before them; then the seconds of the same steps again."""
    import torch

    case = LMCase(**args["case"])
    plain, model, tok, examples = lm_setup(
        Path(args["folder"]), case, args["checkpointing"]
    )
    cfg = plain.train
    run_arm("ours", model, examples, tok, replace(cfg, local_steps=1), 0)
    before = reset_peak_rss()
    run_arm("ours", model, examples, tok, cfg, 0)
    peak = peak_rss_mb()
    return {
        "before_mb": before,
        "peak_mb": peak,
        "extra_mb": peak - before,
        "seconds": run_arm("ours", model, examples, tok, cfg, 0),
        "threads": torch.get_num_threads(),
    }


def measure_checkpointing(work: Path, case: LMCase) -> dict[str, Any]:
    """Activation memory (peak RSS of the training steps above the RSS before them,
    each arm in a fresh process, twice (``--quick``: once), alternating) and
    seconds of the same steps, with gradient checkpointing over without."""
    from fedlora.testing import save_tiny_llama

    folder = work / "lm"
    if not (folder / "config.json").is_file():  # once for both arms
        save_tiny_llama(folder, hidden=case.hidden, layers=case.layers)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for rep in range(min(case.repeats, 2)):  # --quick: one process per arm
        for on in (rep == 1, rep == 0):
            runs[on].append(
                child(
                    "lm_memory",
                    {
                        "folder": str(folder),
                        "case": case.__dict__,
                        "checkpointing": on,
                    },
                    MALLOC,
                )
            )
    extra = {on: median([r["extra_mb"] for r in rs]) for on, rs in runs.items()}
    peak = {on: median([r["peak_mb"] for r in rs]) for on, rs in runs.items()}
    secs = {on: median([r["seconds"] for r in rs]) for on, rs in runs.items()}
    ratio = extra[True] / extra[False]
    return {
        "model": f"Llama {case.layers} layers, hidden {case.hidden}",
        "batch_size": case.batch_size,
        "max_length": case.max_length,
        "steps": case.steps,
        "with_extra_mb": extra[True],
        "without_extra_mb": extra[False],
        "with_peak_mb": peak[True],
        "without_peak_mb": peak[False],
        "peak_ratio": peak[True] / peak[False],
        "with_s": secs[True],
        "without_s": secs[False],
        "time_ratio": secs[True] / secs[False],
        "runs": {"with": runs[True], "without": runs[False]},
        "ratio": ratio,
        "goal": f"<= {CHECKPOINT_GOAL}",
        "met": ratio <= CHECKPOINT_GOAL,
    }
