"""Server optimizers inside the strategy: Flower's FedAdam on the same replies,
the plain method at lr 1 without momentum, bit-identical resume, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam

from fedlora import server_opt
from fedlora.errors import ConfigError
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.rolora import RoLoRA
from fedlora.settings import with_
from fedlora.validate import validate
from strategies.strategy import LoRAStrategy
from strategies.wire import KEY_ARRAYS, record_to_state, state_to_record
from tests.conftest import Grid
from tests.strategies.test_protocol_hooks import global_state, reply_to, trained

pytestmark = pytest.mark.usefixtures("task_identity")
NODES = [11, 12, 13]


def run(strategy, rounds, state, seed=0, start=1):
    """``rounds`` rounds of configure_train -> replies -> aggregate_train; the
    replies depend only on ``seed`` and the round, so two strategies that hold
    the same state get the same replies."""
    states = []
    for server_round in range(start, start + rounds):
        rng = np.random.default_rng([seed, server_round])
        msgs = sorted(
            strategy.configure_train(
                server_round, state_to_record(state), ConfigRecord({}), Grid(NODES)
            ),
            key=lambda m: m.metadata.dst_node_id,
        )
        replies = []
        for pid, m in enumerate(msgs):
            sent = record_to_state(m.content[KEY_ARRAYS])
            keys = [k for k in sent if strategy_trains(strategy, k, server_round)]
            replies.append(reply_to(m, trained(rng, sent, keys), pid))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        state = record_to_state(arrays)
        states.append(state)
    return states


def strategy_trains(strategy, key, server_round):
    method = getattr(strategy, "method", None)
    return method is None or method.trains(key, server_round)


def make(method, optimizer=None):
    return LoRAStrategy(
        method, optimizer=optimizer, min_available_nodes=3, min_train_nodes=3
    )


def test_adam_in_the_strategy_is_flowers_fedadam_on_the_same_replies():
    start = global_state(np.random.default_rng(5))
    ours = run(make(FedAvgLoRA(weighting="num_examples"), server_opt.Adam()), 4, start)
    flower = FedAdam()
    theirs = run(flower, 4, start)
    for a, b in zip(ours, theirs, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k].astype(np.float32))
    # and it really moved differently from the plain mean
    plain = run(make(FedAvgLoRA()), 4, start)
    assert any(np.abs(plain[-1][k] - ours[-1][k]).max() > 1e-6 for k in start)


def test_avgm_at_lr_one_without_momentum_is_the_plain_method():
    start = global_state(np.random.default_rng(6))
    plain = run(make(FedAvgLoRA()), 3, start)
    avgm = run(make(FedAvgLoRA(), server_opt.AvgM(1.0, 0.0)), 3, start)
    for a, b in zip(plain, avgm, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_the_optimizer_steps_only_the_factor_rolora_trained():
    start = global_state(np.random.default_rng(7))
    strategy = make(RoLoRA(), server_opt.Adam(eta=1e-3))
    first = run(strategy, 1, start)[0]  # round 1: B
    for k in start:
        if "lora_A" in k:
            np.testing.assert_array_equal(first[k], start[k])
    assert set(strategy.optimizer.steps) == {k for k in start if "lora_A" not in k}


def test_resume_with_the_optimizers_moments_is_bit_identical():
    start = global_state(np.random.default_rng(8))
    whole = run(make(FedAvgLoRA(), server_opt.Yogi(eta=1e-2)), 4, start)
    first = make(FedAvgLoRA(), server_opt.Yogi(eta=1e-2))
    mid = run(first, 2, start)[-1]
    arrays, state = first.checkpoint_state()
    resumed = make(FedAvgLoRA(), server_opt.Yogi(eta=1e-2))
    resumed.restore_state(arrays, state)
    rest = run(resumed, 2, mid, start=3)
    for k in whole[-1]:
        np.testing.assert_array_equal(rest[-1][k], whole[-1][k])
    # without the moments, the same rounds go elsewhere
    fresh = run(make(FedAvgLoRA(), server_opt.Yogi(eta=1e-2)), 2, mid, start=3)
    assert any(np.abs(fresh[-1][k] - whole[-1][k]).max() > 0 for k in whole[-1])


def test_central_dp_with_a_server_optimizer_is_refused(settings):
    cfg = with_(
        settings,
        "privacy",
        {"mode": "central", "target_delta": 1e-5, "wrapper": None},
        "server_optimizer",
        {"_target_": "fedlora.server_opt.Adam"},
        "strategy.weighting",
        "uniform",
    )
    with pytest.raises(ConfigError, match="server_optimizer"):
        validate(cfg.to_dict())


def test_fedex_lora_with_a_server_optimizer_is_refused():
    from strategies.server_app import compose_settings

    with pytest.raises(ConfigError, match="fedex_lora's server step is not a mean"):
        compose_settings(["strategy=fedex_lora", "server_optimizer=adam"])
