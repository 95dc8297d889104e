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
    if g.is_dir()
}


def test_contract_groups_exist():
    assert {"fedavg_lora"} <= set(GROUPS["strategy"])
    assert {"synthetic", "sst2"} <= set(GROUPS["data"])
    assert "none" in GROUPS["privacy"] and "minilm" in GROUPS["model"]


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUPS.items() for o in opts]
)
def test_every_group_option_composes_and_validates(group, option):
    extra = ["data.path=."] if (group, option) == ("data", "sst2") else []
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
    # Hydra's own instantiate builds the same method from the YAML
    assert type(instantiate(cfg.strategy)) is type(strategy.method)


@pytest.mark.parametrize("option", GROUPS["strategy"])
def test_min_available_clients_sets_the_nodes_a_round_waits_for(option):
    cfg = compose([f"strategy={option}", "federation.min_available_clients=2"])
    typed = Settings.from_dict(settings(cfg))
    assert LoRAStrategy.from_settings(typed).min_available_nodes == 2


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
        ("train.lr=-1", "train.lr"),
        ("adapter.target_modules=[]", "adapter.target_modules"),
        ("partition.type=zipf", "partition.type"),
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
