"""Server optimizers: Flower's own FedOpt strategies step for step, the plain method
at lr 1 without momentum, bit-identical resume, clear config errors, settings."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from fedlora import checkpoint
from fedlora import server_opt as so
from fedlora.errors import ConfigError
from fedlora.settings import Settings, with_
from strategies.server_app import CONF_DIR, compose, settings
from tests.conftest import REPO, Grid

State = dict[str, np.ndarray]
SHAPES = {  # one adapted layer and a head: B (d_out, r), A (r, d_in)
    "layer.lora_B.weight": (48, 4),
    "layer.lora_A.weight": (4, 32),
    "head.weight": (2, 48),
}
#: entry scales: LoRA-like (B starts near 0, A at its init) and N(0, 1)
SCALES = {
    "lora": {
        "layer.lora_B.weight": 1e-3,
        "layer.lora_A.weight": 1e-1,
        "head.weight": 1e-1,
    },
    "normal": dict.fromkeys(SHAPES, 1.0),
}
#: ours and Flower's, built with the same (non-default where defaults are trivial)
#: hyperparameters; Flower's FedAvgM at its defaults does no arithmetic
PAIRS = {
    "avgm": (
        lambda: so.AvgM(server_learning_rate=0.7, server_momentum=0.9),
        lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
    ),
    "avgm_lr_only": (
        lambda: so.AvgM(server_learning_rate=1.5),
        lambda: FedAvgM(server_learning_rate=1.5),
    ),
    "adagrad": (so.Adagrad, FedAdagrad),
    "adam": (so.Adam, FedAdam),
    "adam_small_eta": (
        lambda: so.Adam(eta=1e-3, beta_1=0.5, tau=1e-6),
        lambda: FedAdam(eta=1e-3, beta_1=0.5, tau=1e-6),
    ),
    "yogi": (so.Yogi, FedYogi),
}
ROUNDS = 5


def _record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _replies(strategy, server_round: int, sent: State, clients: list, counts: list):
    """Flower's own train messages for ``sent``, and a reply to each: node ``i``
    returns ``clients[i - 1]`` trained on ``counts[i - 1]`` examples (the
    ``num-examples`` metric Flower weights by). Replies in node order, so that
    every aggregation sums the clients in the same order."""
    messages = strategy.configure_train(
        server_round, _record(sent), ConfigRecord(), Grid(range(1, len(clients) + 1))
    )
    out = []
    for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
        i = msg.metadata.dst_node_id - 1
        content = RecordDict(
            {
                "arrays": _record(clients[i]),
                "metrics": MetricRecord({"num-examples": counts[i]}),
            }
        )
        out.append(Message(content=content, reply_to=msg))
    return out


def _clients(rng, x: State, scale: dict, k: int = 3) -> list[State]:
    """``k`` client states: ``x`` plus a local update of a tenth of its scale."""
    return [
        {
            key: (v + rng.standard_normal(v.shape) * (0.1 * scale[key])).astype(
                np.float32
            )
            for key, v in x.items()
        }
        for _ in range(k)
    ]


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_each_optimizer_is_flowers_own_strategy_bit_for_bit(task_identity, name, scale):
    """Flower's strategy (its configure_train, then aggregate_train over reply
    Messages) against ours applied to Flower's FedAvg of the same replies, for
    ROUNDS rounds, each starting from the float32 state of the previous one (what
    the wire carries): equal to the last bit."""
    ours, flower = PAIRS[name][0](), PAIRS[name][1]()
    rng = np.random.default_rng(7)
    scales = SCALES[scale]
    x = {
        k: (rng.standard_normal(s) * scales[k]).astype(np.float32)
        for k, s in SHAPES.items()
    }
    for server_round in range(1, ROUNDS + 1):
        clients = _clients(rng, x, scales)
        replies = _replies(flower, server_round, x, clients, [12, 30, 57])
        aggregate, _ = FedAvg().aggregate_train(server_round, replies)
        aggregate = {k: a.numpy() for k, a in aggregate.items()}
        theirs, _ = flower.aggregate_train(server_round, replies)
        theirs = {k: a.numpy() for k, a in theirs.items()}
        new = ours.step(x, aggregate)
        assert set(new) == set(theirs) == set(SHAPES)
        for key in SHAPES:
            assert new[key].dtype == np.float32
            # Flower's FedAdam returns float64 (its bias-corrected eta is a float64
            # scalar); the wire rounds it to float32, as step() does
            assert _bits(new[key]) == _bits(theirs[key].astype(np.float32)), (
                server_round,
                key,
            )
            assert not np.array_equal(new[key], aggregate[key])  # a real step
        x = new


def test_avgm_at_lr_1_without_momentum_is_the_plain_method():
    rng = np.random.default_rng(0)
    sent = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    opt = so.AvgM(server_learning_rate=1, server_momentum=0)
    assert (opt.server_learning_rate, opt.server_momentum) == (1.0, 0.0)
    assert so.AvgM().hyperparameters() == opt.hyperparameters()  # Flower's defaults
    for _ in range(3):
        # entries of many magnitudes: x - (x - y) is not y in float32 (1 - 1e-9
        # rounds to 1), so only skipping the arithmetic, as Flower does, gives y
        aggregate = {
            k: (
                v + rng.standard_normal(v.shape) * 10.0 ** rng.integers(-9, 3, v.shape)
            ).astype(np.float32)
            for k, v in sent.items()
        }
        new = opt.step(sent, aggregate)
        assert all(_bits(new[k]) == _bits(aggregate[k]) for k in SHAPES)
        sent = new
    assert opt.state_dict()[0] == {}  # no momentum kept
    none = so.from_settings({"_target_": None})
    assert isinstance(none, so.NoOptimizer)
    assert all(none.step({}, aggregate)[k] is aggregate[k] for k in SHAPES)


def test_only_the_aggregated_keys_are_stepped_and_returned():
    rng = np.random.default_rng(1)
    sent = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    key = "layer.lora_B.weight"  # e.g. FFA-LoRA aggregates B (and the head), not A
    aggregate = {key: sent[key] + np.float32(0.5)}
    opt = so.Adam()
    new = opt.step(sent, aggregate)
    assert set(new) == {key}
    assert set(opt.state_dict()[0]) == {f"m/{key}", f"v/{key}"}
    assert opt.state_dict()[1]["steps"] == {key: 1}


def test_a_mismatched_aggregate_is_refused_before_any_state_changes():
    sent = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    opt = so.Yogi()
    with pytest.raises(ValueError, match="'c'.*did not send"):
        opt.step(sent, {"a": np.ones(3, np.float32), "c": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match=r"'b'.*\(2,\).*\(3,\)"):
        opt.step(sent, {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)})
    assert opt.state_dict() == ({}, {"kind": "Yogi", "steps": {}})


def _run(opt: so.ServerOptimizer, x: State, updates: list[State]) -> State:
    for delta in updates:
        x = opt.step(x, {k: (v + delta[k]).astype(np.float32) for k, v in x.items()})
    return x


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_checkpointed_optimizer_resumes_bit_for_bit(tmp_path, name):
    """3 steps, a real checkpoint (safetensors + JSON), a fresh optimizer loads it
    and takes 2 more steps: the same bits as 5 steps without a break."""
    rng = np.random.default_rng(3)
    x = {
        k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in SHAPES.items()
    }
    updates = [
        {
            k: (rng.standard_normal(s) * 1e-2).astype(np.float32)
            for k, s in SHAPES.items()
        }
        for _ in range(5)
    ]
    make = PAIRS[name][0]
    straight = _run(make(), x, updates)

    first = make()
    halfway = _run(first, x, updates[:3])
    arrays, state = first.state_dict()
    checkpoint.save(tmp_path, 3, {"server_opt": arrays}, {"server_opt": state})
    saved = checkpoint.load_latest(tmp_path)
    second = make()
    second.load_state_dict(saved.arrays["server_opt"], saved.state["server_opt"])
    resumed = _run(second, halfway, updates[3:])
    assert all(_bits(resumed[k]) == _bits(straight[k]) for k in SHAPES)

    if arrays:  # a stateful optimizer: without its state the steps differ
        fresh = _run(make(), halfway, updates[3:])
        assert any(_bits(fresh[k]) != _bits(straight[k]) for k in SHAPES)


def test_state_dict_is_a_copy_and_json_able():
    opt = so.Adam()
    opt.step({"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)})
    arrays, state = opt.state_dict()
    assert json.loads(json.dumps(state)) == {"kind": "Adam", "steps": {"w": 1}}
    arrays["m/w"][:] = 99
    assert opt.state_dict()[0]["m/w"][0] != 99


def test_loading_another_optimizers_state_is_refused():
    adam = so.Adam()
    adam.step({"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="'Adam'.*not 'Yogi'"):
        so.Yogi().load_state_dict(*adam.state_dict())
    arrays, state = adam.state_dict()
    with pytest.raises(ValueError, match="'momentum/w'"):
        so.Adam().load_state_dict({"momentum/w": arrays["m/w"]}, state)


@pytest.mark.parametrize(
    "section,key",
    [
        ({}, "server_optimizer._target_"),
        ({"_target_": "fedlora.server_opt.Adamm"}, "server_optimizer._target_"),
        ({"_target_": "fedlora.methods.ffa_lora.FFALoRA"}, "server_optimizer._target_"),
        ({"_target_": "fedlora.server_opt.Adam", "lr": 0.1}, "server_optimizer.lr"),
        (
            {"_target_": "fedlora.server_opt.Adagrad", "beta_1": 0.9},
            "server_optimizer.beta_1",
        ),
        ({"_target_": None, "eta": 0.1}, "server_optimizer.eta"),
        ({"_target_": "fedlora.server_opt.Adam", "eta": 0}, "server_optimizer.eta"),
        ({"_target_": "fedlora.server_opt.Yogi", "eta": "0.1"}, "server_optimizer.eta"),
        ({"_target_": "fedlora.server_opt.Yogi", "tau": -1.0}, "server_optimizer.tau"),
        (
            {"_target_": "fedlora.server_opt.Adam", "beta_2": 1.0},
            "server_optimizer.beta_2",
        ),
        (
            {"_target_": "fedlora.server_opt.Adam", "beta_1": True},
            "server_optimizer.beta_1",
        ),
        (
            {"_target_": "fedlora.server_opt.AvgM", "server_momentum": -0.5},
            "server_optimizer.server_momentum",
        ),
        ("adam", "server_optimizer"),
    ],
)
def test_bad_settings_name_their_key(section, key):
    with pytest.raises(ConfigError) as err:
        so.from_settings(section)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")


@pytest.mark.parametrize(
    "override,key",
    [
        ("server_optimizer.eta=0", "server_optimizer.eta"),
        ("+server_optimizer.lr=0.1", "server_optimizer.lr"),
        (
            "server_optimizer._target_=fedlora.server_opt.Nope",
            "server_optimizer._target_",
        ),
    ],
)
def test_bad_overrides_are_refused_when_composing(override, key):
    with pytest.raises(ConfigError) as err:
        compose(["server_optimizer=adam", override])
    assert err.value.key == key


FLOWER = {"avgm": FedAvgM, "adagrad": FedAdagrad, "adam": FedAdam, "yogi": FedYogi}
OPTIONS = sorted(p.stem for p in (Path(CONF_DIR) / "server_optimizer").glob("*.yaml"))


def test_every_option_is_shipped():
    assert OPTIONS == sorted(["none", *FLOWER])


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_composes_round_trips_and_has_flowers_defaults(option):
    plain = settings(compose([f"server_optimizer={option}"]))
    typed = Settings.from_dict(plain)
    assert typed.to_dict() == plain
    assert Settings.from_dict(typed.to_dict()) == typed
    opt = so.from_settings(typed.server_optimizer)
    assert opt.name == option
    if option == "none":
        assert plain["server_optimizer"] == {"_target_": None}
        return
    flower = {
        name: p.default
        for name, p in inspect.signature(FLOWER[option]).parameters.items()
        if name in inspect.signature(type(opt)).parameters
    }
    ours = {k: v for k, v in plain["server_optimizer"].items() if k != "_target_"}
    assert ours == flower == opt.hyperparameters()  # every key, Flower's values


def test_none_is_the_default_and_old_settings_without_the_section_load():
    plain = settings(compose([]))
    assert plain["server_optimizer"] == {"_target_": None}
    del plain["server_optimizer"]  # a checkpoint written before the section existed
    typed = Settings.from_dict(plain)
    assert typed.server_optimizer is None and typed.to_dict() == plain
    assert isinstance(so.from_settings(typed.server_optimizer), so.NoOptimizer)
    with pytest.raises(ConfigError, match=r"^server_optimizer=None"):
        Settings.from_dict({**plain, "server_optimizer": None})
    with pytest.raises(ConfigError, match=r"^server_optimizer\._target_="):
        Settings.from_dict({**plain, "server_optimizer": {"eta": 0.1}})
    moved = with_(typed, "server_optimizer", {"_target_": "fedlora.server_opt.Yogi"})
    assert isinstance(so.from_settings(moved.server_optimizer), so.Yogi)
    moved = with_(moved, "server_optimizer.eta", 1e-4)
    assert so.from_settings(moved.server_optimizer).hyperparameters()["eta"] == 1e-4


def test_the_module_imports_neither_flower_nor_hydra():
    code = (
        "import sys, fedlora.server_opt; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'hydra'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
