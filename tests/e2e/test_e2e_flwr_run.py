"""End to end: ``flwr run . local`` (Flower's own CLI, a local simulation SuperLink)
runs the front door's experiment: the same rounds and the same final adapter, bit for
bit; pyproject.toml is left as it was and no Flower/Ray process outlives the test."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from deploy.launch import BIN, ENV
from experiments.flwr_home import stop_local
from fedlora.ports import free_ports
from tests.conftest import REPO, front_door_command, run_front_door
from tests.deploy.test_deploy import leftovers

pytestmark = pytest.mark.slow

CLIENTS = ("federation.num_clients=2",)


def test_flwr_run_local_runs_the_front_doors_experiment(tiny_bert, tmp_path):
    home = tmp_path / "flwr-home"
    http_port, control_port = free_ports(2)  # not Flower's fixed 39091/39093
    env = {
        **os.environ,
        **ENV,
        "HF_HUB_OFFLINE": "1",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    }
    # the front door's overrides, less its own (run directory, Ray resources)
    command = front_door_command(tmp_path / "unused", tiny_bert, *CLIENTS)
    last = {a.partition("=")[0]: a for a in command[3:]}  # a later value wins
    overrides = [a for k, a in last.items() if not k.startswith(("hydra.", "sim"))]
    out = tmp_path / "flwr-run"
    run_config = f"overrides={json.dumps(shlex.join(overrides))} "
    run_config += f"output-dir={json.dumps(str(out))}"
    pyproject = (REPO / "pyproject.toml").read_bytes()

    def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    try:
        made = cli(
            sys.executable, "-m", "experiments.flwr_home", "--num-supernodes", "2"
        )
        assert made.returncode == 0, made.stderr
        run = cli(
            str(BIN / "flwr"),
            "run",
            ".",
            "local",
            "--run-config",
            run_config,
            "--stream",
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "[fedlora] round 2/2" in run.stdout  # the ServerApp's log, streamed
        ls = cli(str(BIN / "flwr"), "ls", "local", "--format", "json")
        runs = json.loads(ls.stdout[ls.stdout.index("{") :])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], runs
    finally:
        stopped = stop_local(home)
    assert stopped == 1  # flwr run started one SuperLink; it is ours to stop
    assert leftovers(home) == []  # nothing with our FLWR_HOME: SuperExec, Ray, ...
    assert (REPO / "pyproject.toml").read_bytes() == pyproject

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows[1:])

    front = tmp_path / "front-door"
    front_rows = run_front_door(front, tiny_bert, *CLIENTS)
    assert [r["eval_accuracy"] for r in rows] == [
        r["eval_accuracy"] for r in front_rows
    ]
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(front / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
