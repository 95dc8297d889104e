"""data=local: a user's own file or folder, string labels, model.num_labels."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import yaml

from fedlora.build import build
from fedlora.data import (
    _partitioned,
    client_examples,
    label_ids,
    labels_record,
    load_splits,
    resolve_labels,
    server_examples,
    write_labels,
)
from fedlora.errors import ConfigError
from fedlora.models import load_tokenizer
from fedlora.settings import with_
from fedlora.validate import validate
from tests.conftest import REPO

NAMES = ("LOC", "NUM", "PER")  # sorted: the ids are 0, 1, 2


def table(n=60):
    """``n`` rows, columns ``question`` and ``kind``: string labels, unsorted."""
    kinds = ["PER", "LOC", "NUM"]
    return pd.DataFrame(
        {
            "question": [f"question number {i}" for i in range(n)],
            "kind": [kinds[i % 3] for i in range(n)],
        }
    )


def local(settings, path, **data):
    """The fixture's settings with conf/data/local.yaml's data section on ``path``
    (columns ``question``/``kind``) and ``model.num_labels`` null, as conf/ has it."""
    section = yaml.safe_load((REPO / "conf/data/local.yaml").read_text())
    section.update(
        {
            "path": str(path),
            "seed": 0,
            "text_column": "question",
            "label_column": "kind",
        }
    )
    section.update(data)
    return with_(settings, "data", section, "model.num_labels", None)


def write(t, path):
    """``t`` as the file ``path``, by its suffix."""
    suffix = path.suffix
    if suffix == ".tsv":
        t.to_csv(path, sep="\t", index=False)
    elif suffix == ".csv":
        t.to_csv(path, index=False)
    elif suffix == ".jsonl":
        t.to_json(path, orient="records", lines=True)
    else:
        t.to_parquet(path)
    return path


LAYOUTS = ["tsv", "csv", "jsonl", "parquet", "folder", "save_to_disk", "saved_dataset"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_with_its_string_labels_mapped(settings, tmp_path, layout):
    t = table()
    if layout in ("tsv", "csv", "jsonl", "parquet"):
        path = write(t, tmp_path / f"data.{layout}")
    elif layout == "folder":  # {train_split,eval_split}.<suffix>, mixed suffixes
        path = tmp_path / "folder"
        path.mkdir()
        write(t.iloc[:50], path / "train.csv")
        write(t.iloc[50:], path / "test.jsonl")
    elif layout == "save_to_disk":  # a DatasetDict's splits
        path = tmp_path / "saved"
        datasets.DatasetDict(
            train=datasets.Dataset.from_pandas(t.iloc[:50], preserve_index=False),
            test=datasets.Dataset.from_pandas(t.iloc[50:], preserve_index=False),
        ).save_to_disk(str(path))
    else:  # one Dataset: 10% held out, as for one file
        path = tmp_path / "one"
        datasets.Dataset.from_pandas(t, preserve_index=False).save_to_disk(str(path))
    s = resolve_labels(local(settings, path))
    train, evals = load_splits(s.data)
    assert len(train) + len(evals) == 60 and len(evals) >= 6
    assert set(train["question"]) | set(evals["question"]) == set(t["question"])
    assert s.data.labels == NAMES and s.model.num_labels == 3
    ids = label_ids(train, s.data)
    assert [NAMES[i] for i in ids] == train["kind"].tolist()


def test_a_missing_split_names_the_splits_found(settings, tmp_path):
    write(table(), tmp_path / "train.csv")
    write(table(), tmp_path / "dev.csv")
    with pytest.raises(
        ConfigError, match=r"data.eval_split='test'.*\['dev', 'train'\]"
    ):
        load_splits(local(settings, tmp_path).data)


@pytest.mark.parametrize("key", ["text_column", "label_column"])
def test_a_missing_column_names_the_key_and_lists_the_columns_found(
    settings, tmp_path, key
):
    s = local(settings, write(table(), tmp_path / "d.csv"), **{key: "sentiment"})
    with pytest.raises(ConfigError) as err:
        validate(s)  # checked before any work
    assert err.value.key == f"data.{key}" and err.value.found == "sentiment"
    assert "['question', 'kind']" in str(err.value)


def test_ids_come_from_the_whole_data_not_a_clients_partition(settings, tmp_path):
    """Shard partitioning gives each client one label only; the ids stay those of
    the whole data's sorted label set on every client and the server."""
    write(table(54), tmp_path / "train.csv")  # 18 rows of each label
    write(table(9), tmp_path / "test.csv")
    s = local(settings, tmp_path)
    s = with_(s, "partition.type", "shard", "partition.shards_per_client", 1)
    s = with_(s, "data.client_eval_fraction", 0.0)
    tok = load_tokenizer(s.model)
    train, parts = _partitioned(resolve_labels(s), 3)
    seen = []
    for k in range(3):
        rows = train.iloc[parts[k]]
        assert rows["kind"].nunique() == 1  # this client lacks two of the labels
        examples, _ = client_examples(s, tok, k, 3)
        expected = [NAMES.index(name) for name in rows["kind"]]
        assert [e["labels"] for e in examples] == expected
        seen.append(expected[0])
    assert sorted(seen) == [0, 1, 2]
    _, evals = load_splits(s.data)
    assert [e["labels"] for e in server_examples(s, tok)] == [
        NAMES.index(name) for name in evals["kind"]
    ]


def test_the_mapping_in_config_is_kept_in_its_order_and_refuses_unknown_labels(
    settings, tmp_path
):
    path = write(table(), tmp_path / "d.csv")
    s = resolve_labels(local(settings, path, labels=["PER", "NUM", "LOC"]))
    assert s.data.labels == ("PER", "NUM", "LOC") and s.model.num_labels == 3
    train, _ = load_splits(s.data)
    assert label_ids(train.iloc[:3], s.data) == [
        ("PER", "NUM", "LOC").index(k) for k in train["kind"].iloc[:3]
    ]
    short = resolve_labels(local(settings, path, labels=["PER", "NUM"]))
    with pytest.raises(ConfigError, match=r"data.labels=\['PER', 'NUM'\].*\['LOC'\]"):
        label_ids(train, short.data)


def test_num_labels_is_inferred_and_a_mismatch_names_both_numbers(settings, tmp_path):
    path = write(table(), tmp_path / "d.csv")
    assert resolve_labels(local(settings, path)).model.num_labels == 3
    wrong = with_(local(settings, path), "model.num_labels", 2)
    with pytest.raises(ConfigError) as err:
        validate(wrong)
    assert err.value.key == "model.num_labels" and err.value.found == 2
    assert "3 labels" in err.value.fix and "model.num_labels=3" in err.value.fix


def test_integer_labels_are_the_ids_and_num_labels_must_cover_them(settings, tmp_path):
    t = table().assign(kind=[i % 4 for i in range(60)])
    s = local(settings, write(t, tmp_path / "d.parquet"))
    resolved = resolve_labels(s)
    assert resolved.model.num_labels == 4 and resolved.data.labels is None
    assert resolve_labels(with_(s, "model.num_labels", 6)).model.num_labels == 6
    with pytest.raises(ConfigError, match=r"model.num_labels=3.*up to 3.*=4"):
        resolve_labels(with_(s, "model.num_labels", 3))


def test_the_label_names_reach_the_model_config_and_labels_json(settings, tmp_path):
    s = resolve_labels(local(settings, write(table(), tmp_path / "d.jsonl")))
    model, _ = build(s)
    assert model.config.id2label == dict(enumerate(NAMES))
    assert model.config.label2id == {name: i for i, name in enumerate(NAMES)}
    path = write_labels(tmp_path, s)
    record = json.loads(path.read_text())
    assert record == labels_record(s)
    assert record["id2label"] == {"0": "LOC", "1": "NUM", "2": "PER"}
    assert record["num_labels"] == 3


def test_the_synthetic_task_keeps_integer_labels(settings):
    s = resolve_labels(with_(settings, "model.num_labels", None))
    assert s.model.num_labels == 2 and s.data.labels is None
    assert np.array_equal(
        label_ids(load_splits(s.data)[0], s.data), load_splits(s.data)[0]["label"]
    )


def test_resolving_changes_only_the_labels_and_num_labels(settings, tmp_path):
    """The labels found are cached; the other settings are the caller's own."""
    path = write(table(), tmp_path / "d.csv")
    first = resolve_labels(local(settings, path))
    other = with_(local(settings, path), "adapter.r", 2, "train.lr", 0.5)
    second = resolve_labels(other)
    assert second.adapter.r == 2 and second.train.lr == 0.5
    assert second == with_(other, "model.num_labels", 3, "data.labels", list(NAMES))
    assert first.adapter.r == settings.adapter.r


def test_natural_partition_gives_each_client_the_rows_of_one_id(settings, tmp_path):
    """partition.type=natural: a client per value of partition.column (sorted)."""
    t = table().assign(
        site=[["b", "a", "c"][i % 3] if i < 45 else "a" for i in range(60)]
    )
    write(t.iloc[:54], tmp_path / "train.csv")
    write(t.iloc[54:], tmp_path / "test.csv")
    s = with_(
        local(settings, tmp_path),
        "partition.type",
        "natural",
        "partition.column",
        "site",
        "federation.num_clients",
        3,
    )
    assert validate(s) == s  # checked before any work
    train, parts = _partitioned(resolve_labels(s), 3)
    assert [sorted(set(train.iloc[p]["site"])) for p in parts] == [["a"], ["b"], ["c"]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(54))
    assert len(parts[0]) == 15 + 9  # uneven sizes, as the data has them
    with pytest.raises(ConfigError, match=r"federation.num_clients=4.*has 3.*=3"):
        validate(with_(s, "federation.num_clients", 4))
    with pytest.raises(ConfigError, match=r"partition.column='user'.*'site'"):
        validate(with_(s, "partition.column", "user"))


def test_a_path_under_the_synthetic_task_points_at_data_local():
    from strategies.server_app import compose

    with pytest.raises(ConfigError, match=r"data.path='x.csv'.*data=local"):
        compose(["data.path=x.csv"])
