"""Check the experiment settings before any work starts.

The resolved config becomes typed :class:`~fedlora.settings.Settings` (a missing or
unknown key is an error at once); then every problem with the values is collected
and one ConfigError-style report is raised, each line naming the key, the value
found and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora import layouts, server_opt, tracking
from fedlora.errors import ConfigError
from fedlora.settings import WIRE_DTYPES, Settings


def _problems(s: Settings) -> list[ConfigError]:
    out: list[ConfigError] = []
    fed, train, adapter, data = s.federation, s.train, s.adapter, s.data

    def need(ok: bool, key: str, value: Any, fix: str) -> None:
        if not ok:
            out.append(ConfigError(key, value, fix))

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def positive_int(section: Any, prefix: str, key: str) -> None:
        value = getattr(section, key)
        need(
            is_int(value) and value > 0,
            f"{prefix}.{key}",
            value,
            "must be a positive integer",
        )

    positive_int(fed, "federation", "num_clients")
    positive_int(fed, "federation", "rounds")
    positive_int(fed, "federation", "min_train_clients")
    if fed.min_available_clients is not None:  # absent in old checkpoints' settings
        positive_int(fed, "federation", "min_available_clients")
    positive_int(train, "train", "batch_size")
    positive_int(train, "train", "max_length")
    positive_int(adapter, "adapter", "r")
    if s.diagnostics is not None:  # absent in settings from before the section
        every = s.diagnostics.every
        need(
            every == "auto" or (is_int(every) and every >= 0),
            "diagnostics.every",
            every,
            "must be auto or a whole number of rounds >= 0: auto measures the "
            "aggregation error every round while it is cheap, 1 every round, N "
            "every N-th round (rounds N, 2N, ...), 0 never; e.g. "
            "diagnostics.every=10",
        )
    need(
        s.wire_dtype in WIRE_DTYPES,
        "wire.dtype",
        s.wire_dtype,
        f"choose one of {', '.join(WIRE_DTYPES)} (the 16-bit ones halve the bytes "
        "of the adapters on the wire)",
    )
    ranks = adapter.client_ranks
    if ranks is not None:
        need(
            len(ranks) > 0
            and all(is_int(k) and 1 <= k <= adapter.r for k in ranks)
            and (not is_int(fed.num_clients) or len(ranks) <= fed.num_clients),
            "adapter.client_ranks",
            list(ranks) if isinstance(ranks, tuple) else ranks,
            f"give ranks between 1 and the global rank adapter.r={adapter.r} (raise "
            "adapter.r to the largest), one per client or fewer (tiers spread "
            f"over the federation.num_clients={fed.num_clients} partitions)",
        )
    for key in ("fraction_train", "fraction_evaluate"):
        value = getattr(fed, key)
        need(
            isinstance(value, (int, float)) and 0.0 <= value <= 1.0,
            f"federation.{key}",
            value,
            "must be a number in [0, 1]",
        )
    if is_int(fed.num_clients) and is_int(fed.min_train_clients):
        need(
            fed.min_train_clients <= fed.num_clients,
            "federation.min_train_clients",
            fed.min_train_clients,
            f"cannot exceed federation.num_clients="
            f"{fed.num_clients}; lower it or add clients",
        )
    for key in ("quiet", "verbose"):
        value = getattr(s, key)
        need(
            value is None or isinstance(value, bool),
            key,
            value,
            f"must be true or false, e.g. {key}=true",
        )
    need(
        not (s.quiet and s.verbose),
        "verbose",
        s.verbose,
        "quiet=true prints nothing but errors, verbose=true everything: choose one",
    )
    sim = s.simulation
    address = sim.ray_address
    need(
        address is None or (isinstance(address, str) and address.strip() != ""),
        "simulation.ray_address",
        address,
        "give auto, a cluster address (host:6379 or ray://host:10001), or null "
        "for a Ray of the run's own",
    )
    need(
        sim.shared_ray is None or isinstance(sim.shared_ray, bool),
        "simulation.shared_ray",
        sim.shared_ray,
        "must be true (a sweep shares one Ray head) or false (a Ray per run)",
    )
    need(
        sim.warm_workers is None or isinstance(sim.warm_workers, bool),
        "simulation.warm_workers",
        sim.warm_workers,
        "must be true (each Ray worker imports, builds the model and reads the "
        "data as it starts) or false (at its first message)",
    )
    need(
        address is None or not sim.ray_num_cpus,
        "simulation.ray_num_cpus",
        sim.ray_num_cpus,
        f"cannot cap the CPUs of the running cluster simulation.ray_address="
        f"{address} (it has its own); drop it, or set ray_address=null",
    )
    timeout = fed.round_timeout
    need(
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and math.isfinite(timeout)
        and timeout > 0,
        "federation.round_timeout",
        timeout,
        "give the seconds a round may take (a positive number, e.g. 3600); "
        "clients later than that count as failed",
    )
    wait = fed.wait_timeout
    need(
        wait is None
        or (
            isinstance(wait, (int, float))
            and not isinstance(wait, bool)
            and math.isfinite(wait)
            and wait > 0
        ),
        "federation.wait_timeout",
        wait,
        "give the seconds a round may wait for its nodes (a positive number, e.g. "
        "3600), or null to wait as long as it takes",
    )
    if is_int(fed.num_clients) and is_int(fed.min_available_clients):
        need(
            fed.min_available_clients <= fed.num_clients,
            "federation.min_available_clients",
            fed.min_available_clients,
            f"cannot exceed federation.num_clients={fed.num_clients}: rounds "
            "would wait for nodes that do not exist",
        )
    need(
        isinstance(train.lr, (int, float)) and train.lr > 0,
        "train.lr",
        train.lr,
        "must be a positive number",
    )
    steps = train.local_steps
    need(
        steps is None or (is_int(steps) and steps > 0),
        "train.local_steps",
        steps,
        "must be null (use local_epochs) or a positive integer",
    )
    need(
        steps is not None or (is_int(train.local_epochs) and train.local_epochs > 0),
        "train.local_epochs",
        train.local_epochs,
        "must be a positive integer",
    )
    need(
        train.optimizer in ("adamw", "sgd"),
        "train.optimizer",
        train.optimizer,
        "choose adamw or sgd",
    )
    need(
        isinstance(train.group_by_length, bool),
        "train.group_by_length",
        train.group_by_length,
        "must be true or false",
    )
    need(
        is_int(train.max_physical_batch_size) and train.max_physical_batch_size >= 0,
        "train.max_physical_batch_size",
        train.max_physical_batch_size,
        "give the most examples one forward pass may hold (0: the whole batch)",
    )
    if train.proximal_mu is not None:  # absent in old checkpoints' settings
        mu = train.proximal_mu
        need(
            isinstance(mu, (int, float))
            and not isinstance(mu, bool)
            and math.isfinite(mu)
            and mu >= 0,
            "train.proximal_mu",
            mu,
            "FedProx's mu must be a number >= 0 (0: off, plain local training)",
        )
    need(
        s.model.task in ("seq_cls", "causal_lm"),
        "model.task",
        s.model.task,
        "choose seq_cls or causal_lm",
    )
    need(
        bool(adapter.target_modules),
        "adapter.target_modules",
        adapter.target_modules,
        "list the module names to adapt, e.g. "
        "[query, value] for BERT or [q_proj, v_proj] for Llama",
    )
    part = s.partition
    need(
        part.type in ("iid", "dirichlet", "shard", "natural"),
        "partition.type",
        part.type,
        "choose iid, dirichlet, shard or natural",
    )
    if part.type == "dirichlet":
        need(
            isinstance(part.alpha, (int, float)) and part.alpha > 0,
            "partition.alpha",
            part.alpha,
            "the Dirichlet concentration must be > 0 (0.5 is the usual choice)",
        )
    need(
        data.layout is None or data.layout in layouts.CHOICES,  # None: old settings
        "data.layout",
        data.layout,
        f"choose one of {', '.join(layouts.CHOICES)}",
    )
    held = data.validation_fraction
    need(
        held is None
        or (
            isinstance(held, (int, float))
            and not isinstance(held, bool)
            and 0.0 <= held < 1.0
        ),
        "data.validation_fraction",
        held,
        "give the share of training rows held out for the validation accuracy "
        "sweeps tune on: a number in [0, 1), e.g. 0.1 (0: none)",
    )
    if data.name == "synthetic":
        for key in ("num_examples", "num_eval_examples"):
            positive_int(data, "data", key)
        need(
            not data.path,
            "data.path",
            data.path,
            "data=synthetic (the default) is the built-in toy task and reads no "
            "file; for your own data add data=local (with data.text_column and "
            "data.label_column)",
        )
    else:
        for key in ("train_split", "eval_split"):
            need(
                bool(getattr(data, key)),
                f"data.{key}",
                getattr(data, key),
                "name the split (set it in conf/data/ or on the command line)",
            )
    if data.name != "synthetic" and data.path:
        need(
            Path(str(data.path)).expanduser().exists(),
            "data.path",
            data.path,
            "no such file or folder; point it at your data (e.g. ../shared/data/sst2)",
        )
    out.extend(_large_model_problems(s))
    out.extend(_privacy_problems(s))
    out.extend(_secure_problems(s))
    try:  # the tracker builds (its class, options, and package installed)
        tracking.from_settings(s.logger)
    except ConfigError as exc:
        out.append(exc)
    try:  # the server optimizer builds (its class, its keys and their values)
        optimizer = server_opt.from_settings(s.server_optimizer)
    except ConfigError as exc:
        out.append(exc)
    else:
        if optimizer.name != "none" and s.privacy.mode == "central":
            out.append(
                ConfigError(
                    "server_optimizer",
                    optimizer.name,
                    "privacy=central calibrates its noise to the mean of the "
                    "clients' updates, not to an optimizer's step on it; use "
                    "server_optimizer=none with privacy=central",
                )
            )
    return out


def _large_model_problems(s: Settings) -> list[ConfigError]:
    """``model.dtype``, ``model.quantization`` and ``train.gradient_checkpointing``:
    their values, and what they cannot be combined with (DP-SGD, the CPU). Whether
    this machine can quantize (CUDA, bitsandbytes) is checked where the model is
    built and in :func:`fedlora.preflight.preflight`."""
    from fedlora.models import DTYPES, QUANTIZATIONS

    model, train = s.model, s.train
    out: list[ConfigError] = []
    if model.dtype is not None and model.dtype not in DTYPES:
        out.append(
            ConfigError(
                "model.dtype",
                model.dtype,
                f"choose one of {', '.join(DTYPES)}, or null (the checkpoint's own)",
            )
        )
    quant = model.quantization
    if quant is not None and quant not in QUANTIZATIONS:
        out.append(
            ConfigError(
                "model.quantization",
                quant,
                f"choose one of {', '.join(QUANTIZATIONS)}, or null (no quantization)",
            )
        )
    checkpointing = train.gradient_checkpointing
    if checkpointing is not None and not isinstance(checkpointing, bool):
        out.append(
            ConfigError(
                "train.gradient_checkpointing",
                checkpointing,
                "must be true or false",
            )
        )
    if quant is not None and str(train.device) == "cpu":
        out.append(
            ConfigError(
                "model.quantization",
                quant,
                "quantized (QLoRA) layers run on CUDA only, and train.device=cpu; "
                "set train.device=auto or cuda, or model.quantization=null",
            )
        )
    if s.privacy.mode == "dp_sgd":
        # Opacus computes per-example gradients from hooks on the adapted layers:
        # recomputed (checkpointed) forwards leave it without them, and it is
        # checked here in float32 only
        if checkpointing:
            out.append(
                ConfigError(
                    "train.gradient_checkpointing",
                    checkpointing,
                    "with privacy=dp_sgd Opacus computes no per-example gradients "
                    "for layers whose forward pass is recomputed; set "
                    "train.gradient_checkpointing=false (lower "
                    "privacy.max_physical_batch_size to save memory instead)",
                )
            )
        if quant is not None:
            out.append(
                ConfigError(
                    "model.quantization",
                    quant,
                    "privacy=dp_sgd is not supported on quantized base weights "
                    "(Opacus' per-example gradients are untested on bitsandbytes' "
                    "layers); set model.quantization=null",
                )
            )
        if model.dtype in ("bfloat16", "float16"):
            out.append(
                ConfigError(
                    "model.dtype",
                    model.dtype,
                    "privacy=dp_sgd clips per-example gradients, tested in float32 "
                    "only; set model.dtype=float32",
                )
            )
    return out


def _privacy_problems(s: Settings) -> list[ConfigError]:
    """Combinations of privacy mode and method that are unsafe or unsupported."""
    from fedlora.methods import from_settings
    from fedlora.privacy import check_settings

    mode = s.privacy.mode
    out: list[ConfigError] = []
    if mode == "dp_sgd":
        try:
            check_settings(s.privacy)
        except ConfigError as exc:
            out.append(exc)
        if float(s.federation.fraction_evaluate or 0) > 0:
            out.append(
                ConfigError(
                    "federation.fraction_evaluate",
                    s.federation.fraction_evaluate,
                    "with privacy=dp_sgd the clients would report their exact "
                    "loss and accuracy on their own held-out examples, which the "
                    "DP-SGD accountant does not cover; set "
                    "federation.fraction_evaluate=0, or leave it null and "
                    "privacy=dp_sgd turns federated evaluation off (the server "
                    "still evaluates on its own data every round)",
                )
            )
    if mode == "central" and not s.privacy.wrapper:
        out.append(
            ConfigError(
                "privacy.wrapper",
                s.privacy.wrapper,
                "privacy=central needs the server-side DP wrapper (conf/privacy/"
                "central.yaml)",
            )
        )
    try:  # the method's own problems with the rest of the experiment
        out.extend(from_settings(s).problems(s))
    except ConfigError as exc:
        out.append(exc)
    if mode == "distributed":
        out.extend(_distributed_problems(s))
    if mode not in ("none", "dp_sgd", "central", "distributed"):
        out.append(
            ConfigError(
                "privacy.mode", mode, "choose none, dp_sgd, central or distributed"
            )
        )
    return out


#: privacy keys of the other modes (dp_sgd; central's wrapper)
DP_SGD_ONLY = (
    "target_epsilon",
    "max_grad_norm",
    "clipping",
    "accountant",
    "max_physical_batch_size",
    "planned_rounds",
    "reproducible_noise",
    "wrapper",
)


def _distributed_problems(s: Settings) -> list[ConfigError]:
    """``privacy=distributed``: its values, and secure aggregation, without which
    each client's own share of the noise would reach the server alone."""
    p = s.privacy
    out: list[ConfigError] = []
    if not s.secure:
        out.append(
            ConfigError(
                "secure_aggregation",
                "none",
                "privacy=distributed has each client add only its share of the "
                "noise, which is enough in the sum alone; add "
                "secure_aggregation=secaggplus (or use privacy=central, where the "
                "server adds the noise)",
            )
        )
    number = (int, float)
    checks = [
        (
            isinstance(p.noise_multiplier, number) and p.noise_multiplier > 0,
            "noise_multiplier",
            p.noise_multiplier,
            "a positive noise multiplier, e.g. 1.0 (without noise no epsilon holds)",
        ),
        (
            isinstance(p.clipping_norm, number) and p.clipping_norm > 0,
            "clipping_norm",
            p.clipping_norm,
            "a positive L2 norm each client clips its update to, e.g. 0.5",
        ),
        (
            isinstance(p.target_delta, number) and 0 < p.target_delta < 1,
            "target_delta",
            p.target_delta,
            "a delta in (0, 1), below 1 / num_clients, e.g. 1e-5",
        ),
        (
            p.min_clients is None
            or (
                isinstance(p.min_clients, int)
                and not isinstance(p.min_clients, bool)
                and 2 <= p.min_clients <= s.federation.sampled_clients
            ),
            "min_clients",
            p.min_clients,
            "an integer from 2 to the clients sampled a round "
            f"({s.federation.sampled_clients}), or null",
        ),
    ]
    for ok, key, value, fix in checks:
        if not ok:
            out.append(ConfigError(f"privacy.{key}", value, fix))
    for key in DP_SGD_ONLY:  # a key of another mode would do nothing here
        if getattr(p, key) is not None:
            out.append(
                ConfigError(
                    f"privacy.{key}",
                    getattr(p, key),
                    "not a privacy=distributed setting (no budget stop: the run "
                    "spends what its rounds spend, reported as "
                    "distributed_epsilon); remove it",
                )
            )
    if s.secure and s.secure_aggregation.max_update_norm is not None:
        out.append(
            ConfigError(
                "secure_aggregation.max_update_norm",
                s.secure_aggregation.max_update_norm,
                "under privacy=distributed each client clips its update to "
                "privacy.clipping_norm; a client refusing to send above a norm "
                "would tell the server its norm is larger, outside the "
                "accountant. Set it to null",
            )
        )
    if float(s.federation.fraction_evaluate or 0) > 0:
        out.append(
            ConfigError(
                "federation.fraction_evaluate",
                s.federation.fraction_evaluate,
                "with privacy=distributed the clients would report their exact "
                "loss and accuracy on their own examples, which the accountant "
                "does not cover; set federation.fraction_evaluate=0 or leave it "
                "null (the server still evaluates on its own data every round)",
            )
        )
    return out


def _secure_problems(s: Settings) -> list[ConfigError]:
    """The ``secure_aggregation`` section's values and what it cannot run with
    (the method's own refusal is in its ``problems``)."""
    sec = s.secure_aggregation
    if sec is None or sec.mode == "none":
        return []
    if sec.mode != "secaggplus":
        return [ConfigError("secure_aggregation.mode", sec.mode, "none or secaggplus")]
    out: list[ConfigError] = []
    k = sec.neighbours
    checks = [
        (
            k is None or (isinstance(k, int) and k >= 2 and k % 2 == 0),
            "neighbours",
            k,
            "an even number >= 2, or null for every other sampled client",
        ),
        (
            isinstance(sec.threshold, (int, float)) and 0.5 <= sec.threshold < 1,
            "threshold",
            sec.threshold,
            "a fraction in [0.5, 1): more than half of a secret's holders rebuild it",
        ),
        (
            isinstance(sec.clip, (int, float)) and sec.clip > 0,
            "clip",
            sec.clip,
            "a positive bound on an update entry, e.g. 0.5",
        ),
        (
            isinstance(sec.max_weight, (int, float)) and sec.max_weight >= 1,
            "max_weight",
            sec.max_weight,
            "the largest example count a client's weight takes, >= 1",
        ),
        (
            sec.max_update_norm is None or float(sec.max_update_norm) > 0,
            "max_update_norm",
            sec.max_update_norm,
            "a positive L2 norm, or null for no limit",
        ),
    ]
    for ok, key, value, fix in checks:
        if not ok:
            out.append(ConfigError(f"secure_aggregation.{key}", value, fix))
    if s.privacy.mode == "central":
        out.append(
            ConfigError(
                "privacy",
                "central",
                "the server would add its noise to a sum it has seen; for "
                "client-level DP with secure aggregation use privacy=distributed "
                "(the clients add the noise), or privacy=dp_sgd (works unchanged), "
                "or secure_aggregation=none",
            )
        )
    if s.wire_dtype != "float32":
        out.append(
            ConfigError(
                "wire.dtype",
                s.wire_dtype,
                "secure aggregation sends masked 32-bit words, which no cast may "
                "touch; set wire.dtype=float32 or secure_aggregation=none",
            )
        )
    if s.adapter.client_ranks:
        out.append(
            ConfigError(
                "adapter.client_ranks",
                list(s.adapter.client_ranks),
                "secure aggregation sums updates of one shape; remove "
                "adapter.client_ranks or use secure_aggregation=none",
            )
        )
    return out


def validate(plain: Mapping[str, Any] | Settings) -> Settings:
    """The typed settings of ``plain`` (a resolved settings dict), checked.

    Raises
    ------
    ConfigError
        A missing or unknown key (at once), else every problem with the values,
        listed in one report.
    """
    s = plain if isinstance(plain, Settings) else Settings.from_dict(plain)
    problems = _problems(s)
    if not problems and not (s.data.hub_id and not s.data.path):  # local data
        from fedlora.data import check_data

        try:  # the splits, their columns, the labels and model.num_labels
            check_data(s)
        except ConfigError as exc:
            problems.append(exc)
    raise_problems(problems)
    return s


def raise_problems(problems: list[ConfigError]) -> None:
    """Raise ``problems`` as one ConfigError (the first, the others listed below
    it, one a line); nothing when there are none."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigError(
            problems[0].key,
            problems[0].found,
            problems[0].fix + "\n" + "\n".join(f"  {p}" for p in problems[1:]),
        )
