"""A node's base-weight folds (FedEx-LoRA) through the real ClientApp and strategy:
a node that loses its state refuses folds that continue from a round it does not
hold, then gets the whole sum and trains on the same base weights as a node that
kept its state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from clients import client_app
from fedlora.adapters import base_weight, set_base_delta
from fedlora.base_delta import BaseDelta
from fedlora.build import build
from fedlora.settings import Settings
from strategies.server_app import settings
from strategies.wire import (
    KEY_BASE_FROM,
    KEY_BASE_SYNC,
    KEY_BASE_TO,
    KEY_STATE_BASE,
    KEY_STATE_BASE_ROUND,
    record_to_state,
)
from tests.fedlora.methods.test_methods import (  # noqa: F401 - fixtures
    client_frozen,
    experiment,
    federated_round,
)

RESTARTED = 2  # the node that loses its state before round 3


@pytest.fixture
def play(task_identity, client_frozen):  # noqa: F811 - the fixtures imported above
    """``play(cfg, previous=None)``: the next round of the real strategy and the
    real ClientApp (:func:`federated_round`)."""
    return lambda cfg, previous=None: federated_round(
        cfg, client_frozen, previous=previous
    )


@pytest.fixture
def raised(monkeypatch):
    """The ClientApp's exceptions become error replies, as Flower's runtime makes
    them; each is kept, by node."""
    seen: dict[int, str] = {}
    real = client_app.train

    def train(msg, context):
        try:
            return real(msg, context)
        except Exception as exc:  # noqa: BLE001 - what the runtime does
            seen[context.node_id] = str(exc)
            return Message(Error(code=0, reason=str(exc)), reply_to=msg)

    monkeypatch.setattr(client_app, "train", train)
    return seen


def held(context):
    """``(the node's summed folds, the last fold round it holds)``."""
    delta = BaseDelta.from_state(record_to_state(context.state[KEY_STATE_BASE]))
    return delta, int(context.state[KEY_STATE_BASE_ROUND][KEY_BASE_TO])


def sync(rnd, node):
    """``(from, to)`` of the folds the round's message to ``node`` carried."""
    (msg,) = [m for m in rnd.messages if m.metadata.dst_node_id == node]
    record = msg.content[KEY_BASE_SYNC]
    return int(record[KEY_BASE_FROM]), int(record[KEY_BASE_TO])


def test_a_node_that_lost_its_state_ends_with_the_same_base_weights(
    tiny_bert, play, raised
):
    cfg = experiment(tiny_bert, "fedex_lora")
    rnd = play(cfg)
    rnd = play(cfg, rnd)  # round 2: the sum
    assert sync(rnd, 1) == (0, 1) and not raised
    # node 2 restarts: a fresh context, its summed folds gone
    old = rnd.contexts[RESTARTED]
    rnd.contexts[RESTARTED] = Context(
        run_id=1,
        node_id=RESTARTED,
        node_config=dict(old.node_config),
        state=RecordDict(),
        run_config={},
    )
    rnd = play(cfg, rnd)  # round 3
    assert sync(rnd, RESTARTED) == (1, 2)  # the server thinks it holds round 1
    assert (
        "continue from round 1, but this node holds them up to round 0"
        in (raised[RESTARTED])
    )
    log = rnd.strategy.round_log[3]
    assert log["failures"] == 1 and log["clients"] == 2
    rnd = play(cfg, rnd)  # round 4
    assert sync(rnd, RESTARTED) == (0, 3) and sync(rnd, 1) == (2, 3)
    assert list(raised) == [RESTARTED] and rnd.strategy.round_log[4]["clients"] == 3
    kept, kept_round = held(rnd.contexts[1])
    restarted, restarted_round = held(rnd.contexts[RESTARTED])
    assert kept_round == restarted_round == 3
    # the base weights each trained round 4 on: W0 as built + its summed folds
    model, _ = build(Settings.from_dict(settings(cfg)))
    layers = sorted(kept)
    assert layers == sorted(restarted) and layers
    weights = {}
    for name, delta in (("kept", kept), ("restarted", restarted)):
        set_base_delta(model, delta.matrices())
        weights[name] = {layer: base_weight(model, layer) for layer in layers}
    set_base_delta(model, {})
    pristine = {layer: base_weight(model, layer) for layer in layers}
    for layer in layers:
        a, b = weights["kept"][layer], weights["restarted"][layer]
        # bit for bit: the restarted node got the server's float64 sum as float64,
        # the kept one summed the same folds in the same order
        np.testing.assert_array_equal(kept.matrix(layer), restarted.matrix(layer))
        np.testing.assert_array_equal(a, b)
        assert np.linalg.norm(a - pristine[layer]) > 1e-4 * np.linalg.norm(a)


def test_folds_that_do_not_continue_the_nodes_are_refused(tiny_bert, play, raised):
    """A node holding the folds up to round 2 gets folds that continue from round
    3 (its state says 2, the message 3): it refuses them rather than miss one."""
    cfg = experiment(tiny_bert, "fedex_lora")
    rnd = play(cfg)
    rnd = play(cfg, rnd)
    rnd = play(cfg, rnd)
    assert not raised and held(rnd.contexts[1])[1] == 2
    strategy = rnd.strategy
    strategy.holdings.folds[1] = 3  # the server believes node 1 holds round 3
    rnd = play(cfg, rnd)
    assert sync(rnd, 1) == (3, 3)
    assert raised[1].startswith(
        "base-weight folds continue from round 3, but this node holds them up to "
        "round 2"
    )
    assert held(rnd.contexts[1])[1] == 2  # its state is left as it was
