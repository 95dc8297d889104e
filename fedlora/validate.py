"""Check the experiment settings before any work starts.

Every problem is collected, then one ConfigError-style report is raised, each line
naming the key, the value found and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.config import with_privacy_defaults
from fedlora.errors import ConfigError


def _problems(cfg: dict[str, Any]) -> list[ConfigError]:
    out: list[ConfigError] = []
    fed, train, adapter, data = (
        cfg["federation"],
        cfg["train"],
        cfg["adapter"],
        cfg["data"],
    )

    def need(ok: bool, key: str, value: Any, fix: str) -> None:
        if not ok:
            out.append(ConfigError(key, value, fix))

    def positive_int(section: dict[str, Any], prefix: str, key: str) -> None:
        value = section.get(key)
        need(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{prefix}.{key}",
            value,
            "must be a positive integer",
        )

    positive_int(fed, "federation", "num_clients")
    positive_int(fed, "federation", "rounds")
    positive_int(fed, "federation", "min_train_clients")
    if "min_available_clients" in fed:  # absent in settings saved before it existed
        positive_int(fed, "federation", "min_available_clients")
    positive_int(train, "train", "batch_size")
    positive_int(train, "train", "max_length")
    positive_int(adapter, "adapter", "r")
    for key in ("fraction_train", "fraction_evaluate"):
        value = fed.get(key)
        need(
            isinstance(value, (int, float)) and 0.0 <= value <= 1.0,
            f"federation.{key}",
            value,
            "must be a number in [0, 1]",
        )
    if isinstance(fed.get("num_clients"), int) and isinstance(
        fed.get("min_train_clients"), int
    ):
        need(
            fed["min_train_clients"] <= fed["num_clients"],
            "federation.min_train_clients",
            fed["min_train_clients"],
            f"cannot exceed federation.num_clients="
            f"{fed['num_clients']}; lower it or add clients",
        )
    if isinstance(fed.get("num_clients"), int) and isinstance(
        fed.get("min_available_clients"), int
    ):
        need(
            fed["min_available_clients"] <= fed["num_clients"],
            "federation.min_available_clients",
            fed["min_available_clients"],
            f"cannot exceed federation.num_clients={fed['num_clients']}: rounds "
            "would wait for nodes that do not exist",
        )
    need(
        isinstance(train.get("lr"), (int, float)) and train["lr"] > 0,
        "train.lr",
        train.get("lr"),
        "must be a positive number",
    )
    steps = train.get("local_steps")
    need(
        steps is None or (isinstance(steps, int) and steps > 0),
        "train.local_steps",
        steps,
        "must be null (use local_epochs) or a positive integer",
    )
    need(
        steps is not None
        or (isinstance(train.get("local_epochs"), int) and train["local_epochs"] > 0),
        "train.local_epochs",
        train.get("local_epochs"),
        "must be a positive integer",
    )
    need(
        train.get("optimizer") in ("adamw", "sgd"),
        "train.optimizer",
        train.get("optimizer"),
        "choose adamw or sgd",
    )
    need(
        isinstance(train.get("group_by_length", True), bool),
        "train.group_by_length",
        train.get("group_by_length"),
        "must be true or false",
    )
    need(
        cfg["model"].get("task") in ("seq_cls", "causal_lm"),
        "model.task",
        cfg["model"].get("task"),
        "choose seq_cls or causal_lm",
    )
    need(
        bool(adapter.get("target_modules")),
        "adapter.target_modules",
        adapter.get("target_modules"),
        "list the module names to adapt, e.g. "
        "[query, value] for BERT or [q_proj, v_proj] for Llama",
    )
    need(
        cfg["partition"].get("type") in ("iid", "dirichlet", "shard"),
        "partition.type",
        cfg["partition"].get("type"),
        "choose iid, dirichlet or shard",
    )
    if cfg["partition"].get("type") == "dirichlet":
        alpha = cfg["partition"].get("alpha")
        need(
            isinstance(alpha, (int, float)) and alpha > 0,
            "partition.alpha",
            alpha,
            "the Dirichlet concentration must be > 0 (0.5 is the usual choice)",
        )
    if data.get("name") != "synthetic" and data.get("path"):
        need(
            Path(str(data["path"])).expanduser().exists(),
            "data.path",
            data["path"],
            "no such file or folder; point it at your data (e.g. ../shared/data/sst2)",
        )
    out.extend(_privacy_problems(cfg))
    return out


def _privacy_problems(cfg: dict[str, Any]) -> list[ConfigError]:
    """Combinations of privacy mode and method that are unsafe or unsupported."""
    from fedlora.methods import from_settings
    from fedlora.privacy import check_settings

    mode = cfg["privacy"].get("mode", "none")
    out: list[ConfigError] = []
    if mode == "dp_sgd":
        try:
            check_settings(cfg["privacy"])
        except ConfigError as exc:
            out.append(exc)
        if float(cfg["federation"].get("fraction_evaluate") or 0) > 0:
            out.append(
                ConfigError(
                    "federation.fraction_evaluate",
                    cfg["federation"]["fraction_evaluate"],
                    "with privacy=dp_sgd the clients would report their exact "
                    "loss and accuracy on their own held-out examples, which the "
                    "DP-SGD accountant does not cover; set "
                    "federation.fraction_evaluate=0, or leave it null and "
                    "privacy=dp_sgd turns federated evaluation off (the server "
                    "still evaluates on its own data every round)",
                )
            )
    try:  # the method's own problems with the rest of the experiment
        out.extend(from_settings(cfg).problems(cfg))
    except ConfigError as exc:
        out.append(exc)
    if mode not in ("none", "dp_sgd", "central"):
        out.append(ConfigError("privacy.mode", mode, "choose none, dp_sgd or central"))
    return out


def validate(cfg: dict[str, Any]) -> None:
    """Raise ConfigError listing every problem of ``cfg`` (a resolved settings dict;
    keys left null for the privacy mode are checked as that mode fills them)."""
    problems = _problems(with_privacy_defaults(cfg))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigError(
            problems[0].key,
            problems[0].found,
            problems[0].fix + "\n" + "\n".join(f"  {p}" for p in problems[1:]),
        )
