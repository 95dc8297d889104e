"""The server rejects an update whose frozen factors are not its own: FFA-LoRA's and
Fed-SB's exactness rests on every client using the server's ``A`` (and ``B``)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from clients import client_app
from fedlora import adapters
from fedlora.adapters import frozen_digest, get_frozen_state
from fedlora.build import build
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.ffa_lora import FFALoRA
from fedlora.settings import with_
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_FROZEN,
    record_to_state,
    state_to_record,
)
from tests.conftest import FFA_LORA, exchange
from tests.fedlora.methods.test_methods import (  # noqa: F401 - fixtures
    client_frozen,
    dense_check,
    edit_experiment,
    experiment,
    federated_round,
)

SHAPES = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (5, 2), "head.weight": (2, 6)}
A_SHAPE = SHAPES["l.lora_A.weight"]


def state(seed, with_a=True):
    """A wire state; FFA-LoRA's (``with_a=False``) carries no A."""
    rng = np.random.default_rng(seed)
    out = {k: rng.standard_normal(v).astype(np.float32) for k, v in SHAPES.items()}
    return out if with_a else {k: v for k, v in out.items() if ".lora_A." not in k}


# --- one digest, on both sides -----------------------------------------------------
def test_server_and_client_compute_the_same_digest(settings):
    assert client_app.frozen_digest is adapters.frozen_digest  # one function
    model, _ = build(with_(settings, "strategy", {"_target_": FFA_LORA}))
    frozen = get_frozen_state(model)
    assert frozen and all(".lora_A." in k for k in frozen)
    digest = frozen_digest(model)
    assert digest == frozen_digest(frozen)  # the model's, or its state dict's
    # what the server holds may be float64 or come back from the wire: same digest
    assert digest == frozen_digest({k: v.astype(np.float64) for k, v in frozen.items()})
    assert digest == frozen_digest(record_to_state(state_to_record(frozen)))
    key = sorted(frozen)[0]
    nudged = dict(frozen, **{key: np.nextafter(frozen[key], np.inf)})
    assert frozen_digest(nudged) != digest  # one ulp anywhere changes it
    renamed = {f"x.{k}": v for k, v in frozen.items()}
    assert frozen_digest(renamed) != digest
    assert frozen_digest({}) == 0


# --- the strategy's check, on crafted replies --------------------------------------
def reply(seed, crc, with_a=True, n=10):
    metrics = {"num-examples": n, "partition-id": seed}
    if crc is not None:
        metrics["frozen-crc"] = crc
    return RecordDict(
        {
            "arrays": state_to_record(state(seed, with_a)),
            "metrics": MetricRecord(metrics),
        }
    )


@pytest.fixture
def ffa(task_identity):  # noqa: F811 - the fixture imported above
    strategy = LoRAStrategy(FFALoRA(), min_available_nodes=1)
    strategy.frozen = {"l.lora_A.weight": np.full(A_SHAPE, 0.5, np.float32)}
    return strategy


def test_an_update_with_other_frozen_factors_is_rejected(ffa):
    ours = frozen_digest(ffa.frozen)
    other = frozen_digest({"l.lora_A.weight": np.full(A_SHAPE, 0.25, np.float32)})
    replies = [reply(0, ours, False), reply(1, other, False), reply(2, None, False)]
    arrays, _ = ffa.aggregate_train(1, exchange(ffa, state(9, False), replies))
    rejected = ffa.round_log[1]["rejected"]
    assert [r["node"] for r in rejected] == [2, 3]
    assert rejected[0]["reason"] == (
        f"frozen factors differ from the server's (crc {other} != {ours})"
    )
    assert rejected[1]["reason"].startswith("no frozen-crc in the reply")
    assert f"(crc {ours})" in rejected[1]["reason"]
    assert ffa.round_log[1]["clients"] == 1
    new = record_to_state(arrays)
    assert new.keys() == state(0, False).keys()
    assert all(np.array_equal(new[k], state(0)[k]) for k in new)  # only node 1's


def test_methods_without_frozen_factors_skip_the_check(task_identity):  # noqa: F811
    strategy = LoRAStrategy(FedAvgLoRA(), min_available_nodes=1)
    assert strategy.frozen == {}
    strategy.aggregate_train(
        1, exchange(strategy, state(9), [reply(0, None), reply(1, 12345)])
    )
    assert strategy.round_log[1]["rejected"] == []
    assert strategy.round_log[1]["clients"] == 2


# --- real clients whose frozen factors are not the server's ------------------------
def aggregated(rnd):
    """Indices into ``rnd.replies`` of the updates the strategy aggregated."""
    used = {
        c["partition-id"]
        for c in rnd.strategy.round_log[rnd.server_round]["client_replies"]
    }
    return [
        i
        for i, m in enumerate(rnd.replies)
        if m.content["metrics"]["partition-id"] in used
    ]


def test_an_ffa_client_with_another_a_is_rejected_and_the_rest_stays_exact(
    tiny_bert,
    task_identity,  # noqa: F811
    client_frozen,  # noqa: F811
):
    """Node 3 builds its model from another seed, so its A is not the server's."""

    def other_seed(cfg):
        cfg["federation"]["seed"] += 1

    rnd = federated_round(
        experiment(tiny_bert, "ffa_lora"),
        client_frozen,
        edit_experiment({3}, other_seed),
    )
    # exact over the updates the server aggregated, each with its client's own A
    assert dense_check(rnd, aggregated(rnd)).error < 1e-5
    assert len(aggregated(rnd)) == 2
    rogue = [m.metadata.src_node_id for m in rnd.replies].index(3)
    ours = frozen_digest(rnd.strategy.frozen)
    theirs = frozen_digest(rnd.client_frozen[rogue])
    assert theirs != ours and rogue not in aggregated(rnd)
    reason = f"frozen factors differ from the server's (crc {theirs} != {ours})"
    assert rnd.strategy.round_log[1]["rejected"] == [{"node": 3, "reason": reason}]


def test_a_fedsb_node_with_other_factors_is_rejected_and_gets_them_again(
    tiny_bert,
    task_identity,  # noqa: F811
    client_frozen,  # noqa: F811
):
    """Node 2 receives a corrupted copy of B (e.g. stale factors it kept)."""

    def corrupted(node, msg):
        if node != 2:
            return msg
        frozen = record_to_state(msg.content[KEY_FROZEN])
        key = sorted(k for k in frozen if ".lora_B." in k)[0]
        frozen[key] = frozen[key] + np.float32(1e-3)
        return Message(
            content=RecordDict(
                {**dict(msg.content.items()), KEY_FROZEN: state_to_record(frozen)}
            ),
            message_type=msg.metadata.message_type,
            dst_node_id=node,
        )

    cfg = experiment(tiny_bert, "fedsb", "strategy.init=random_orthogonal")
    first = federated_round(cfg, client_frozen, corrupted)
    assert dense_check(first, aggregated(first)).error < 1e-5
    strategy = first.strategy
    rejected = strategy.round_log[1]["rejected"]
    assert [r["node"] for r in rejected] == [2]
    assert rejected[0]["reason"].startswith("frozen factors differ from the server's")
    # round 2: only node 2 is sent B and A again, and now it is accepted
    second = federated_round(cfg, client_frozen, previous=first)
    with_frozen = {
        m.metadata.dst_node_id for m in second.messages if KEY_FROZEN in m.content
    }
    assert with_frozen == {2}
    assert strategy.round_log[2]["rejected"] == []
    assert dense_check(second).error < 1e-5
