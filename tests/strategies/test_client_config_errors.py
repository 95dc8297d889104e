"""Clients' configuration errors through the real path (ClientApp replies -> the
real strategy): when they leave a round without enough usable updates, the run
stops at once with their message (:class:`ClientConfigError`), rather than
failing round after round; one node's own bad setting does not stop its peers."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, RecordDict

from fedlora.errors import ClientConfigError
from fedlora.methods.fedavg_lora import FedAvgLoRA
from strategies.strategy import LoRAStrategy
from strategies.wire import ERROR_CONFIG
from tests.fedlora.methods.test_methods import (  # noqa: F401 - fixtures
    client_frozen,
    edit_experiment,
    experiment,
    federated_round,
)

NO_COLUMN = "data.label_column='nope': the data has no such column; its columns are"


def without_label_column(*nodes):
    """A tamper for ``federated_round``: these nodes' data lack the label column
    (as a deployed node's own data could)."""

    def no_column(cfg):
        cfg["data"]["label_column"] = "nope"

    return edit_experiment(nodes, no_column)


def test_config_errors_in_every_client_stop_the_run_with_their_message(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811
):
    cfg = experiment(tiny_bert, "fedavg_lora", "federation.max_failed_rounds=3")
    with pytest.raises(ClientConfigError) as info:
        federated_round(cfg, client_frozen, without_label_column(1, 2, 3))
    message = str(info.value)
    assert message.startswith(NO_COLUMN)
    assert message.endswith("[reported by 3 of 3 clients in round 1; the run stopped]")
    assert "\n" not in message and message.count(NO_COLUMN) == 1  # one line
    assert info.value.server_round == 1 and len(info.value.reasons) == 3


def test_one_node_with_a_config_error_does_not_stop_its_peers(
    tiny_bert,
    task_identity,
    client_frozen,  # noqa: F811
):
    rnd = federated_round(
        experiment(tiny_bert, "fedavg_lora"), client_frozen, without_label_column(2)
    )
    assert rnd.new is not None  # aggregated from nodes 1 and 3
    log = rnd.strategy.round_log[1]
    assert log["clients"] == 2 and log["failures"] == 1
    (failure,) = log["failure_reasons"]
    assert failure["node"] == 2 and failure["reason"].startswith(NO_COLUMN)


def test_config_errors_in_every_evaluation_reply_stop_the_run(task_identity):
    strategy = LoRAStrategy(FedAvgLoRA(), min_available_nodes=1)
    replies = []
    for node, code in ((1, ERROR_CONFIG), (2, 2)):  # 2: Flower's "client raised"
        sent = Message(content=RecordDict(), dst_node_id=node, message_type="evaluate")
        replies.append(Message(Error(code=code, reason=f"bad {node}"), reply_to=sent))
    with pytest.raises(ClientConfigError, match=r"^bad 1 \[reported by 1 of 2 "):
        strategy.aggregate_evaluate(1, replies)
    assert strategy.aggregate_evaluate(1, replies[1:]) is None  # no config error
