"""A round waits for its nodes at most ``federation.wait_timeout`` seconds: then the
run stops with an error naming the key and the fix, its checkpoints kept, instead
of waiting for ever as Flower's own sampling does."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedlora import checkpoint
from fedlora.errors import NodesUnavailableError
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.fedsb import FedSB
from strategies.nodes import wait_for_nodes
from strategies.strategy import LoRAStrategy
from strategies.wire import state_to_record
from tests.conftest import BASE_OVERRIDES, Grid


class Clock:
    """A fake clock: ``sleep`` moves it on (and records the pause)."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Returning(Grid):
    """``nodes`` connected, and ``late`` too from ``at`` seconds on (fake clock)."""

    def __init__(self, nodes: list[int], late: list[int], at: float, clock: Clock):
        super().__init__(nodes)
        self.late, self.at, self.clock = late, at, clock

    def get_node_ids(self) -> list[int]:
        return self.nodes + (self.late if self.clock() >= self.at else [])


def wait(grid: Grid, needed: int, timeout: float | None, clock: Clock) -> list[int]:
    return wait_for_nodes(
        grid, needed, timeout, what="round 4", clock=clock, sleep=clock.sleep
    )


def test_enough_nodes_go_on_at_once():
    clock = Clock()
    assert wait(Grid([11, 12]), 2, 60, clock) == [11, 12]
    assert clock.slept == []


def test_a_node_back_before_the_deadline_is_waited_for():
    clock = Clock()
    grid = Returning([11, 12], [13], at=5.0, clock=clock)
    assert wait(grid, 3, 60, clock) == [11, 12, 13]
    assert clock.now == 5.0  # counted again every second


def test_too_few_nodes_past_the_deadline_stop_the_run_naming_the_key():
    clock = Clock()
    grid = Returning([11], [12, 13], at=31.0, clock=clock)  # back too late
    with pytest.raises(NodesUnavailableError) as info:
        wait(grid, 3, 30, clock)
    assert clock.now == 30.0  # not a second longer
    message = str(info.value)
    for part in (
        "round 4: 1 of the 3 nodes it needs were connected for 30 s",
        "federation.wait_timeout=30;",
        "lower federation.min_available_clients",
        "null: wait as long as it takes",
    ):
        assert part in message


def test_null_waits_as_long_as_it_takes():
    clock = Clock()
    grid = Returning([11], [12], at=1e6, clock=clock)
    assert wait(grid, 2, None, clock) == [11, 12]
    assert clock.now == 1e6


@pytest.fixture
def flower_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own wait (``sample_nodes`` sleeps a second between counts, for
    ever) fails the test instead of hanging it."""

    def sleep(seconds: float) -> None:
        raise AssertionError("Flower's sample_nodes waited for nodes")

    monkeypatch.setattr("flwr.serverapp.strategy.strategy_utils.sleep", sleep)


GLOBAL = state_to_record({"l.lora_A.weight": np.ones((2, 4), np.float32)})


def strategy(available: int = 3, sampled: int = 2, **kwargs) -> LoRAStrategy:
    return LoRAStrategy(
        FedAvgLoRA(),
        min_available_nodes=available,
        min_train_nodes=sampled,
        min_evaluate_nodes=sampled,
        **kwargs,
    )


def test_a_round_without_its_nodes_stops_after_the_deadline(
    task_identity, flower_never_waits
):
    s = strategy(wait_timeout=0.2)
    s.round_offset = 2  # a resumed run: the message names the real round
    with pytest.raises(NodesUnavailableError, match=r"^round 3: 2 of the 3 nodes"):
        s.configure_train(1, GLOBAL, ConfigRecord(), Grid([11, 12]))


def test_an_evaluation_without_its_nodes_is_skipped_keeping_the_round(
    task_identity, flower_never_waits
):
    """Federated evaluation never changes the global adapter: past the deadline
    the round goes on without it (and is checkpointed), and says so in its row."""
    s = strategy(wait_timeout=0.2)
    assert s.configure_evaluate(1, GLOBAL, ConfigRecord(), Grid([11, 12])) == []
    assert s.round_log[1]["eval_skipped"] == (
        "2 of the 3 nodes it needs were connected at federation.wait_timeout=0.2 s"
    )
    messages = s.configure_evaluate(2, GLOBAL, ConfigRecord(), Grid([11, 12, 13]))
    assert len(messages) == 3 and "eval_skipped" not in s.round_log.get(2, {})


@pytest.mark.parametrize(
    "available,sampled,fix",
    [
        (3, 2, "lower federation.min_available_clients (rounds"),
        (1, 3, "lower federation.min_train_clients (rounds"),
        (3, 3, "lower federation.min_available_clients and "),
    ],
)
def test_the_error_names_the_settings_that_ask_for_the_nodes(
    task_identity, flower_never_waits, available, sampled, fix
):
    s = strategy(available, sampled, wait_timeout=0.1)
    with pytest.raises(NodesUnavailableError, match=re.escape(fix)):
        s.configure_train(1, GLOBAL, ConfigRecord(), Grid([11]))


def test_fedsbs_init_round_waits_with_the_deadline_too(flower_never_waits):
    s = LoRAStrategy(FedSB(init="federated_gradient"), wait_timeout=0.1)
    s.min_available_nodes = 1
    with pytest.raises(NodesUnavailableError) as info:
        s._gradient_round(Grid([]), ConfigRecord(), 4)
    assert str(info.value).startswith("fedsb init round: 0 of the 1 nodes")
    assert "lower federation.min_available_clients (rounds" in str(info.value)


def test_a_round_samples_the_nodes_its_wait_found(task_identity, flower_never_waits):
    """Flower counts the nodes again when it samples; a node that dropped out
    right after the wait must not make it wait (for ever) after all."""

    class Dropping(Grid):  # 3 nodes at the first count, 2 afterwards
        def get_node_ids(self) -> list[int]:
            nodes, self.nodes = self.nodes, self.nodes[:2]
            return nodes

    s = strategy(wait_timeout=0.2)
    messages = s.configure_train(1, GLOBAL, ConfigRecord(), Dropping([11, 12, 13]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]


def test_the_run_stops_with_its_checkpoint_and_says_how_to_resume(tiny_bert, tmp_path):
    """The ServerApp on a grid with 1 of its 2 nodes: round 0 is evaluated and
    checkpointed, round 1 never gets its nodes, and the error says where the
    checkpoint is and how to go on from it."""
    from strategies.server_app import compose, run_server

    cfg = compose(
        [*BASE_OVERRIDES, f"model.name={tiny_bert}", "federation.wait_timeout=0.5"]
    )
    run_dir = tmp_path / "run"

    class OneNode(Grid):
        def send_and_receive(self, messages, timeout):
            raise AssertionError(f"round 1 went on with {list(messages)}")

    with pytest.raises(NodesUnavailableError) as info:
        run_server(OneNode([11]), cfg, run_dir)
    ckpt = checkpoint.load_latest(run_dir)
    assert ckpt is not None and ckpt.round == 0
    message = str(info.value)
    assert message.startswith("round 1: 1 of the 2 nodes it needs")
    assert f"The last checkpoint is {ckpt.path};" in message
    assert f"resume={run_dir}" in message
