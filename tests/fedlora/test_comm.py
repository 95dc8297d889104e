"""Communication: the analytic calculator and measured bytes per method."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from experiments.comm import table
from fedlora.adapters import get_state, lora_layers
from fedlora.base_delta import BaseDelta
from fedlora.build import build, initial_state
from fedlora.comm import (
    client_traffic,
    dense_from,
    fold_parameters,
    fold_sizes,
    layer_shapes,
    num_parameters,
    raw_bytes,
    round_parameters,
    spread_ranks,
)
from fedlora.methods import available, from_settings
from fedlora.settings import with_
from strategies.wire import (
    KEY_ARRAYS,
    KEY_BASE,
    KEY_EXPERIMENT,
    payload_bytes,
    record_to_state,
    state_to_record,
)
from tests.conftest import FEDAVG_LORA, FEDSB, FFA_LORA, Grid

METHODS = available()


def test_mistral_counts_match_the_published_figures():
    shapes = layer_shapes("mistral-7b")
    assert sum(d_out + d_in for d_out, d_in in shapes) == 32 * 81_920
    fedit = round_parameters(shapes, 32, METHODS["fedavg_lora"]())
    fedsb = round_parameters(shapes, 200, METHODS["fedsb"]())
    assert fedit == 83_886_080  # 83.9M
    assert fedsb == 8_960_000  # 8.96M
    assert round(fedit / fedsb, 1) == 9.4
    # FFA sends B only: r * sum(d_out) = 44.0M. "Half of LoRA's" (41.9M) holds
    # only for square layers; Mistral's k, v, gate, up, down are not.
    assert round_parameters(shapes, 32, METHODS["ffa_lora"]()) == 32 * 32 * 43_008
    assert round_parameters(shapes, 32, METHODS["ffa_lora"]()) == pytest.approx(
        fedit / 2, rel=0.06
    )


def test_calculator_table_has_one_row_per_method():
    rows = table(
        "llama-2-7b",
        ["fedavg_lora", "fedsb"],
        {"fedavg_lora": [16] * 10, "fedsb": [200] * 10},
        1,
    )
    assert [r["method"] for r in rows] == ["fedavg_lora", "fedsb"]
    assert rows[0]["params_up_per_client_round"] == 16 * 32 * (4 * 8192 + 3 * 15104)
    assert rows[0]["params_down_per_client_round"] == 16 * 32 * (4 * 8192 + 3 * 15104)
    assert rows[0]["clients"] == 10
    assert rows[1]["one_time_MB_per_client"] > 0 and rows[1]["r"] == 200


# Llama-2-7B: 32 decoder layers, sum(d_out + d_in) = 4 * 8192 + 3 * 15104 per layer
LLAMA_PER_RANK = 32 * 78_080


def test_a_rank_list_counts_each_tier_at_its_own_rank():
    """fedavg_lora, hetlora, flexlora: r_k (d_in + d_out) each way; FLoRA: the same
    up, and down the global factors (rank 8) plus the stack of every reply,
    sum r_k (d_in + d_out) a layer (below the dense size here)."""
    shapes, ranks = layer_shapes("llama-2-7b"), [2, 2, 4, 4, 8, 8]
    for name in ("fedavg_lora", "hetlora", "flexlora"):
        for r in (2, 4, 8):
            n = r * LLAMA_PER_RANK
            assert client_traffic(shapes, r, ranks, METHODS[name]()) == (n, n)
    for r in (2, 4, 8):
        up, down = client_traffic(shapes, r, ranks, METHODS["flora"]())
        assert up == r * LLAMA_PER_RANK
        assert down == 28 * LLAMA_PER_RANK  # the stack, sum r_k = 28; no factors
    rows = table("llama-2-7b", ["flora"], {"flora": ranks}, 1)
    assert [(row["r"], row["clients"]) for row in rows] == [(2, 2), (4, 2), (8, 2)]
    down = rows[0]["MB_down_round_tier"]  # 2 clients of rank 2, 4 bytes a number
    assert down == pytest.approx(2 * 28 * LLAMA_PER_RANK * 4e-6)


def test_flora_fold_turns_dense_where_the_base_delta_does():
    """The analytic fold size against :class:`BaseDelta`'s own choice, on both
    sides of the crossover of a square and a wide layer."""
    rng = np.random.default_rng(0)
    for d_out, d_in in ((48, 48), (80, 24)):
        k0 = dense_from(d_out, d_in)
        assert (d_out + d_in) * (k0 - 1) < d_out * d_in <= (d_out + d_in) * k0
        for k in (1, k0 - 1, k0, k0 + 3):
            delta = BaseDelta()
            delta.add({"l": (rng.normal(size=(d_out, k)), rng.normal(size=(k, d_in)))})
            assert delta.num_parameters() == fold_parameters(d_out, d_in, k)
            assert (delta.factors("l") is None) == (k >= k0)
    sizes = fold_sizes([(48, 48), (80, 24)], 24)  # dense from 24 and 19
    assert sizes["dense_layers"] == 2 and sizes["sent"] == sizes["dense"]


def test_spread_ranks_follows_the_adapter_settings(settings):
    tiers = (2, 4, 8)
    adapter = with_(settings, "adapter.client_ranks", list(tiers), "adapter.r", 8)
    for clients in (1, 3, 4, 7, 16):
        want = [adapter.adapter.rank_of(k, clients) for k in range(clients)]
        assert spread_ranks(tiers, clients) == want
    assert spread_ranks([2, 3], 2) == [2, 3]


@pytest.mark.parametrize("method,r", [(FEDAVG_LORA, 64), (FFA_LORA, 128), (FEDSB, 256)])
def test_measured_bytes_are_within_5_percent_of_raw_parameters(settings, method, r):
    settings = with_(
        settings,
        "model.name",
        "minilm",
        "strategy",
        {"_target_": method},
        "adapter.r",
        r,
        "adapter.alpha",
        r,
    )
    state = get_state(build(settings)[0])
    rng = np.random.default_rng(0)  # trained values: no identical arrays to share
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()
    }
    content = RecordDict(
        {
            "arrays": state_to_record(state),
            "config": ConfigRecord({KEY_EXPERIMENT: json.dumps(settings.to_dict())}),
        }
    )
    measured = payload_bytes(content)
    assert raw_bytes(state) >= 1_000_000
    assert 1.0 <= measured / (num_parameters(state) * 4) <= 1.05


# --- the analytic counts against what the real strategy and ClientApp send ----------
FLORA = "fedlora.methods.flora.FLoRA"


def ranked_setup(settings, target: str, r: int, ranks: list[int]):
    """``(method, global start, strategy, config, nodes)`` for clients of ``ranks``
    (partition ``k`` trains ``ranks[k]``) under global rank ``r``."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from strategies.strategy import LoRAStrategy

    cfg = with_(
        settings,
        "strategy",
        {"_target_": target, "weighting": "num_examples", "max_update_norm_ratio": 0},
        "train.local_steps",
        1,
        "adapter.r",
        r,
        "adapter.client_ranks",
        ranks,
        "federation.num_clients",
        len(ranks),
        "federation.min_train_clients",
        len(ranks),
    )
    method = from_settings(cfg)
    start = initial_state(build(cfg)[0])
    strategy = LoRAStrategy(
        method, min_available_nodes=len(ranks), min_train_nodes=len(ranks)
    )
    config = ConfigRecord({KEY_EXPERIMENT: json.dumps(cfg.to_dict())})
    nodes = [
        Context(
            run_id=1,
            node_id=k + 1,
            node_config={"partition-id": k, "num-partitions": len(ranks)},
            state=RecordDict(),
            run_config={},
        )
        for k in range(len(ranks))
    ]
    return method, start, strategy, config, nodes


def train_round(strategy, server_round, state, config, nodes):
    """configure_train on the nodes, each trains in the real ClientApp,
    aggregate_train. Returns ``(messages, replies, new global state)``, by node."""
    from clients.client_app import train as client_train

    msgs = sorted(
        strategy.configure_train(
            server_round,
            state_to_record(state),
            config,
            Grid([n.node_id for n in nodes]),
        ),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies = []
    for msg, ctx in zip(msgs, nodes, strict=True):
        reply = client_train(msg, ctx)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert strategy.round_log[server_round]["rejected"] == []
    return msgs, replies, record_to_state(arrays)


def shapes_and_head(state) -> tuple[list[tuple[int, int]], int]:
    """Every adapted layer's ``(d_out, d_in)`` and the head's parameter count."""
    layers = lora_layers(state)
    shapes = [(state[b].shape[0], state[a].shape[1]) for a, b in layers.values()]
    factors = {k for pair in layers.values() for k in pair}
    return shapes, sum(v.size for k, v in state.items() if k not in factors)


def arrays_of(record) -> int:
    """Numbers an ArrayRecord carries."""
    return sum(int(np.prod(a.shape)) for a in record.values())


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("target", [FEDAVG_LORA, FLORA], ids=["fedavg_lora", "flora"])
def test_a_rank_per_client_uplink_is_the_analytic_count(settings, target):
    """Ranks 2 and 3 under global rank 4: each reply carries ``r_k (d_out + d_in)``
    per layer plus the head, and the strategy's ``params_up`` is their sum (what
    crossed the wire, not the replies padded to the global rank)."""
    ranks = [2, 3]
    method, start, strategy, config, nodes = ranked_setup(settings, target, 4, ranks)
    _, replies, _ = train_round(strategy, 1, start, config, nodes)
    shapes, head = shapes_and_head(start)
    want = [client_traffic(shapes, r, ranks, method)[0] + head for r in ranks]
    assert [arrays_of(m.content[KEY_ARRAYS]) for m in replies] == want
    assert strategy.round_log[1]["params_up"] == sum(want)
    # measured bytes per tier: 4 a number, plus the same framing (names, metrics:
    # about 5 KB on this toy) for every reply
    by_rank = strategy.round_log[1]["bytes_up_by_rank"]
    assert all(by_rank[str(r)] > 4 * n for r, n in zip(ranks, want, strict=True))
    extra = by_rank[str(ranks[1])] - by_rank[str(ranks[0])]
    assert abs(extra - 4 * (want[1] - want[0])) <= 16


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    "target,r,ranks",
    [(FEDAVG_LORA, 4, [2, 3]), (FLORA, 4, [2, 3]), (FLORA, 12, [6, 12])],
    ids=["fedavg_lora", "flora_stacked", "flora_dense"],  # dense from sum r_k = 16
)
def test_a_rank_per_client_downlink_is_the_analytic_count(settings, target, r, ranks):
    """Round 2 through the real ClientApp and strategy (the server knows each
    node's rank): a message carries what the analytic count says plus the head.
    FedAvg-LoRA: the global factors truncated to the node's rank. FLoRA: no
    factors (the client draws fresh ones) and round 1's fold, the stack of both replies
    (``(d_out + d_in) sum r_k`` a layer) or, on the tiny BERT's 32 x 32 layers
    from ``sum r_k = 16``, the dense delta."""
    method, start, strategy, config, nodes = ranked_setup(settings, target, r, ranks)
    _, _, new = train_round(strategy, 1, start, config, nodes)
    msgs, _, _ = train_round(strategy, 2, new, config, nodes)
    shapes, head = shapes_and_head(start)
    for msg, rank in zip(msgs, ranks, strict=True):
        fold = record_to_state(msg.content[KEY_BASE]) if KEY_BASE in msg.content else {}
        got = arrays_of(msg.content[KEY_ARRAYS]) + num_parameters(fold)
        assert got == client_traffic(shapes, rank, ranks, method)[1] + head
        if method.folds_into_base:
            dense = sum(ranks) >= 16
            suffixes = (".base_D",) if dense else (".base_U", ".base_V")
            assert fold and all(k.endswith(suffixes) for k in fold)
    assert strategy.round_log[2]["params_down"] == sum(
        arrays_of(m.content[KEY_ARRAYS]) for m in msgs
    )
