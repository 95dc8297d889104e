"""SecAgg+ through the real strategy and the real ClientApp handlers.

A grid calls the real ClientApp (routing each message type to its handler) with a
Flower context per node, and keeps a deep copy of every reply the server receives
(the recording the privacy tests read). The reference is each client's own update,
as its train handler computed it before masking, averaged in float64."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Error, Message, RecordDict

from clients import client_app
from fedlora import secagg
from fedlora.adapters import get_frozen_state, get_state
from fedlora.build import build
from fedlora.errors import ConfigError
from fedlora.privacy import CLIENT_DIR_ENV
from fedlora.settings import Settings
from fedlora.validate import validate
from strategies.server_app import compose, settings
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_ARRAYS,
    KEY_EXPERIMENT,
    KEY_RUN_ID,
    KEY_SECAGG,
    record_to_state,
    state_to_record,
)
from tests.fedlora.methods.test_methods import node_context

pytestmark = pytest.mark.usefixtures("task_identity")
KEYS, SHARE, TRAIN, UNMASK = (
    "train.secagg_keys",
    "train.secagg_share",
    "train",
    "train.secagg_unmask",
)


class ClientGrid:
    """The real ClientApp behind a grid: node ``i`` holds partition ``i - 1``.
    ``lost`` is a set of ``(message type, node)``: that node sends nothing from
    that message on (it is gone). Every reply is recorded, deep-copied."""

    def __init__(self, num_nodes, lost=()):
        self.nodes = list(range(1, num_nodes + 1))
        self.contexts = {}
        self.lost = set(lost)
        self.gone = set()
        self.received = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if (msg.metadata.message_type, node) in self.lost:
                self.gone.add(node)
            if node in self.gone:
                continue
            context = self.contexts.setdefault(
                node, node_context(node, len(self.nodes))
            )
            try:
                reply = client_app.app(msg, context)
            except Exception as exc:  # Flower's runtime: an error reply
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.received.append(copy.deepcopy(reply))
            replies.append(reply)
        return replies


def experiment(model_dir, strategy, *extra, clients=4):
    return compose(
        [
            f"model.name={model_dir}",
            f"strategy={strategy}",
            "secure_aggregation=secaggplus",
            "adapter.r=4",
            f"federation.num_clients={clients}",
            "federation.min_train_clients=3",
            "data.num_examples=160",
            "partition.type=dirichlet",
            "partition.alpha=1.0",
            "partition.min_partition_size=10",
            "train.device=cpu",
            "train.lr=1e-2",
            "train.batch_size=16",
            "train.local_steps=2",
            *(["strategy.init=random_orthogonal"] if strategy == "fedsb" else []),
            *extra,
        ]
    )


class Run:
    """The real strategy on a :class:`ClientGrid`, round after round."""

    def __init__(self, cfg, grid):
        typed = validate(Settings.from_dict(settings(cfg)))
        self.config = ConfigRecord({KEY_EXPERIMENT: json.dumps(typed.to_dict())})
        self.grid = grid
        model, _ = build(typed)
        self.strategy = LoRAStrategy.from_settings(typed)
        self.arrays = self.strategy.initialize(
            grid,
            state_to_record(get_state(model)),
            get_frozen_state(model),
            self.config,
        )

    def round(self, server_round):
        sent = record_to_state(self.arrays)
        messages = self.strategy.configure_train(
            server_round, self.arrays, self.config, self.grid
        )
        replies = self.grid.send_and_receive(list(messages))
        new, _ = self.strategy.aggregate_train(server_round, replies)
        if new is not None:
            self.arrays = new
        entry = self.strategy.round_log[server_round]
        return sent, (None if new is None else record_to_state(new)), entry


def reference(sent, inputs, nodes, weighting):
    """``sent + sum p_k (x_k - sent)`` in float64 over ``nodes``."""
    n = np.array([inputs[u][1] for u in nodes])
    p = (
        n / n.sum()
        if weighting == "num_examples"
        else np.full(len(nodes), 1 / len(nodes))
    )
    return {
        k: sent[k].astype(np.float64)
        + sum(w * inputs[u][0][k] for w, u in zip(p, nodes, strict=True))
        for k in inputs[nodes[0]][0]
    }


def assert_within_bound(new, ref, entry):
    bound = entry["secagg_error_bound"]
    assert 0 < bound < 1e-5
    for k, v in ref.items():
        # the float64 mean, then the wire's float32 cast of the new state
        tol = bound + np.abs(v).max() * 2.0**-23
        assert np.abs(new[k] - v).max() <= tol, k
    assert entry["secagg_clipped"] == 0


@pytest.mark.parametrize("method", ["fedavg_lora", "ffa_lora", "fedsb"])
@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_secure_sum_equals_the_plain_weighted_aggregate(
    tiny_bert, client_inputs, method, weighting
):
    grid = ClientGrid(4)
    run = Run(experiment(tiny_bert, method, f"strategy.weighting={weighting}"), grid)
    sent, new, entry = run.round(1)
    assert sorted(client_inputs) == [1, 2, 3, 4]
    ref = reference(sent, client_inputs, [1, 2, 3, 4], weighting)
    assert_within_bound(new, ref, entry)
    assert entry["secure_aggregation"] is True and entry["clients"] == 4
    assert entry["aggregation_error"] is None
    assert "secure aggregation" in entry["aggregation_error_skipped"]
    # nothing computed from the data in plaintext: no example counts, no loss
    for reply in grid.received:
        metrics = reply.content.get("metrics", {})
        assert "num-examples" not in metrics and "train_loss" not in metrics
    # the masked upload is uint32 of the plain upload's shapes (its size)
    masked = [r for r in grid.received if r.metadata.message_type == TRAIN]
    for r in masked:
        for k, a in r.content[KEY_ARRAYS].items():
            assert a.dtype == "uint32" and tuple(a.shape) == sent[k].shape


@pytest.mark.parametrize("method", ["rolora", "fedsa_lora"])
def test_partial_upload_methods_sum_what_they_share(tiny_bert, client_inputs, method):
    """RoLoRA uploads one factor a round (B, then A); FedSA-LoRA only A (and the
    head), each client keeping its B. Over two rounds the secure sum is the plain
    weighted mean of what was uploaded; what was not is left as it was sent."""
    run = Run(experiment(tiny_bert, method), ClientGrid(4))
    uploaded = []
    for server_round in (1, 2):
        client_inputs.clear()
        sent, new, entry = run.round(server_round)
        assert sorted(client_inputs) == [1, 2, 3, 4]
        assert entry["secure_aggregation"] is True and entry["clients"] == 4
        ref = reference(sent, client_inputs, [1, 2, 3, 4], "num_examples")
        assert_within_bound(new, ref, entry)
        unshared = set(new) - set(ref)  # the frozen factor, FedSA-LoRA's B
        assert unshared
        for k in unshared:
            np.testing.assert_array_equal(new[k], sent[k], err_msg=k)
        uploaded.append({k.split(".lora_")[-1][0] for k in ref if ".lora_" in k})
    expected = [{"B"}, {"A"}] if method == "rolora" else [{"A"}, {"A"}]
    assert uploaded == expected


# --- what the server receives ---
def secrets_revealed(grid):
    """``{node: [shares of it]}`` the unmask replies carried."""
    out = {}
    for r in grid.received:
        if r.metadata.message_type == UNMASK and not r.has_error():
            config = r.content[KEY_SECAGG]
            of = secagg.unpack_ids(bytes(config["of"]))
            for v, s in zip(of, config.get("shares", []), strict=True):
                out.setdefault(v, []).append(bytes(s))
    return out


def mask_public_keys(grid, server_round_replies=None):
    return {
        r.metadata.src_node_id: bytes(r.content[KEY_SECAGG]["mask"])
        for r in (server_round_replies or grid.received)
        if r.metadata.message_type == KEYS and not r.has_error()
    }


def rebuilds_mask_key(shares, public):
    """Whether any ``shares`` combine to the private key of mask key ``public``."""
    try:
        key = secagg.combine_shares(shares)
    except secagg.ProtocolError:
        return False
    pub = X25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
    return pub == public


def test_no_live_clients_mask_key_can_be_rebuilt(tiny_bert, client_inputs):
    grid = ClientGrid(4, lost={(TRAIN, 3)})  # node 3 drops before its input
    run = Run(experiment(tiny_bert, "ffa_lora"), grid)
    _, new, entry = run.round(1)
    assert new is not None and entry["clients"] == 3
    revealed, public = secrets_revealed(grid), mask_public_keys(grid)
    for u in (1, 2, 4):  # alive: every share of it that reached the server
        assert not rebuilds_mask_key(revealed.get(u, []), public[u])
    assert rebuilds_mask_key(revealed[3], public[3])  # the dropout's, as it must


def test_a_masked_vector_alone_looks_uniform(tiny_bert, client_inputs):
    grid = ClientGrid(4)
    Run(experiment(tiny_bert, "fedavg_lora"), grid).round(1)
    for r in grid.received:
        if r.metadata.message_type != TRAIN:
            continue
        words = np.concatenate(
            [a.numpy().ravel() for a in r.content[KEY_ARRAYS].values()]
        )
        counts = np.bincount(words >> 28, minlength=16)
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert words.size > 1000 and chi2 < 45  # 15 dof, p ~ 1e-4


def test_masks_and_keys_are_fresh_every_round(tiny_bert, client_inputs, monkeypatch):
    masks = {}
    real = secagg.ClientSession.mask_vector

    def spy(self, size):
        out = real(self, size)
        masks.setdefault(self.node, []).append(out.copy())
        return out

    monkeypatch.setattr(secagg.ClientSession, "mask_vector", spy)
    grid = ClientGrid(3)
    run = Run(experiment(tiny_bert, "fedavg_lora", clients=3), grid)
    run.round(1)
    first = mask_public_keys(grid)
    grid.received.clear()
    run.round(2)
    second = mask_public_keys(grid)
    assert all(first[u] != second[u] for u in first)
    assert all(not np.array_equal(a, b) for a, b in masks.values())


# --- dropouts ---
@pytest.mark.parametrize("stage", [KEYS, SHARE, TRAIN, UNMASK])
def test_a_dropout_after_each_stage_leaves_the_survivors_sum(
    tiny_bert, client_inputs, stage
):
    grid = ClientGrid(4, lost={(stage, 2)})
    run = Run(experiment(tiny_bert, "fedavg_lora"), grid)
    sent, new, entry = run.round(1)
    # an input that arrived counts even if its node leaves before unmasking
    summed = [1, 2, 3, 4] if stage == UNMASK else [1, 3, 4]
    assert sorted(client_inputs) == ([1, 2, 3, 4] if stage == UNMASK else [1, 3, 4])
    assert new is not None and entry["clients"] == len(summed)
    assert_within_bound(
        new, reference(sent, client_inputs, summed, "num_examples"), entry
    )
    assert entry["failures"] == (0 if stage == UNMASK else 1)


def test_below_the_threshold_the_round_fails_cleanly(tiny_bert, client_inputs):
    grid = ClientGrid(4, lost={(TRAIN, 2), (TRAIN, 3)})  # 2 of 4: t = 3
    run = Run(experiment(tiny_bert, "fedavg_lora"), grid)
    before = record_to_state(run.arrays)
    _, new, entry = run.round(1)
    assert new is None and entry["clients"] == 0
    assert "threshold" in entry["secagg_failure"]
    assert run.strategy.failed_rounds == 1
    after = record_to_state(run.arrays)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_declined_client_is_a_dropout(tiny_bert, client_inputs, monkeypatch):
    real = client_app._train_dp  # noqa: F841 - the path a spent budget takes
    grid = ClientGrid(4)
    run = Run(experiment(tiny_bert, "fedavg_lora"), grid)

    def declined(msg, pid, info):
        return client_app.Message(
            RecordDict(
                {
                    "metrics": client_app.MetricRecord(
                        {"num-examples": 0, "declined": 1, "partition-id": pid}
                    ),
                    "config": ConfigRecord({"reason": "privacy budget"}),
                }
            ),
            reply_to=msg,
        )

    original = client_app.secagg.masked_reply

    def maybe_decline(msg, context, *args):
        if context.node_id == 4:
            return declined(msg, 3, {})
        return original(msg, context, *args)

    monkeypatch.setattr(client_app.secagg, "masked_reply", maybe_decline)
    sent, new, entry = run.round(1)
    assert new is not None and entry["clients"] == 3 and entry["declined"]
    assert_within_bound(
        new, reference(sent, client_inputs, [1, 2, 3], "num_examples"), entry
    )


# --- configuration ---
@pytest.mark.parametrize(
    "method", ["lora_fair", "flexlora", "hetlora", "flora", "fedex_lora"]
)
def test_methods_that_need_each_update_are_refused(tiny_bert, method):
    with pytest.raises(ConfigError, match="secure_aggregation"):
        experiment(tiny_bert, method)


def test_bad_secure_aggregation_settings_are_named(tiny_bert):
    with pytest.raises(ConfigError) as info:
        experiment(
            tiny_bert,
            "fedavg_lora",
            "secure_aggregation.threshold=0.4",
            "secure_aggregation.neighbours=3",
            "privacy=central",
        )
    text = str(info.value)
    for key in ("secure_aggregation.threshold", "secure_aggregation.neighbours"):
        assert key in text
    assert "privacy=distributed" in text


# --- what must never reach the server (review findings) ---
def test_a_split_masking_graph_fails_the_round_before_any_share_is_asked(
    tiny_bert, client_inputs, monkeypatch
):
    """Ring 1-2-3-4-5-6 with one neighbour a side; 2 and 5 drop after sharing: the
    survivors split into {3, 4} and {6, 1}, whose sums the revealed seeds would
    unmask one by one. The round fails before the unmasking stage."""
    from strategies import secagg as server_secagg

    class InOrder:  # the server's shuffle of the ring, made a sort
        def shuffle(self, order):
            order.sort()

    monkeypatch.setattr(server_secagg.secrets, "SystemRandom", InOrder)
    grid = ClientGrid(6, lost={(TRAIN, 2), (TRAIN, 5)})
    neighbours = "secure_aggregation.neighbours=2"
    cfg = experiment(tiny_bert, "fedavg_lora", neighbours, clients=6)
    run = Run(cfg, grid)
    _, new, entry = run.round(1)
    assert new is None and "split" in entry["secagg_failure"]
    assert not [r for r in grid.received if r.metadata.message_type == UNMASK]
    assert sorted(client_inputs) == [1, 3, 4, 6]  # their inputs had arrived


def test_under_dp_sgd_the_masked_replies_say_nothing_of_the_example_counts(
    tiny_bert, client_inputs, tmp_path, monkeypatch
):
    """DP-SGD's delta (0.1 / examples by default) and noise multiplier (calibrated
    to batch / examples) would give each client's example count away: the masked
    replies carry neither."""
    monkeypatch.setenv(CLIENT_DIR_ENV, str(tmp_path))  # the clients' ledgers
    grid = ClientGrid(4)
    run = Run(experiment(tiny_bert, "fedavg_lora", "privacy=dp_sgd"), grid)
    run.config[KEY_RUN_ID] = "secagg-dp"
    run.round(1)
    masked = [r for r in grid.received if r.metadata.message_type == TRAIN]
    assert len(masked) == 4
    for reply in masked:
        metrics = dict(reply.content["metrics"])
        assert "epsilon" in metrics
        assert not {"delta", "noise_multiplier", "num-examples"} & set(metrics)


def test_an_update_that_fails_its_clients_check_is_not_described(
    tiny_bert, client_inputs
):
    """An update above ``max_update_norm`` is not sent, and the error the server
    gets names the check, not the update's norm."""
    grid = ClientGrid(4)
    tiny = "secure_aggregation.max_update_norm=1e-9"
    cfg = experiment(tiny_bert, "fedavg_lora", tiny)
    run = Run(cfg, grid)
    _, new, _ = run.round(1)
    assert new is None
    errors = [r for r in grid.received if r.has_error()]
    assert len(errors) == 4
    for reply in errors:
        assert "failed the client's own check" in reply.error.reason
        assert "L2 norm" not in reply.error.reason
