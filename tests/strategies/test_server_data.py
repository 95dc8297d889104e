"""Fed-SB ``init=server_data``: the server calibrates on data it holds itself (its
``strategy.server_data_path`` file), never on the clients' rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedlora import data
from fedlora.errors import ConfigError
from fedlora.methods.fedsb import FedSB
from fedlora.settings import Settings, with_
from strategies import server_app
from strategies.strategy import LoRAStrategy

NUM_CLIENTS = 3
CALIBRATION = 24


def write_tagged(path: Path, tag: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` synthetic rows, each tagged with its own ``row_id`` (``tag-i``).

    The synthetic sentences repeat, so rows can only be told apart by that tag."""
    table = data.synthetic_table(n, seed)[["sentence", "label"]]
    table.insert(0, "row_id", [f"{tag}-{i}" for i in range(n)])
    table.to_csv(path, sep="\t", index=False)
    return table


@pytest.fixture
def folders(tmp_path):
    """A data folder (train.tsv, dev.tsv) and a separate server calibration file."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_tagged(folder / "train.tsv", "train", 240, seed=1)
    write_tagged(folder / "dev.tsv", "dev", 40, seed=2)
    calib = tmp_path / "server_calibration.tsv"
    write_tagged(calib, "calib", 60, seed=3)
    return folder, calib


def overrides(tiny_bert, folder, *extra):
    return [
        f"model.name={tiny_bert}",
        "data=sst2",
        f"data.path={folder}",
        "strategy=fedsb",
        "adapter.r=4",
        f"federation.num_clients={NUM_CLIENTS}",
        "train.device=cpu",
        "train.batch_size=8",
        f"strategy.calibration_examples={CALIBRATION}",
        *extra,
    ]


class Stop(Exception):
    """Raised instead of Flower's round loop: the init is all this test needs."""


def test_calibration_rows_are_never_client_training_rows(
    folders, tiny_bert, tmp_path, monkeypatch
):
    folder, calib = folders
    cfg = server_app.compose(
        overrides(
            tiny_bert,
            folder,
            "strategy.init=server_data",
            f"strategy.server_data_path={calib}",
        )
    )
    # every tokenised example -> the row_id of the row it came from (by object)
    origin: dict[int, str] = {}
    keep: list = []
    real_tokenise = data.tokenise

    def tokenise(table, *args, **kwargs):
        out = real_tokenise(table, *args, **kwargs)
        for example, row_id in zip(out, table["row_id"], strict=True):
            origin[id(example)] = row_id
        keep.extend(out)  # keep them alive: ids stay unique
        return out

    calibration: list = []
    real_gradient_sums = server_app.gradient_sums

    def gradient_sums(model, examples, *args, **kwargs):
        calibration.extend(examples)
        return real_gradient_sums(model, examples, *args, **kwargs)

    def stop(*_args, **_kwargs):
        raise Stop

    data.clear_caches()  # nothing cached: every example passes the spy
    monkeypatch.setattr(data, "tokenise", tokenise)
    monkeypatch.setattr(server_app, "gradient_sums", gradient_sums)
    monkeypatch.setattr(LoRAStrategy, "start", stop)
    with pytest.raises(Stop):
        server_app.run_server(None, cfg, tmp_path / "run")  # init=server_data ran
    assert calibration, "the server computed no calibration gradient"

    plain = Settings.from_dict(server_app.settings(cfg))
    _, tokenizer = server_app.build(plain)
    calib_rows = [origin[id(e)] for e in calibration]
    client_rows, client_texts = [], set()
    for pid in range(NUM_CLIENTS):
        train, _ = data.client_examples(plain, tokenizer, pid, NUM_CLIENTS)
        client_rows.append({origin[id(e)] for e in train})
        client_texts |= {tuple(e["input_ids"]) for e in train}
    for pid, rows in enumerate(client_rows):
        shared = sorted(set(calib_rows) & rows)
        assert not shared, f"calibration uses partition {pid}'s training rows {shared}"
    evals = {origin[id(e)] for e in data.server_examples(plain, tokenizer)}
    assert not set(calib_rows) & evals  # nor the split accuracy is reported on
    assert calib_rows == [f"calib-{i}" for i in range(CALIBRATION)]
    # the texts alone could not tell: the synthetic sentences repeat across files
    assert {tuple(e["input_ids"]) for e in calibration} & client_texts


def test_server_data_without_a_file_is_refused(folders, tiny_bert):
    folder, _ = folders
    with pytest.raises(ConfigError) as err:
        server_app.compose(overrides(tiny_bert, folder, "strategy.init=server_data"))
    assert err.value.key == "strategy.server_data_path"
    assert err.value.found is None
    assert "evaluation split it reports accuracy on" in str(err.value)
    assert "random_orthogonal" in str(err.value)
    with pytest.raises(ConfigError, match="strategy.server_data_path"):
        FedSB(init="server_data")


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("train.tsv", "the clients' training split"),
        ("dev.tsv", "the evaluation split accuracy is reported on"),
    ],
)
def test_the_clients_data_or_the_evaluation_split_is_refused(
    folders, tiny_bert, name, role
):
    folder, _ = folders
    with pytest.raises(ConfigError) as err:
        server_app.compose(
            overrides(
                tiny_bert,
                folder,
                "strategy.init=server_data",
                f"strategy.server_data_path={folder / name}",
            )
        )
    assert err.value.key == "strategy.server_data_path"
    assert role in str(err.value)


def test_a_single_data_file_is_the_clients_data(folders, tiny_bert):
    folder, _ = folders
    with pytest.raises(ConfigError, match="clients' training data"):
        server_app.compose(
            overrides(
                tiny_bert,
                folder / "train.tsv",
                "strategy.init=server_data",
                f"strategy.server_data_path={folder / 'train.tsv'}",
            )
        )


def test_a_missing_file_or_column_is_refused(folders, tiny_bert, tmp_path):
    folder, calib = folders
    with pytest.raises(ConfigError, match="no such file"):
        server_app.compose(
            overrides(
                tiny_bert,
                folder,
                "strategy.init=server_data",
                f"strategy.server_data_path={tmp_path / 'nope.tsv'}",
            )
        )
    cfg = server_app.compose(
        overrides(
            tiny_bert,
            folder,
            "strategy.init=server_data",
            f"strategy.server_data_path={calib}",
        )
    )
    # a column the calibration file lacks (the clients' data has it: validation
    # reads the data, so a column missing there is refused before)
    plain = with_(
        Settings.from_dict(server_app.settings(cfg)), "data.text_column", "review"
    )
    _, tokenizer = server_app.build(plain)
    with pytest.raises(ConfigError) as err:
        data.server_calibration_examples(plain, tokenizer, 8)
    assert err.value.key == "strategy.server_data_path"
    assert "'review'" in str(err.value) and "row_id" in str(err.value)


def test_dp_users_are_pointed_at_a_server_file(folders, tiny_bert):
    folder, _ = folders
    with pytest.raises(ConfigError) as err:
        server_app.compose(
            overrides(
                tiny_bert,
                folder,
                "privacy=dp_sgd",
                "strategy.init=federated_gradient",
                "federation.fraction_evaluate=0",
            )
        )
    assert err.value.key == "strategy.init"
    assert "strategy.server_data_path" in str(err.value)
    assert "never the clients' data" in str(err.value)
