"""LoRA adapters: settings -> PEFT model, and adapter state <-> named arrays.

One adapted linear layer::

    h = W0 x + s * B (A x)     A: (r, d_in)   B: (d_out, r)
                               s = alpha / r  (rsLoRA: alpha / sqrt(r))

The *wire state* of a model is the dict of its trainable tensors (the LoRA factors
and the classification head), keyed by a stable name: the parameter name without
PEFT's ``base_model.model.`` prefix and without the adapter name, e.g.
``bert.encoder.layer.0.attention.self.query.lora_A.weight``. Exactly these tensors
are trained, sent and aggregated; frozen tensors never travel.
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch

from fedlora.errors import ConfigError, StateMismatchError
from fedlora.settings import AdapterSettings

ADAPTER_NAME = "default"
_PREFIX = "base_model.model."
PEFT_TASK = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def lora_config(adapter: AdapterSettings, task: str) -> Any:
    """Build a ``peft.LoraConfig`` from the ``adapter`` settings.

    ``r``, ``alpha``, ``dropout``, ``target_modules`` (a list or a comma string),
    ``use_rslora``.
    """
    from peft import LoraConfig

    targets: Any = adapter.target_modules
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    r = int(adapter.r)
    if r <= 0:
        raise ConfigError("adapter.r", r, "the LoRA rank must be a positive integer")
    return LoraConfig(
        task_type=PEFT_TASK[task],
        r=r,
        lora_alpha=float(adapter.alpha),
        lora_dropout=float(adapter.dropout),
        target_modules=list(targets),
        use_rslora=bool(adapter.use_rslora),
    )


def lora_scaling(adapter: AdapterSettings) -> float:
    """``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
    return adapter.scaling


def wrap_with_lora(
    model: torch.nn.Module, adapter: AdapterSettings, task: str, seed: int
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA; the factors are initialised from ``seed``.

    PEFT's standard init: A Kaiming-uniform, B = 0. The same seed on every party
    gives bit-identical starting adapters.
    """
    from peft import get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    config = lora_config(adapter, task)
    torch.manual_seed(seed)
    try:
        model = get_peft_model(model, config)
    except (NoMatchingPeftModuleError, ValueError) as exc:
        if not isinstance(
            exc, NoMatchingPeftModuleError
        ) and "not found in the base" not in str(exc):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(
            "adapter.target_modules",
            config.target_modules and sorted(config.target_modules),
            "no module of the model matches; module names in this model include "
            + ", ".join(names[:30]),
        ) from exc
    return model


def wire_name(param_name: str) -> str:
    """Parameter name -> wire key (strip PEFT's prefix and the adapter name)."""
    name = param_name[len(_PREFIX) :] if param_name.startswith(_PREFIX) else param_name
    return name.replace(f".{ADAPTER_NAME}.", ".")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of ``model``, keyed by wire name."""
    return {wire_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def get_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy the trainable tensors out as float32 numpy arrays (the wire state)."""
    return _copy_out(trainable_parameters(model))


def frozen_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Frozen LoRA factors (FFA's A; LoRA-SB's A and B), keyed by wire name."""
    return {
        wire_name(n): p
        for n, p in model.named_parameters()
        if not p.requires_grad and (".lora_A." in n or ".lora_B." in n)
    }


def get_frozen_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy the frozen LoRA factors out as float32 arrays."""
    return _copy_out(frozen_parameters(model))


#: the metric in which a client reports :func:`frozen_digest` of its frozen factors
FROZEN_CRC_KEY = "frozen-crc"
#: how the server's reasons for rejecting such a reply begin (in ``rejected``)
FROZEN_DIFFER = "frozen factors differ from the server's"
FROZEN_MISSING = "no frozen-crc in the reply"


def frozen_digest(frozen: torch.nn.Module | Mapping[str, Any]) -> int:
    """CRC32 of the frozen LoRA factors (a model's, or a state dict of them).

    The server (its ``strategy.frozen``) and every client (its model) compute it with
    this one function, so equal digests mean equal factors (up to CRC32 collisions):
    each key, then its values as little-endian float32 (the wire and model dtype,
    C order), in sorted key order. No frozen factors: 0.
    """
    state = get_frozen_state(frozen) if isinstance(frozen, torch.nn.Module) else frozen
    crc = 0
    for key in sorted(state):
        value = np.ascontiguousarray(state[key], dtype="<f4")
        crc = zlib.crc32(value.tobytes(), zlib.crc32(key.encode(), crc))
    return crc


def set_frozen_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load frozen LoRA factors (e.g. Fed-SB's ``B`` and ``A``) into ``model``."""
    _copy_in(frozen_parameters(model), state)


def _copy_out(params: dict[str, torch.nn.Parameter]) -> dict[str, np.ndarray]:
    return {
        k: p.detach().to("cpu", torch.float32).numpy().copy() for k, p in params.items()
    }


def _copy_in(params: dict[str, torch.nn.Parameter], state: dict[str, Any]) -> None:
    check_state({k: tuple(p.shape) for k, p in params.items()}, state)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.as_tensor(np.asarray(state[k]), dtype=p.dtype))


def check_state(expected: dict[str, tuple[int, ...]], state: dict[str, Any]) -> None:
    """Raise StateMismatchError unless ``state`` has exactly these keys/shapes."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise StateMismatchError(
            f"adapter state keys differ: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {extra[:5]} ({len(extra)}); were both sides built from the "
            "same model and adapter settings?"
        )
    for k, shape in expected.items():
        if tuple(np.shape(state[k])) != tuple(shape):
            raise StateMismatchError(
                f"{k}: expected shape {tuple(shape)}, got {tuple(np.shape(state[k]))}"
            )


def set_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load a wire state into the trainable tensors of ``model`` (in place)."""
    _copy_in(trainable_parameters(model), state)


def load_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Load ``state`` into the parameters of those wire names, trainable or not
    (a method may freeze a wire key for a round, e.g. RoLoRA).

    Raises
    ------
    StateMismatchError
        A key the model does not have, or a shape that differs.
    """
    params = {wire_name(n): p for n, p in model.named_parameters()}
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise StateMismatchError(
            f"adapter state keys the model lacks: {unknown[:5]} ({len(unknown)}); "
            "were both sides built from the same model and adapter settings?"
        )
    _copy_in({k: params[k] for k in state}, state)


def set_trainable(model: torch.nn.Module, keys: Collection[str]) -> None:
    """Train exactly the parameters whose wire names are in ``keys``."""
    for name, p in model.named_parameters():
        p.requires_grad_(wire_name(name) in keys)


#: each model's base weights as built, for models whose base weights get a delta
_PRISTINE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def set_base_delta(model: torch.nn.Module, delta: Mapping[str, np.ndarray]) -> None:
    """Set every adapted layer's base weight to its value as built plus
    ``delta[layer]`` (``d_out x d_in``; a layer not in ``delta``: as built).

    The sum is formed in float64 and rounded once to the weight's dtype, so the
    same delta gives the same weights whatever the model held before (a model
    reused across simulated nodes).
    """
    layers = {
        wire_name(n): m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "base_layer", None), torch.nn.Linear)
    }
    unknown = sorted(set(delta) - set(layers))
    if unknown:
        raise StateMismatchError(
            f"base delta for layers the model lacks: {unknown[:5]}"
        )
    if model not in _PRISTINE:
        _PRISTINE[model] = {
            k: m.base_layer.weight.detach().to("cpu", torch.float64).clone()
            for k, m in layers.items()
        }
    pristine = _PRISTINE[model]
    with torch.no_grad():
        for layer, module in layers.items():
            weight = pristine[layer]
            if layer in delta:
                add = torch.as_tensor(np.asarray(delta[layer], dtype=np.float64))
                if tuple(add.shape) != tuple(weight.shape):
                    raise StateMismatchError(
                        f"{layer}: base delta of shape {tuple(add.shape)}, weight "
                        f"{tuple(weight.shape)}"
                    )
                weight = weight + add
            target = module.base_layer.weight
            target.copy_(weight.to(target.device, target.dtype))


def base_weight(model: torch.nn.Module, layer: str) -> np.ndarray:
    """The base weight of adapted layer ``layer`` (wire name), as float64."""
    for n, m in model.named_modules():
        if wire_name(n) == layer and hasattr(m, "base_layer"):
            return m.base_layer.weight.detach().to("cpu", torch.float64).numpy().copy()
    raise KeyError(layer)


def lora_layers(state: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Group LoRA factor keys by layer: ``{layer: (A_key, B_key)}``."""
    layers: dict[str, tuple[str, str]] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            b_key = f"{layer}.lora_B.weight"
            if b_key in state:
                layers[layer] = (key, b_key)
    return layers


def module_name(layer: str) -> str:
    """Short module name of a layer key (``...attention.self.query`` -> ``query``)."""
    return layer.rsplit(".", 1)[-1]
