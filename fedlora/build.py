"""Build the adapted model every party shares, from the experiment settings."""

from __future__ import annotations

import json
from typing import Any

import torch

from fedlora.adapters import wrap_with_lora
from fedlora.methods import from_settings
from fedlora.models import load_base_model, load_tokenizer

_CACHE: dict[str, tuple[torch.nn.Module, Any]] = {}


def build(cfg: dict[str, Any], plain: bool = False) -> tuple[torch.nn.Module, Any]:
    """``(peft_model, tokenizer)`` for ``cfg["model"]`` and ``cfg["adapter"]``,
    parametrised by the method of ``cfg["strategy"]`` (``plain``: ordinary PEFT
    LoRA, the export format).

    The base model's new head and the LoRA factors are initialised from
    ``federation.seed``, so the server and every client build identical models.
    """
    seed = int(cfg["federation"]["seed"])
    tokenizer = load_tokenizer(cfg["model"])
    model = load_base_model(cfg["model"], seed)
    model = wrap_with_lora(model, cfg["adapter"], cfg["model"]["task"], seed)
    if not plain:
        from_settings(cfg).parametrise(model)
    return model, tokenizer


def build_cached(cfg: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """Like :func:`build`, but reuse the model built for the same settings in this
    process (a simulation worker serves many rounds; every round overwrites all
    trainable tensors, so reuse is safe)."""
    key = json.dumps(
        [cfg["model"], cfg["adapter"], cfg["strategy"], cfg["federation"]["seed"]],
        sort_keys=True,
        default=str,
    )
    if key not in _CACHE:
        _CACHE.clear()  # one model per process is enough
        _CACHE[key] = build(cfg)
    return _CACHE[key]
