"""The console: one line per round with the time left, the summary table, and the
libraries' known chatter hushed narrowly (other warnings still shown)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from fedlora.console import Progress, _DropKnown, hush_libraries, summary_table
from fedlora.errors import ConfigError
from fedlora.validate import validate
from strategies.server_app import compose, settings


def row(rnd, wall, **extra):
    out = {
        "round": rnd,
        "wall_time": wall,
        "eval_accuracy": 0.5 + rnd / 10,
        "eval_loss": 0.7 - rnd / 10,
        "bytes_up": 0 if rnd == 0 else 2_000_000,
        "bytes_down": 0 if rnd == 0 else 1_000_000,
        "clients": 0 if rnd == 0 else 3,
        "failures": 0,
        "aggregation_error": None if rnd == 0 else 3.2e-8,
    }
    return {**out, **extra}


def test_a_line_per_round_with_megabytes_so_far_and_the_time_left():
    out = io.StringIO()
    progress = Progress(rounds=4, stream=out)
    progress(row(0, 40.0))  # start-up: no estimate from round 0
    progress(row(1, 50.0, clients_sampled=3))
    progress(row(2, 70.0, clients_sampled=4, clients=3, failures=1))
    progress(row(4, 100.0))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[fedlora] round 0/4: acc 0.5000, loss 0.7000 | 0.00 MB | 40s"
    # rounds 1-2 took 30 s after round 0: 15 s a round, 2 rounds left
    assert lines[1] == (
        "[fedlora] round 1/4: clients 3/3 ok | acc 0.6000, loss 0.6000 "
        "| agg_error 3.2e-08 | 3.00 MB | 50s (ETA 30s)"
    )
    assert lines[2].startswith("[fedlora] round 2/4: clients 3/4 ok, 1 failed |")
    assert lines[2].endswith("| 6.00 MB | 1m10s (ETA 30s)")
    assert lines[3].endswith("| 9.00 MB | 1m40s")  # the last round: no estimate
    resumed = Progress(rounds=6)  # a run resumed after round 2: its own pace
    resumed.line(row(2, 100.0))
    assert resumed.line(row(3, 110.0)).endswith("(ETA 30s)")


def test_quiet_prints_nothing_and_perplexity_stands_for_accuracy(capsys):
    progress = Progress(rounds=2, quiet=True)
    progress(row(0, 1.0))
    lm = {k: v for k, v in row(1, 2.0).items() if k != "eval_accuracy"}
    assert "ppl 3.250" in progress.line({**lm, "eval_perplexity": 3.25})
    assert capsys.readouterr().out == ""


def test_the_summary_table_names_the_figures_and_the_run_directory():
    summary = {
        "strategy": "fedavg_lora",
        "rounds": 3,
        "final_eval_accuracy": 0.8912,
        "best_eval_accuracy": 0.9,
        "total_bytes_up": 2_500_000,
        "total_bytes_down": 1_250_000,
        "mean_aggregation_error": 0.0123,
        "failures": 0,
        "epsilon_max": 2.5,
        "wall_time": 61.2,
    }
    lines = summary_table(summary, "/runs/x").splitlines()
    table = {line[:28].strip(): line[28:].strip() for line in lines}
    assert table == {
        "method": "fedavg_lora",
        "rounds": "3",
        "final accuracy": "0.8912",
        "best accuracy": "0.9000",
        "mean aggregation error": "0.0123",
        "traffic": "2.50 MB up, 1.25 MB down",
        "epsilon (max over clients)": "2.500",
        "wall time": "61 s",
        "run directory": "/runs/x",
    }


def test_client_level_epsilon_shows_in_the_line_and_the_table():
    line = Progress(rounds=2).line(row(1, 5.0, distributed_epsilon=1.234))
    assert "| distributed eps 1.23 |" in line
    table = summary_table({"distributed_epsilon": 1.5, "central_epsilon": 0.5}, "/x")
    assert "client-level epsilon (distributed)  1.500" in table
    assert "central epsilon" in table


@pytest.fixture
def restored_logging():
    """Undo what :func:`hush_libraries` sets (warning filters, logger levels)."""
    flwr = logging.getLogger("flwr")
    level, filters = flwr.level, list(flwr.filters)
    # start clean: a client set up earlier in this process hushed it already
    flwr.filters[:] = [f for f in filters if not isinstance(f, _DropKnown)]
    with warnings.catch_warnings():
        yield flwr
    flwr.setLevel(level)
    flwr.filters[:] = filters


def test_only_the_known_chatter_is_hushed(restored_logging, caplog):
    hush_libraries(verbose=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        hush_libraries(verbose=False)  # its filters go first again
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    flwr = restored_logging
    with caplog.at_level(logging.INFO, logger="flwr"):
        flwr.setLevel(logging.WARNING)  # caplog lowered it; the hush sets WARNING
        flwr.warning("DEPRECATED FEATURE: The `run_simulation` function is gone")
        flwr.warning("a node failed")
        flwr.info("[ROUND 1/3]")
    assert [r.getMessage() for r in caplog.records] == ["a node failed"]


def test_verbose_hushes_nothing(restored_logging):
    restored_logging.setLevel(logging.INFO)
    hush_libraries(verbose=True)
    assert restored_logging.level == logging.INFO and not restored_logging.filters


def test_quiet_and_verbose_together_are_refused():
    with pytest.raises(ConfigError, match="verbose") as err:
        validate(settings(compose(["quiet=true", "verbose=true"])))
    assert "choose one" in str(err.value)


@pytest.mark.parametrize("value", [0, -5, "soon", True])
def test_a_round_timeout_that_is_not_a_positive_number_is_refused(value):
    plain = settings(compose([]))
    plain["federation"]["round_timeout"] = value
    with pytest.raises(ConfigError, match="federation.round_timeout"):
        validate(plain)
