"""The method protocol's newer hooks through the real strategy: Flower's
``configure_train`` on a stand-in grid, client replies, ``aggregate_train``.

- ``trains`` (RoLoRA): a round's replies carry one factor; the other keeps the
  server's value; every round is exact.
- ``keeps_local`` (FedSA-LoRA): B never goes down or up; A is the weighted mean.
- ``fold`` (a toy folding method): each node gets the folds it lacks, a node that
  failed gets the whole sum, a reply from other base weights is rejected, and the
  sum survives a checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.aggregation import client_weights
from fedlora.base_delta import BaseDelta
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.fedsa_lora import FedSALoRA
from fedlora.methods.rolora import RoLoRA
from strategies.replies import FOLDS_DIFFER
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_ARRAYS,
    KEY_BASE,
    KEY_BASE_FROM,
    KEY_BASE_ROUND,
    KEY_BASE_SYNC,
    KEY_BASE_TO,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_PARTITION,
    record_to_state,
    state_to_record,
)
from tests.conftest import Grid
from tests.toy_methods import ToyFold

pytestmark = pytest.mark.usefixtures("task_identity")

LAYERS = {"l0": (16, 12), "l1": (8, 20)}
R = 3
COUNTS = [30, 50, 20]


def global_state(rng) -> dict[str, np.ndarray]:
    """LoRA-scale factors (B ~ 1e-3, A ~ 0.1) and a head."""
    out = {}
    for layer, (d_out, d_in) in LAYERS.items():
        out[f"{layer}.lora_A.weight"] = (rng.normal(size=(R, d_in)) * 0.1).astype("f4")
        out[f"{layer}.lora_B.weight"] = (rng.normal(size=(d_out, R)) * 1e-3).astype(
            "f4"
        )
    out["classifier.weight"] = rng.normal(size=(2, 4)).astype("f4")
    return out


def trained(rng, sent, keys):
    """A client's update of ``keys``: a small step from what it received."""
    return {
        k: (
            sent[k] + rng.normal(size=sent[k].shape) * 0.05 * np.abs(sent[k]).mean()
        ).astype("f4")
        for k in keys
    }


def reply_to(msg: Message, state: dict, pid: int, **metrics) -> Message:
    content = RecordDict(
        {
            KEY_ARRAYS: state_to_record(state),
            KEY_METRICS: MetricRecord(
                {KEY_NUM_EXAMPLES: COUNTS[pid], KEY_PARTITION: pid, **metrics}
            ),
        }
    )
    reply = Message(content=content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


def strategy_for(method) -> LoRAStrategy:
    return LoRAStrategy(method, scaling=2.0, min_available_nodes=3, min_train_nodes=3)


def one_round(strategy, server_round, state, rng, train=None, held=None, **metrics):
    """configure_train -> replies of every node -> aggregate_train. With ``held``
    (``{node: state}``, nodes that keep the global state), each node merges what
    its message carries over its copy, as the ClientApp does."""
    msgs = list(
        strategy.configure_train(
            server_round, state_to_record(state), ConfigRecord({}), Grid([11, 12, 13])
        )
    )
    msgs.sort(key=lambda m: m.metadata.dst_node_id)
    sent = [record_to_state(m.content[KEY_ARRAYS]) for m in msgs]
    whole = sent
    if held is not None:
        whole = []
        for m, s in zip(msgs, sent, strict=True):
            node = m.metadata.dst_node_id
            held[node] = {**held.get(node, {}), **s}
            whole.append(held[node])
    updates = [
        trained(rng, s, train(server_round, s) if train else list(s)) for s in whole
    ]
    replies = [
        reply_to(m, u, pid, **metrics)
        for pid, (m, u) in enumerate(zip(msgs, updates, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return msgs, sent, updates, record_to_state(arrays)


def test_rolora_sends_one_factor_up_and_its_rounds_are_exact():
    rng = np.random.default_rng(0)
    strategy = strategy_for(RoLoRA())
    state = global_state(rng)
    p = client_weights(COUNTS, "num_examples")
    held = {}
    for server_round in (1, 2, 3):
        factor = "lora_B" if server_round % 2 else "lora_A"
        frozen = "lora_A" if server_round % 2 else "lora_B"
        _, sent, updates, new = one_round(
            strategy,
            server_round,
            state,
            rng,
            train=lambda r, s, f=factor: [k for k in s if f in k or "classifier" in k],
            held=held,
        )
        # down: everything to a new node, then only what the last round changed
        # (the factor frozen in this round, and the head)
        changed = (
            set(state)
            if server_round == 1
            else {k for k in state if frozen in k or "classifier" in k}
        )
        assert all(set(s) == changed for s in sent)
        for k in state:
            if frozen in k:  # the frozen factor keeps the server's value
                np.testing.assert_array_equal(new[k], state[k])
            else:  # the trained one is the weighted mean (float64 reference)
                want = sum(
                    pk * u[k].astype(np.float64)
                    for pk, u in zip(p, updates, strict=True)
                )
                np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-9)
        error = strategy.round_log[server_round]["aggregation_error"]
        assert error < 1e-5  # exact up to float32 round-off of the 5% steps
        state = new
    # a reply carrying the frozen factor too does not fit the round: rejected
    msgs = list(
        strategy.configure_train(
            4, state_to_record(state), ConfigRecord({}), Grid([11, 12, 13])
        )
    )
    replies = [reply_to(m, dict(state), pid) for pid, m in enumerate(msgs)]
    assert strategy.aggregate_train(4, replies) == (None, None)
    assert len(strategy.round_log[4]["rejected"]) == 3
    # ... and those nodes, like any that failed, get the whole state next time
    msgs = strategy.configure_train(
        5, state_to_record(state), ConfigRecord({}), Grid([11, 12, 13])
    )
    assert all(set(m.content[KEY_ARRAYS]) == set(state) for m in msgs)


def test_fedavg_lora_on_the_same_replies_is_inexact():
    """The control for the exactness above: training both factors is not."""
    rng = np.random.default_rng(0)
    strategy = strategy_for(FedAvgLoRA())
    one_round(strategy, 1, global_state(rng), rng)
    assert strategy.round_log[1]["aggregation_error"] > 1e-3


def test_fedsa_lora_shares_a_and_never_moves_b():
    rng = np.random.default_rng(1)
    strategy = strategy_for(FedSALoRA())
    state = global_state(rng)
    p = client_weights(COUNTS, "num_examples")
    msgs, sent, updates, new = one_round(strategy, 1, state, rng)
    b_keys = {k for k in state if "lora_B" in k}
    assert all(not (set(s) & b_keys) for s in sent)  # B does not go down ...
    for k in b_keys:  # ... or come back, and the server never changes it
        np.testing.assert_array_equal(new[k], state[k])
    for k in set(state) - b_keys:
        want = sum(
            pk * u[k].astype(np.float64) for pk, u in zip(p, updates, strict=True)
        )
        np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-9)
    # the server cannot see the clients' B, so it reports no aggregation error
    assert strategy.round_log[1]["aggregation_error"] is None
    # a reply that sends its B is refused
    msgs = list(
        strategy.configure_train(
            2, state_to_record(new), ConfigRecord({}), Grid([11, 12, 13])
        )
    )
    bad = [reply_to(m, dict(new), pid) for pid, m in enumerate(msgs)]
    assert strategy.aggregate_train(2, bad) == (None, None)


def folds_of(msg: Message) -> tuple[int, int, BaseDelta]:
    sync = msg.content[KEY_BASE_SYNC]
    delta = BaseDelta.from_state(record_to_state(msg.content[KEY_BASE]))
    return int(sync[KEY_BASE_FROM]), int(sync[KEY_BASE_TO]), delta


def test_each_node_gets_the_folds_it_lacks():
    rng = np.random.default_rng(2)
    strategy = strategy_for(ToyFold())
    state = global_state(rng)
    p = client_weights(COUNTS, "num_examples")
    grid = Grid([11, 12, 13])

    def round_(server_round, state, fail=(), base_round=None):
        msgs = sorted(
            strategy.configure_train(
                server_round, state_to_record(state), ConfigRecord({}), grid
            ),
            key=lambda m: m.metadata.dst_node_id,
        )
        replies = []
        for pid, m in enumerate(msgs):
            if m.metadata.dst_node_id in fail:
                replies.append(Message(content=RecordDict(), reply_to=m))  # empty
                continue
            _, to, _ = folds_of(m)
            held = to if base_round is None else base_round
            update = trained(rng, record_to_state(m.content[KEY_ARRAYS]), state)
            replies.append(reply_to(m, update, pid, **{KEY_BASE_ROUND: held}))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        return msgs, record_to_state(arrays) if arrays is not None else state

    msgs, state = round_(1, state)
    assert [folds_of(m)[:2] for m in msgs] == [(0, 0)] * 3  # nothing folded yet
    fold1 = strategy.folds.total.copy()
    assert set(fold1) == set(LAYERS)
    # the exactness check includes the fold: it is part of the new model
    assert strategy.round_log[1]["aggregation_error"] > 0
    msgs, state = round_(2, state, fail={12})
    for m in msgs:  # nodes held round 0: the whole sum (= round 1's fold)
        start, end, delta = folds_of(m)
        assert (start, end) == (0, 1)
        for layer in LAYERS:
            np.testing.assert_array_equal(delta.matrix(layer), fold1.matrix(layer))
    msgs, state = round_(3, state)
    by_node = {m.metadata.dst_node_id: folds_of(m) for m in msgs}
    assert by_node[11][:2] == (1, 2) and by_node[13][:2] == (1, 2)
    assert by_node[12][:2] == (0, 2)  # it failed in round 2: the whole sum
    for layer in LAYERS:
        np.testing.assert_allclose(
            by_node[12][2].matrix(layer),
            fold1.matrix(layer) + by_node[11][2].matrix(layer),
            rtol=1e-6,
            atol=1e-12,
        )
    # a reply computed on other base weights is rejected, and its node resynced
    msgs, _ = round_(4, state, base_round=1)
    reasons = [r["reason"] for r in strategy.round_log[4]["rejected"]]
    assert len(reasons) == 3 and all(r.startswith(FOLDS_DIFFER) for r in reasons)
    assert not strategy.holdings.folds
    # the summed folds survive a checkpoint; every node then gets the whole sum
    arrays, json_state = strategy.checkpoint_state()
    restored = strategy_for(ToyFold())
    restored.restore_state(arrays, json_state)
    for layer in LAYERS:
        np.testing.assert_array_equal(
            restored.folds.total.matrix(layer), strategy.folds.total.matrix(layer)
        )
    msgs = list(
        restored.configure_train(5, state_to_record(state), ConfigRecord({}), grid)
    )
    assert all(folds_of(m)[:2] == (0, 3) for m in msgs)
    del p


def ranked_round(strategy, plan, state, ranks, rng):
    """Round 1 with client ``k`` of rank ``ranks[k]``: it starts from what it was
    sent at its rank, trains, and reports its rank. Returns the replies' states
    and the new global state."""
    from fedlora.ranks import RANK_KEY

    msgs = sorted(
        strategy.configure_train(
            1, state_to_record(state), ConfigRecord({}), Grid([11, 12, 13])
        ),
        key=lambda m: m.metadata.dst_node_id,
    )
    replies, ups = [], []
    for pid, (m, r) in enumerate(zip(msgs, ranks, strict=True)):
        mine = plan.to_client(record_to_state(m.content[KEY_ARRAYS]), r)
        ups.append(trained(rng, mine, mine))
        replies.append(reply_to(m, ups[-1], pid, **{RANK_KEY: r}))
    arrays, _ = strategy.aggregate_train(1, replies)
    return ups, record_to_state(arrays)


def test_hetlora_weights_each_layer_by_the_size_of_each_clients_update():
    """HetLoRA through the strategy, replies of ranks 2, 3, 4 (global 4): padded at
    the global scale, then per layer w_k ~ ||s_k B_k A_k|| (dense float64
    reference), the head by p_k."""
    from fedlora.methods.hetlora import HetLoRA
    from fedlora.ranks import RankPlan

    rng = np.random.default_rng(4)
    plan = RankPlan(R, 6.0)  # global rank R = 3 at scale 6 / 3
    strategy = strategy_for(HetLoRA(ranks=plan))
    state = global_state(rng)
    ranks = [1, 2, 3]
    ups, new = ranked_round(strategy, plan, state, ranks, rng)
    p = client_weights(COUNTS, "num_examples")
    for layer in LAYERS:
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        norms = np.array(
            [
                np.linalg.norm(plan.scale(r) * u[b].astype(float) @ u[a].astype(float))
                for r, u in zip(ranks, ups, strict=True)
            ]
        )
        w = norms / norms.sum()
        want_b, want_a = np.zeros(state[b].shape), np.zeros(state[a].shape)
        for wk, r, u in zip(w, ranks, ups, strict=True):
            c = plan.factor(r)
            want_b[:, :r] += wk * u[b] / c
            want_a[:r] += wk * u[a] / c
        np.testing.assert_allclose(new[b], want_b, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(new[a], want_a, rtol=1e-5, atol=1e-7)
    want = sum(
        pk * u["classifier.weight"].astype(float) for pk, u in zip(p, ups, strict=True)
    )
    np.testing.assert_allclose(new["classifier.weight"], want, rtol=1e-5)


def test_flexlora_gives_each_rank_the_truncated_svd_of_the_average_update():
    """FlexLoRA through the strategy, replies of ranks 1, 2, 3 at their own scales:
    each client's next adapter is the truncated SVD of the dense float64 average
    ``sum p_k s_k B_k A_k`` at its rank, and the record's shares are its tails."""
    from fedlora.methods.flexlora import FlexLoRA
    from fedlora.ranks import RankPlan

    rng = np.random.default_rng(5)
    plan = RankPlan(R, 6.0)
    strategy = strategy_for(FlexLoRA(ranks=plan))
    state = global_state(rng)
    ranks = [1, 2, 3]
    ups, new = ranked_round(strategy, plan, state, ranks, rng)
    p = client_weights(COUNTS, "num_examples")
    tails = np.zeros(R + 1)
    for layer in LAYERS:
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        delta = sum(
            pk * plan.scale(r) * u[b].astype(float) @ u[a].astype(float)
            for pk, r, u in zip(p, ranks, ups, strict=True)
        )
        uu, ss, vt = np.linalg.svd(delta)
        tails += [np.sum(ss[r:] ** 2) for r in range(R + 1)]
        for r in ranks:  # what a rank-r client starts from next round
            mine = plan.to_client({a: new[a], b: new[b]}, r)
            got = plan.scale(r) * mine[b].astype(float) @ mine[a].astype(float)
            want = (uu[:, :r] * ss[:r]) @ vt[:r]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * abs(want).max())
    # the diagnostic for clients of different ranks: what each tier cannot hold
    by_rank = strategy.round_log[1]["aggregation_error_by_rank"]
    assert set(by_rank) == {"1", "2", "3"}
    assert by_rank["3"] < by_rank["2"] < by_rank["1"] < 1
    shares = strategy.round_log[1]["flexlora"]["truncation_share_by_rank"]
    for r in range(1, R + 1):
        assert shares[str(r)] == pytest.approx(np.sqrt(tails[r] / tails[0]), abs=1e-6)


def test_flora_stacks_the_replies_into_an_exact_fold_and_restarts_the_adapter():
    """FLoRA through the strategy, replies of ranks 1, 2, 3 at their own scales:
    the fold is ``sum p_k s_k B_k A_k`` (dense float64 reference), of rank
    ``sum r_k`` once the padding is left out, the adapter goes back to ``B = 0``,
    and the round is exact."""
    from fedlora.methods.flora import FLoRA
    from fedlora.ranks import RANK_KEY, RankPlan

    rng = np.random.default_rng(6)
    plan = RankPlan(R, 6.0)
    method = FLoRA(ranks=plan, seed=3)
    strategy = LoRAStrategy(method, scaling=plan.scale(R), min_available_nodes=3)
    state = global_state(rng)
    msgs = sorted(
        strategy.configure_train(
            1, state_to_record(state), ConfigRecord({}), Grid([11, 12, 13])
        ),
        key=lambda m: m.metadata.dst_node_id,
    )
    ranks, replies, ups = [1, 2, 3], [], []
    for pid, (m, r) in enumerate(zip(msgs, ranks, strict=True)):
        fresh = plan.to_client(record_to_state(m.content[KEY_ARRAYS]), r)
        start = method.client_start(fresh, fresh, 1, pid)
        assert all(not start[k].any() for k in start if "lora_B" in k)  # B = 0
        up = {
            k: (v + rng.normal(size=v.shape) * 1e-3).astype("f4")
            for k, v in start.items()
        }
        ups.append(up)
        replies.append(reply_to(m, up, pid, **{RANK_KEY: r, "base-round": 0}))
    arrays, _ = strategy.aggregate_train(1, replies)
    new = record_to_state(arrays)
    p = client_weights(COUNTS, "num_examples")
    for layer in LAYERS:
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        want = sum(
            pk * plan.scale(r) * u[b].astype(float) @ u[a].astype(float)
            for pk, r, u in zip(p, ranks, ups, strict=True)
        )
        held = strategy.folds.total.factors(layer)  # None where dense is smaller
        assert held is None or held[0].shape[1] == sum(ranks)  # padding left out
        np.testing.assert_allclose(
            strategy.folds.total.matrix(layer),
            want,
            rtol=0,
            atol=1e-6 * abs(want).max(),
        )
        assert not new[b].any()
    assert strategy.round_log[1]["aggregation_error"] < 1e-9  # from the factors


def test_flora_clients_start_from_fresh_factors_seeded_by_round_and_client():
    from fedlora.methods.flora import FLoRA

    method = FLoRA(seed=1)
    initial = {
        "l.lora_A.weight": np.zeros((4, 25), "f4"),
        "l.lora_B.weight": np.ones((6, 4), "f4"),
    }
    draws = {
        (r, k): method.client_start(dict(initial), initial, r, k)["l.lora_A.weight"]
        for r in (1, 2)
        for k in (0, 1)
    }
    assert all(
        np.abs(a).max() <= 1 / 5 and np.abs(a).max() > 0.1 for a in draws.values()
    )
    assert len({a.tobytes() for a in draws.values()}) == 4  # all different
    again = method.client_start(dict(initial), initial, 2, 1)["l.lora_A.weight"]
    np.testing.assert_array_equal(again, draws[(2, 1)])  # but reproducible


def test_the_server_sends_each_node_the_global_factors_at_the_rank_it_reported():
    """FedAvg-LoRA with ranks 1, 2, 3 (global 3) on nodes 11, 12, 13: round 1 goes
    at the global rank to all (ranks unknown; its bytes go to the rank each reply
    reports); then each node gets its rank, unscaled, the evaluation too. A node
    that did not reply, and a new node id (a restarted SuperNode), get the global
    rank again; a resumed run relearns every rank."""
    from fedlora.ranks import RANK_KEY, RankPlan, rank_of

    rng = np.random.default_rng(7)
    plan = RankPlan(R, 6.0)
    strategy = strategy_for(FedAvgLoRA(ranks=plan))
    ranks = {11: 1, 12: 2, 13: 3, 14: 2}
    state = global_state(rng)

    def round_(server_round, nodes, silent=()):
        msgs = strategy.configure_train(
            server_round, state_to_record(state), ConfigRecord({}), Grid(nodes)
        )
        sent, replies = {}, []
        for pid, m in enumerate(sorted(msgs, key=lambda m: m.metadata.dst_node_id)):
            node = m.metadata.dst_node_id
            sent[node] = record_to_state(m.content[KEY_ARRAYS])
            if node not in silent:
                mine = plan.to_client(sent[node], ranks[node])
                update = trained(rng, mine, mine)
                replies.append(reply_to(m, update, pid, **{RANK_KEY: ranks[node]}))
        strategy.aggregate_train(server_round, replies)
        entry = strategy.round_log[server_round]
        assert sum(entry["bytes_down_by_rank"].values()) == entry["bytes_down"]
        return {n: rank_of(s) for n, s in sent.items()}, sent, entry

    got, _, entry = round_(1, [11, 12, 13])
    assert got == {11: R, 12: R, 13: R}
    down = entry["bytes_down_by_rank"]
    assert set(down) == {"1", "2", "3"} and len(set(down.values())) == 1
    got, sent, entry = round_(2, [11, 12, 13], silent={12})
    assert got == {11: 1, 12: 2, 13: R}
    for node, s in sent.items():  # the first r rows / columns, as they are
        r = ranks[node]
        for layer in LAYERS:
            a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
            np.testing.assert_array_equal(s[a], state[a][:r])
            np.testing.assert_array_equal(s[b], state[b][:, :r])
        np.testing.assert_array_equal(
            s["classifier.weight"], state["classifier.weight"]
        )
    down = entry["bytes_down_by_rank"]  # node 12 failed: its rank when sent
    assert set(down) == {"1", "2", "3"} and down["1"] < down["2"] < down["3"]
    assert (
        entry["params_down"]
        == sum(r * (d_out + d_in) for r in (1, 2, 3) for d_out, d_in in LAYERS.values())
        + 3 * state["classifier.weight"].size
    )
    evals = strategy.configure_evaluate(
        2, state_to_record(state), ConfigRecord({}), Grid([11, 12, 13])
    )
    got = {
        m.metadata.dst_node_id: rank_of(record_to_state(m.content[KEY_ARRAYS]))
        for m in evals
    }
    assert got == {11: 1, 12: R, 13: R}  # 12 did not reply: forgotten
    got, _, entry = round_(3, [11, 12, 14], silent={14})
    assert got == {11: 1, 12: R, 14: R}  # 14: a new node id
    assert set(entry["bytes_down_by_rank"]) == {"1", "2", "unknown"}
    arrays, json_state = strategy.checkpoint_state()
    assert "ranks" not in str(json_state)
    strategy = strategy_for(FedAvgLoRA(ranks=plan))
    strategy.restore_state(arrays, json_state)
    got, _, _ = round_(4, [11, 12, 13])
    assert got == {11: R, 12: R, 13: R}
