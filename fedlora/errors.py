"""Typed errors: each message says which setting is wrong, what was found, the fix."""

import importlib
import inspect
from collections.abc import Mapping
from typing import Any


class FedLoraError(Exception):
    """Base class of every error fedlora raises on purpose."""


class ConfigError(FedLoraError, ValueError):
    """A setting is missing, malformed or impossible to satisfy.

    Parameters
    ----------
    key : str
        The dotted config key at fault (``data.path``, ``adapter.target_modules``).
    found : object
        The value that was given.
    fix : str
        What to do instead.
    """

    def __init__(self, key: str, found: object, fix: str) -> None:
        self.key, self.found, self.fix = key, found, fix
        super().__init__(f"{key}={found!r}: {fix}")


class ClientConfigError(FedLoraError):
    """The clients of a round reported configuration errors (a ConfigError each
    raised) and too few usable updates came back: the run stops at once.

    Parameters
    ----------
    server_round : int
        The round whose replies carried the errors.
    reasons : list of str
        Each failing client's message (``key=value: fix``), duplicates included.
    replies : int
        How many replies the round received.
    """

    def __init__(self, server_round: int, reasons: list[str], replies: int) -> None:
        self.server_round, self.reasons, self.replies = server_round, reasons, replies
        distinct = list(dict.fromkeys(reasons))
        others = len(distinct) - 1
        more = f" (and {others} other message{'s' * (others > 1)})" if others else ""
        super().__init__(
            f"{distinct[0]}{more} [reported by {len(reasons)} of {replies} clients "
            f"in round {server_round}; the run stopped]"
        )


class StateMismatchError(FedLoraError, ValueError):
    """An adapter state does not fit the model (missing/extra keys, wrong shapes)."""


class NodesUnavailableError(FedLoraError, RuntimeError):
    """Too few nodes were connected for longer than ``federation.wait_timeout``:
    the round could not begin, and the run stops (its last checkpoint stays).

    Attributes
    ----------
    connected, needed : int
        The nodes connected at the deadline, and the nodes the round needed.
    """

    def __init__(self, message: str, connected: int, needed: int) -> None:
        super().__init__(message)
        self.connected, self.needed = connected, needed


def load_target(target: str, base: type, key: str, example: str) -> Any:
    """The subclass of ``base`` a config's ``_target_`` names (``key``: its dotted
    config key, ``example``: a valid target for the message).

    Raises
    ------
    ConfigError
        No such class, or not a subclass of ``base``.
    """
    module, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        fix = f"no such class ({exc}); name a {base.__name__}, e.g. {example}"
        raise ConfigError(key, target, fix) from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(key, target, f"is not a {base.__module__}.{base.__name__}")
    return cls


def build_target(
    section: Any, base: type, key: str, example: str, default: type
) -> Any:
    """The object a ``_target_`` settings section describes: the class it names
    (null: ``default``), built with the section's other keys as its arguments.

    Parameters
    ----------
    section : mapping
        ``_target_`` and the class's arguments (a conf group's option).
    base : type
        The class every target must subclass.
    key : str
        The section's dotted config key (``server_optimizer``, ``logger``).
    example : str
        A valid target, for the messages.
    default : type
        The class a null ``_target_`` stands for.

    Raises
    ------
    ConfigError
        Not a mapping, no ``_target_``, a target that is not a ``base``, or an
        argument the class does not take (naming ``<key>.<argument>``); and
        whatever the class raises for a bad value.
    """
    if not isinstance(section, Mapping):
        fix = f"must be a mapping with _target_ (see conf/{key}/)"
        raise ConfigError(key, section, fix)
    if "_target_" not in section:
        raise ConfigError(
            f"{key}._target_", None, f"is missing; name the class, e.g. {example}"
        )
    target = section["_target_"]
    if target is None:
        cls = default
    else:
        cls = load_target(target, base, f"{key}._target_", example)
    accepted = [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    kwargs = {str(k): v for k, v in section.items() if k != "_target_"}
    for name, value in kwargs.items():
        if name not in accepted:
            takes = ", ".join(accepted) if accepted else "no settings"
            raise ConfigError(
                f"{key}.{name}",
                value,
                f"{cls.__name__} takes {takes}; remove the key or choose another {key}",
            )
    return cls(**kwargs)
