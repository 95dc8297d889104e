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
