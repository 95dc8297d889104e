"""A rank per client: which rank each client trains, the map of its factors to and
from the global adapter's (dense float64 references), and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import ConfigError
from fedlora.ranks import RankPlan, rank_of
from fedlora.settings import with_
from strategies.server_app import compose_settings

A, B = "l.lora_A.weight", "l.lora_B.weight"


def global_factors(rng, r=8, d_out=12, d_in=10):
    return {
        B: (rng.normal(size=(d_out, r)) * 1e-3).astype(np.float32),
        A: (rng.normal(size=(r, d_in)) * 0.1).astype(np.float32),
        "head.weight": rng.normal(size=(2, 3)).astype(np.float32),
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_a_client_gets_the_global_deltas_truncation_at_its_own_scale(rslora):
    rng = np.random.default_rng(0)
    plan = RankPlan(8, 16.0, rslora)
    g = global_factors(rng)
    for r in (2, 5, 8):
        mine = plan.to_client(g, r)
        assert rank_of(mine) == r and mine["head.weight"] is g["head.weight"]
        s_r = 16.0 / (np.sqrt(r) if rslora else r)
        s_big = 16.0 / (np.sqrt(8) if rslora else 8)
        ours = s_r * mine[B].astype(float) @ mine[A].astype(float)
        want = s_big * g[B][:, :r].astype(float) @ g[A][:r].astype(float)
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6 * abs(want).max())
        back = plan.from_client(mine, r)  # up: unscaled and zero-padded to 8
        assert rank_of(back) == 8
        np.testing.assert_allclose(back[B][:, :r], g[B][:, :r], rtol=1e-6)
        np.testing.assert_array_equal(back[B][:, r:], 0)
        np.testing.assert_array_equal(back[A][r:], 0)
    with pytest.raises(ValueError, match="between 1 and the global rank"):
        plan.to_client(g, 9)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_client_starts_from_the_same_factors_sent_whole_or_truncated(rslora):
    """The server may send a rank-r node the global factors truncated to r
    (unscaled): the client scales them exactly once, to the same start."""
    from fedlora.methods.fedavg_lora import FedAvgLoRA
    from fedlora.methods.flora import FLoRA

    rng = np.random.default_rng(1)
    plan = RankPlan(8, 16.0, rslora)
    method = FedAvgLoRA(ranks=plan)
    g = global_factors(rng)
    assert method.downlink(g, 8) is g
    flora = FLoRA(ranks=plan)  # no factors: its clients draw fresh ones
    assert sorted(flora.downlink(g, 2)) == ["head.weight"]
    initial = {A: np.zeros((2, 10), "f4"), B: np.zeros((12, 2), "f4")}
    fresh = flora.client_start(flora.downlink(g, 2), initial, 2, 0)
    for k, v in flora.client_start(g, initial, 2, 0).items():
        np.testing.assert_array_equal(fresh[k], v)
    for r in (2, 5, 8):
        down = method.downlink(g, r)
        np.testing.assert_array_equal(down[A], g[A][:r])
        np.testing.assert_array_equal(down[B], g[B][:, :r])
        assert down["head.weight"] is g["head.weight"]
        initial = {A: np.zeros((r, 10), "f4"), B: np.zeros((12, r), "f4")}
        whole = method.client_start(g, initial, 2, 0)
        cut = method.client_start(down, initial, 2, 0)
        for k in g:
            np.testing.assert_array_equal(cut[k], whole[k])
        s_r = 16.0 / (np.sqrt(r) if rslora else r)
        s_big = 16.0 / (np.sqrt(8) if rslora else 8)
        ours = s_r * cut[B].astype(float) @ cut[A].astype(float)
        want = s_big * g[B][:, :r].astype(float) @ g[A][:r].astype(float)
        np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6 * abs(want).max())
    wider = {A: np.zeros((5, 10), "f4"), B: np.zeros((12, 5), "f4")}
    with pytest.raises(ValueError, match="sent factors of rank 2"):
        method.client_start(method.downlink(g, 2), wider, 2, 0)


def test_each_partition_gets_its_rank_or_its_tier(settings):
    one_each = with_(settings, "adapter.r", 8, "adapter.client_ranks", [2, 4, 8])
    assert [one_each.adapter.rank_of(k, 3) for k in range(3)] == [2, 4, 8]
    tiers = with_(settings, "adapter.r", 8, "adapter.client_ranks", [2, 8])
    assert [tiers.adapter.rank_of(k, 6) for k in range(6)] == [2, 2, 2, 8, 8, 8]
    assert [settings.adapter.rank_of(k, 2) for k in range(2)] == [4, 4]  # none


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["adapter.client_ranks=[2,16]"], "adapter.client_ranks"),  # above adapter.r
        (["adapter.client_ranks=[0,4]"], "adapter.client_ranks"),
        (["adapter.client_ranks=[2,4,8,8]"], "adapter.client_ranks"),  # > 3 clients
        (["adapter.client_ranks=[2,4]", "strategy=ffa_lora"], "adapter.client_ranks"),
        (["adapter.client_ranks=[2,4]", "strategy=fedex_lora"], "adapter.client_ranks"),
    ],
)
def test_impossible_client_ranks_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose_settings(["federation.num_clients=3", "adapter.r=8", *overrides])
    assert err.value.key == key


def test_fedavg_lora_takes_client_ranks():
    cfg = compose_settings(
        ["federation.num_clients=3", "adapter.r=8", "adapter.client_ranks=[2,4,8]"]
    )
    assert cfg.adapter.client_ranks == (2, 4, 8)
