"""The simulation on a Ray cluster that is already running: a real head started by
the test (``ray start --head``), a run attached to it through the front door
(``simulation.ray_address``), the clients' environment reaching the cluster's
workers, and the cluster still serving after the run; and a Hydra sweep whose runs
share one head the front door starts and stops."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from experiments.ray_head import RayHead, cluster_up
from tests.conftest import (
    front_door_command,
    processes_in_group,
    run_front_door,
    run_in_group,
)

pytestmark = pytest.mark.slow


def drivers(temp: Path) -> set[Path]:
    """A log per driver (a run's process) that joined the cluster in ``temp``."""
    return set(temp.glob("session_*/logs/python-core-driver-*"))


@pytest.fixture
def ray_head():
    """A Ray head of 2 CPUs in its own process group; stopped, and checked gone,
    at the end."""
    head = RayHead(num_cpus=2)
    try:
        head.start()
        yield head
    finally:
        head.stop()
        assert not processes_in_group(head.proc.pid)


def test_a_run_attaches_to_a_running_cluster_and_leaves_it_running(
    tiny_bert, ray_head, tmp_path
):
    before = drivers(ray_head.temp_dir)
    clients = tmp_path / "clients"
    rows = run_front_door(
        tmp_path / "run",
        tiny_bert,
        f"simulation.ray_address={ray_head.address}",
        "strategy=fedsa_lora",  # its nodes keep B under simulation.client_dir
        f"simulation.client_dir={clients}",
    )
    assert drivers(ray_head.temp_dir) - before, "the run did not join the cluster"
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in rows[1:])
    # the cluster's workers got the clients' environment (their own folder)
    assert sorted(p.name for p in (clients / "node-state").iterdir())
    # the run detached only: the cluster, its head process included, still serves
    assert ray_head.alive() and cluster_up(ray_head.address)


def test_a_sweep_starts_one_ray_head_for_all_its_runs(tiny_bert, tmp_path):
    drop = ("federation.rounds", "hydra.run.dir")
    cmd = front_door_command(tmp_path / "unused", tiny_bert, drop=drop)
    cmd.insert(cmd.index("experiments.run") + 1, "-m")  # Hydra's flags first
    cmd += [
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "federation.seed=0,1",
        "federation.rounds=1",
        "simulation.ray_num_cpus=2",
    ]
    code, stdout, stderr = run_in_group(cmd)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.count("[fedlora] sweep: one Ray head for all runs at") == 1, stdout
    assert stdout.count("[fedlora] done") == 2
    runs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(runs) == 2
    # the head (its own process group) and every worker are gone with the sweep
    port = stdout.split("one Ray head for all runs at ")[1].split()[0].rsplit(":")[1]
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True)
    assert not [line for line in ps.stdout.splitlines() if port in line]
