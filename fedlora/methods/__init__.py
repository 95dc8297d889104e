"""Federated LoRA methods, one per module, each a :class:`~fedlora.methods.base.Method`.

A method is chosen by its YAML in ``conf/strategy/``, whose ``_target_`` names the
class and whose other keys are its constructor's arguments; server and clients build
it the same way, with :func:`from_settings`, which adds the arguments the class
derives from the rest of the settings (:meth:`Method.derived_arguments`, e.g. the
LoRA scale ``s``, computed from ``adapter``).
"""

from __future__ import annotations

import importlib
import pkgutil

from fedlora.errors import ConfigError, load_target
from fedlora.export import ExportPlan
from fedlora.methods.base import InitInputs, Method
from fedlora.settings import Settings

__all__ = ["InitInputs", "Method", "available", "from_settings", "load_class"]


def load_class(target: str) -> type[Method]:
    """The :class:`Method` subclass at the dotted path ``target``."""
    return load_target(
        target, Method, "strategy._target_", "fedlora.methods.fedavg_lora.FedAvgLoRA"
    )


#: ``strategy`` keys that moved to another section: ``{key: its new dotted key}``
_MOVED = {"export_rank": "export.rank"}


def from_settings(settings: Settings) -> Method:
    """The method of the experiment settings: its ``strategy`` section, plus the
    arguments its class derives from the other sections (the export's rank,
    ``export``, for every class, and :meth:`Method.derived_arguments`), which the
    section may not set.

    Raises
    ------
    ConfigError
        A key the section may not set, one of a moved setting (set the new key
        instead), or arguments the class does not take.
    """
    spec = dict(settings.strategy)
    cls = load_class(spec.pop("_target_"))
    for key, moved_to in _MOVED.items():
        if key in spec and spec.pop(key) is not None:
            raise ConfigError(
                f"strategy.{key}",
                settings.strategy[key],
                f"moved to {moved_to} (one key for every method); remove "
                f"strategy.{key} and set {moved_to}={settings.strategy[key]}",
            )  # null (settings written before the move): the same default
    derived = {
        "export": ExportPlan.of(settings, cls.default_export_rank(settings)),
        **cls.derived_arguments(settings),
    }
    clash = sorted(set(spec) & set(derived))
    if clash:
        key = clash[0]
        raise ConfigError(
            f"strategy.{key}",
            spec[key],
            f"{cls.__name__} derives it from the other settings "
            f"({derived[key]!r} here); remove it from the strategy section",
        )
    try:
        return cls(**spec, **derived)
    except TypeError as exc:
        raise ConfigError(
            "strategy", sorted(spec), f"does not fit {cls.__name__}: {exc}"
        ) from None


def available() -> dict[str, type[Method]]:
    """Every method shipped in this package, by name (for reports and tools)."""
    out: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Method)
                and value.name
                and value.__module__ == module.__name__
            ):
                out[value.name] = value
    return out
