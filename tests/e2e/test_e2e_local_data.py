"""End to end: ``data=local`` on a CSV of string labels, as a new user runs it."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import yaml

from tests.conftest import adapter_metrics, run_front_door

NAMES = ["negative", "neutral", "positive"]  # sorted: ids 0, 1, 2


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A CSV with columns ``review`` and ``sentiment`` (three string labels)."""
    words = {"negative": "awful", "neutral": "okay", "positive": "great"}
    rng = random.Random(0)
    rows = []
    for i in range(300):
        label = rng.choice(NAMES)
        rows.append(
            {"id": i, "review": f"the film was {words[label]}", "sentiment": label}
        )
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_a_csv_of_string_labels_runs_and_its_adapter_keeps_the_names(
    tiny_bert, reviews, tmp_path
):
    from fedlora.models import load_base_model
    from fedlora.settings import Settings

    run = tmp_path / "run"
    rows = run_front_door(
        run,
        tiny_bert,
        "data=local",
        f"data.path={reviews}",
        "data.text_column=review",
        "data.label_column=sentiment",
        drop=("data.num_examples", "data.num_eval_examples"),  # synthetic's keys
    )
    assert rows[-1]["round"] == 2
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["num_labels"] == 3  # null in conf/: from the data
    assert resolved["data"]["labels"] == NAMES
    for folder in (run, run / "adapter"):
        record = json.loads((folder / "labels.json").read_text())
        assert record["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    # the adapter loads onto a base model with the run's label names
    cfg = Settings.from_dict(resolved)
    base = load_base_model(cfg.model, seed=7, labels=record)  # labels.json as is
    assert base.config.id2label[2] == "positive"
    metrics = adapter_metrics(base, run / "adapter", cfg)
    assert metrics["eval_accuracy"] == rows[-1]["eval_accuracy"]


@pytest.fixture(scope="module")
def colour_tasks(tmp_path_factory):
    """A JSON lines instruction file with its own column names: ``question``,
    ``context`` (empty in a third of the rows) and ``answer``."""
    colours = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black"}
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    with path.open("w") as out:
        for i in range(200):
            thing = rng.choice(sorted(colours))
            row = {
                "question": "What colour is this?",
                "context": f"the {thing}" if i % 3 else "",
                "answer": colours[thing],
            }
            out.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_a_jsonl_instruction_file_trains_a_causal_lm_on_the_answers(
    tiny_llama, colour_tasks, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.data import load_splits
    from fedlora.settings import Settings

    run = tmp_path / "run"
    rows = run_front_door(
        run,
        tiny_llama,
        "model.task=causal_lm",
        "adapter.target_modules=[q_proj,v_proj]",
        "data=local",
        f"data.path={colour_tasks}",
        "data.instruction_column=question",
        "data.input_column=context",
        "data.output_column=answer",
        drop=("data.num_examples", "data.num_eval_examples"),  # synthetic's keys
    )
    assert rows[-1]["round"] == 2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # the reported loss, recomputed here: the mean negative log-likelihood of the
    # answer tokens (and the end-of-sequence token) after the prompt written out
    # by hand, under the run's adapter read back by PEFT
    cfg = Settings.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    _, held_out = load_splits(cfg.data)  # the rows the server evaluates on
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    nll, count = 0.0, 0
    for q, c, a in held_out[["question", "context", "answer"]].itertuples(False):
        block = f"Input:\n{c}\n\n" if c else ""
        prompt = tok(f"Instruction:\n{q}\n\n{block}Response:\n")["input_ids"][1:-1]
        answer = tok(a)["input_ids"][1:-1] + [tok.eos_token_id]  # no [CLS] [SEP]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for k, token in enumerate(answer, start=len(prompt)):
            nll -= float(logp[k - 1, token])
            count += 1
    assert rows[-1]["eval_examples"] == len(held_out) == 20
    assert nll / count == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)
