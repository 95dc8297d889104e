"""The experiment settings as frozen dataclasses, one per section of ``conf/``.

The composed Hydra config (a plain dict once resolved) becomes a :class:`Settings`
once, with :meth:`Settings.from_dict`; :func:`fedlora.validate.validate` checks the
values and returns it. Every default lives in ``conf/``: the dataclasses have none,
and a key ``conf/`` defines that is missing here is an error, as is an unknown key
(a typo). A field that some option of its group does not define (e.g. the privacy
settings under ``privacy=none``, which has only ``mode``) is optional and None.
:meth:`Settings.to_dict` gives back the plain dict, what travels to the clients as
JSON and what a checkpoint keeps.

The method (``strategy``) keeps its constructor arguments as a read-only mapping:
its typed form is the object :func:`fedlora.methods.from_settings` builds. The server
optimizer (``server_optimizer``) is held the same way and built by
:func:`fedlora.server_opt.from_settings`; it is None in settings written before the
section existed (no server optimizer), as is ``export`` (the default export). So is
the experiment tracker (``logger``, built by :func:`fedlora.tracking.from_settings`;
None: no tracking).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fedlora.errors import ConfigError

_OPTIONAL = "optional"
T = TypeVar("T", bound="_Section")


def optional() -> Any:
    """A field that some option of its conf group does not define (then None)."""
    return field(metadata={_OPTIONAL: True})


class Frozen(Mapping[str, Any]):
    """A read-only mapping (nested mappings and lists frozen too)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = {str(k): _freeze(v) for k, v in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Frozen({self._data!r})"

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Frozen(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, _Section):
        return value.to_dict()
    return value


def _missing(key: str) -> ConfigError:
    return ConfigError(
        key, None, "this setting is missing; set it in conf/ or on the command line"
    )


#: settings that are gone on purpose, and why
_REMOVED = {
    "privacy.poisson_sampling": (
        "is not a setting: DP-SGD always samples its batches by Poisson sampling, "
        "which the accountant's amplification by subsampling assumes (fixed "
        "batches would make every reported epsilon too small); remove the key"
    ),
}


def _unknown(key: str, value: Any, known: list[str]) -> ConfigError:
    if key in _REMOVED:
        return ConfigError(key, value, _REMOVED[key])
    return ConfigError(
        key,
        value,
        f"no such setting (a typo?); the settings here are {', '.join(known)}",
    )


@dataclass(frozen=True)
class _Section:
    """A section of the settings: strict :meth:`from_dict`, exact :meth:`to_dict`."""

    #: optional keys the source dict did not have (left out again by to_dict)
    absent: frozenset[str] = field(
        default=frozenset(), compare=False, repr=False, kw_only=True
    )

    @classmethod
    def _keys(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.name != "absent"]

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
        """The section ``prefix`` (a dotted key) from its plain dict.

        Raises
        ------
        ConfigError
            A missing key (naming it: set it in conf/ or on the command line) or an
            unknown one (a typo).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(prefix, data, "must be a mapping of settings")
        fields = cls._keys()
        names = [f.name for f in fields]
        for key in data:
            if key not in names:
                raise _unknown(f"{prefix}.{key}", data[key], names)
        values, absent = {}, set()
        for f in fields:
            if f.name in data:
                values[f.name] = _freeze(data[f.name])
            elif f.metadata.get(_OPTIONAL):
                values[f.name], absent = None, absent | {f.name}
            else:
                raise _missing(f"{prefix}.{f.name}")
        return cls(**values, absent=frozenset(absent))

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :meth:`from_dict` took (lists and mappings thawed)."""
        return {
            f.name: _thaw(getattr(self, f.name))
            for f in self._keys()
            if not (f.name in self.absent and getattr(self, f.name) is None)
        }


@dataclass(frozen=True)
class ModelSettings(_Section):
    """``conf/model/``: the base model."""

    name: str  # a local folder, a hub id or a packaged alias (minilm)
    task: str  # seq_cls | causal_lm
    num_labels: int | None  # null: from the data (fedlora.data.resolve_labels)
    #: the base weights' dtype: float32 | bfloat16 | float16; None: as the
    #: checkpoint stores them (also in settings written before the key existed)
    dtype: str | None = optional()
    #: 4bit | 8bit: bitsandbytes-quantized base weights (QLoRA, CUDA only); None: off
    quantization: str | None = optional()


@dataclass(frozen=True)
class AdapterSettings(_Section):
    """``conf/adapter/``: PEFT's LoraConfig, ``W0 + s B A``."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    #: a rank per client: one per partition, or tiers spread over the partitions
    client_ranks: tuple[int, ...] | None = optional()

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
        r = int(self.r)
        return float(self.alpha) / (math.sqrt(r) if self.use_rslora else r)

    def rank_of(self, partition: int, num_partitions: int) -> int:
        """The rank client ``partition`` trains: ``client_ranks[partition]`` when
        the list has one rank per partition; otherwise the list is tiers spread in
        order over the partitions, partition ``k`` of ``N`` taking tier
        ``k * T // N``; ``r`` without a list."""
        ranks = self.client_ranks
        if not ranks:
            return int(self.r)
        if len(ranks) == num_partitions:
            return int(ranks[partition])
        return int(ranks[partition * len(ranks) // num_partitions])


@dataclass(frozen=True)
class DataSettings(_Section):
    """``conf/data/``: the data set, its columns and the held-out fractions."""

    name: str
    path: str | None = optional()  # a local file or folder (not synthetic)
    #: the label names in id order (null: the sorted labels of the whole data)
    labels: tuple[str, ...] | None = optional()
    hub_id: str | None = optional()
    hub_config: str | None = optional()
    train_split: str | None = optional()
    eval_split: str | None = optional()
    num_examples: int | None = optional()  # synthetic
    num_eval_examples: int | None = optional()  # synthetic
    text_column: str = field()
    label_column: str = field()
    prompt_column: str = field()
    response_column: str = field()
    #: causal LM: auto | prompt_response | instruction | chat (fedlora.layouts);
    #: these five are optional only for settings written before they existed
    #: (layout None: auto)
    layout: str | None = optional()
    instruction_column: str | None = optional()
    input_column: str | None = optional()
    output_column: str | None = optional()
    messages_column: str | None = optional()
    client_eval_fraction: float = field()
    #: training rows held out (before partitioning) for the server's validation
    #: accuracy, the tuning objective; None (settings written before the key
    #: existed): 0, none
    validation_fraction: float | None = optional()
    max_train_examples: int | None = field()
    max_eval_examples: int | None = field()
    seed: int = field()


@dataclass(frozen=True)
class PartitionSettings(_Section):
    """``partition``: how the training split is divided among the clients."""

    type: str  # iid | dirichlet | shard | natural
    alpha: float
    min_partition_size: int
    shards_per_client: int
    seed: int
    #: natural: the data's column naming each row's client
    column: str | None = optional()


@dataclass(frozen=True)
class FederationSettings(_Section):
    """``federation``: clients, rounds, sampling and failure handling."""

    num_clients: int
    rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_clients: int
    #: optional only for checkpoints written before the key existed (then
    #: num_clients, the value conf/ gives it)
    min_available_clients: int | None = optional()
    seed: int = field()
    round_timeout: float = field()
    min_replies: int = field()
    max_failed_rounds: int = field()
    #: seconds a round waits for its nodes; None: no limit (also in settings
    #: written before the key existed, whose runs waited as long as it took)
    wait_timeout: float | None = optional()

    @property
    def sampled_clients(self) -> int:
        """Clients Flower samples for training each round:
        ``min(N, max(int(N * fraction_train), min_train_clients))``."""
        n = int(self.num_clients)
        wanted = int(n * float(self.fraction_train))
        return min(n, max(wanted, int(self.min_train_clients)))

    @property
    def available_clients(self) -> int:
        """Connected nodes a round waits for (``min_available_clients``)."""
        if self.min_available_clients is None:
            return int(self.num_clients)
        return int(self.min_available_clients)


@dataclass(frozen=True)
class TrainSettings(_Section):
    """``train``: the clients' local optimisation."""

    optimizer: str  # adamw | sgd
    lr: float
    weight_decay: float
    momentum: float
    local_epochs: int
    local_steps: int | None  # when set, overrides local_epochs
    batch_size: int
    max_physical_batch_size: int
    eval_batch_size: int
    max_length: int
    device: str
    num_threads: int
    group_by_length: bool
    #: FedProx's mu (0: off); optional only for checkpoints written before the key
    #: existed (then off, as they trained)
    proximal_mu: float | None = optional()
    #: recompute activations in the backward pass (less memory, more compute);
    #: None in settings written before the key existed (off, as they trained)
    gradient_checkpointing: bool | None = optional()

    def batches_per_epoch(self, num_examples: int) -> int:
        """``ceil(N_k / batch_size)``, at least 1."""
        return max(1, math.ceil(int(num_examples) / int(self.batch_size)))

    def steps_per_round(self, num_examples: int) -> int:
        """Local optimizer steps a round on ``num_examples`` examples:
        ``local_steps`` if set, else ``local_epochs`` x batches per epoch."""
        if self.local_steps:
            return int(self.local_steps)
        return self.batches_per_epoch(num_examples) * int(self.local_epochs)


@dataclass(frozen=True)
class PrivacySettings(_Section):
    """``conf/privacy/``: none, DP-SGD in the clients, central DP at the server,
    or client-level DP with noise the clients add under secure aggregation.

    Every field but ``mode`` is optional: ``privacy=none`` defines none of them,
    ``central`` only ``target_delta`` and ``wrapper``, ``distributed``
    ``target_delta``, ``noise_multiplier``, ``clipping_norm`` and ``min_clients``.
    """

    mode: str  # none | dp_sgd | central | distributed
    target_epsilon: float | None = optional()
    target_delta: float | None = optional()
    max_grad_norm: float | None = optional()
    clipping: str | None = optional()  # flat | per_layer
    accountant: str | None = optional()  # prv | rdp
    max_physical_batch_size: int | None = optional()
    planned_rounds: int | None = optional()
    reproducible_noise: bool | None = optional()
    #: central: the server-side DP wrapper's constructor arguments, ``_target_``
    wrapper: Mapping[str, Any] | None = optional()
    #: distributed (fedlora.distributed_dp): z of a sum of min_clients survivors
    noise_multiplier: float | None = optional()
    #: distributed: the L2 bound each client clips its whole update to
    clipping_norm: float | None = optional()
    #: distributed: the fewest survivors the noise is calibrated for (None: more
    #: than secure_aggregation.threshold of the clients asked)
    min_clients: int | None = optional()


@dataclass(frozen=True)
class SecureAggregationSettings(_Section):
    """``conf/secure_aggregation/``: none, or SecAgg+ (every field but ``mode``
    optional: ``none`` defines none of them)."""

    mode: str  # none | secaggplus
    neighbours: int | None = optional()  # k; None: every other sampled client
    threshold: float | None = optional()  # share threshold's fraction of k + 1
    clip: float | None = optional()  # c: an update entry's clipping range
    max_weight: float | None = optional()  # num_examples: the largest weight
    max_update_norm: float | None = optional()  # a client's own update check

    @property
    def on(self) -> bool:
        """Whether the server sees only the clients' sum."""
        return self.mode != "none"


@dataclass(frozen=True)
class SimulationSettings(_Section):
    """``simulation``: Ray resources of the simulated clients."""

    client_num_cpus: float
    client_num_gpus: float
    ray_num_cpus: int | None
    client_dir: str | None
    #: a running Ray cluster to attach to (``auto`` or an address); None: a Ray
    #: of the run's own (absent in settings from before the key: None)
    ray_address: str | None = optional()
    #: a sweep (``-m``) starts one Ray head for all its runs (absent: true)
    shared_ray: bool | None = optional()
    #: a Ray of the run's own warms each worker as it starts (imports, model,
    #: data) while the server starts (absent: true)
    warm_workers: bool | None = optional()


@dataclass(frozen=True)
class FaultSettings(_Section):
    """``faults``: fault injection for tests and drills."""

    raise_partition: int | None = optional()
    raise_every: int | None = optional()  # None: every round
    #: this partition's node loses its node state at the start of that round
    #: (a restarted node in a simulation)
    forget_partition: int | None = optional()
    forget_round: int | None = optional()
    #: every client raises a ConfigError in this round (a configuration error
    #: only the clients can see, as a deployed node's own data could give)
    config_error_round: int | None = optional()

    def raises(self, partition: int, server_round: int) -> bool:
        """Whether ``partition``'s client is to fail in ``server_round``."""
        return (
            self.raise_partition == partition
            and server_round % int(self.raise_every or 1) == 0
        )

    def forgets(self, partition: int, server_round: int) -> bool:
        """Whether ``partition``'s node loses its state in ``server_round``."""
        return self.forget_partition == partition and self.forget_round == server_round


@dataclass(frozen=True)
class ExportSettings(_Section):
    """``export``: the PEFT adapter a run saves at its end."""

    #: its LoRA rank; None: the method's default (the largest client rank, or
    #: ``adapter.r`` without ``adapter.client_ranks``; FLoRA: ``adapter.r``)
    rank: int | None


@dataclass(frozen=True)
class DiagnosticsSettings(_Section):
    """``diagnostics``: what the server measures beyond the round itself."""

    #: the aggregation-error diagnostic in every ``every``-th round (rounds
    #: ``every``, ``2 every``, ...); 0: never; ``"auto"``: every round while it
    #: is cheap (:class:`~fedlora.diagnostics.DiagnosticSchedule`)
    every: int | str


@dataclass(frozen=True)
class WireSettings(_Section):
    """``wire``: how adapter states travel between the server and the clients."""

    #: the dtype of the adapter arrays sent both ways, one of :data:`WIRE_DTYPES`
    dtype: str


#: ``wire.dtype``'s choices: float32, or a 16-bit float (half the bytes)
WIRE_DTYPES = ("float32", "bfloat16", "float16")


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSettings,
    "adapter": AdapterSettings,
    "data": DataSettings,
    "partition": PartitionSettings,
    "federation": FederationSettings,
    "train": TrainSettings,
    "privacy": PrivacySettings,
    "simulation": SimulationSettings,
}
_SCALARS = ("quiet", "resume")


@dataclass(frozen=True)
class Settings:
    """The whole experiment, as composed from ``conf/`` (see the module doc)."""

    model: ModelSettings
    adapter: AdapterSettings
    data: DataSettings
    partition: PartitionSettings
    federation: FederationSettings
    train: TrainSettings
    privacy: PrivacySettings
    simulation: SimulationSettings
    #: the method's constructor arguments, ``_target_`` naming its class
    strategy: Mapping[str, Any]
    #: the server optimizer's arguments, ``_target_`` naming its class (null: none);
    #: None when absent (settings written before the section existed: none)
    server_optimizer: Mapping[str, Any] | None
    quiet: bool
    resume: str | None  # a run directory to continue
    faults: FaultSettings | None  # tests and drills only; None when absent
    #: None when absent (settings written before the section existed: the
    #: default export)
    export: ExportSettings | None = None
    #: None when absent (settings written before the section existed: the
    #: diagnostic every round)
    diagnostics: DiagnosticsSettings | None = None
    #: Flower's logs and the libraries' warnings shown; None when absent
    #: (settings written before the key existed: not shown)
    verbose: bool | None = None
    #: None when absent (settings written before the section existed: none)
    secure_aggregation: SecureAggregationSettings | None = None
    #: the experiment tracker's options, ``_target_`` naming its class
    #: (:mod:`fedlora.tracking`); None when absent (settings written before the
    #: section existed: no tracking)
    logger: Mapping[str, Any] | None = None
    #: None when absent (settings written before the section existed: float32)
    wire: WireSettings | None = None

    @property
    def wire_dtype(self) -> str:
        """The dtype adapter states travel in (``wire.dtype``; absent: float32)."""
        return "float32" if self.wire is None else str(self.wire.dtype)

    @property
    def secure(self) -> bool:
        """Whether secure aggregation is on."""
        return self.secure_aggregation is not None and self.secure_aggregation.on

    @classmethod
    def from_dict(cls, plain: Mapping[str, Any]) -> Settings:
        """The typed settings of the resolved config ``plain``.

        Raises
        ------
        ConfigError
            A missing key, naming its dotted path (set it in conf/ or on the
            command line), or an unknown key (a typo), naming it.
        """
        plain = with_privacy_defaults(plain)
        known = [
            *_SECTIONS,
            "strategy",
            "server_optimizer",
            *_SCALARS,
            "faults",
            "export",
            "diagnostics",
            "verbose",
            "secure_aggregation",
            "logger",
            "wire",
        ]
        for key in plain:
            if key not in known:
                raise _unknown(str(key), plain[key], known)
        for key in [*_SECTIONS, "strategy", *_SCALARS]:
            if key not in plain:
                raise _missing(key)
        strategy = plain["strategy"]
        if not isinstance(strategy, Mapping):
            raise ConfigError("strategy", strategy, "must be a mapping of settings")
        if "_target_" not in strategy:
            raise _missing("strategy._target_")
        faults = plain["faults"] if "faults" in plain else None  # test-only
        return cls(
            **{k: t.from_dict(plain[k], k) for k, t in _SECTIONS.items()},
            strategy=Frozen(strategy),
            server_optimizer=_component(plain, "server_optimizer"),
            quiet=plain["quiet"],
            verbose=plain.get("verbose"),
            resume=plain["resume"],
            faults=None
            if faults is None
            else FaultSettings.from_dict(faults, "faults"),
            export=ExportSettings.from_dict(plain["export"], "export")
            if "export" in plain
            else None,
            diagnostics=DiagnosticsSettings.from_dict(
                plain["diagnostics"], "diagnostics"
            )
            if "diagnostics" in plain
            else None,
            secure_aggregation=SecureAggregationSettings.from_dict(
                plain["secure_aggregation"], "secure_aggregation"
            )
            if "secure_aggregation" in plain
            else None,
            logger=_component(plain, "logger"),
            wire=WireSettings.from_dict(plain["wire"], "wire")
            if "wire" in plain
            else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain dict (what travels to clients as JSON, what checkpoints keep)."""
        out = {k: getattr(self, k).to_dict() for k in _SECTIONS}
        out["strategy"] = _thaw(self.strategy)
        for key in _COMPONENTS:
            if getattr(self, key) is not None:
                out[key] = _thaw(getattr(self, key))
        out.update({k: getattr(self, k) for k in _SCALARS})
        if self.faults is not None:
            out["faults"] = self.faults.to_dict()
        if self.export is not None:
            out["export"] = self.export.to_dict()
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics.to_dict()
        if self.verbose is not None:
            out["verbose"] = self.verbose
        if self.secure_aggregation is not None:
            out["secure_aggregation"] = self.secure_aggregation.to_dict()
        if self.wire is not None:
            out["wire"] = self.wire.to_dict()
        return out

    @property
    def dp_planned_rounds(self) -> int:
        """Rounds a DP-SGD client expects to train in: ``privacy.planned_rounds`` if
        set, else ``ceil(rounds * sampled / num_clients)`` (all rounds under full
        participation). A client sampled more often than planned declines once its
        budget is spent."""
        if self.privacy.planned_rounds:
            return int(self.privacy.planned_rounds)
        fed = self.federation
        return max(
            1,
            math.ceil(int(fed.rounds) * fed.sampled_clients / int(fed.num_clients)),
        )


#: optional sections held as a ``_target_`` mapping, and the option that turns
#: each off (for the messages)
_COMPONENTS = {"server_optimizer": "server_optimizer=none", "logger": "logger=none"}


def _component(plain: Mapping[str, Any], key: str) -> Frozen | None:
    """The section ``key`` of :data:`_COMPONENTS`, frozen; None when ``plain`` has
    none (settings written before the section existed)."""
    if key not in plain:
        return None
    section = plain[key]
    if not isinstance(section, Mapping):
        raise ConfigError(
            key,
            section,
            f"must be a mapping of settings with _target_ ({_COMPONENTS[key]} "
            "for none)",
        )
    if "_target_" not in section:
        raise _missing(f"{key}._target_")
    return Frozen(section)


#: settings whose ``null`` lets the privacy mode choose, as
#: ``{key: ({privacy mode: value}, value otherwise)}``. The privacy group writes
#: nothing outside ``privacy``: what a mode needs elsewhere is filled in here, and
#: only where the user left the key null; a value set by hand is kept, and the
#: validator refuses one the mode cannot take.
PRIVACY_DEFAULTS: dict[str, tuple[dict[str, Any], Any]] = {
    # clients' exact metrics on their own examples are outside DP-SGD's accountant,
    # and would reach a server that secure aggregation keeps from every update
    # (secaggplus counts as a mode here, after the privacy mode)
    "federation.fraction_evaluate": (
        {"dp_sgd": 0.0, "distributed": 0.0, "secaggplus": 0.0},
        1.0,
    ),
    # client-level DP's noise is calibrated to a uniform mean of the updates
    "strategy.weighting": (
        {"central": "uniform", "distributed": "uniform"},
        "num_examples",
    ),
}


def with_privacy_defaults(plain: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the plain settings whose null :data:`PRIVACY_DEFAULTS` keys hold
    the value its ``privacy.mode`` takes, else its ``secure_aggregation.mode`` (a
    key set by hand, or absent, is left alone)."""
    out = dict(plain)
    modes = [
        section.get("mode") if isinstance(section, Mapping) else None
        for section in (out.get("privacy"), out.get("secure_aggregation"))
    ]
    for dotted, (by_mode, otherwise) in PRIVACY_DEFAULTS.items():
        section, key = dotted.split(".")
        inner = out.get(section)
        if isinstance(inner, Mapping) and key in inner and inner[key] is None:
            value = next((by_mode[m] for m in modes if m in by_mode), otherwise)
            out[section] = {**inner, key: value}
    return out


def with_(settings: Settings, *changes: Any) -> Settings:
    """A copy of ``settings`` with settings replaced, given as alternating dotted
    keys and values, e.g. ``with_(s, "train.lr", 0.5, "train.batch_size", 8)``.

    A whole section may be given as a plain mapping (``with_(s, "privacy", {...})``,
    checked as :meth:`Settings.from_dict` would); ``strategy``,
    ``server_optimizer`` and ``logger`` take a mapping.
    """
    if len(changes) % 2:
        raise TypeError("with_ takes pairs of a dotted key and its value")
    for dotted, value in zip(changes[::2], changes[1::2], strict=True):
        section, _, key = str(dotted).partition(".")
        if not key:
            if section in _SECTIONS and isinstance(value, Mapping):
                value = _SECTIONS[section].from_dict(value, section)
            elif section == "faults" and isinstance(value, Mapping):
                value = FaultSettings.from_dict(value, section)
            elif section == "export" and isinstance(value, Mapping):
                value = ExportSettings.from_dict(value, section)
            elif section == "diagnostics" and isinstance(value, Mapping):
                value = DiagnosticsSettings.from_dict(value, section)
            elif section == "secure_aggregation" and isinstance(value, Mapping):
                value = SecureAggregationSettings.from_dict(value, section)
            elif section == "wire" and isinstance(value, Mapping):
                value = WireSettings.from_dict(value, section)
            elif section == "strategy":
                value = Frozen(value)
            elif section in _COMPONENTS and value is not None:
                value = _component({section: value}, section)
            settings = dataclasses.replace(settings, **{section: value})
        elif section in ("strategy", *_COMPONENTS):
            mapping = getattr(settings, section) or {}
            settings = dataclasses.replace(
                settings, **{section: Frozen({**mapping, key: value})}
            )
        else:
            inner = getattr(settings, section)
            if inner is None and section == "export":  # absent: the defaults
                inner = ExportSettings(rank=None)
            if inner is None and section == "diagnostics":
                inner = DiagnosticsSettings(every=1)
            if inner is None and section == "wire":
                inner = WireSettings(dtype="float32")
            inner = dataclasses.replace(inner, **{key: _freeze(value)})
            settings = dataclasses.replace(settings, **{section: inner})
    return settings
