"""Meaningless or unsafe combinations are refused before any work, each naming
the key at fault and why."""

from __future__ import annotations

import pytest

from fedlora.errors import ConfigError
from strategies.server_app import compose_settings

REFUSED = [
    (["strategy=fedsb", "privacy=dp_sgd"], "strategy.init", "unprotected gradients"),
    (["strategy=fedsa_lora", "privacy=central"], "privacy", "keeps each client's B"),
    (["strategy=lora_fair", "privacy=central"], "privacy", "every client's update"),
    (["strategy=fedex_lora", "privacy=central"], "privacy", "every client's update"),
    (["privacy=central", "server_optimizer=adam"], "server_optimizer", "calibrates"),
    (
        ["strategy=fedex_lora", "server_optimizer=yogi"],
        "server_optimizer",
        "not a mean",
    ),
]


@pytest.mark.parametrize(("overrides", "key", "why"), REFUSED)
def test_a_meaningless_combination_is_refused_naming_the_key(overrides, key, why):
    with pytest.raises(ConfigError, match=why) as err:
        compose_settings(overrides)
    assert err.value.key == key


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=rolora", "server_optimizer=adam"],
        ["strategy=fedsa_lora", "server_optimizer=avgm", "train.proximal_mu=0.1"],
        ["strategy=rolora", "privacy=central"],
        ["strategy=fedex_lora", "privacy=dp_sgd"],
    ],
)
def test_sensible_combinations_compose(overrides):
    cfg = compose_settings(overrides)
    chosen = dict(o.split("=", 1) for o in overrides)
    assert cfg.strategy["_target_"].startswith(f"fedlora.methods.{chosen['strategy']}.")
    if "server_optimizer" in chosen:
        assert (
            cfg.server_optimizer["_target_"]
            .lower()
            .endswith(chosen["server_optimizer"])
        )
