"""Build the adapted model every party shares, from the experiment settings."""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch

from fedlora.adapters import get_state, wrap_with_lora
from fedlora.data import labels_record, resolve_labels
from fedlora.methods import from_settings
from fedlora.models import load_base_model, load_tokenizer, prepare_for_training
from fedlora.settings import Settings

_CACHE: dict[str, tuple[torch.nn.Module, Any]] = {}
_CACHE_SIZE = 1  # models kept per process: one (an LLM twice may not fit); a
#   worker serving clients of several ranks rebuilds when the rank changes
_INITIAL: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def build(settings: Settings, plain: bool = False) -> tuple[torch.nn.Module, Any]:
    """``(peft_model, tokenizer)`` for ``settings.model`` and ``settings.adapter``,
    parametrised by the method of ``settings.strategy`` (``plain``: ordinary PEFT
    LoRA, the export format).

    The base model's new head and the LoRA factors are initialised from
    ``federation.seed``, so the server and every client build identical models.
    The base weights load in ``model.dtype`` (or quantized, ``model.quantization``);
    PEFT keeps the LoRA factors in float32 whatever that dtype
    (``get_peft_model``'s ``autocast_adapter_dtype``), and the wire state is
    float32 in any case (:func:`fedlora.adapters.get_state`).
    """
    s = resolve_labels(settings)  # model.num_labels null: from the data
    seed = int(s.federation.seed)
    tokenizer = load_tokenizer(s.model)
    named = s.model.task == "seq_cls" and s.data.labels  # the names in the config
    labels = labels_record(s) if named else None
    model = load_base_model(s.model, seed, labels)
    checkpointing = bool(s.train.gradient_checkpointing)
    model = prepare_for_training(model, s.model, checkpointing)
    model = wrap_with_lora(model, s.adapter, s.model.task, seed)
    if not plain:
        from_settings(s).parametrise(model)
    _INITIAL[model] = get_state(model)
    return model, tokenizer


def initial_state(model: torch.nn.Module) -> dict[str, Any]:
    """The wire state ``model`` had when :func:`build` made it: every key the
    method trains, at its seeded value (a node's start for keys it keeps local)."""
    return _INITIAL[model]


def clear_cache() -> None:
    """Forget the models :func:`build_cached` kept in this process (a node's
    long-lived worker does so when a message of another run arrives)."""
    _CACHE.clear()


def build_cached(settings: Settings) -> tuple[torch.nn.Module, Any]:
    """Like :func:`build`, but reuse the model built for the same settings in this
    process (a simulation worker serves many nodes and rounds: each message resets
    what it uses, the wire state, the trainable set and the base weights, from the
    message and the node's state)."""
    key = json.dumps(
        [
            settings.model.to_dict(),
            settings.adapter.to_dict(),
            dict(settings.strategy),
            settings.federation.seed,
            settings.train.gradient_checkpointing,
        ],
        sort_keys=True,
        default=str,
    )
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:  # e.g. one model per client rank
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = build(settings)
    return _CACHE[key]
