"""Typed settings: every conf/ option composes into frozen dataclasses, strictly."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fedlora.errors import ConfigError
from fedlora.settings import Settings, with_
from strategies.server_app import compose, settings
from tests.conftest import REPO
from tests.fedlora.test_configs import GROUPS, NEEDS


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in GROUPS.items() for o in opts]
)
def test_every_option_composes_into_settings_and_round_trips(
    group, option, data_folder
):
    local = (group, option) in (("data", "sst2"), ("data", "local"))
    extra = [f"data.path={data_folder}"] if local else []  # validation reads it
    extra += NEEDS.get((group, option), [])
    plain = settings(compose([f"{group}={option}", *extra]))
    typed = Settings.from_dict(plain)
    assert typed.to_dict() == plain  # exactly what travels to the clients
    assert Settings.from_dict(typed.to_dict()) == typed


def test_a_missing_key_names_its_dotted_path():
    plain = settings(compose([]))
    del plain["train"]["eval_batch_size"]
    with pytest.raises(ConfigError, match=r"^train\.eval_batch_size=None") as err:
        Settings.from_dict(plain)
    assert "conf/" in str(err.value) and "command line" in str(err.value)
    del plain["quiet"]
    with pytest.raises(ConfigError, match=r"^quiet="):
        Settings.from_dict(plain)


def test_an_unknown_key_is_a_typo_named_by_its_path():
    plain = settings(compose([]))
    plain["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"^train\.learning_rate=0\.1") as err:
        Settings.from_dict(plain)
    assert "typo" in str(err.value)
    plain = settings(compose([]))
    plain["trian"] = {}
    with pytest.raises(ConfigError, match=r"^trian="):
        Settings.from_dict(plain)


def test_options_without_a_key_leave_it_none_and_out_of_the_dict():
    typed = Settings.from_dict(settings(compose([])))  # privacy=none: only mode
    assert typed.privacy.mode == "none" and typed.privacy.target_epsilon is None
    assert typed.to_dict()["privacy"] == {"mode": "none"}
    assert typed.data.hub_id is None and "hub_id" not in typed.to_dict()["data"]
    moved = with_(typed, "data.hub_id", "glue")  # set later: it travels
    assert moved.to_dict()["data"]["hub_id"] == "glue"


def test_settings_are_frozen(settings):
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.lr = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train = settings.train  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.strategy["_target_"] = "x"  # type: ignore[index]
    assert with_(settings, "train.lr", 0.5).train.lr == 0.5 != settings.train.lr


def test_computed_quantities_are_computed_in_one_place(settings):
    fed = with_(
        settings,
        "federation.num_clients",
        10,
        "federation.fraction_train",
        0.3,
        "federation.min_train_clients",
        2,
    ).federation
    assert fed.sampled_clients == 3  # min(10, max(int(3.0), 2))
    train = with_(settings, "train.batch_size", 16, "train.local_epochs", 2).train
    assert train.steps_per_round(40) == 2 * 3  # ceil(40 / 16) = 3 batches an epoch
    assert dataclasses.replace(train, local_steps=5).steps_per_round(40) == 5


# what the typed settings replaced: dict access with a default, hidden defaults
_PATTERNS = [
    r"(cfg|_cfg|plain|settings|privacy|train|adapter|fed|faults)"
    r"(\[\"\w+\"\])*\.get\(\s*\"\w+\"\s*,",
    r"_cfg\b",
    r"cfg\[\"(train|privacy|model|adapter|data|partition|federation|strategy)\"\]",
]


def test_no_settings_are_read_with_a_default_in_the_code():
    found = []
    for folder in ("fedlora", "clients", "strategies"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(Path(path).read_text().splitlines(), 1):
                if any(re.search(p, line) for p in _PATTERNS):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
