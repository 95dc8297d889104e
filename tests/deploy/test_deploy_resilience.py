"""Deployment resilience: the server side dies and comes back, and nothing is lost.

Real processes over gRPC with TLS (the launcher's services): the ServerApp killed
after round 2 of 4 and the run continued with ``python -m deploy.launch --resume``;
the SuperLink killed mid-round and restarted by the launcher on its database; the
compose file's health checks run against a live SuperLink and SuperNode. Each final
adapter must equal the simulation's of the same experiment, bit for bit. The times
measured are printed (``-s``) and quoted in docs/deployment.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from deploy import launch as deploy
from tests.deploy.test_deploy import COMPOSE, leftovers
from tests.deploy.test_deploy_e2e import (
    NO_FEDERATED_EVAL,
    TASK,
    assert_same_adapter,
    received,
    rows,
    run_python,
    simulate,
)

pytestmark = pytest.mark.slow

#: 2 clients x 4 rounds, train messages only; the server side dies once mid-run
FOUR_ROUNDS = [
    "federation.num_clients=2",
    "federation.min_train_clients=2",
    "federation.rounds=4",
    *TASK,
    *NO_FEDERATED_EVAL,
]


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, tmp_path_factory):
    """``{strategy: final adapter}`` of the uninterrupted simulation, made on first
    use (deployment and simulation agree bit for bit: test_deploy_e2e.py)."""
    made: dict[str, dict[str, np.ndarray]] = {}

    def get(strategy: str) -> dict[str, np.ndarray]:
        if strategy not in made:
            out = tmp_path_factory.mktemp("sim") / strategy
            made[strategy] = simulate(
                tiny_bert, out, f"strategy={strategy}", *FOUR_ROUNDS
            )
        return made[strategy]

    return get


def no_process_left(work: Path) -> None:
    left = leftovers(work)
    for line in left:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    assert left == [], f"processes outlived the launcher: {left}"


def kill_serverapp_after_round(n: int, out: Path, killed: list[float]) -> deploy.Watch:
    """A watch that SIGKILLs the ServerApp process (the child of
    ``superexec-serverapp``) once round ``n``'s checkpoint is on disk."""
    manifest = out / "checkpoints" / f"round-{n:06d}.manifest.json"

    def watch(services: deploy.Services, lines: list[str]) -> None:
        if killed or not manifest.exists():
            return
        apps = deploy._descendants(services.procs["superexec-serverapp"].pid)
        assert apps, "no ServerApp process to kill"
        for proc in apps:
            proc.kill()
        killed.append(time.monotonic())

    return watch


def killed_after_round_2(
    overrides: list[str], work: Path, out: Path
) -> tuple[str, float]:
    """Deploy ``overrides`` (2 SuperNodes, TLS), SIGKILL the ServerApp once round 2
    is checkpointed (the launch fails with the resume hint, and no process
    outlives it); returns that error message and the kill's monotonic time."""
    killed: list[float] = []
    try:
        with pytest.raises(RuntimeError) as failed:
            deploy.deploy(
                overrides,
                deploy.Plan(work, 2, tls=True),
                out,
                timeout=600,
                watch=kill_serverapp_after_round(2, out, killed),
            )
    finally:
        no_process_left(work)
    assert killed
    return str(failed.value), killed[0]


def resume(out: Path, work: Path) -> str:
    """``python -m deploy.launch --resume <out>`` alone (TLS and the work folder
    from the run's deployment.json); its log."""
    log = run_python(["-m", "deploy.launch", "--resume", str(out)], work)
    assert "TLS on" in log  # as launched, without --tls
    assert "[deploy] finished:completed" in log
    return log


# one strategy per mechanism a resume must restore: a node's own B on its disk
# (FedSA-LoRA), frozen factors shipped again (Fed-SB), the summed base-weight folds
# sent again as float64 (FedEx-LoRA; FLoRA uses the same folds, and passed this
# drill too, 2 minutes more of CI). The plain resume runs under DP-SGD below.
@pytest.mark.parametrize("strategy", ["fedsa_lora", "fedsb", "fedex_lora"])
def test_deploy_serverapp_killed_and_resumed(
    tiny_bert, uninterrupted, strategy, tmp_path
):
    """SIGKILL the ServerApp once round 2 of 4 is checkpointed. Flower ends the run
    ``finished:failed`` (no heartbeat from the ServerApp), the launcher says how to
    continue it, and ``python -m deploy.launch --resume <run dir>`` does: rounds 3
    and 4 run on fresh processes (new node ids, an empty SuperLink), the server
    sends the nodes what they must hold again (Fed-SB's frozen factors, the
    summed base-weight folds of FedEx-LoRA and FLoRA, as float64 once dense),
    FedSA-LoRA's nodes reload their own ``B`` from their
    ``data-dir``, and the final adapter is the uninterrupted run's, bit for bit."""
    work, out = tmp_path / "work", tmp_path / "run"
    overrides = [f"model.name={tiny_bert}", f"strategy={strategy}", *FOUR_ROUNDS]
    message, killed = killed_after_round_2(overrides, work, out)
    noticed = time.monotonic()
    assert "ended finished:failed" in message
    assert f"--resume {out.resolve()}" in message, message
    assert [r["round"] for r in rows(out)][:3] == [0, 1, 2]

    started = time.monotonic()
    log = resume(out, work)
    resumed = time.monotonic() - started
    assert "[fedlora] round 2/4: resumed from" in log
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1, 2, 3, 4]
    assert all((r["clients"], r["failures"]) == (2, 0) for r in metrics[1:])
    record = json.loads((out / "deployment.json").read_text())
    assert record["work"] == str(work.resolve())  # found by --resume
    assert_same_adapter(out, uninterrupted(strategy))
    print(
        f"\n[{strategy}] ServerApp killed: the run failed after "
        f"{noticed - killed:.0f} s; the resumed launch took {resumed:.0f} s "
        f"(startup {record['startup_seconds']:.0f} s), 2 rounds"
    )


def test_deploy_superlink_restarted(tiny_bert, uninterrupted, tmp_path, capsys):
    """SIGKILL the SuperLink once both SuperNodes have taken round 2's train
    message. The launcher starts it again on its database (runs, nodes, messages
    and their arrays survive), the SuperNodes and SuperExecs reconnect by
    themselves under their old node ids, the replies of round 2 arrive, and the run
    continues with no failure to the uninterrupted run's adapter, bit for bit."""
    work, out = tmp_path / "work", tmp_path / "run"
    t: dict[str, float] = {}
    at_kill: dict[str, int] = {}  # each node's log length when the SuperLink died

    def reconnected(services: deploy.Services, node: str) -> bool:
        """The node talks to the restarted SuperLink: it logged a reconnection
        after failed attempts, or (it tried nothing during the outage) it sent its
        round-2 reply since the kill."""
        new = services.log(node).read_text()[at_kill[node] :]
        if "Connection attempt failed" in new:
            return "Connection successful" in new
        return "Sending: train message" in new

    def watch(services: deploy.Services, lines: list[str]) -> None:
        nodes = ["supernode-0", "supernode-1"]
        if "kill" not in t and all(received(services, n) == 2 for n in nodes):
            link = services.procs["superlink"]
            at_kill.update({n: len(services.log(n).read_text()) for n in nodes})
            deploy._signal_group(link.pid, signal.SIGKILL)
            link.wait()
            t["kill"] = time.monotonic()  # the launcher notices and restarts it
        if "kill" in t and "back" not in t and services.restarts:
            t["back"] = time.monotonic()
        if "back" in t and "whole" not in t:
            if all(reconnected(services, n) for n in nodes):
                t["whole"] = time.monotonic()
        if (
            "whole" in t
            and "round" not in t
            and any(line.startswith("[fedlora] round 2/") for line in lines)
        ):
            t["round"] = time.monotonic()

    try:
        summary = deploy.deploy(
            [f"model.name={tiny_bert}", *FOUR_ROUNDS],
            deploy.Plan(work, 2, tls=True),
            out,
            timeout=900,
            watch=watch,
        )
    finally:
        no_process_left(work)
    said = capsys.readouterr().out
    assert "[deploy] the SuperLink exited with code -9; restarting it" in said
    assert "run " in said and " continues" in said
    assert {"kill", "back", "whole"} <= t.keys(), t
    link = (work / "superlink.log").read_text()
    assert link.count("Starting Flower SuperLink") == 2
    for i in range(2):  # the same node, reconnected: one id, no second activation
        log = (work / f"supernode-{i}.log").read_text()
        assert log.count("SuperNode ID") == 1
        assert log.count("Sending: train message") == 4
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1, 2, 3, 4]
    assert all((r["clients"], r["failures"]) == (2, 0) for r in metrics[1:])
    assert summary["failures"] == 0
    assert_same_adapter(out, uninterrupted("fedavg_lora"))
    print(
        f"\nSuperLink killed mid-round 2: back after {t['back'] - t['kill']:.1f} s, "
        f"federation whole after {t['whole'] - t['kill']:.1f} s, round 2 ended "
        f"{t.get('round', float('nan')) - t['kill']:.1f} s after the kill"
    )


def healthcheck(service: str) -> list[str]:
    """The ``test`` command of ``service``'s compose health check, as argv."""
    test = yaml.safe_load(COMPOSE.read_text())["services"][service]["healthcheck"]
    assert test["test"][0] == "CMD"
    return test["test"][1:]


def run_healthcheck(argv: list[str], compose_address: str, address: str) -> int:
    """Run the compose health check against ``address`` (it names
    ``compose_address``) with this environment's python; its exit code."""
    code = argv[-1]
    assert compose_address in code
    proc = subprocess.run(
        [sys.executable, *argv[1:-1], code.replace(compose_address, address)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode


def test_deploy_compose_healthchecks_see_a_live_superlink_and_supernode(tmp_path):
    """The compose file's health checks, run against a SuperLink and a SuperNode
    the launcher started with the same flags: exit 0 while they serve, non-zero
    once they are down."""
    plan = deploy.Plan(tmp_path, 1, tls=True)
    services = deploy.Services(plan)
    checks = {
        "superlink": (healthcheck("superlink"), "127.0.0.1:9080"),
        "supernode-0": (healthcheck("supernode-0"), "127.0.0.1:9081"),
    }
    try:
        deploy.start_on_free_ports(plan, services)
        for name, (argv, address) in checks.items():
            assert argv[0] == "python"
            live = plan.health_address(name)
            assert run_healthcheck(argv, address, live) == 0, name
        for name, (argv, address) in checks.items():
            services.kill(name)
            assert run_healthcheck(argv, address, plan.health_address(name)) != 0
    finally:
        services.stop()
    no_process_left(tmp_path)
    assert str(plan.database) in " ".join(deploy.commands(plan)["superlink"])
    assert plan.database.is_file()  # the SuperLink kept its state there


def test_deploy_serverapp_killed_and_resumed_under_dp_sgd_accounts_every_round(
    tiny_bert, tmp_path
):
    """DP-SGD: the same kill after round 2 of 4 and ``--resume``. Each node's
    privacy ledger (its ``data-dir``, keyed by the run id the checkpoint keeps) goes
    on composing: it lists rounds 1 to 4, plus round 3 once more if the dead
    ServerApp's round-3 message had already reached the node (that privacy was
    spent), and its epsilon is that of exactly the rounds it lists, which the last
    round's metrics report."""
    from fedlora import privacy

    work, out = tmp_path / "work", tmp_path / "run"
    overrides = [
        f"model.name={tiny_bert}",
        *FOUR_ROUNDS,
        "privacy=dp_sgd",
        "privacy.planned_rounds=6",  # room for a round spent twice
    ]
    assert "--resume" in killed_after_round_2(overrides, work, out)[0]
    run_id = json.loads((out / "checkpoints" / "round-000002.json").read_text())[
        "run_id"
    ]
    resume(out, work)
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1, 2, 3, 4]
    assert all((r["clients"], r["failures"]) == (2, 0) for r in metrics[1:])
    assert json.loads((out / "summary.json").read_text())["run_id"] == run_id
    for i in range(2):
        path = work / f"node-{i}" / "privacy-ledger" / run_id / f"partition-{i}.json"
        ledger = json.loads(path.read_text())
        assert ledger["rounds"] in ([1, 2, 3, 4], [1, 2, 3, 3, 4]), ledger["rounds"]
        plan = privacy.DPPlan.from_json(ledger["plan"])
        fresh = privacy.make_accountant(plan.accountant)
        for _ in ledger["rounds"]:
            fresh.history.append(
                (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
            )
        assert ledger["epsilon"] == pytest.approx(fresh.get_epsilon(plan.delta))
        assert metrics[4]["epsilon"][str(i)] == pytest.approx(ledger["epsilon"])
