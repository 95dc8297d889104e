"""A ConfigError inside the ClientApp becomes an error reply carrying its message
(code ``ERROR_CONFIG``), not a traceback per client; other errors still raise."""

from __future__ import annotations

import pytest

from clients.client_app import evaluate as client_evaluate
from clients.client_app import train as client_train
from fedlora.adapters import get_state
from fedlora.build import build
from fedlora.settings import with_
from strategies.wire import ERROR_CONFIG
from tests.clients.test_node_state import message, node

pytestmark = pytest.mark.usefixtures("task_identity")
NO_COLUMN = "data.label_column='nope': the data has no such column; its columns are"


def test_a_config_error_in_a_client_is_replied_with_its_message(settings):
    cfg = with_(settings, "data.label_column", "nope")  # this node's data lacks it
    state = get_state(build(settings)[0])
    for handler, kind in ((client_train, "train"), (client_evaluate, "evaluate")):
        reply = handler(message(cfg, state, kind=kind), node(0))
        assert reply.has_error() and reply.error.code == ERROR_CONFIG
        assert reply.error.reason.startswith(NO_COLUMN)


def test_other_client_errors_still_raise(settings):
    cfg = with_(settings, "faults", {"raise_partition": 0})
    with pytest.raises(RuntimeError, match="injected fault: partition 0"):
        client_train(message(cfg, get_state(build(settings)[0])), node(0))
