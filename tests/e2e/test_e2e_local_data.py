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
