"""data.validation_fraction: training rows the server holds out to tune on, never
the evaluation split accuracy is reported on nor any client's training data."""

from __future__ import annotations

import pandas as pd
import pytest

from fedlora.data import (
    clear_caches,
    load_splits,
    partition_table,
    resolve_labels,
    validation_table,
)
from fedlora.errors import ConfigError
from strategies.server_app import compose_settings


@pytest.fixture
def sst2_like(tmp_path):
    """SST-2's layout with every sentence distinct: 100 training, 20 dev rows."""
    for split, n in (("train", 100), ("dev", 20)):
        rows = pd.DataFrame(
            {"sentence": [f"{split} {i}" for i in range(n)], "label": [0, 1] * (n // 2)}
        )
        rows.to_csv(tmp_path / f"{split}.tsv", sep="\t", index=False)
    return tmp_path


def tuned(folder, *overrides):
    clear_caches()
    return compose_settings(
        ["data=sst2", f"data.path={folder}", "data.validation_fraction=0.2", *overrides]
    )


def test_the_validation_rows_come_from_training_and_no_client_gets_them(sst2_like):
    s = resolve_labels(tuned(sst2_like))
    train, evals = load_splits(s.data)
    held = validation_table(s.data)
    assert len(held) == 20 and len(train) == 80
    full = set(pd.read_csv(sst2_like / "train.tsv", sep="\t")["sentence"])
    dev = set(pd.read_csv(sst2_like / "dev.tsv", sep="\t")["sentence"])
    assert set(held["sentence"]) <= full
    assert not set(held["sentence"]) & dev  # never the reported split
    assert set(evals["sentence"]) == dev
    assert not set(held["sentence"]) & set(train["sentence"])
    assert set(held["sentence"]) | set(train["sentence"]) == full
    clients = partition_table(train, s, 3)  # the clients' rows: the rest only
    given = {train["sentence"].iloc[i] for part in clients for i in part}
    assert given == set(train["sentence"])


def test_the_validation_rows_follow_the_seed(sst2_like):
    first = set(validation_table(tuned(sst2_like).data)["sentence"])
    again = set(validation_table(tuned(sst2_like).data)["sentence"])
    other = set(validation_table(tuned(sst2_like, "data.seed=1").data)["sentence"])
    assert first == again and first != other


def test_no_validation_rows_by_default(sst2_like):
    clear_caches()
    s = compose_settings(["data=sst2", f"data.path={sst2_like}"])
    assert s.data.validation_fraction == 0
    assert validation_table(s.data).empty and len(load_splits(s.data)[0]) == 100


@pytest.mark.parametrize("bad", [1.0, -0.1, "many"])
def test_a_fraction_outside_0_1_is_refused_by_name(sst2_like, bad):
    with pytest.raises(ConfigError) as err:
        tuned(sst2_like, f"data.validation_fraction={bad}")
    assert err.value.key == "data.validation_fraction"
