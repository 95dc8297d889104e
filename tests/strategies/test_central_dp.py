"""Client-level (central) DP: what is accounted, and the noise actually added.

Each test drives ``CentralDP`` through Flower's own hooks (``configure_train`` with
Flower's fixed-size sampling, then ``aggregate_train`` on real reply Messages).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedlora.errors import ConfigError
from fedlora.methods.fedavg_lora import FedAvgLoRA
from strategies.central_dp import CentralDP
from strategies.strategy import LoRAStrategy
from strategies.wire import record_to_state, state_to_record

Z, C, DELTA = 1.0, 0.5, 1e-5
SMALL = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (6, 2), "head.weight": (2, 6)}
#: ~100k noisy entries: the empirical std has a standard error of ~0.2%
LARGE = {
    "l.lora_A.weight": (4, 300),
    "l.lora_B.weight": (200, 4),
    "head.weight": (2, 50_000),
}


pytestmark = pytest.mark.usefixtures("task_identity")


class Grid:
    """The one Grid call Flower's FedAvg sampling makes: the connected node ids."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def central(num_clients, sampled, noise_multiplier=Z, **strategy_kwargs):
    """CentralDP around uniform FedAvg-LoRA sampling ``sampled`` of ``num_clients``."""
    method = LoRAStrategy(
        FedAvgLoRA(weighting="uniform"),
        fraction_train=sampled / num_clients,
        min_train_nodes=sampled,
        min_available_nodes=num_clients,
        **strategy_kwargs,
    )
    return CentralDP(
        strategy=method,
        noise_multiplier=noise_multiplier,
        clipping_norm=C,
        num_sampled_clients=sampled,
        delta=DELTA,
    )


def state(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def update(arrays, node):
    return RecordDict(
        {
            "arrays": state_to_record(arrays),
            "metrics": MetricRecord({"num-examples": 10, "partition-id": node}),
        }
    )


def play(dp, grid, server_round, global_state, answer):
    """One round: Flower's sampling, one reply per sampled node from
    ``answer(i, node)`` (a RecordDict, an Error, or None for no reply), then the
    wrapper's aggregation. Returns the aggregate as a state (None if none)."""
    sent = list(
        dp.configure_train(
            server_round, state_to_record(global_state), ConfigRecord(), grid
        )
    )
    replies = []
    for i, msg in enumerate(sent):
        node = msg.metadata.dst_node_id
        content = answer(i, node)
        if content is None:
            continue  # no reply within the round's timeout
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    arrays, _ = dp.aggregate_train(server_round, replies)
    return None if arrays is None else record_to_state(arrays)


def reference_epsilon(releases):
    """Opacus' RDP accountant: ``releases`` Gaussian releases (multiplier Z) at
    sample rate 1, i.e. without amplification by subsampling."""
    acc = RDPAccountant()
    for _ in range(releases):
        acc.step(noise_multiplier=Z, sample_rate=1.0)
    return float(acc.get_epsilon(DELTA))


def noise_of(out, global_state):
    return np.concatenate(
        [(out[k].astype(np.float64) - global_state[k]).ravel() for k in global_state]
    )


def shifted(global_state, seed=99, norm=0.1):
    """``global_state`` plus a fixed update of L2 norm ``norm`` (< C: not clipped)."""
    d = state({k: v.shape for k, v in global_state.items()}, seed)
    scale = norm / np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in d.values()))
    return {k: (v + scale * d[k]).astype(np.float32) for k, v in global_state.items()}


# (a) ----------------------------------------------------------------------------
def test_ten_clients_three_sampled_twenty_rounds_are_accounted_without_amplification():
    dp, grid = central(10, 3), Grid(10)
    rng = np.random.default_rng(0)
    current = state(SMALL, 0)
    for rnd in range(1, 21):
        base = current  # bound for the replies below
        current = play(
            dp,
            grid,
            rnd,
            current,
            # real updates, some far beyond the clipping norm
            lambda i, node, base=base: update(
                {
                    k: v + rng.normal(0, 0.5 * (i + 1), v.shape).astype(np.float32)
                    for k, v in base.items()
                },
                node,
            ),
        )
        assert current is not None
    eps = dp.round_log[20]["central_epsilon"]
    print(f"central epsilon after 20 rounds (N=10, m=3, z=1, delta=1e-5): {eps:.4f}")
    assert eps == pytest.approx(reference_epsilon(20), rel=1e-9)
    assert 29.5 < eps < 30.5  # not the 10.6 of Poisson rate 3/10
    assert dp.round_log[20]["central_delta"] == DELTA
    assert dp.round_log[20]["central_accountant"] == "rdp"
    epsilons = [dp.round_log[r]["central_epsilon"] for r in range(1, 21)]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    for rnd in range(1, 21):
        entry = dp.round_log[rnd]
        assert entry["clients_sampled"] == 3 and entry["clients"] == 3
        assert entry["central_updates"] == 3
        assert entry["central_sample_rate"] == 1.0
        assert entry["central_noise_multiplier"] == pytest.approx(Z)
        assert entry["central_releases"] == rnd


# (b) ----------------------------------------------------------------------------
def odd_reply(kind, node, global_state):
    """The one reply of a round that is not averaged."""
    if kind == "missing":
        return None
    if kind == "error":
        return Error(code=0, reason="boom")
    if kind == "declined":
        return RecordDict(
            {
                "metrics": MetricRecord(
                    {"num-examples": 0, "declined": 1, "partition-id": node}
                ),
                "config": ConfigRecord({"reason": "privacy budget"}),
            }
        )
    bad = {k: v.copy() for k, v in global_state.items()}
    if kind == "rejected":  # same shapes; NaN: rejected by the wrapped strategy
        bad["head.weight"][0, 0] = np.nan
    else:  # malformed: a wrong shape
        bad["head.weight"] = np.zeros((3, 7), np.float32)
    return update(bad, node)


@pytest.mark.parametrize(
    "kind", ["rejected", "malformed", "missing", "declined", "error"]
)
def test_noise_follows_the_updates_averaged_when_one_of_m_is_not(kind):
    dp, grid = central(3, 3), Grid(3)
    glob = state(LARGE, 1)
    same = shifted(glob)  # every averaged update is this one: it is their mean
    out = play(
        dp,
        grid,
        1,
        glob,
        lambda i, node: update(same, node) if i else odd_reply(kind, node, glob),
    )
    assert out is not None
    noise = noise_of(out, same)
    assert abs(noise.mean()) < 5 * Z * C / 2 / np.sqrt(noise.size)  # 5 std errors
    # std z*C/m' (0.25), not Flower's z*C/m (0.167): the multiplier stays z
    assert noise.std() == pytest.approx(Z * C / 2, rel=0.02)
    entry = dp.round_log[1]
    assert entry["clients"] == 2 and entry["central_updates"] == 2
    assert entry["central_noise_std"] == pytest.approx(Z * C / 2)
    assert entry["central_noise_multiplier"] == pytest.approx(Z)
    assert entry["central_epsilon"] == pytest.approx(reference_epsilon(1), rel=1e-9)
    if kind in ("rejected", "malformed"):
        assert len(entry["rejected"]) == 1
    elif kind == "declined":
        assert len(entry["declined"]) == 1
    else:
        assert entry["failures"] == 1


# (c) ----------------------------------------------------------------------------
def test_full_round_noise_is_z_c_over_m_from_os_entropy_not_numpy_global():
    dp, grid = central(3, 3), Grid(3)
    glob = state(LARGE, 2)
    same = shifted(glob)
    noises, drawn = [], []
    for rnd in (1, 2):
        np.random.seed(0)  # e.g. a run that seeds, or a restored checkpoint
        before = np.random.get_state()
        out = play(dp, grid, rnd, glob, lambda i, node: update(same, node))
        after = np.random.get_state()
        drawn.append(after[2] != before[2] or not np.array_equal(after[1], before[1]))
        noises.append(noise_of(out, same))
    for noise in noises:
        assert abs(noise.mean()) < 5 * Z * C / 3 / np.sqrt(noise.size)
        assert noise.std() == pytest.approx(Z * C / 3, rel=0.02)
    # the same global seed gave different noise: it cannot be regenerated from it
    assert np.corrcoef(noises[0], noises[1])[0, 1] < 0.05
    assert not any(drawn)  # nothing was drawn from NumPy's global generator
    for rnd in (1, 2):
        entry = dp.round_log[rnd]
        assert entry["clients"] == 3 and entry["central_updates"] == 3
        assert entry["central_noise_std"] == pytest.approx(Z * C / 3)
    assert dp.round_log[2]["central_epsilon"] == pytest.approx(
        reference_epsilon(2), rel=1e-9
    )


# clipping ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Optimal order")  # z=1e-3: epsilon means nothing
def test_updates_are_clipped_by_name_whatever_the_order_of_the_arrays():
    dp, grid = central(3, 3, noise_multiplier=1e-3), Grid(3)
    glob = state(SMALL, 3)
    direction = state(SMALL, 4)
    norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in direction.values()))
    big = {k: glob[k] + 100 * direction[k] for k in reversed(list(SMALL))}
    small = {k: glob[k] + 0.01 * direction[k] for k in SMALL}  # within the norm

    def answer(i, node):
        return update([big, small, small][i], node)

    out = play(dp, grid, 1, glob, answer)
    for k in SMALL:  # mean of (C * unit direction, 0.01 * direction twice)
        expected = glob[k] + (C / norm + 0.02) * direction[k] / 3
        np.testing.assert_allclose(out[k], expected, atol=2e-3)
    assert dp.round_log[1]["central_updates"] == 3


def test_an_unchanged_model_is_a_zero_update_not_a_crash():
    dp, grid = central(3, 3), Grid(3)
    glob = state(SMALL, 6)
    out = play(dp, grid, 1, glob, lambda i, node: update(glob, node))
    assert out is not None and dp.round_log[1]["central_updates"] == 3


# checkpoints and settings ---------------------------------------------------------
def test_a_restored_run_goes_on_composing_at_sample_rate_one():
    dp, grid = central(10, 3), Grid(10)
    glob = state(SMALL, 5)
    same = shifted(glob)
    for rnd in range(1, 4):
        play(dp, grid, rnd, glob, lambda i, node: update(same, node))
    arrays, saved = dp.checkpoint_state()
    resumed = central(10, 3)
    resumed.restore_state(arrays, saved)
    resumed.strategy.round_offset = 3
    for rnd in range(1, 3):
        play(resumed, grid, rnd, glob, lambda i, node: update(same, node))
    assert resumed.round_log[5]["central_epsilon"] == pytest.approx(
        reference_epsilon(5), rel=1e-9
    )
    # a checkpoint written with the old (amplified) rate is re-accounted at rate 1
    saved["central_rdp_history"] = [[Z, 0.3, 3]]
    old = central(10, 3)
    old.restore_state(arrays, saved)
    assert old.rdp.get_epsilon(DELTA) == pytest.approx(reference_epsilon(3))


def test_no_noise_or_a_weighted_mean_is_refused():
    with pytest.raises(ConfigError, match="noise_multiplier"):
        central(3, 3, noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="uniform"):
        CentralDP(
            LoRAStrategy(FedAvgLoRA(weighting="num_examples")),
            noise_multiplier=Z,
            clipping_norm=C,
            num_sampled_clients=3,
            delta=DELTA,
        )


def test_16_bit_replies_are_clipped_in_float32_and_counted_as_they_arrived():
    """``wire.dtype=bfloat16``: the clipped update goes on in float32 (rounding it
    again could take it past the clipping norm), and ``bytes_up`` counts the
    replies as they came, in 16 bits."""
    from strategies.wire import payload_bytes

    dp = central(2, 2, noise_multiplier=1e-9, wire_dtype="bfloat16")  # ~no noise
    global_state = state(SMALL, 0)
    far = {k: v + 10.0 for k, v in global_state.items()}  # far beyond C: clipped
    arrived = []

    def answer(i, node):
        content = RecordDict(
            {
                "arrays": state_to_record(far, "bfloat16"),
                "metrics": MetricRecord({"num-examples": 10, "partition-id": node}),
            }
        )
        arrived.append(payload_bytes(content))
        return content

    out = play(dp, Grid(2), 1, global_state, answer)
    log = dp.strategy.round_log[1]
    assert log["bytes_up"] == sum(arrived)
    assert not dp.strategy.arrived  # nothing left for the next round
    # the mean of two updates clipped to C, widened from bfloat16 exactly
    norm = np.sqrt(sum(np.sum((out[k] - global_state[k]) ** 2.0) for k in out))
    assert norm == pytest.approx(C, rel=1e-5)
