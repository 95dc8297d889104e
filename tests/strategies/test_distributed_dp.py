"""Client-level DP with distributed noise (privacy=distributed) through the real
strategy and the real ClientApp handlers, on the recording grid of
test_secagg: what the server unmasks is the float64 uniform mean of the clients'
clipped updates plus noise of the calibrated size, rounds with too few survivors
are never unmasked, and epsilon is accounted for every release."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from fedlora import distributed_dp
from fedlora.errors import ConfigError
from fedlora.secagg import ProtocolError
from strategies import secagg as server_secagg
from strategies.server_app import compose_settings
from strategies.wire import KEY_ARRAYS, record_to_state
from tests.fedlora.test_distributed_dp import exact_gaussian_epsilon
from tests.strategies.test_secagg import (
    KEYS,
    TRAIN,
    UNMASK,
    ClientGrid,
    Run,
    experiment,
)

pytestmark = pytest.mark.usefixtures("task_identity")
Z, C = 0.8, 0.05  # C about the norm of a tiny BERT's adapter update: some clip


def distributed(model_dir, *extra, clients=4):
    return experiment(
        model_dir,
        "fedavg_lora",
        "privacy=distributed",
        f"privacy.noise_multiplier={Z}",
        f"privacy.clipping_norm={C}",
        *extra,
        clients=clients,
    )


def clipped_mean(sent, inputs, nodes):
    """``sent + mean_k clip_C(x_k - sent)`` in float64 (one L2 norm per client
    over every array it sends)."""
    out = {k: sent[k].astype(np.float64) for k in inputs[nodes[0]][0]}
    for u in nodes:
        delta = inputs[u][0]
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in delta.values()))
        scale = min(1.0, C / norm)
        for k in out:
            out[k] += scale * delta[k] / len(nodes)
    return out


def test_the_unmasked_mean_is_the_clipped_mean_plus_the_calibrated_noise(
    tiny_bert, client_inputs
):
    grid = ClientGrid(4)
    run = Run(distributed(tiny_bert), grid)
    sent, new, entry = run.round(1)
    assert sorted(client_inputs) == [1, 2, 3, 4] and new is not None
    norms = [
        math.sqrt(sum(float(np.sum(v * v)) for v in d.values()))
        for d, _ in client_inputs.values()
    ]
    assert max(norms) > C  # the clipping is exercised
    ref = clipped_mean(sent, client_inputs, [1, 2, 3, 4])
    err = np.concatenate([(new[k] - ref[k]).ravel() for k in ref])
    t = 3  # more than half of the 4 clients asked (secure_aggregation.threshold)
    expected = Z * C * math.sqrt(4 / t) / 4
    assert err.size > 1000  # the std's estimate is within ~2%: 0.1 is 4.6 of it
    assert np.std(err) == pytest.approx(expected, rel=0.1)
    assert abs(np.mean(err)) < 5 * expected / math.sqrt(err.size)
    assert entry["distributed_noise_multiplier"] == pytest.approx(Z * math.sqrt(4 / t))
    assert entry["distributed_min_clients"] == t and entry["distributed_updates"] == 4
    assert entry["distributed_releases"] == 1
    mu = 1 / entry["distributed_noise_multiplier"]
    exact = exact_gaussian_epsilon(mu, 1e-5)
    assert exact <= entry["distributed_epsilon"] <= 1.5 * exact
    # against the noise measured: sensitivity C over the sum's std (n times the
    # mean's), with 10% for the std's sampling error
    measured = exact_gaussian_epsilon(0.9 * C / (4 * np.std(err)), 1e-5)
    assert entry["distributed_epsilon"] >= measured
    assert entry["secagg_clipped"] is None  # no count computed from the data
    # the masked upload: uint32 of the plain upload's shapes, nothing in plaintext
    for r in grid.received:
        if r.metadata.message_type == TRAIN:
            assert not {"num-examples", "train_loss"} & set(r.content["metrics"])
            for k, a in r.content[KEY_ARRAYS].items():
                assert a.dtype == "uint32" and tuple(a.shape) == sent[k].shape


def test_a_dropout_is_accounted_for_the_survivors(tiny_bert, client_inputs):
    """Node 2 drops before its masked input arrives: 3 of 4 survive, t = 3; the
    release has multiplier z sqrt(3/3), its mean the 3 survivors' clipped mean
    plus that noise."""
    grid = ClientGrid(4, lost={(TRAIN, 2)})
    run = Run(distributed(tiny_bert), grid)
    sent, new, entry = run.round(1)
    assert new is not None and entry["distributed_updates"] == 3
    assert entry["distributed_noise_multiplier"] == pytest.approx(Z)
    ref = clipped_mean(sent, client_inputs, [1, 3, 4])
    err = np.concatenate([(new[k] - ref[k]).ravel() for k in ref])
    assert np.std(err) == pytest.approx(Z * C / 3, rel=0.1)
    assert entry["distributed_releases"] == 1


def test_a_sum_that_does_not_decode_after_unmasking_is_still_accounted(
    tiny_bert, client_inputs, monkeypatch
):
    """The server may hold the noisy sum once the clients revealed their
    shares: a failure after that (here the decoding) still spends a release."""

    def broken(self, total, shapes, survivors):
        raise ValueError("the sum's meta words do not count the survivors")

    monkeypatch.setattr(distributed_dp.DistributedGaussian, "decode_mean", broken)
    grid = ClientGrid(4)
    run = Run(distributed(tiny_bert), grid)
    _, new, entry = run.round(1)
    assert new is None and "meta words" in entry["secagg_failure"]
    assert [r for r in grid.received if r.metadata.message_type == UNMASK]
    assert entry["distributed_releases"] == 1 and entry["distributed_epsilon"] > 0


def test_too_few_clients_after_setup_train_nowhere(tiny_bert, client_inputs):
    grid = ClientGrid(4, lost={(KEYS, 3)})  # 3 complete the setup; t = 4
    run = Run(distributed(tiny_bert, "privacy.min_clients=4"), grid)
    _, new, entry = run.round(1)
    assert new is None and "setup" in entry["secagg_failure"]
    assert not client_inputs  # no client trained
    assert not [r for r in grid.received if r.metadata.message_type == TRAIN]


def test_a_round_below_the_noise_floor_is_never_unmasked(tiny_bert, client_inputs):
    """min_clients=4 of 4: one dropout leaves a sum with too little noise; the
    round fails before any share is asked for, and nothing is accounted."""
    grid = ClientGrid(4, lost={(TRAIN, 2)})
    run = Run(distributed(tiny_bert, "privacy.min_clients=4"), grid)
    before = record_to_state(run.arrays)
    _, new, entry = run.round(1)
    assert new is None and "privacy.min_clients" in entry["secagg_failure"]
    assert not [r for r in grid.received if r.metadata.message_type == UNMASK]
    assert entry["distributed_releases"] == 0 and entry["distributed_epsilon"] == 0
    after = record_to_state(run.arrays)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_clients_refuse_to_unmask_a_sum_below_their_noise_floor(
    tiny_bert, client_inputs, monkeypatch
):
    """A server that skips its own check (and would unmask 3 inputs calibrated
    for 4) gets no share: each client checks the survivors' count itself."""
    real = distributed_dp.for_round

    def lenient(privacy, secure, clients):  # the server's view only
        noise = real(privacy, secure, clients)
        return None if noise is None else noise.__class__(Z, C, clients, 2)

    grid = ClientGrid(4, lost={(TRAIN, 2)})
    run = Run(distributed(tiny_bert, "privacy.min_clients=4"), grid)
    server_view = SimpleNamespace(**vars(distributed_dp))
    server_view.for_round = lenient
    monkeypatch.setattr(server_secagg, "distributed_dp", server_view)
    _, new, entry = run.round(1)
    assert new is None
    unmask = [r for r in grid.received if r.metadata.message_type == UNMASK]
    assert len(unmask) == 3 and all(r.has_error() for r in unmask)
    assert all("calibrated for" in r.error.reason for r in unmask)
    assert ProtocolError.__name__ in unmask[0].error.reason


def test_epsilon_composes_over_rounds_and_across_a_resume(tiny_bert, client_inputs):
    run = Run(distributed(tiny_bert), ClientGrid(4))
    run.round(1)
    _, _, second = run.round(2)
    assert second["distributed_releases"] == 2
    z = second["distributed_noise_multiplier"]
    exact = exact_gaussian_epsilon(math.sqrt(2) / z, 1e-5)
    assert exact <= second["distributed_epsilon"] <= 1.5 * exact
    arrays, state = run.strategy.checkpoint_state()
    resumed = Run(distributed(tiny_bert), ClientGrid(4))
    resumed.strategy.restore_state(arrays, state)
    assert resumed.strategy.secure.accountant.epsilon == second["distributed_epsilon"]
    state.pop("distributed_rdp_history")
    with pytest.raises(ValueError, match="privacy=distributed ledger"):
        Run(distributed(tiny_bert), ClientGrid(4)).strategy.restore_state(arrays, state)


def test_distributed_dp_settings_are_checked(tiny_bert):
    with pytest.raises(ConfigError) as info:
        experiment(
            tiny_bert,
            "fedavg_lora",
            "privacy=distributed",
            "secure_aggregation=none",
            "privacy.noise_multiplier=0",
            "privacy.min_clients=1",
            "strategy.weighting=num_examples",
            "federation.fraction_evaluate=0.5",
            "+privacy.target_epsilon=1.0",
        )
    text = str(info.value)
    for key in (
        "privacy.target_epsilon",
        "secure_aggregation",
        "privacy.noise_multiplier",
        "privacy.min_clients",
        "strategy.weighting",
        "federation.fraction_evaluate",
    ):
        assert key in text, key
    with pytest.raises(ConfigError, match="secure_aggregation.max_update_norm"):
        distributed(tiny_bert, "secure_aggregation.max_update_norm=0.01")
    # FedSA-LoRA's personal B never leaves its node (no federated evaluation)
    experiment(tiny_bert, "fedsa_lora", "privacy=distributed")
    typed = compose_settings(  # null weighting and evaluation: uniform, off
        [
            f"model.name={tiny_bert}",
            "privacy=distributed",
            "secure_aggregation=secaggplus",
        ]
    )
    assert typed.strategy["weighting"] == "uniform"
    assert typed.federation.fraction_evaluate == 0.0
