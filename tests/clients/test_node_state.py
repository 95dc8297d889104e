"""What a node keeps between rounds, through the real ClientApp functions: the
factor RoLoRA trains this round, FedSA-LoRA's own B, and the base-weight folds a
folding method sends. The simulation reuses one model across nodes, so each test
also interleaves another node to check that nothing leaks between them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.client_app import evaluate as client_evaluate
from clients.client_app import train as client_train
from fedlora.adapters import base_weight, get_state, lora_layers, set_trainable
from fedlora.base_delta import BaseDelta
from fedlora.build import build, build_cached, initial_state
from fedlora.methods import from_settings
from fedlora.settings import Settings, with_
from strategies.wire import (
    KEY_ARRAYS,
    KEY_BASE,
    KEY_BASE_FROM,
    KEY_BASE_ROUND,
    KEY_BASE_SYNC,
    KEY_BASE_TO,
    KEY_CONFIG,
    KEY_EXPERIMENT,
    KEY_LOCAL_ROUNDS,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_RANK,
    KEY_ROUND,
    KEY_RUN_ID,
    KEY_STATE_LOCAL,
    record_to_state,
    state_to_record,
)

ROLORA = "fedlora.methods.rolora.RoLoRA"
FEDSA = "fedlora.methods.fedsa_lora.FedSALoRA"
TOY_FOLD = "tests.toy_methods.ToyFold"


pytestmark = pytest.mark.usefixtures("task_identity")


def method_settings(settings: Settings, target: str, *changes) -> Settings:
    return with_(
        settings,
        "strategy",
        {"_target_": target, "weighting": "num_examples", "max_update_norm_ratio": 0},
        "train.local_steps",
        2,
        *changes,
    )


def message(cfg, state, server_round=1, kind="train", extra=None) -> Message:
    config = ConfigRecord(
        {KEY_EXPERIMENT: json.dumps(cfg.to_dict()), KEY_ROUND: server_round}
    )
    content = {KEY_CONFIG: config, KEY_ARRAYS: state_to_record(state)}
    return Message(
        content=RecordDict({**content, **(extra or {})}),
        dst_node_id=1,
        message_type=kind,
    )


def node(pid: int) -> Context:
    """A fresh node (empty state) holding partition ``pid``."""
    return Context(
        run_id=1,
        node_id=pid + 1,
        node_config={"partition-id": pid, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )


def sent_up(reply: Message) -> dict[str, np.ndarray]:
    return record_to_state(reply.content[KEY_ARRAYS])


def test_rolora_trains_and_sends_b_in_odd_rounds_and_a_in_even_rounds(settings):
    cfg = method_settings(settings, ROLORA)
    start = {k: v.copy() for k, v in _wire(cfg).items()}
    a_keys = {k for k in start if ".lora_A." in k}
    b_keys = {k for k in start if ".lora_B." in k}
    head = set(start) - a_keys - b_keys
    assert a_keys and b_keys and head
    odd = sent_up(client_train(message(cfg, start, 1), node(0)))
    assert set(odd) == b_keys | head
    assert any(np.abs(odd[k] - start[k]).max() > 0 for k in b_keys)
    # the frozen factor stayed at what the server sent
    cached, _ = build_cached(cfg)
    set_trainable(cached, start)
    held = get_state(cached)
    for k in a_keys:
        np.testing.assert_array_equal(held[k], start[k])
    even = sent_up(client_train(message(cfg, {**start, **odd}, 2), node(0)))
    assert set(even) == a_keys | head
    assert any(np.abs(even[k] - start[k]).max() > 0 for k in a_keys)


def _wire(cfg):
    """The wire state of the model the client builds, as seeded."""
    model, _ = build_cached(cfg)
    return initial_state(model)


def test_fedsa_keeps_each_nodes_b_on_the_node_and_sends_only_a(settings):
    cfg = method_settings(settings, FEDSA)
    initial = _wire(cfg)
    b_keys = {k for k in initial if ".lora_B." in k}
    sent = {k: v for k, v in initial.items() if k not in b_keys}
    first, other = node(0), node(1)
    reply = sent_up(client_train(message(cfg, sent, 1), first))
    assert set(reply) == set(sent)  # B never leaves the node
    own_b = record_to_state(first.state[KEY_STATE_LOCAL])
    assert set(own_b) == b_keys
    assert all(np.abs(own_b[k]).max() > 0 for k in b_keys)  # trained from B = 0
    client_train(message(cfg, sent, 1), other)  # another node on the same model
    other_b = record_to_state(other.state[KEY_STATE_LOCAL])
    assert any(np.abs(other_b[k] - own_b[k]).max() > 0 for k in b_keys)
    # with lr 0 nothing trains, so the B a node ends with is the B it started with:
    # its own, not the other node's (which the shared model held last) ...
    still = with_(cfg, "train.lr", 0.0)
    client_train(message(still, sent, 2), first)
    for k, v in record_to_state(first.state[KEY_STATE_LOCAL]).items():
        np.testing.assert_array_equal(v, own_b[k])
    # ... and a restarted node starts again from the initial B
    fresh = node(0)
    client_train(message(still, sent, 2), fresh)
    for k, v in record_to_state(fresh.state[KEY_STATE_LOCAL]).items():
        np.testing.assert_array_equal(v, initial[k])
    # its federated evaluation uses its own B: a different result than with B = 0
    ev_own = client_evaluate(message(cfg, sent, 2, "evaluate"), first)
    ev_fresh = client_evaluate(message(cfg, sent, 2, "evaluate"), node(0))
    assert ev_own.content[KEY_METRICS]["eval_loss"] != pytest.approx(
        ev_fresh.content[KEY_METRICS]["eval_loss"], rel=1e-9
    )


def test_a_fedsa_node_with_a_data_dir_reloads_its_b_after_a_restart_or_resume(
    settings, tmp_path
):
    """With a ``data-dir`` and the run's id, a node also keeps its B on disk: a new
    context (a restarted SuperNode, or a resumed run, which is a new Flower run)
    starts from the B of the newest round before the one it trains, also when
    that round had been trained already (a dead server's round)."""
    cfg = method_settings(settings, FEDSA)
    initial = _wire(cfg)
    b_keys = {k for k in initial if ".lora_B." in k}
    sent = {k: v for k, v in initial.items() if k not in b_keys}
    still = with_(cfg, "train.lr", 0.0)  # nothing trains: B stays as it started

    def on_disk(folder: str) -> Context:
        ctx = node(0)
        ctx.node_config["data-dir"] = str(tmp_path / folder)
        return ctx

    def train(c, server_round, ctx, run_id="20261203-000000-abcd1234"):
        msg = message(c, sent, server_round)
        msg.content[KEY_CONFIG][KEY_RUN_ID] = run_id
        return client_train(msg, ctx)

    # round 3 after a restart; round 2 again after a resume (the dead server had
    # sent it, the node had trained it): each on a node that trained rounds 1, 2
    for folder, server_round, start, kept in (("a", 3, 2, 3), ("b", 2, 1, 2)):
        first = on_disk(folder)
        held = {}
        for r in (1, 2):
            train(cfg, r, first)
            held[r] = record_to_state(first.state[KEY_STATE_LOCAL])
        assert any(np.abs(held[2][k] - held[1][k]).max() > 0 for k in b_keys)
        fresh = on_disk(folder)
        reply = train(still, server_round, fresh)
        assert reply.content[KEY_METRICS][KEY_LOCAL_ROUNDS] == kept
        for k, v in record_to_state(fresh.state[KEY_STATE_LOCAL]).items():
            np.testing.assert_array_equal(v, held[start][k])
    other_run = on_disk("a")  # another run finds nothing of this one
    train(still, 3, other_run, run_id="20261203-000000-ffff0000")
    for k, v in record_to_state(other_run.state[KEY_STATE_LOCAL]).items():
        np.testing.assert_array_equal(v, initial[k])


def folds_message(cfg, state, server_round, start, end, delta: BaseDelta):
    extra = {
        KEY_BASE: state_to_record(delta.to_state()),
        KEY_BASE_SYNC: ConfigRecord({KEY_BASE_FROM: start, KEY_BASE_TO: end}),
    }
    return message(cfg, state, server_round, extra=extra)


def test_a_node_keeps_its_summed_folds_and_a_restarted_one_catches_up(settings):
    cfg = method_settings(settings, TOY_FOLD, "train.lr", 0.0)
    initial = _wire(cfg)
    layers = list(lora_layers(initial))
    plain, _ = build(cfg)
    w0 = {layer: base_weight(plain, layer) for layer in layers}
    rng = np.random.default_rng(0)

    def random_fold():
        return {
            layer: (
                (rng.normal(size=(w0[layer].shape[0], 1)) * 1e-3).astype(np.float32),
                (rng.normal(size=(1, w0[layer].shape[1])) * 0.1).astype(np.float32),
            )
            for layer in layers
        }

    f1, f2 = random_fold(), random_fold()
    one, two = BaseDelta(), BaseDelta()
    one.add(f1)
    two.add(f2)
    kept = node(0)
    reply = client_train(folds_message(cfg, initial, 1, 0, 1, one), kept)
    assert reply.content[KEY_METRICS][KEY_BASE_ROUND] == 1
    reply = client_train(folds_message(cfg, initial, 2, 1, 2, two), kept)
    assert reply.content[KEY_METRICS][KEY_BASE_ROUND] == 2
    model, _ = build_cached(cfg)
    kept_w = {layer: base_weight(model, layer) for layer in layers}
    for layer in layers:  # W0 + f1 + f2, against a dense float64 reference
        want = w0[layer] + sum(
            u.astype(float) @ v.astype(float) for u, v in (f1[layer], f2[layer])
        )
        np.testing.assert_allclose(kept_w[layer], want, rtol=0, atol=1e-6)
    # a restarted node asked to continue from round 1 refuses ...
    restarted = node(0)
    with pytest.raises(RuntimeError, match="continue from round 1"):
        client_train(folds_message(cfg, initial, 3, 1, 2, two), restarted)
    # ... and given the whole sum ends with the same base weights as the node
    # that kept its state
    whole = BaseDelta()
    whole.add_delta(one)
    whole.add_delta(two)
    client_train(folds_message(cfg, initial, 3, 0, 2, whole), restarted)
    for layer in layers:
        np.testing.assert_allclose(
            base_weight(model, layer), kept_w[layer], rtol=0, atol=1e-6
        )
    # a message with no new folds leaves each node at its own sum (the shared
    # model is reset per node): a node that never got any is back at W0
    client_train(message(cfg, initial, 3), node(1))
    for layer in layers:
        np.testing.assert_array_equal(
            base_weight(model, layer), w0[layer].astype(np.float32)
        )


def test_a_rank_per_client_truncates_down_and_pads_up_through_the_strategy(settings):
    """FedAvg-LoRA with ``adapter.client_ranks`` (the zero-padding baseline), through
    the real ClientApp and strategy: each client trains its own rank from the global
    factors truncated and rescaled to its scale, reports it, and the strategy
    brings the replies back to the global rank and scale before the mean."""
    from strategies.strategy import LoRAStrategy
    from tests.conftest import Grid

    cfg = method_settings(
        settings,
        "fedlora.methods.fedavg_lora.FedAvgLoRA",
        "adapter.client_ranks",
        [2, 3],
    )
    method = from_settings(cfg)
    start = initial_state(build(cfg)[0])  # the server's model: rank adapter.r = 4
    rng = np.random.default_rng(0)
    start = {  # as after some training: B no longer zero
        k: (v + rng.normal(size=v.shape) * 1e-3).astype(np.float32)
        for k, v in start.items()
    }
    strategy = LoRAStrategy(method, min_available_nodes=2, min_train_nodes=2)
    config = ConfigRecord({KEY_EXPERIMENT: json.dumps(cfg.to_dict())})
    msgs = sorted(
        strategy.configure_train(1, state_to_record(start), config, Grid([1, 2])),
        key=lambda m: m.metadata.dst_node_id,
    )
    alpha, big = cfg.adapter.alpha, cfg.adapter.r
    replies, ups = [], []
    for pid, msg in enumerate(msgs):
        reply = client_train(msg, node(pid))
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        up = sent_up(reply)
        rank = 2 + pid
        assert reply.content[KEY_METRICS][KEY_RANK] == rank
        assert all(
            v.shape[0 if ".lora_A." in k else 1] == rank
            for k, v in up.items()
            if ".lora_" in k
        )
        replies.append(reply)
        ups.append((rank, up))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.round_log[1]["rejected"] == []
    new = record_to_state(arrays)
    p = strategy.method.weights(
        [r.content[KEY_METRICS][KEY_NUM_EXAMPLES] for r in replies]
    )
    for key in (k for k in start if ".lora_" in k):
        assert new[key].shape == start[key].shape
        want = np.zeros(start[key].shape)  # float64 reference: unscale, pad, mean
        for pk, (rank, up) in zip(p, ups, strict=True):
            c = np.sqrt((alpha / big) / (alpha / rank))  # sqrt(s_R / s_k)
            if ".lora_B." in key:
                want[:, :rank] += pk * up[key] / c
            else:
                want[:rank] += pk * up[key] / c
        np.testing.assert_allclose(new[key], want, rtol=1e-5, atol=1e-9)
    # the client's effective delta was the global one's truncation
    b, a = "lora_B.weight", "lora_A.weight"
    layer = next(k[: -len(b)] for k in start if k.endswith(b))
    truncated = method.client_start(start, {layer + a: np.zeros((2, 1))}, 1, 0)
    s_k, s_r = alpha / 2, alpha / big
    np.testing.assert_allclose(
        s_k * truncated[layer + b].astype(float) @ truncated[layer + a],
        s_r * start[layer + b][:, :2].astype(float) @ start[layer + a][:2],
        rtol=1e-5,
        atol=1e-10,  # float32 factors; entries ~1e-4
    )


def test_from_round_2_the_server_sends_each_node_its_rank_and_only_bytes_change(
    settings, monkeypatch
):
    """FedAvg-LoRA, ranks 2, 3, 4 (global 4), through the real ClientApp and
    strategy: round 1 goes at the global rank to every node; in round 2 each node
    gets the global factors truncated to the rank it reported, starts from the
    global delta's truncation (scaled once, on the client), and the model after
    round 2 is the one a server sending the global rank gets, for fewer bytes."""
    import copy

    from fedlora.methods.fedavg_lora import FedAvgLoRA
    from fedlora.ranks import rank_of
    from strategies.strategy import LoRAStrategy
    from tests.conftest import Grid

    cfg = method_settings(
        settings,
        "fedlora.methods.fedavg_lora.FedAvgLoRA",
        "federation.num_clients",
        3,
        "federation.min_train_clients",
        3,
        "adapter.client_ranks",
        [2, 3, 4],
    )
    big, alpha = cfg.adapter.r, cfg.adapter.alpha
    rank = {1: 2, 2: 3, 3: 4}  # node id -> rank (partition = node id - 1)
    starts = {}  # (round, partition) -> the wire state the client started from
    client_start = FedAvgLoRA.client_start

    def recorded(self, sent, initial, server_round, partition):
        starts[server_round, partition] = client_start(
            self, sent, initial, server_round, partition
        )
        return starts[server_round, partition]

    monkeypatch.setattr(FedAvgLoRA, "client_start", recorded)
    config = ConfigRecord({KEY_EXPERIMENT: json.dumps(cfg.to_dict())})

    def train_round(strategy, server_round, state):
        msgs = sorted(
            strategy.configure_train(
                server_round, state_to_record(state), config, Grid([1, 2, 3])
            ),
            key=lambda m: m.metadata.dst_node_id,
        )
        replies = []
        for msg in msgs:
            nid = msg.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": nid - 1, "num-partitions": 3},
                state=RecordDict(),
                run_config={},
            )
            reply = client_train(msg, context)
            reply.metadata.__dict__["_src_node_id"] = nid
            replies.append(reply)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        entry = strategy.round_log[server_round]
        assert entry["rejected"] == [] and entry["clients"] == 3
        assert sum(entry["bytes_down_by_rank"].values()) == entry["bytes_down"]
        sent = {
            m.metadata.dst_node_id: record_to_state(m.content[KEY_ARRAYS]) for m in msgs
        }
        return sent, record_to_state(arrays), entry["bytes_down_by_rank"]

    rng = np.random.default_rng(0)
    start = {  # as after some training: B no longer zero (entries ~1e-3)
        k: (v + rng.normal(size=v.shape) * 1e-3).astype(np.float32)
        for k, v in initial_state(build(cfg)[0]).items()
    }
    strategy = LoRAStrategy(from_settings(cfg), min_available_nodes=3)
    sent, state, down = train_round(strategy, 1, start)
    assert {n: rank_of(s) for n, s in sent.items()} == {1: big, 2: big, 3: big}
    assert set(down) == {"2", "3", "4"} and len(set(down.values())) == 1
    whole = copy.deepcopy(strategy)  # a server that sends everyone the global rank
    whole.holdings.ranks.clear()

    sent, cut, down = train_round(strategy, 2, state)
    cut_starts = {pid: starts[2, pid] for pid in range(3)}
    for nid, s in sent.items():
        r = rank[nid]
        for k, v in s.items():
            if ".lora_A." in k:
                np.testing.assert_array_equal(v, state[k][:r])  # unscaled
            elif ".lora_B." in k:
                np.testing.assert_array_equal(v, state[k][:, :r])
            else:
                np.testing.assert_array_equal(v, state[k])
        mine = cut_starts[nid - 1]  # the client's effective start delta
        for layer, (a, b) in lora_layers(state).items():
            got = (alpha / r) * mine[b].astype(float) @ mine[a].astype(float)
            want = (alpha / big) * state[b][:, :r].astype(float) @ state[a][:r]
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=1e-6 * abs(want).max(), err_msg=layer
            )
    assert down["2"] < down["3"] < down["4"]

    sent, full, full_down = train_round(whole, 2, state)
    assert {n: rank_of(s) for n, s in sent.items()} == {1: big, 2: big, 3: big}
    assert sum(down.values()) < sum(full_down.values())
    for pid in range(3):  # the same start, hence the same round
        for k, v in cut_starts[pid].items():
            np.testing.assert_array_equal(v, starts[2, pid][k])
    for k in full:
        np.testing.assert_allclose(cut[k], full[k], rtol=1e-6, atol=1e-9)

    # the evaluation goes at each node's rank too, and the client takes it
    evals = strategy.configure_evaluate(
        2, state_to_record(cut), config, Grid([1, 2, 3])
    )
    for msg in evals:
        nid = msg.metadata.dst_node_id
        assert rank_of(record_to_state(msg.content[KEY_ARRAYS])) == rank[nid]
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    low = next(m for m in evals if m.metadata.dst_node_id == 1)
    assert "eval_loss" in client_evaluate(low, context).content[KEY_METRICS]


def test_a_rolora_node_merges_the_changes_over_its_copy_of_the_global(settings):
    from strategies.wire import KEY_GLOBAL_SYNC, KEY_STATE_GLOBAL

    cfg = method_settings(settings, ROLORA)
    start = {k: v.copy() for k, v in _wire(cfg).items()}

    def sync(start_round, end_round):
        return {
            KEY_GLOBAL_SYNC: ConfigRecord(
                {KEY_BASE_FROM: start_round, KEY_BASE_TO: end_round}
            )
        }

    kept = node(0)
    odd = sent_up(client_train(message(cfg, start, 1, extra=sync(0, 1)), kept))
    changes = {**odd}  # the server's round-1 aggregate: B and the head changed
    reply = client_train(message(cfg, changes, 2, extra=sync(1, 2)), kept)
    assert {k for k in sent_up(reply) if "lora_" in k} == {
        k for k in start if ".lora_A." in k
    }
    held = record_to_state(kept.state[KEY_STATE_GLOBAL])
    assert set(held) == set(start)  # A from round 1's copy, B and head from round 2's
    for k in start:
        want = changes[k] if k in changes else start[k]
        np.testing.assert_array_equal(held[k], want)
    with pytest.raises(RuntimeError, match="start from round 2"):
        client_train(message(cfg, changes, 3, extra=sync(2, 3)), node(0))
