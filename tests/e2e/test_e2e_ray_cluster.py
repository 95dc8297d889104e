"""The simulation on a Ray cluster that is already running (``simulation.ray_address``):
a real head started by the test with ``ray start --head``, the run attached to it
through the front door, and the cluster still serving after the run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import processes_in_group, run_front_door

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_up(address: str) -> bool:
    """``ray status`` against ``address`` succeeds (the cluster serves)."""
    proc = subprocess.run(
        [RAY, "status", "--address", address], capture_output=True, text=True
    )
    return proc.returncode == 0 and "node_" in proc.stdout


@pytest.fixture
def ray_head():
    """A Ray head of 2 CPUs in its own process group; its address. Stopped, and
    checked gone, at the end."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
    )
    try:
        deadline = time.monotonic() + 180
        while not cluster_up(address):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield address, head
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while processes_in_group(head.pid) and time.monotonic() < deadline:
            time.sleep(1)
        left = processes_in_group(head.pid)
        for _ in left:
            os.killpg(head.pid, signal.SIGKILL)
        assert not left, left


def test_a_run_attaches_to_a_running_cluster_and_leaves_it_running(
    tiny_bert, ray_head, tmp_path
):
    address, head = ray_head
    rows = run_front_door(
        tmp_path / "run", tiny_bert, f"simulation.ray_address={address}"
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in rows[1:])
    # the run detached only: the cluster, its head process included, still serves
    assert head.poll() is None
    assert cluster_up(address)
