"""Every shipped config composes, validates and instantiates; bad ones fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from fedlora.errors import ConfigError
from fedlora.settings import Settings
from fedlora.validate import validate
from strategies.server_app import CONF_DIR, compose, settings
from strategies.strategy import LoRAStrategy

GROUPS = {  # files starting with _ are bases the options extend, not options
    g.name: sorted(p.stem for p in g.glob("*.yaml") if not p.stem.startswith("_"))
    for g in Path(CONF_DIR).iterdir()
    if g.is_dir() and g.name != "experiment"  # presets: +experiment=<name>, below
}
#: what an option cannot run without (it writes nothing outside its own group)
NEEDS = {("privacy", "distributed"): ["secure_aggregation=secaggplus"]}
PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
#: the multirun presets and the sweep each holds in hydra.sweeper.params
SWEEPS = {
    "compare_methods": {
        "strategy": "fedavg_lora,ffa_lora,fedsb,lora_fair",
        "federation.seed": "0,1",
    },
    "lora_fair_rerun": {"strategy": "fedavg_lora,lora_fair", "federation.seed": "0,1"},
    "dp_large_batch64": {"strategy": "fedavg_lora,ffa_lora", "federation.seed": "0"},
}
#: the Optuna presets and their search space (points: values tried below)
SEARCHES = {"tune_lr": {"train.lr": "tag(log, interval(1e-4, 3e-2))"}}
SEARCH_POINTS = {"tune_lr": [["train.lr=1e-4"], ["train.lr=3e-2"]]}


def test_contract_groups_exist():
    assert {"fedavg_lora"} <= set(GROUPS["strategy"])
    assert {"synthetic", "sst2"} <= set(GROUPS["data"])
    assert "none" in GROUPS["privacy"] and "minilm" in GROUPS["model"]


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUPS.items() for o in opts]
)
def test_every_group_option_composes_and_validates(group, option, data_folder):
    local = (group, option) in (("data", "sst2"), ("data", "local"))
    extra = [f"data.path={data_folder}"] if local else []  # validation reads it
    extra += NEEDS.get((group, option), [])
    cfg = compose([f"{group}={option}", *extra])
    plain = settings(cfg)
    assert "${" not in str(plain)  # every interpolation resolved
    validate(plain)


@pytest.mark.parametrize("option", GROUPS["strategy"])
def test_every_strategy_instantiates(option):
    cfg = compose([f"strategy={option}"])
    strategy = LoRAStrategy.from_settings(Settings.from_dict(settings(cfg)))
    assert strategy.name == option == strategy.method.name
    assert strategy.min_available_nodes == cfg.federation.num_clients
    # Hydra's own instantiate builds the same method from the settings
    assert type(instantiate(settings(cfg)["strategy"])) is type(strategy.method)


@pytest.mark.parametrize("option", GROUPS["strategy"])
def test_min_available_clients_sets_the_nodes_a_round_waits_for(option):
    cfg = compose([f"strategy={option}", "federation.min_available_clients=2"])
    typed = Settings.from_dict(settings(cfg))
    assert LoRAStrategy.from_settings(typed).min_available_nodes == 2


def test_wait_timeout_sets_the_strategys_deadline_and_null_means_none():
    def deadline(*overrides: str) -> float | None:
        typed = Settings.from_dict(settings(compose(list(overrides))))
        return LoRAStrategy.from_settings(typed).wait_timeout

    assert deadline() == 3600
    assert deadline("federation.wait_timeout=90.5") == 90.5
    assert deadline("federation.wait_timeout=null") is None


def test_unknown_strategy_lists_the_options():
    with pytest.raises(MissingConfigException, match="fedavg_lora"):
        compose(["strategy=fedsgd"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("federation.num_clients=0", "federation.num_clients"),
        ("federation.min_train_clients=9", "federation.min_train_clients"),
        ("federation.min_available_clients=9", "federation.min_available_clients"),
        ("federation.min_available_clients=0", "federation.min_available_clients"),
        ("federation.fraction_train=1.5", "federation.fraction_train"),
        ("federation.wait_timeout=0", "federation.wait_timeout"),
        ("federation.wait_timeout=-60", "federation.wait_timeout"),
        ("federation.wait_timeout=true", "federation.wait_timeout"),
        ("federation.wait_timeout=soon", "federation.wait_timeout"),
        ("federation.wait_timeout=inf", "federation.wait_timeout"),
        ("train.lr=-1", "train.lr"),
        ("adapter.target_modules=[]", "adapter.target_modules"),
        ("partition.type=zipf", "partition.type"),
        ("data.layout=dialogue", "data.layout"),
        ("data.path=/no/such/dir", "data.path"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    extra = ["data=sst2"] if key == "data.path" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([*extra, override])


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        compose(["train.lr=0", "train.batch_size=0"])
    assert "train.lr" in str(info.value) and "train.batch_size" in str(info.value)


# --- keys the privacy mode fills in (no group writes another group's keys) -------
@pytest.mark.parametrize(
    "privacy,fraction_evaluate,weighting",
    [
        ("none", 1.0, "num_examples"),
        ("dp_sgd", 0.0, "num_examples"),
        ("central", 1.0, "uniform"),
    ],
)
def test_the_privacy_mode_fills_the_keys_left_null(
    privacy, fraction_evaluate, weighting
):
    cfg = compose([f"privacy={privacy}"])  # each privacy option alone validates
    assert cfg.federation.fraction_evaluate is None and cfg.strategy.weighting is None
    plain = settings(cfg)
    assert plain["federation"]["fraction_evaluate"] == fraction_evaluate
    assert plain["strategy"]["weighting"] == weighting


@pytest.mark.parametrize("privacy", ["none", "dp_sgd"])
def test_secure_aggregation_turns_federated_evaluation_off_unless_set(privacy):
    """The clients' own evaluation metrics would reach the server in plaintext."""
    secure = ["secure_aggregation=secaggplus", f"privacy={privacy}"]
    plain = settings(compose(secure))
    assert plain["federation"]["fraction_evaluate"] == 0.0
    assert plain["strategy"]["weighting"] == "num_examples"
    if privacy == "none":  # set by hand: kept (the docs say what it shows)
        plain = settings(compose([*secure, "federation.fraction_evaluate=0.5"]))
        assert plain["federation"]["fraction_evaluate"] == 0.5


def test_a_value_set_by_hand_is_kept_or_refused_never_replaced():
    plain = settings(compose(["privacy=dp_sgd", "federation.fraction_evaluate=0"]))
    assert plain["federation"]["fraction_evaluate"] == 0
    with pytest.raises(ConfigError, match=r"^federation\.fraction_evaluate=1\b"):
        compose(["privacy=dp_sgd", "federation.fraction_evaluate=1"])
    with pytest.raises(ConfigError, match=r"^strategy\.weighting='num_examples'"):
        compose(["privacy=central", "strategy.weighting=num_examples"])
    plain = settings(compose(["privacy=none", "strategy.weighting=uniform"]))
    assert plain["strategy"]["weighting"] == "uniform"


def test_command_line_overrides_win_over_the_primary_config_and_the_groups():
    cfg = compose(
        [
            "federation.rounds=7",  # a key of conf/config.yaml
            "strategy=fedsb",  # selects adapter=lora_sb (r 32) ...
            "adapter.r=4",  # ... whose r the command line still sets
            "strategy.init=random_orthogonal",
            "privacy=dp_sgd",
            "privacy.target_epsilon=8",
            "federation.fraction_evaluate=0",
        ]
    )
    assert cfg.federation.rounds == 7 and cfg.adapter.r == 4 and cfg.adapter.alpha == 4
    assert cfg.privacy.target_epsilon == 8 and cfg.federation.fraction_evaluate == 0


# --- experiment presets (conf/experiment/, +experiment=<name>) ---------------------
def test_contract_presets_exist():
    assert {"compare_methods", "lora_fair_rerun", "dp_sweep", "dp_large"} <= set(
        PRESETS
    )


def test_only_presets_write_outside_their_own_package():
    """No group option declares ``@package _global_`` (each writes only its own
    section); presets do, as Hydra's pattern for experiment presets has them."""
    offenders = [
        str(p.relative_to(CONF_DIR))
        for p in Path(CONF_DIR).rglob("*.yaml")
        if "@package _global_" in p.read_text() and p.parent.name != "experiment"
    ]
    assert offenders == []
    for name in PRESETS:
        first = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
        assert first.startswith("# @package _global_\n"), name


def compose_with_hydra(overrides: list[str]):
    """The composed config with its ``hydra`` node (sweeper, sweep dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_validates(name, data_folder):
    overrides = [f"+experiment={name}", f"data.path={data_folder}"]  # SST-2's layout
    plain = settings(compose(overrides))
    assert "${" not in str(plain)
    hydra_cfg = compose_with_hydra(overrides).hydra
    assert hydra_cfg.runtime.choices.experiment == name
    params = hydra_cfg.sweeper.params or {}
    assert dict(params) == {**SWEEPS, **SEARCHES}.get(name, {})
    # every point of the sweep composes and validates too (Optuna's: its ends)
    points = SEARCH_POINTS.get(name, [[]])
    for key, values in params.items() if name not in SEARCHES else ():
        points = [[*p, f"{key}={v}"] for p in points for v in str(values).split(",")]
    for point in points:
        compose([*overrides, *point])


@pytest.mark.parametrize("name", ["dp_sweep", "dp_large"])
def test_the_dp_presets_validate_under_every_privacy_arm(name, data_folder):
    for strategy in ("fedavg_lora", "ffa_lora", "fedsb"):
        init = ["strategy.init=random_orthogonal"] if strategy == "fedsb" else []
        for arm in (["privacy=none"], ["privacy=dp_sgd", "privacy.target_epsilon=1"]):
            overrides = [
                f"+experiment={name}",
                f"data.path={data_folder}",
                f"strategy={strategy}",
            ]
            plain = settings(compose([*overrides, *init, *arm]))
            assert plain["federation"]["fraction_evaluate"] == 0


def test_a_preset_is_overridden_by_the_command_line(data_folder):
    cfg = compose(
        ["+experiment=dp_large", f"data.path={data_folder}", "federation.rounds=5"]
    )
    assert cfg.federation.rounds == 5 and cfg.data.max_train_examples == 30000
