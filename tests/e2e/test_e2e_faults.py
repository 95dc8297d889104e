"""End to end with injected faults: the federation carries on and records them."""

from __future__ import annotations

import pytest

from tests.conftest import run_front_door

pytestmark = pytest.mark.slow


def test_a_client_raising_every_other_round_does_not_stop_the_run(tiny_bert, tmp_path):
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        "federation.rounds=4",
        "+faults.raise_partition=1",  # test-only keys: not in conf/config.yaml
        "+faults.raise_every=2",
    )
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows[1:]:
        faulty_round = r["round"] % 2 == 0
        assert r["failures"] == (1 if faulty_round else 0)
        assert r["clients"] == (2 if faulty_round else 3)
        if faulty_round:
            (failure,) = r["failure_reasons"]
            assert "injected fault: partition 1" in failure["reason"]
            assert failure["node"] is not None and failure["time"] > 0
            pids = sorted(c["partition-id"] for c in r["client_replies"])
            assert pids == [0, 2]
