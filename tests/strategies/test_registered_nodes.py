"""The server holds nothing per registered client that it need not: what the
strategy keeps after a few rounds is the same with 4 or 400 registered nodes when
the same number is sampled, and a round's log is dropped once its metrics row is
written (issue 19: 1,000 clients with bounded server memory)."""

from __future__ import annotations

import pickle

import pytest

from tests.fedlora.methods.test_methods import (  # noqa: F401 - the fixture
    client_frozen,
    experiment,
    federated_round,
)

SAMPLED = 2


def held_bytes(tiny_bert, client_frozen, method, registered):  # noqa: F811
    """The pickled size of the whole strategy after 2 rounds of ``registered``
    nodes, ``SAMPLED`` of them trained a round (the same data set)."""
    cfg = experiment(
        tiny_bert,
        method,
        f"federation.num_clients={registered}",
        f"federation.fraction_train={SAMPLED / registered}",
        f"federation.min_train_clients={SAMPLED}",
        "data.num_examples=1600",
        "partition.type=iid",
        *(["strategy.init=random_orthogonal"] if method == "fedsb" else []),
    )
    first = federated_round(cfg, client_frozen)
    second = federated_round(cfg, client_frozen, previous=first)
    assert second.strategy.round_log[2]["clients"] == SAMPLED
    return len(pickle.dumps(second.strategy))


# Fed-SB keeps which nodes hold its frozen factors, FedEx-LoRA which folds each
# node holds, RoLoRA the global state each node last received
@pytest.mark.parametrize("method", ["fedavg_lora", "fedsb", "fedex_lora", "rolora"])
def test_the_server_state_does_not_grow_with_registered_but_unsampled_nodes(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811 - the fixture
    method,
):
    few = held_bytes(tiny_bert, client_frozen, method, 4)
    many = held_bytes(tiny_bert, client_frozen, method, 400)
    # node ids above 255 take a byte more each; one int per unsampled node
    # would add at least 2 bytes x 398
    assert abs(many - few) < 200, (few, many)


def test_the_server_drops_each_rounds_log_once_its_metrics_row_is_written(
    tiny_bert, tmp_path, task_identity, monkeypatch
):
    """The ServerApp on the real ClientApp: after 2 rounds the strategy keeps no
    round's log (its clients' replies, failures...), and the metrics rows have it."""
    from fedlora import results
    from strategies.server_app import compose, run_server
    from strategies.strategy import LoRAStrategy
    from tests.strategies.test_secagg import ClientGrid

    made = []
    real = LoRAStrategy.from_settings

    def spy(settings):
        made.append(real(settings))
        return made[-1]

    monkeypatch.setattr(LoRAStrategy, "from_settings", spy)
    cfg = compose(
        [
            f"model.name={tiny_bert}",
            "federation.num_clients=3",
            "federation.fraction_train=0.5",
            f"federation.min_train_clients={SAMPLED}",
            "federation.fraction_evaluate=0",
            "federation.rounds=2",
            "data.num_examples=120",
            "train.device=cpu",
            "train.local_steps=1",
            "quiet=true",
        ]
    )
    run_server(ClientGrid(3), cfg, tmp_path / "run")
    assert made[0].round_log == {}
    rows = results.read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == SAMPLED and len(row["client_replies"]) == SAMPLED
        assert row["bytes_up"] > 0
