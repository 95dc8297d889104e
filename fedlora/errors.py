"""Typed errors: each message says which setting is wrong, what was found, the fix."""


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


class StateMismatchError(FedLoraError, ValueError):
    """An adapter state does not fit the model (missing/extra keys, wrong shapes)."""
