"""Data: load a table (local file, hub, or the built-in synthetic task), partition it
across clients with flwr-datasets partitioners, and tokenise each partition once.

Settings (``data.*``): ``name`` (``synthetic`` builds the offline toy task), ``path``
(a file, a folder holding ``{split}.{tsv,csv,jsonl,json,parquet}``, or a folder
``datasets``' ``save_to_disk`` wrote), ``labels`` (the label names in id order;
null: the sorted label set of the whole data set), ``hub_id`` /
``hub_config`` (online users), ``train_split``, ``eval_split``, ``text_column``,
``label_column``; causal LM: ``layout`` and the columns of each layout
(``prompt_column``, ``response_column``, ``instruction_column``, ``input_column``,
``output_column``, ``messages_column``; :mod:`fedlora.layouts`),
``max_train_examples``, ``max_eval_examples``, ``client_eval_fraction``,
``validation_fraction`` (training rows the server holds out to tune on), ``seed``.
Partitioning (``partition.*``): ``type`` = ``iid`` | ``dirichlet`` | ``shard`` |
``natural`` (a client per value of ``column``), ``alpha``, ``min_partition_size``,
``shards_per_client``, ``column``, ``seed``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.errors import ConfigError
from fedlora.layouts import encode, resolve_layout
from fedlora.settings import DataSettings, PartitionSettings, Settings, with_

if TYPE_CHECKING:  # pandas is imported where a table is read or built: a ClientApp
    #   whose partition and labels are cached on its disk never loads it (0.4 s)
    import pandas as pd

log = logging.getLogger("fedlora")

Example = dict[str, Any]  # {"input_ids": [...], "attention_mask": [...], "labels": ...}
FORMATS = {
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
PARTITIONS = ("iid", "dirichlet", "shard", "natural")
_TOKENISED: dict[str, tuple[list[Example], list[Example]]] = {}
_PARTITIONED: dict[str, tuple[pd.DataFrame, list[np.ndarray]]] = {}


def _files_stamp(path: str | None, limit: int = 1000) -> list[tuple[str, int, int]]:
    """``(file, mtime_ns, size)`` of the data file, or of the files under the data
    folder (at most ``limit``): a cache keyed by it sees a file rewritten in place."""
    if not path:
        return []
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())[:limit]
    else:
        return []
    return [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]


def clear_caches() -> None:
    """Forget the partitions, label mappings and tokenised examples kept in this
    process."""
    _LABELS.clear()
    _TOKENISED.clear()
    _PARTITIONED.clear()


# --------------------------------------------------------------------------- loading
def synthetic_table(n: int, seed: int) -> pd.DataFrame:
    """A small sentiment-like task: the label is the polarity of one adjective.

    Sentences mix neutral filler with one polar word, so a model must find it.
    """
    pos = ["good", "great", "wonderful", "charming", "brilliant", "moving", "fun"]
    neg = ["bad", "awful", "boring", "dull", "clumsy", "tedious", "weak"]
    subjects = ["the film", "this movie", "the story", "the cast", "the script"]
    filler = ["honestly", "overall", "at times", "from start to end", "mostly", ""]
    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        adj = rng.choice(pos if label else neg)
        text = f"{rng.choice(subjects)} is {rng.choice(filler)} {adj}".replace(
            "  ", " "
        )
        rows.append(
            {
                "sentence": text,
                "label": label,
                "prompt": f"Review: {text}\nSentiment:",
                "response": " positive" if label else " negative",
            }
        )
    return pd.DataFrame(rows)


def read_table(path: Path) -> pd.DataFrame:
    """Read one local file by its suffix (tsv, csv, jsonl/json, parquet)."""
    import pandas as pd

    kind = FORMATS.get(path.suffix.lower())
    if kind == "tsv":
        return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
    if kind == "csv":
        return pd.read_csv(path, keep_default_na=False)
    if kind == "json":
        return pd.read_json(path, lines=path.suffix.lower() == ".jsonl")
    if kind == "parquet":
        return pd.read_parquet(path)
    raise ConfigError(
        "data.path",
        str(path),
        f"unsupported file type; use one of {', '.join(FORMATS)}",
    )


def _find_split(folder: Path, split: str) -> Path | None:
    for suffix in FORMATS:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_splits(data: DataSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(train, eval)`` tables as configured (synthetic, local or hub),
    without the validation rows ``data.validation_fraction`` holds out of the
    training split (:func:`validation_table`)."""
    train, evals = _tables(data)
    train, _ = split_validation(train, data.validation_fraction, int(data.seed))
    return train, evals


def _tables(data: DataSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, eval)`` as read and subsampled, the training split whole."""
    seed = int(data.seed)
    if data.name == "synthetic":
        n = int(data.num_examples)
        table = synthetic_table(n + int(data.num_eval_examples), seed)
        train, evals = table.iloc[:n], table.iloc[n:]
    elif data.path:
        train, evals = _load_local(data, seed)
    elif data.hub_id:
        train, evals = _load_hub(data)
    else:
        raise ConfigError(
            "data.path",
            None,
            "set data.path to a local file or folder "
            "(or data.hub_id for a Hugging Face dataset when online)",
        )
    train = _subsample(train, data.max_train_examples, seed)
    evals = _subsample(evals, data.max_eval_examples, seed)
    return train, evals.reset_index(drop=True)


def split_validation(
    train: pd.DataFrame, fraction: float | None, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(rest, validation)``: a shuffled ``fraction`` of the training rows (at
    least one when the fraction is positive) held out for tuning, taken before the
    clients' partitions are formed; the same rows for the same seed. Fraction 0 or
    None: nothing held out."""
    train = train.reset_index(drop=True)
    if not fraction:
        return train, train.iloc[:0]
    order = train.sample(frac=1.0, random_state=seed).index
    held = order[: max(1, int(float(fraction) * len(train)))]
    return train.drop(index=held), train.loc[held]


def validation_table(data: DataSettings) -> pd.DataFrame:
    """The rows :func:`split_validation` took out of the training split (empty
    when ``data.validation_fraction`` is 0): the tuning split, never the
    evaluation split accuracy is reported on."""
    train, _ = _tables(data)
    _, held = split_validation(train, data.validation_fraction, int(data.seed))
    return held.reset_index(drop=True)


def _load_local(data: DataSettings, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = Path(str(data.path)).expanduser()
    if not path.exists():
        raise ConfigError(
            "data.path",
            str(path),
            "no such file or folder; point it at "
            "a data file or at a folder with train/dev files",
        )
    if path.is_file():
        return _hold_out(read_table(path), seed)
    if _is_saved_dataset(path):
        return _load_saved(path, data, seed)
    splits = []
    for key in ("train_split", "eval_split"):
        name = str(getattr(data, key))
        found = _find_split(path, name)
        if found is None:
            present = sorted(
                {f.stem for f in path.iterdir() if f.suffix.lower() in FORMATS}
            )
            raise ConfigError(
                f"data.{key}",
                name,
                f"no {name}.<tsv|csv|jsonl|parquet> in {path} (its splits: "
                f"{present or 'none'}); set data.{key} to a split that exists",
            )
        splits.append(read_table(found))
    return splits[0], splits[1]


def _hold_out(table: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table as ``(train, eval)``: a shuffled 10% (at least 1 row) held out."""
    table = table.sample(frac=1.0, random_state=seed)
    n_eval = max(1, int(0.1 * len(table)))
    return table.iloc[n_eval:], table.iloc[:n_eval]


def _is_saved_dataset(folder: Path) -> bool:
    """A folder ``datasets.Dataset(Dict).save_to_disk`` wrote."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(
    folder: Path, data: DataSettings, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A ``save_to_disk`` folder: a DatasetDict's ``train_split`` and
    ``eval_split``, or a single Dataset with 10% held out."""
    import datasets

    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.Dataset):
        return _hold_out(saved.to_pandas(), seed)
    tables = []
    for key in ("train_split", "eval_split"):
        name = str(getattr(data, key))
        if name not in saved:
            raise ConfigError(
                f"data.{key}",
                name,
                f"the dataset in {folder} has no such split (its splits: "
                f"{sorted(saved)}); set data.{key} to one of them",
            )
        tables.append(saved[name].to_pandas())
    return tables[0], tables[1]


def _load_hub(data: DataSettings) -> tuple[pd.DataFrame, pd.DataFrame]:  # online
    import datasets

    ds = datasets.load_dataset(data.hub_id, data.hub_config)
    return (
        ds[data.train_split].to_pandas(),
        ds[data.eval_split].to_pandas(),
    )


def _subsample(table: pd.DataFrame, limit: Any, seed: int) -> pd.DataFrame:
    if limit is None or int(limit) >= len(table):
        return table
    return table.sample(n=int(limit), random_state=seed)


def check_columns(table: pd.DataFrame, data: DataSettings, task: str) -> None:
    """Raise ConfigError naming the column setting when a needed column is absent
    (causal LM: the columns of the data layout, :func:`fedlora.layouts.resolve_layout`).
    """
    if task != "seq_cls":
        resolve_layout(table.columns, data)
        return
    for key in ("text_column", "label_column"):
        column = getattr(data, key)
        if column not in table.columns:
            raise ConfigError(
                f"data.{key}",
                column,
                f"the data has no such column; its columns are {list(table.columns)}",
            )


# --------------------------------------------------------------------------- labels
LABELS_FILE = "labels.json"
_LABELS: dict[str, tuple[tuple[str, ...] | None, int]] = {}


def _label_column(table: pd.DataFrame, data: DataSettings) -> pd.Series:
    if data.label_column not in table.columns:
        raise ConfigError(
            "data.label_column",
            data.label_column,
            f"the data has no such column; its columns are {list(table.columns)}",
        )
    return table[data.label_column]


def found_labels(values: pd.Series, column: str) -> tuple[tuple[str, ...] | None, int]:
    """``(names, count)`` of a label column: string labels (``positive``,
    ``LOC``) give their sorted set and its size; integer labels give
    ``(None, max + 1)`` (they are the ids already).

    Raises
    ------
    ConfigError
        ``data.label_column``: empty labels, or negative integer ones.
    """
    import pandas as pd

    if values.empty:
        raise ConfigError("data.label_column", column, "the data has no rows")
    if values.isna().any():
        raise ConfigError(
            "data.label_column",
            column,
            f"{int(values.isna().sum())} rows have no label; fill or drop them",
        )
    integral = pd.api.types.is_integer_dtype(values) or (
        pd.api.types.is_float_dtype(values) and bool((values % 1 == 0).all())
    )
    if integral and not pd.api.types.is_bool_dtype(values):
        ids = values.astype(int)
        if int(ids.min()) < 0:
            raise ConfigError(
                "data.label_column",
                column,
                f"it holds negative labels ({int(ids.min())}); integer labels are "
                "the ids 0..num_labels-1, else list the names in data.labels",
            )
        return None, int(ids.max()) + 1
    names = tuple(sorted(values.astype(str).unique()))
    return names, len(names)


def resolve_labels(settings: Settings, cache_dir: str | Path | None = None) -> Settings:
    """``settings`` with the label mapping fixed for every party (classification).

    ``data.labels`` (the names in id order) is kept when given; else string labels
    get the sorted set of the whole data set's labels (training and evaluation
    splits, never one client's partition, so a client lacking a label cannot shift
    the ids). ``model.num_labels`` is inferred when null, and checked when given.
    The server sends the result to every client. The labels found are cached
    in-process, by the data and model settings and the data files' sizes and times
    (and in ``cache_dir`` when given: a deployment's fresh ClientApp processes then
    read neither the data nor import pandas).

    Raises
    ------
    ConfigError
        ``model.num_labels`` that does not fit the data (both numbers named), a
        missing label column (the columns found named), duplicate names in
        ``data.labels``.
    """
    s = settings
    if s.model.task != "seq_cls":
        return s
    key = json.dumps(
        ["labels", s.data.to_dict(), s.model.to_dict(), _files_stamp(s.data.path)],
        sort_keys=True,
        default=str,
    )
    names, count = _cached(
        _LABELS,
        key,
        cache_dir,
        "labels",
        lambda: _resolved_labels(s),
        lambda v: (None if v[0] is None else tuple(v[0]), int(v[1])),
    )
    changes: list[Any] = ["model.num_labels", count]
    if names is not None:
        changes += ["data.labels", list(names)]
    return with_(s, *changes)


def _resolved_labels(s: Settings) -> tuple[tuple[str, ...] | None, int]:
    """``(data.labels, model.num_labels)`` of :func:`resolve_labels`."""
    data, given = s.data, s.model.num_labels
    if data.labels is not None:
        names: tuple[str, ...] | None = tuple(str(x) for x in data.labels)
        if len(set(names)) != len(names) or not names:
            raise ConfigError(
                "data.labels",
                list(data.labels),
                "list each label name once, in id order (null: the sorted labels "
                "of the data)",
            )
        count = len(names)
        source = f"data.labels names {count} labels"
    else:
        import pandas as pd

        train, evals = _tables(data)  # the validation rows too
        values = pd.concat([_label_column(train, data), _label_column(evals, data)])
        names, count = found_labels(values, data.label_column)
        source = (
            f"the data has {count} labels {list(names)[:20]}"
            if names is not None
            else f"the data's integer labels go up to {count - 1}"
        )
    if given is not None:
        ok = (
            isinstance(given, int)
            and not isinstance(given, bool)
            and (given == count if names is not None else given >= count)
        )
        if not ok:
            raise ConfigError(
                "model.num_labels",
                given,
                f"{source}, so the model needs {count} labels"
                + ("" if names is not None else " (or more)")
                + f"; set model.num_labels={count}, or null to take it from the data",
            )
    return names, count if given is None else int(given)


def check_data(settings: Settings) -> Settings:
    """Read the data once before any work: both splits load, hold the columns the
    task needs (and ``partition.column`` for ``partition.type=natural``, a value
    per client), and their labels fit ``model.num_labels``; returns
    :func:`resolve_labels`' settings.

    Raises
    ------
    ConfigError
        The first problem found, naming its key (see :func:`load_splits`,
        :func:`check_columns`, :func:`resolve_labels`).
    """
    train, evals = load_splits(settings.data)
    for split in (train, evals):
        check_columns(split, settings.data, settings.model.task)
    part = settings.partition
    if part.type == "natural":  # the column, and a client per value of it
        ids = _natural_ids(train, part)
        num_clients = int(settings.federation.num_clients)
        partition_indices(np.zeros(len(ids), dtype=int), num_clients, part, ids)
    return resolve_labels(settings)


def label_ids(table: pd.DataFrame, data: DataSettings) -> list[int]:
    """The class id of each row: the label's index in ``data.labels``, or the
    integer label itself when ``data.labels`` is null.

    Raises
    ------
    ConfigError
        A label ``data.labels`` does not list, or string labels with no
        ``data.labels`` (:func:`resolve_labels` sets it).
    """
    column = _label_column(table, data)
    if data.labels is None:
        names, _ = found_labels(column, data.label_column)
        if names is not None:
            raise ConfigError(
                "data.labels",
                None,
                f"the labels of column {data.label_column!r} are not integers "
                f"(e.g. {list(names)[:5]}); list the names in id order in "
                "data.labels, or build the settings with resolve_labels",
            )
        return column.astype(int).tolist()
    ids = {str(name): i for i, name in enumerate(data.labels)}
    mapped = column.astype(str).map(ids)
    unknown = sorted(set(column.astype(str)[mapped.isna()]))
    if unknown:
        raise ConfigError(
            "data.labels",
            list(data.labels),
            f"the data has labels {unknown[:20]} it does not list; add them, or set "
            "data.labels=null to take the labels from the data",
        )
    return mapped.astype(int).tolist()


def labels_record(settings: Settings) -> dict[str, Any]:
    """``{"num_labels", "id2label", "label2id"}`` of a classification run
    (``transformers``' config keys: ``from_pretrained(base, **record)`` builds the
    head with the run's label names)."""
    n = int(settings.model.num_labels)
    names = settings.data.labels or tuple(str(i) for i in range(n))
    return {
        "num_labels": n,
        "id2label": {str(i): str(name) for i, name in enumerate(names)},
        "label2id": {str(name): i for i, name in enumerate(names)},
    }


def write_labels(folder: str | Path, settings: Settings) -> Path | None:
    """Save :func:`labels_record` as ``folder/labels.json`` (classification only)."""
    if settings.model.task != "seq_cls":
        return None
    path = Path(folder) / LABELS_FILE
    path.write_text(json.dumps(labels_record(settings), indent=2) + "\n")
    return path


def check_labels(table: pd.DataFrame, settings: Settings) -> None:
    """Raise ConfigError unless every label of ``table`` (classification) maps to a
    class id in ``0..model.num_labels-1`` under the run's label mapping
    (:func:`resolve_labels`), as the model's head expects."""
    s = resolve_labels(settings)
    num_labels = int(s.model.num_labels)
    ids = label_ids(table, s.data)
    outside = sorted({i for i in ids if not 0 <= i < num_labels})
    if outside:
        column = s.data.label_column
        raise ConfigError(
            "model.num_labels",
            num_labels,
            f"the data's {column!r} column holds labels {outside[:5]} outside "
            f"0..{num_labels - 1}; set model.num_labels={outside[-1] + 1} (or null "
            f"to take it from the data) or map the labels to 0..{num_labels - 1}",
        )


def check_table(table: pd.DataFrame, s: Settings) -> None:
    """:func:`check_columns`, then (classification) :func:`check_labels`."""
    check_columns(table, s.data, s.model.task)
    if s.model.task == "seq_cls":
        check_labels(table, s)


# ---------------------------------------------------------------------- partitioning
#: flwr-datasets' plotting package, which its ``__init__`` imports (matplotlib and
#: seaborn: about 2 s of every start that partitions data and never plots)
_FLWR_PLOTS = "flwr_datasets.visualization"


def _load_on_first_use(spec: importlib.machinery.ModuleSpec) -> ModuleType:
    """A module standing in for ``spec``'s until one of its names is used
    (PEP 562's module ``__getattr__``): then the real one is executed, takes
    its place in ``sys.modules`` and in its package, and answers."""
    stand_in = ModuleType(spec.name)
    stand_in.__spec__ = spec
    stand_in.__path__ = list(spec.submodule_search_locations or [])
    stand_in.__package__ = spec.name

    def load(name: str) -> Any:
        real = sys.modules.get(spec.name)
        if real is stand_in:
            real = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = real
            assert spec.loader is not None
            spec.loader.exec_module(real)
            package, _, child = spec.name.rpartition(".")
            if package in sys.modules:
                setattr(sys.modules[package], child, real)
        return getattr(real, name)

    stand_in.__getattr__ = load  # type: ignore[method-assign]
    return stand_in


def flwr_partitioners() -> ModuleType:
    """``flwr_datasets.partitioner``, without executing the package's plotting
    module as its ``__init__`` imports it: a stand-in module takes its place
    and loads it (and matplotlib) at the first use of one of its names. Nothing
    else changes: the partitioners are flwr-datasets' own."""
    if "flwr_datasets" not in sys.modules and _FLWR_PLOTS not in sys.modules:
        package = importlib.machinery.PathFinder.find_spec("flwr_datasets")
        where = package.submodule_search_locations if package is not None else None
        spec = importlib.machinery.PathFinder.find_spec(_FLWR_PLOTS, where)
        if spec is not None and spec.loader is not None:
            sys.modules[_FLWR_PLOTS] = _load_on_first_use(spec)
    from flwr_datasets import partitioner

    return partitioner


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    part: PartitionSettings,
    natural_ids: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Row indices of each client's partition, via flwr-datasets partitioners.

    ``iid``: equal random split. ``dirichlet``: per-label proportions drawn from
    ``Dir(alpha)``, resampled until every client has ``min_partition_size``.
    ``shard``: sort by label, cut into shards, ``shards_per_client`` each.
    ``natural``: one client per distinct value of ``natural_ids`` (the column
    ``partition.column``: a user, a site), client ``k`` taking the ``k``-th value in
    sorted order.
    """
    import datasets

    flwr = flwr_partitioners()

    kind = part.type
    seed = int(part.seed)
    if num_partitions < 1 or num_partitions > len(labels):
        raise ConfigError(
            "federation.num_clients",
            num_partitions,
            f"need between 1 and {len(labels)} clients (the number of "
            "training examples); lower it or use more data",
        )
    if kind == "iid":  # flwr-datasets' IidPartitioner's contiguous shards, taken
        # directly: a Dataset per client costs seconds and memory at 1,000 clients
        return np.array_split(np.arange(len(labels)), num_partitions)
    ds = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    if kind == "dirichlet":
        min_size = int(part.min_partition_size)
        if min_size * num_partitions > len(labels):
            raise ConfigError(
                "partition.min_partition_size",
                min_size,
                f"{num_partitions} clients x {min_size} > {len(labels)} examples; "
                "lower partition.min_partition_size or use fewer clients",
            )
        part = flwr.DirichletPartitioner(
            num_partitions,
            "label",
            alpha=float(part.alpha),
            min_partition_size=int(part.min_partition_size),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif kind == "natural":
        if natural_ids is None:
            raise ConfigError(
                "partition.column", part.column, "name the column of client ids"
            )
        found = sorted({str(x) for x in natural_ids})
        if len(found) != num_partitions:
            raise ConfigError(
                "federation.num_clients",
                num_partitions,
                f"partition.type=natural gives one client per value of column "
                f"{part.column!r}, which has {len(found)} ({found[:10]}); set "
                f"federation.num_clients={len(found)}",
            )
        ds = ds.add_column("natural", [str(x) for x in natural_ids])
        part = flwr.NaturalIdPartitioner("natural")
    elif kind == "shard":
        part = flwr.ShardPartitioner(
            num_partitions,
            "label",
            num_shards_per_partition=int(part.shards_per_client),
            shuffle=True,
            seed=seed,
        )
    else:
        raise ConfigError(
            "partition.type", kind, f"choose one of {', '.join(PARTITIONS)}"
        )
    part.dataset = ds
    try:
        return [
            np.asarray(part.load_partition(i)["idx"]) for i in range(num_partitions)
        ]
    except ValueError as exc:
        if kind == "dirichlet":
            raise ConfigError(
                "partition.min_partition_size",
                part.min_partition_size,
                f"Dir(alpha={part.alpha}) over {num_partitions} clients and "
                f"{len(labels)} examples cannot give every client that many examples; "
                "lower partition.min_partition_size, raise partition.alpha, or use "
                "fewer clients",
            ) from exc
        raise ConfigError(
            f"partition.{'shards_per_client' if kind == 'shard' else 'type'}",
            part.shards_per_client,
            str(exc),
        ) from exc


# ---------------------------------------------------------------------- tokenising
def tokenise(
    table: pd.DataFrame,
    tokenizer: Any,
    data: DataSettings,
    task: str,
    max_length: int,
) -> list[Example]:
    """Tokenise once, without padding (batches are padded dynamically).

    Causal LM: each row rendered by its data layout (:mod:`fedlora.layouts`), labels
    -100 outside the response so the loss covers the response tokens only. Rows
    left with no response token within ``max_length`` are dropped, with a warning
    that counts them.

    Raises
    ------
    ConfigError
        ``train.max_length``: no row keeps a response token.
    """
    if task == "seq_cls":
        enc = tokenizer(
            table[data.text_column].astype(str).tolist(),
            truncation=True,
            max_length=max_length,
        )
        labels = label_ids(table, data)
        return [
            {"input_ids": ids, "attention_mask": am, "labels": y}
            for ids, am, y in zip(
                enc["input_ids"], enc["attention_mask"], labels, strict=True
            )
        ]
    layout = resolve_layout(table.columns, data)
    out, dropped = encode(layout.pieces(table, data, tokenizer), tokenizer, max_length)
    why = (
        f"{dropped} of {len(table)} examples ({layout.name} layout) have no response "
        f"token within train.max_length={max_length}: their prompt fills it, or "
        "they have no response (no assistant turn)"
    )
    if dropped and not out:
        raise ConfigError(
            "train.max_length", max_length, f"{why}; raise train.max_length"
        )
    if dropped:
        log.warning("%s; they are left out (raise train.max_length to keep them)", why)
    return out


def client_examples(
    settings: Settings,
    tokenizer: Any,
    partition_id: int,
    num_partitions: int,
    cache_dir: str | Path | None = None,
) -> tuple[list[Example], list[Example]]:
    """``(train, local_eval)`` tokenised examples of one client, cached in-process
    (and in ``cache_dir`` when given: a deployment's fresh ClientApp processes),
    keyed by every setting that shapes them and the sizes and times of the data
    files and of a model folder's files (its tokenizer).

    The partition is computed from the shared seeds, so every process agrees on it;
    ``data.client_eval_fraction`` of it is held out for federated evaluation.
    """
    # the whole data set's labels, not the partition's
    s = resolve_labels(settings, cache_dir)
    key = json.dumps(
        [
            s.data.to_dict(),
            s.partition.to_dict(),
            s.model.name,
            s.model.task,
            s.train.max_length,
            partition_id,
            num_partitions,
            _files_stamp(s.data.path),  # a data file rewritten in place
            _files_stamp(s.model.name),  # a model folder's tokenizer changed
        ],
        sort_keys=True,
        default=str,
    )

    def compute() -> tuple[list[Example], list[Example]]:
        train, parts = _partitioned(s, num_partitions)
        rows = train.iloc[parts[partition_id]]
        examples = tokenise(
            rows, tokenizer, s.data, s.model.task, int(s.train.max_length)
        )
        n_eval = int(len(examples) * float(s.data.client_eval_fraction))
        return examples[n_eval:], examples[:n_eval]

    found: tuple[list[Example], list[Example]]
    found = _cached(_TOKENISED, key, cache_dir, "tokenised", compute, tuple)
    return found


def _cached(
    memory: dict[str, Any],
    key: str,
    cache_dir: str | Path | None,
    kind: str,
    compute: Callable[[], Any],
    decode: Callable[[Any], Any],
) -> Any:
    """``memory[key]``: kept in this process, else read from ``cache_dir`` (as
    ``decode`` turns the JSON back), else computed; written to ``cache_dir`` (when
    given) if its file is not there yet."""
    if key not in memory:
        stored = read_cache(cache_dir, key, kind) if cache_dir else None
        memory[key] = compute() if stored is None else decode(stored)
    if cache_dir and not _cache_file(cache_dir, key, kind).is_file():
        write_cache(cache_dir, key, memory[key], kind)
    return memory[key]


def read_cache(cache_dir: str | Path, key: str, kind: str = "tokenised") -> Any:
    """The value :func:`write_cache` stored under ``key`` in ``cache_dir``, or None."""
    path = _cache_file(cache_dir, key, kind)
    if not path.is_file():
        return None
    entry = json.loads(path.read_text())
    return entry["value"] if entry.get("key") == key else None


def write_cache(
    cache_dir: str | Path, key: str, value: Any, kind: str = "tokenised"
) -> None:
    """Store a JSON-able ``value`` as ``<cache_dir>/<kind>-<sha256(key)>.json``.

    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    path = _cache_file(cache_dir, key, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    os.replace(tmp, path)


def _cache_file(cache_dir: str | Path, key: str, kind: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return Path(cache_dir).expanduser() / f"{kind}-{digest}.json"


def _partitioned(
    s: Settings, num_partitions: int
) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The training table and every client's row indices, computed once per process
    (a simulation worker serves many partitions)."""
    key = json.dumps(
        [s.data.to_dict(), s.partition.to_dict(), s.model.task, num_partitions],
        sort_keys=True,
        default=str,
    )
    if key not in _PARTITIONED:
        train, _ = load_splits(s.data)
        parts = partition_table(train, s, num_partitions)
        _PARTITIONED.clear()  # one experiment per process at a time
        _PARTITIONED[key] = (train, parts)
    return _PARTITIONED[key]


def partition_table(
    train: pd.DataFrame, s: Settings, num_partitions: int
) -> list[np.ndarray]:
    """Every client's row indices in the training table, after checking its
    columns (and its labels, for classification).

    Raises
    ------
    ConfigError
        A missing column, a label the model's head cannot take, more clients than
        the data can serve (see :func:`partition_indices`).
    """
    check_table(train, s)
    natural = None
    if s.partition.type == "natural":
        natural = _natural_ids(train, s.partition)
    if s.model.task == "seq_cls":
        labels = np.asarray(label_ids(train, resolve_labels(s).data))
    elif s.data.label_column in train.columns:
        labels = train[s.data.label_column].to_numpy()
    else:
        labels = np.zeros(len(train), dtype=int)
    return partition_indices(labels, num_partitions, s.partition, natural)


def _natural_ids(table: pd.DataFrame, part: PartitionSettings) -> np.ndarray:
    """The column ``partition.column`` of ``table`` (``partition.type=natural``)."""
    column = part.column
    if not column or column not in table.columns:
        raise ConfigError(
            "partition.column",
            column,
            "partition.type=natural needs the column naming each row's client; "
            f"the data's columns are {list(table.columns)}",
        )
    return table[column].to_numpy()


def server_examples(settings: Settings, tokenizer: Any) -> list[Example]:
    """The held-out split for the server's centralised evaluation, tokenised."""
    s = resolve_labels(settings)
    _, evals = load_splits(s.data)
    check_table(evals, s)
    return tokenise(evals, tokenizer, s.data, s.model.task, int(s.train.max_length))


def server_validation_examples(settings: Settings, tokenizer: Any) -> list[Example]:
    """The validation rows ``data.validation_fraction`` held out of the training
    split (:func:`validation_table`), tokenised: the server's tuning objective.
    Empty when the fraction is 0."""
    s = resolve_labels(settings)
    held = validation_table(s.data)
    if held.empty:
        return []
    check_table(held, s)
    return tokenise(held, tokenizer, s.data, s.model.task, int(s.train.max_length))


# ------------------------------------------------- the server's own calibration data
SERVER_DATA_KEY = "strategy.server_data_path"
SERVER_DATA_MISSING = (
    "strategy.init=server_data needs a calibration file the server itself holds; "
    "the server's only other data is the evaluation split it reports accuracy on, "
    "and the clients' data is never used. Set strategy.server_data_path to such a "
    f"file ({', '.join(FORMATS)}, with the data's columns), or use "
    "strategy.init=random_orthogonal (no data) or, without DP, federated_gradient"
)


def server_data_file(settings: Settings) -> Path:
    """The server's calibration file for Fed-SB's ``init=server_data``.

    It must be data the server itself holds: ``strategy.server_data_path``, a file
    in one of :data:`FORMATS`. Refused: no path (the server's only other data is the
    evaluation split it reports accuracy on, and the clients' data is never used),
    a missing file, and the very files of ``data.path`` (the clients' training data,
    or the evaluation split).

    Raises
    ------
    ConfigError
        ``strategy.server_data_path``, with what was found and the fix.
    """
    arg = SERVER_DATA_KEY.split(".")[1]  # Fed-SB's argument; other methods lack it
    raw = settings.strategy[arg] if arg in settings.strategy else None
    if not raw:
        raise ConfigError(SERVER_DATA_KEY, raw, SERVER_DATA_MISSING)
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise ConfigError(
            SERVER_DATA_KEY,
            str(path),
            "no such file; point it at a calibration file the server holds",
        )
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(
            SERVER_DATA_KEY,
            str(path),
            f"unsupported file type; use one of {', '.join(FORMATS)}",
        )
    for role, other in _data_files(settings.data):
        if other is not None and os.path.samefile(path, other):
            raise ConfigError(
                SERVER_DATA_KEY,
                str(path),
                f"this is {role}; the calibration set must be other data the "
                "server holds (never the clients' data nor the split accuracy is "
                "reported on)",
            )
    return path


def _data_files(data: DataSettings) -> list[tuple[str, Path | None]]:
    """The files ``data.path`` names: ``(role, file)`` pairs."""
    if data.name == "synthetic" or not data.path:
        return []
    path = Path(str(data.path)).expanduser()
    if path.is_file():
        return [
            ("data.path, the clients' training data and the evaluation split", path)
        ]
    if not path.is_dir():
        return []
    train = str(data.train_split)
    evals = str(data.eval_split)
    return [
        (
            f"the clients' training split (data.train_split={train})",
            _find_split(path, train),
        ),
        (
            f"the evaluation split accuracy is reported on (data.eval_split={evals})",
            _find_split(path, evals),
        ),
    ]


def server_calibration_examples(
    settings: Settings, tokenizer: Any, n: int
) -> list[Example]:
    """The first ``n`` (``strategy.calibration_examples``) rows of the server's own
    calibration file (:func:`server_data_file`), tokenised: Fed-SB's
    ``init=server_data`` estimates its gradient on them.

    Raises
    ------
    ConfigError
        ``strategy.server_data_path``: no usable file (see :func:`server_data_file`),
        no rows, or a column the data settings name is absent.
    """
    settings = resolve_labels(settings)
    path = server_data_file(settings)
    table = read_table(path)
    task = settings.model.task
    try:
        check_columns(table, settings.data, task)
    except ConfigError as exc:
        raise ConfigError(
            SERVER_DATA_KEY,
            str(path),
            f"{exc.key}={exc.found!r} does not fit this file: {exc.fix}",
        ) from exc
    if len(table) == 0 or n < 1:
        raise ConfigError(
            SERVER_DATA_KEY,
            str(path),
            f"no calibration rows ({len(table)} in the file, "
            f"strategy.calibration_examples={n}); give it rows and a positive count",
        )
    return tokenise(
        table.iloc[:n], tokenizer, settings.data, task, int(settings.train.max_length)
    )
