"""End to end: a configuration error ends ``python -m experiments.run`` at once, with
one line and exit status 2, no traceback, found before the run where the front door
can (the data), else reported by the clients in the first round."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora import checkpoint
from tests.conftest import front_door_command, run_in_group

pytestmark = pytest.mark.slow
ERROR = "[fedlora] configuration error: "


def failing_run(out: Path, model: Path, *overrides: str) -> tuple[str, str]:
    """Run the front door, which must fail with exit status 2, with no traceback,
    and leave no process behind; return its stdout and stderr."""
    code, stdout, stderr = run_in_group(
        front_door_command(out, model, *overrides), timeout=600
    )
    assert code == 2, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    return stdout, stderr


def test_a_config_error_in_every_client_ends_the_run_in_round_one(tiny_bert, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = failing_run(
        out, tiny_bert, "federation.rounds=5", "+faults.config_error_round=1"
    )
    injected = (
        "faults.config_error_round=1: an injected configuration error (a drill); "
        "drop +faults.*"
    )
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert errors == [
        f"{ERROR}{injected} [reported by 3 of 3 clients in round 1; the run stopped]"
    ]
    # besides it, only the round's one failure line (3 nodes, one reason)
    assert (stdout + stderr).count(injected) == 2
    assert "[fedlora] round 0/5" in stdout and "[fedlora] round 1/" not in stdout
    # the run directory holds what was complete: round 0's row and checkpoint
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"round": 0' in rows[0]
    assert checkpoint.load_latest(out).round == 0
    assert not (out / "summary.json").exists()


def test_more_clients_than_examples_ends_before_the_simulation_starts(
    tiny_bert, tmp_path
):
    out = tmp_path / "run"
    stdout, stderr = failing_run(out, tiny_bert, "federation.num_clients=5000")
    assert stderr.strip().splitlines() == [
        f"{ERROR}federation.num_clients=5000: need between 1 and 240 clients (the "
        "number of training examples); lower it or use more data"
    ]
    assert "run directory" not in stdout and not (out / "metrics.jsonl").exists()
