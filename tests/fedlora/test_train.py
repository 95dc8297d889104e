"""Local training and evaluation: classification and causal-LM instruction tuning."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.adapters import get_state
from fedlora.build import build
from fedlora.data import client_examples, synthetic_table, tokenise
from fedlora.errors import ConfigError
from fedlora.models import resolve_device
from fedlora.settings import with_
from fedlora.train import batch_indices, batch_loss, collate, evaluate, train_local

CPU = torch.device("cpu")


def test_collate_pads_dynamically_to_the_longest_example():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
            {"input_ids": [8], "attention_mask": [1], "labels": 0},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 56, size=1000).tolist()

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    g = torch.Generator().manual_seed(0)
    plain = batch_indices(lengths, 32, g, group_by_length=False)
    grouped = batch_indices(lengths, 32, torch.Generator().manual_seed(0), True)
    for batches in (plain, grouped):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) == 32 for b in batches[:-1]) and len(batches[-1]) == 8
    assert padded(grouped) < 0.6 * padded(plain)  # 1.04x vs 1.9x the real tokens
    again = batch_indices(lengths, 32, torch.Generator().manual_seed(0), True)
    other = batch_indices(lengths, 32, torch.Generator().manual_seed(1), True)
    assert again == grouped and other != grouped  # seeded, and shuffled
    longest_first = batch_indices(lengths, 32, None, True)
    assert lengths[longest_first[0][0]] == max(lengths)


def test_grouping_by_length_changes_speed_not_the_evaluation(settings):
    model, tok = build(settings)
    examples, _ = client_examples(settings, tok, 0, 1)
    task = settings.model.task
    grouped = evaluate(model, examples, task, CPU, tok.pad_token_id, batch_size=8)
    one_by_one = evaluate(model, examples, task, CPU, tok.pad_token_id, batch_size=1)
    assert grouped["eval_accuracy"] == one_by_one["eval_accuracy"]
    assert grouped["eval_loss"] == pytest.approx(one_by_one["eval_loss"], rel=1e-5)


def test_training_changes_exactly_the_trainable_weights(settings):
    model, tok = build(settings)
    frozen_before = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    before = get_state(model)
    examples, _ = client_examples(settings, tok, 0, 2)
    out = train_local(model, examples, settings.train, CPU, tok.pad_token_id, seed=0)
    after = get_state(model)
    assert out["num_examples"] == len(examples) and out["steps"] == 6  # ceil(90/16)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_local_steps_override_epochs_and_training_is_seeded(settings):
    settings = with_(settings, "train.local_steps", 3)
    tok = build(settings)[1]
    examples, _ = client_examples(settings, tok, 0, 2)
    states = []
    for _ in range(2):
        model, _ = build(settings)
        out = train_local(model, examples, settings.train, CPU, tok.pad_token_id, 7)
        assert out["steps"] == 3 and out["num_examples"] == 48
        states.append(get_state(model))
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k])


def test_training_on_minilm_learns_the_synthetic_task(settings):
    settings = with_(
        settings, "model.name", "minilm", "train.lr", 2e-3, "train.local_epochs", 3
    )
    model, tok = build(settings)
    table = synthetic_table(200, seed=5)
    ex = tokenise(table, tok, settings.data, "seq_cls", 32)
    before = evaluate(model, ex[150:], "seq_cls", CPU, tok.pad_token_id, 64)
    train_local(model, ex[:150], settings.train, CPU, tok.pad_token_id, seed=0)
    after = evaluate(model, ex[150:], "seq_cls", CPU, tok.pad_token_id, 64)
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_accuracy"] >= 0.8


def llama(settings, tiny_llama, *changes):
    """The unit tests' settings on the tiny Llama (causal LM on q and v)."""
    return with_(
        settings,
        "model.name",
        str(tiny_llama),
        "model.task",
        "causal_lm",
        "adapter.target_modules",
        ["q_proj", "v_proj"],
        *changes,
    )


def test_causal_lm_instruction_tuning_lowers_response_loss(settings, tiny_llama):
    settings = llama(settings, tiny_llama, "train.lr", 5e-2, "train.local_epochs", 4)
    model, tok = build(settings)
    table = synthetic_table(64, seed=2)
    ex = tokenise(table, tok, settings.data, "causal_lm", 48)
    before = evaluate(model, ex, "causal_lm", CPU, tok.pad_token_id, 64)
    train_local(model, ex, settings.train, CPU, tok.pad_token_id, seed=0)
    after = evaluate(model, ex, "causal_lm", CPU, tok.pad_token_id, 64)
    assert set(after) == {"eval_loss", "eval_perplexity", "eval_examples"}
    assert after["eval_perplexity"] == pytest.approx(np.exp(after["eval_loss"]))
    assert after["eval_loss"] < before["eval_loss"] - 0.2


def _loss_and_grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {
        n: p.grad.detach().double().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return float(loss), grads


def test_causal_lm_loss_keeps_only_the_logits_of_response_positions(
    settings, tiny_llama
):
    """``batch_loss`` asks the head for the response positions' logits alone and
    gives the loss and the gradients of ``model(**batch).loss`` (every position's
    logits): prompts of different lengths, right padding, a row of prompt only."""
    model, tok = build(llama(settings, tiny_llama))
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # a trained adapter's scale
        if "lora_B" in name:
            param.data.normal_(0.0, 1e-3)
    ex = tokenise(synthetic_table(8, seed=3), tok, settings.data, "causal_lm", 48)
    batch = collate(ex[:6], tok.pad_token_id)
    batch["labels"][5, :] = -100  # a row without a response token
    head = model.get_output_embeddings()
    shapes = []
    hook = head.register_forward_hook(lambda m, i, out: shapes.append(out.shape))
    ours, ours_grads = _loss_and_grads(model, batch, batch_loss)
    hook.remove()
    want, want_grads = _loss_and_grads(model, batch, lambda m, b: m(**b).loss)
    responses = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < responses < batch["labels"].numel() // 2
    assert shapes == [torch.Size([responses, head.out_features])]
    assert ours == pytest.approx(want, rel=1e-6)
    assert ours_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(ours_grads[name], grad, rtol=0, atol=1e-5 * scale)


def test_causal_lm_loss_falls_back_to_every_logit_without_logits_to_keep(
    settings, tiny_llama
):
    class NoMask(torch.nn.Module):  # a model whose forward has no such argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels=None):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels
            )

    model, tok = build(llama(settings, tiny_llama))
    ex = tokenise(synthetic_table(4, seed=3), tok, settings.data, "causal_lm", 48)
    batch = collate(ex, tok.pad_token_id)
    wrapped = NoMask(model)
    assert float(batch_loss(wrapped, batch)) == pytest.approx(
        float(model(**batch).loss), rel=1e-6
    )
    assert wrapped._fedlora_full_logits


def test_empty_partition_and_bad_device_give_clear_errors(settings):
    model, tok = build(settings)
    with pytest.raises(ConfigError, match="federation.num_clients"):
        train_local(model, [], settings.train, CPU, tok.pad_token_id, seed=0)
    with pytest.raises(ConfigError, match="train.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(ConfigError, match="no GPU"):
            resolve_device("cuda")


def test_unknown_optimizer_names_the_key(settings):
    settings = with_(settings, "train.optimizer", "lion")
    model, tok = build(settings)
    ex = tokenise(
        pd.DataFrame({"sentence": ["a b"], "label": [1]}),
        tok,
        settings.data,
        "seq_cls",
        8,
    )
    with pytest.raises(ConfigError, match="train.optimizer"):
        train_local(model, ex, settings.train, CPU, tok.pad_token_id, seed=0)


def _one_step_state(settings, examples, pad_id, physical):
    """The trainable state after one optimizer step over all ``examples``."""
    model, _ = build(settings)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same step with and without pieces, not the same masks
    train_cfg = replace(
        settings.train,
        batch_size=len(examples),
        local_steps=1,
        max_physical_batch_size=physical,
    )
    out = train_local(model, examples, train_cfg, CPU, pad_id, seed=0)
    return get_state(model), out["train_loss"]


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_physical_batches_take_the_same_step_as_the_whole_batch(
    settings, tiny_llama, task
):
    if task == "causal_lm":
        settings = with_(
            settings,
            "model.name",
            str(tiny_llama),
            "model.task",
            "causal_lm",
            "adapter.target_modules",
            ["q_proj", "v_proj"],
        )
    # the step is lr x gradient: compared as is
    settings = with_(settings, "train.optimizer", "sgd", "train.lr", 1.0)
    _, tok = build(settings)
    table = synthetic_table(23, seed=4)
    ex = tokenise(table, tok, settings.data, task, 48)
    assert len({len(e["input_ids"]) for e in ex}) > 1  # pieces pad differently
    whole, whole_loss = _one_step_state(settings, ex, tok.pad_token_id, 0)
    pieces, pieces_loss = _one_step_state(settings, ex, tok.pad_token_id, 5)
    frozen = with_(settings, "train.lr", 0.0)
    start, _ = _one_step_state(frozen, ex, tok.pad_token_id, 0)
    moved = 0
    for k in whole:  # LoRA's A gets no gradient while B is zero: only B and the head
        step = whole[k] - start[k]
        moved += float(np.abs(step).max()) > 1e-5
        np.testing.assert_allclose(pieces[k] - start[k], step, rtol=1e-3, atol=1e-7)
    assert moved >= 2  # a step the comparison can see (head, value B)
    assert pieces_loss == pytest.approx(whole_loss, rel=1e-5)


def test_a_bad_physical_batch_limit_names_the_key(settings):
    settings = with_(settings, "train.max_physical_batch_size", -1)
    model, tok = build(settings)
    ex, _ = client_examples(settings, tok, 0, 2)
    with pytest.raises(ConfigError, match="train.max_physical_batch_size"):
        train_local(model, ex, settings.train, CPU, tok.pad_token_id, seed=0)
