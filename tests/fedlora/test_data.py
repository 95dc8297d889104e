"""Loading, partitioning and tokenising data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from fedlora.data import (
    check_columns,
    client_examples,
    load_splits,
    partition_indices,
    read_table,
    synthetic_table,
    tokenise,
)
from fedlora.errors import ConfigError
from fedlora.models import load_tokenizer


def part(settings, **changes):
    """The fixture's ``partition`` settings with ``changes``."""
    return replace(settings.partition, **changes)


def data(settings, **changes):
    """The fixture's ``data`` settings with ``changes``."""
    return replace(settings.data, **changes)


def labels(n=1000, classes=2, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def skew(parts, y):
    """Mean total-variation distance of client label histograms from the global one."""
    classes = np.unique(y)
    glob = np.array([(y == c).mean() for c in classes])
    tvs = [
        0.5 * np.abs(np.array([(y[p] == c).mean() for c in classes]) - glob).sum()
        for p in parts
    ]
    return float(np.mean(tvs))


def test_iid_partitions_are_disjoint_equal_and_cover_the_data(settings):
    y = labels()
    parts = partition_indices(y, 4, part(settings, type="iid"))
    assert [len(p) for p in parts] == [250] * 4
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))


@pytest.mark.parametrize("n,k", [(1000, 4), (1003, 7), (5000, 1000), (10, 10)])
def test_iid_partitions_are_flwr_datasets_iid_partitions(settings, n, k):
    """Taken without a Dataset per client, they are the library's own, row for row
    (the reference: flwr-datasets' IidPartitioner on the same table)."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    ours = partition_indices(np.zeros(n, dtype=int), k, part(settings, type="iid"))
    theirs = IidPartitioner(k)
    theirs.dataset = datasets.Dataset.from_dict({"idx": np.arange(n)})
    assert len(ours) == k
    for i in range(k):
        assert ours[i].tolist() == theirs.load_partition(i)["idx"]


def test_dirichlet_respects_min_size_and_skews_more_with_smaller_alpha(settings):
    y = labels(2000, classes=4)
    cfg = part(settings, type="dirichlet", min_partition_size=20, seed=0)
    sharp = partition_indices(y, 10, replace(cfg, alpha=0.1))
    flat = partition_indices(y, 10, replace(cfg, alpha=100.0))
    assert min(len(p) for p in sharp) >= 20
    assert sum(len(p) for p in sharp) == 2000
    assert skew(sharp, y) > 0.3 > 0.1 > skew(flat, y)


def test_shard_partition_gives_few_labels_per_client(settings):
    y = np.repeat(np.arange(10), 100)
    parts = partition_indices(y, 10, part(settings, type="shard", shards_per_client=2))
    assert max(len(np.unique(y[p])) for p in parts) <= 2


def test_partitions_are_reproducible_from_the_seed(settings):
    y = labels()
    cfg = part(settings, type="dirichlet", alpha=0.5, min_partition_size=10, seed=3)
    first, second = partition_indices(y, 5, cfg), partition_indices(y, 5, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=False))


def test_impossible_dirichlet_minimum_names_the_key(settings):
    with pytest.raises(ConfigError, match="partition.min_partition_size"):
        partition_indices(
            labels(100),
            10,
            part(settings, type="dirichlet", alpha=0.1, min_partition_size=50),
        )


def test_more_clients_than_examples_names_the_key(settings):
    with pytest.raises(ConfigError, match="federation.num_clients"):
        partition_indices(labels(5), 6, part(settings, type="iid"))


def test_missing_path_and_missing_label_column_name_their_keys(settings, tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_splits(data(settings, name="x", path=str(tmp_path / "nope")))
    table = pd.DataFrame({"sentence": ["a"], "target": [1]})
    with pytest.raises(ConfigError, match="data.label_column") as info:
        check_columns(
            table,
            data(settings, text_column="sentence", label_column="label"),
            "seq_cls",
        )
    assert "target" in str(info.value)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_local_formats_load_the_same_table(settings, tmp_path, suffix):
    table = synthetic_table(30, seed=1)[["sentence", "label"]]
    path = tmp_path / f"train{suffix}"
    {
        ".tsv": lambda: table.to_csv(path, sep="\t", index=False),
        ".csv": lambda: table.to_csv(path, index=False),
        ".jsonl": lambda: table.to_json(path, orient="records", lines=True),
        ".parquet": lambda: table.to_parquet(path),
    }[suffix]()
    pd.testing.assert_frame_equal(
        read_table(path).reset_index(drop=True), table, check_dtype=False
    )
    (tmp_path / f"dev{suffix}").write_bytes(path.read_bytes())
    train, evals = load_splits(
        data(
            settings,
            name="custom",
            path=str(tmp_path),
            train_split="train",
            eval_split="dev",
        )
    )
    assert len(train) == len(evals) == 30


def test_missing_split_file_names_the_split_key(settings, tmp_path):
    synthetic_table(10, 0).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    custom = data(
        settings,
        name="custom",
        path=str(tmp_path),
        train_split="train",
        eval_split="dev",
    )
    with pytest.raises(ConfigError, match="data.eval_split"):
        load_splits(custom)


def test_causal_tokenisation_masks_the_prompt(settings, tiny_llama):
    tok = load_tokenizer(replace(settings.model, name=str(tiny_llama)))
    table = pd.DataFrame(
        {"prompt": ["Review: fine\nSentiment:"], "response": [" positive"]}
    )
    (ex,) = tokenise(
        table,
        tok,
        data(settings, prompt_column="prompt", response_column="response"),
        "causal_lm",
        64,
    )
    n_prompt = len(
        tok("Review: fine\nSentiment:", add_special_tokens=False)["input_ids"]
    )
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_client_examples_are_tokenised_once_and_cached(settings):
    tok = load_tokenizer(settings.model)
    first = client_examples(settings, tok, 0, 2)
    assert client_examples(settings, tok, 0, 2) is first
    train, held_out = first
    assert len(train) + len(held_out) == 100 and len(held_out) == 10


def test_partitioning_does_not_import_plotting_until_a_plot_is_asked_for():
    """flwr-datasets' ``__init__`` imports its plotting (matplotlib, seaborn:
    seconds of every start); fedlora's partitioning loads it lazily, in a fresh
    interpreter: same partitions as flwr-datasets' partitioner used directly, no
    matplotlib, and the plotting module still works when used."""
    import subprocess
    import sys

    code = """
import sys
import numpy as np
import datasets
from fedlora.data import partition_indices
from fedlora.settings import PartitionSettings
y = np.random.default_rng(0).integers(0, 3, 500)
cfg = PartitionSettings(type="dirichlet", alpha=0.3, min_partition_size=10,
                        shards_per_client=2, seed=4, column=None)
ours = partition_indices(y, 6, cfg)
assert "matplotlib" not in sys.modules and "seaborn" not in sys.modules
from flwr_datasets.partitioner import DirichletPartitioner
theirs = DirichletPartitioner(6, "label", alpha=0.3, min_partition_size=10,
                              self_balancing=False, shuffle=True, seed=4)
theirs.dataset = datasets.Dataset.from_dict({"label": y, "idx": np.arange(500)})
for k in range(6):
    assert ours[k].tolist() == theirs.load_partition(k)["idx"], k
import flwr_datasets
assert callable(flwr_datasets.visualization.plot_label_distributions)
assert "matplotlib" in sys.modules
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
