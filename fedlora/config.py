"""Small helpers to read the nested settings dict (the resolved Hydra config)."""

from __future__ import annotations

from typing import Any

from fedlora.errors import ConfigError


def get(cfg: dict[str, Any], dotted: str, default: Any = ...) -> Any:
    """Return ``cfg[a][b][c]`` for ``dotted="a.b.c"``; raise ConfigError if absent."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is ...:
                raise ConfigError(dotted, None, "this setting is required; add it")
            return default
        node = node[part]
    return node


def choice(cfg: dict[str, Any], dotted: str, options: tuple[str, ...]) -> str:
    """Return a string setting after checking it is one of ``options``."""
    value = get(cfg, dotted)
    if value not in options:
        raise ConfigError(dotted, value, f"choose one of {', '.join(options)}")
    return str(value)


def sampled_clients(federation: dict[str, Any]) -> int:
    """Clients Flower samples for training each round:
    ``min(N, max(int(N * fraction_train), min_train_clients))``."""
    n = int(federation["num_clients"])
    wanted = int(n * float(federation["fraction_train"]))
    return min(n, max(wanted, int(federation["min_train_clients"])))


#: settings whose ``null`` lets the privacy mode choose, as
#: ``{key: ({privacy mode: value}, value otherwise)}``. The privacy group writes
#: nothing outside ``privacy``: what a mode needs elsewhere is filled in here, and
#: only where the user left the key null; a value set by hand is kept, and the
#: validator refuses one the mode cannot take.
PRIVACY_DEFAULTS: dict[str, tuple[dict[str, Any], Any]] = {
    # clients' exact metrics on their own examples are outside DP-SGD's accountant
    "federation.fraction_evaluate": ({"dp_sgd": 0.0}, 1.0),
    # central DP's noise is calibrated to a uniform mean of the updates
    "strategy.weighting": ({"central": "uniform"}, "num_examples"),
}


def with_privacy_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` whose null :data:`PRIVACY_DEFAULTS` keys hold the value
    its ``privacy.mode`` takes (a key set by hand, or absent, is left alone)."""
    mode = get(cfg, "privacy.mode", "none")
    out = dict(cfg)
    for dotted, (by_mode, otherwise) in PRIVACY_DEFAULTS.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            if out[section][key] is None:
                out[section] = {**out[section], key: by_mode.get(mode, otherwise)}
    return out
