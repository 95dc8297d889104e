"""The checks made before the first round: the model's modules, and the data the
simulated clients would read (columns, labels, one partition per client)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedlora import preflight as pre
from fedlora.data import server_examples, synthetic_table
from fedlora.errors import ConfigError
from fedlora.models import load_tokenizer
from fedlora.settings import with_


def local_data(settings, tmp_path, train_labels, dev_labels=(0, 1)):
    """``settings`` reading a train/dev folder whose labels are the given ones."""

    def write(split, labels):
        table = synthetic_table(len(labels), seed=0)[["sentence"]]
        table["label"] = list(labels)
        table.to_csv(tmp_path / f"{split}.tsv", sep="\t", index=False)

    write("train", train_labels)
    write("dev", dev_labels)
    return with_(
        settings,
        "data",
        {
            **settings.data.to_dict(),
            "name": "custom",
            "path": str(tmp_path),
            "train_split": "train",
            "eval_split": "dev",
        },
    )


def test_target_modules_the_model_lacks_are_found_without_loading_it(settings):
    before = torch.random.get_rng_state()
    assert pre.model_problems(settings) == []  # query, value: BERT's
    assert pre.model_problems(with_(settings, "model.num_labels", None)) == []
    (problem,) = pre.model_problems(with_(settings, "adapter.target_modules", ["foo"]))
    assert problem.key == "adapter.target_modules" and problem.found == ["foo"]
    assert (
        "module names in this model include" in problem.fix and "query" in problem.fix
    )
    assert torch.equal(torch.random.get_rng_state(), before)  # the seed untouched


def test_more_clients_than_examples_is_found_before_the_run(settings):
    assert pre.data_problems(settings) == []
    (problem,) = pre.data_problems(with_(settings, "federation.num_clients", 5000))
    assert str(problem) == (
        "federation.num_clients=5000: need between 1 and 200 clients (the number "
        "of training examples); lower it or use more data"
    )


def test_labels_the_head_cannot_take_name_the_key_and_the_fix(settings, tmp_path):
    ok = local_data(settings, tmp_path, [0, 1] * 10)
    assert pre.data_problems(ok) == []
    (problem,) = pre.data_problems(local_data(settings, tmp_path, [0, 1, 2, 3] * 5))
    assert problem.key == "model.num_labels" and problem.found == 2
    assert "integer labels go up to 3, so the model needs 4 labels" in problem.fix
    # string labels are names: three of them do not fit a two-label head
    three = local_data(settings, tmp_path, ["pos", "neg", "mid"] * 5, ["pos", "neg"])
    (problem,) = pre.data_problems(three)
    assert problem.key == "model.num_labels" and problem.found == 2
    assert "the data has 3 labels ['mid', 'neg', 'pos']" in problem.fix
    # the evaluation split too, which is also what the server itself checks
    bad_dev = local_data(settings, tmp_path, [0, 1] * 10, dev_labels=[-1, -1])
    (problem,) = pre.data_problems(bad_dev)
    assert problem.key == "data.label_column" and "negative labels (-1)" in problem.fix
    tokenizer = load_tokenizer(settings.model)
    with pytest.raises(ConfigError, match=r"^data\.label_column='label': .*\(-1\)"):
        server_examples(bad_dev, tokenizer)


def test_preflight_reports_every_problem_at_once(settings):
    bad = with_(
        settings, "adapter.target_modules", ["foo"], "federation.num_clients", 5000
    )
    with pytest.raises(ConfigError) as info:
        pre.preflight(bad, data=True)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("adapter.target_modules=['foo']: no module")
    assert lines[1].startswith("  federation.num_clients=5000: need between 1 and")


def test_without_data_the_clients_data_is_never_read(settings, monkeypatch):
    """A deployment's server checks the model only: it must not read the data its
    clients hold."""

    def refuse(*args, **kwargs):
        raise AssertionError("the clients' data was read")

    monkeypatch.setattr(pre, "load_splits", refuse)
    monkeypatch.setattr(pd, "read_csv", refuse)
    pre.preflight(with_(settings, "federation.num_clients", 5000), data=False)
    with pytest.raises(ConfigError, match=r"^adapter\.target_modules"):
        pre.preflight(with_(settings, "adapter.target_modules", ["foo"]), data=False)
