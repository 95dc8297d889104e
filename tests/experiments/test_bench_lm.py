"""The bench's causal-LM cases (``experiments/bench_lm.py``) at toy sizes: both
arms of the throughput comparison train the very same thing, and the cases report
their figures (no timings asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiments import bench, bench_lm
from fedlora.adapters import get_state, set_state

CASE = bench_lm.LMCase(
    hidden=32, layers=2, max_length=40, batch_size=4, steps=3, repeats=1
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return bench_lm.lm_setup(tmp_path_factory.mktemp("lm"), CASE)


def test_examples_vary_in_length_so_batches_are_padded(lm):
    _, _, _, examples = lm
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(examples) == CASE.batch_size * CASE.steps
    assert max(lengths) <= CASE.max_length and min(lengths) < max(lengths) / 2
    assert all(any(y != -100 for y in e["labels"]) for e in examples)


def test_our_trainer_and_the_plain_loop_take_the_same_steps(lm):
    """The same LoRA weights after the same steps: the throughput ratio compares
    the same work. (A plain loop on other batches, with another weight decay or
    other labels would end elsewhere.)"""
    plain, model, tok, examples = lm
    cfg = plain.train
    start = get_state(model)
    ends = {}
    for arm in ("ours", "plain"):
        set_state(model, start)
        bench_lm.run_arm(arm, model, examples, tok, cfg, seed=3)
        ends[arm] = get_state(model)
    moved = max(np.abs(ends["ours"][k] - start[k]).max() for k in start)
    assert moved > float(cfg.lr)  # it trained (Adam moves about lr a step)
    for key, value in ends["ours"].items():
        np.testing.assert_allclose(ends["plain"][key], value, rtol=1e-5, atol=1e-6)


def test_step_batches_are_the_trainers_batches(lm):
    """The tokens counted are those of the batches ``train_local`` runs."""
    from fedlora.train import batch_indices

    plain, _, _, examples = lm
    lengths = [len(e["input_ids"]) for e in examples]
    expected = batch_indices(lengths, CASE.batch_size, torch.Generator().manual_seed(0))
    assert bench_lm.step_batches(examples, plain.train, 0) == expected[: CASE.steps]


def test_quick_bench_writes_the_causal_lm_figures(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(
        ["--quick", "--only", "causal_lm,gradient_checkpointing", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    for name in ("causal_lm", "gradient_checkpointing"):
        r = report["results"][name]
        assert r["ratio"] > 0 and r["met"] == (
            r["ratio"] >= 0.95 if name == "causal_lm" else r["ratio"] <= 0.7
        )
        assert r["goal"]
    g = report["results"]["gradient_checkpointing"]
    assert g["with_extra_mb"] > 0 and g["without_extra_mb"] > 0
    assert g["time_ratio"] > 0
    assert "causal LM tokens/s" in report["table"]
    assert "gradient checkpointing" in report["table"]
