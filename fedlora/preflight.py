"""Checks made before the first round against what the settings name.

:func:`fedlora.validate.validate` checks the settings by themselves; these look at
the model and the data: ``adapter.target_modules`` against the model's modules (on
a weightless copy, so no weights are loaded), that this machine can quantize the
model when ``model.quantization`` asks for it (a CUDA device, bitsandbytes),
and, where the caller may read the clients' data (a simulation, where they share
one machine and one ``data.path``), the training table's columns and labels and
one partition per client. A deployment's server must not read its clients' data:
it checks the model only (and its own evaluation split,
:func:`fedlora.data.server_examples`).
"""

from __future__ import annotations

import warnings

import torch

from fedlora.adapters import wrap_with_lora
from fedlora.data import check_table, load_splits, partition_table
from fedlora.errors import ConfigError
from fedlora.models import quantization_config, resolve_model_path
from fedlora.settings import Settings
from fedlora.validate import raise_problems


def model_problems(s: Settings) -> list[ConfigError]:
    """``adapter.target_modules`` against the modules of ``model.name``, wrapped
    with LoRA as :func:`fedlora.build.build` does, on the meta device."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    try:
        path = resolve_model_path(s.model.name)
        quantization_config(s.model)  # CUDA and bitsandbytes, when quantized
    except ConfigError as exc:
        return [exc]
    if s.model.task == "seq_cls":
        # the head's size does not change the module names (null: from the data)
        n = s.model.num_labels
        config = AutoConfig.from_pretrained(path, num_labels=int(n or 2))
        auto = AutoModelForSequenceClassification
    else:
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    # wrapping seeds torch's generator; PEFT's deprecation warnings are noise here
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            wrap_with_lora(model, s.adapter, s.model.task, int(s.federation.seed))
        except ConfigError as exc:
            return [exc]
    return []


def data_problems(s: Settings) -> list[ConfigError]:
    """The data as the simulated clients and the server will read it: both
    splits load and have the configured columns and labels, and
    ``federation.num_clients`` partitions of the training split each hold
    training examples."""
    try:
        train, evals = load_splits(s.data)
        check_table(evals, s)
        parts = partition_table(train, s, int(s.federation.num_clients))
    except ConfigError as exc:
        return [exc]
    sizes = [len(p) for p in parts]
    if min(sizes) == 0:
        empty = [k for k, n in enumerate(sizes) if n == 0]
        return [
            ConfigError(
                "federation.num_clients",
                s.federation.num_clients,
                f"{len(empty)} partitions (e.g. {empty[:5]}) would hold no training "
                f"examples ({s.partition.type} partitioning of {len(train)} "
                "examples); use fewer clients, more data, or raise "
                "partition.min_partition_size",
            )
        ]
    return []


def preflight(s: Settings, data: bool) -> None:
    """Check the model and, with ``data``, the clients' data (see the module).

    Raises
    ------
    ConfigError
        Every problem found, in one report (as :func:`fedlora.validate.validate`).
    """
    raise_problems(model_problems(s) + (data_problems(s) if data else []))
