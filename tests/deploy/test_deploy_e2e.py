"""End to end: real deployments (SuperLink + SuperNodes over gRPC) of the experiment
the simulation runs, on 127.0.0.1 and across network namespaces with TLS and
SuperNode authentication; each final adapter must equal the simulation's. Also: nodes
without a registered key or without the CA are refused, a failed run is reported, a
SuperNode killed mid-round costs that round one reply (the run goes on without it, or
with it again once restarted, or ends after ``federation.wait_timeout`` when the
round after needs it), and no process outlives the launcher."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from deploy import launch as deploy
from fedlora import checkpoint
from tests.conftest import REPO
from tests.deploy.test_deploy import leftovers

#: the task every deployment test trains: a small synthetic set, one lr and batch
TASK = [
    "data=synthetic",
    "data.num_examples=240",
    "data.num_eval_examples=60",
    "train.lr=5e-3",
    "train.batch_size=16",
]
# 2 clients x 2 rounds of FedAvg-LoRA. The same seeds, one torch thread per client and
# replies aggregated in partition order: deployment and simulation agree bit for bit
EXPERIMENT = [
    "federation.num_clients=2",
    "federation.min_train_clients=2",
    "federation.rounds=2",
    *TASK,
]
NO_FEDERATED_EVAL = ["federation.fraction_evaluate=0"]  # fewer ClientApp processes;
# federated evaluation never changes the global adapter
pytestmark = pytest.mark.slow


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run_dir: Path, reference: dict[str, np.ndarray]) -> None:
    got = adapter(run_dir)
    assert sorted(got) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def rows(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def run_python(
    args: list[str], work: Path, timeout: float = 420, ok: bool = True
) -> str:
    """``python <args>`` from the repository; its output. On timeout it gets SIGTERM
    (the launcher then stops its services); whatever it left is killed by PID."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout} s:\n{out[-4000:]}")
    finally:
        proc.kill()
        left = leftovers(work)
        for line in left:
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert left == [], f"processes outlived the launcher: {left}"
    assert (proc.returncode == 0) == ok, out[-6000:]
    return out


def launch(work: Path, out: Path, *args: str) -> str:
    """``python -m deploy.launch --work work --out out <args>``; its output."""
    return run_python(
        ["-m", "deploy.launch", "--work", str(work), "--out", str(out), *args], work
    )


def simulate(model: str, out: Path, *overrides: str) -> dict[str, np.ndarray]:
    """Run ``overrides`` on Flower's simulation engine into ``out``; the final
    adapter."""
    run_python(
        [
            "-m",
            "experiments.run",
            f"hydra.run.dir={out}",
            f"model.name={model}",
            "quiet=true",
            *overrides,
        ],
        out,
    )
    return adapter(out)


@pytest.fixture(scope="module")
def simulated(tiny_bert, tmp_path_factory) -> dict[str, np.ndarray]:
    """The final adapter of the same experiment on Flower's simulation engine."""
    return simulate(tiny_bert, tmp_path_factory.mktemp("sim") / "run", *EXPERIMENT)


def test_deploy_grpc_loopback_completes_and_matches_the_simulation(
    tiny_bert, simulated, tmp_path
):
    work, out = tmp_path / "work", tmp_path / "run"
    log = launch(work, out, f"model.name={tiny_bert}", *EXPERIMENT)
    assert "[deploy] finished:completed" in log
    assert "[fedlora] round 2/2" in log  # the ServerApp's progress, followed live
    for name in (*deploy.RUN_FILES, "plots/accuracy_vs_mb.png", "deployment.json"):
        assert (out / name).is_file(), name
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    for r in metrics[1:]:
        assert r["clients"] == 2 and r["failures"] == 0
        assert "federated_eval_accuracy" in r and r["bytes_up"] > 0
    record = json.loads((out / "deployment.json").read_text())
    assert record["status"] == "finished:completed"
    assert "Starting Fleet API (gRPC-rere)" in (work / "superlink.log").read_text()
    for i in range(2):  # each node tokenised its partition once, then read the cache
        assert len(list((work / f"node-{i}" / "cache").glob("tokenised-*.json"))) == 1
    assert_same_adapter(out, simulated)


def test_deploy_a_drawn_port_taken_before_its_service_binds_is_drawn_again(
    tmp_path, capsys
):
    """Another program starts listening on the port drawn for SuperNode 0's
    Runtime API before the SuperNode binds it: the SuperNode dies with "address
    already in use" and the launcher starts again on new ports. A port the plan
    was given is never changed: the same conflict is raised."""
    drawn = deploy.Plan(tmp_path / "drawn", 1)
    with socket.socket() as held:
        held.bind(("127.0.0.1", drawn.node_ports[0]))
        held.listen()
        services = deploy.Services(drawn)
        try:
            deploy.start_on_free_ports(drawn, services)
            assert "SuperNode ID" in services.log("supernode-0").read_text()
        finally:
            services.stop()
        assert drawn.node_ports[0] != held.getsockname()[1]
        assert "address already in use" in services.log("supernode-0").read_text()
        assert "starting again on new ports" in capsys.readouterr().out

        fleet, control, node = deploy.free_ports(3)
        given = deploy.Plan(
            tmp_path / "given",
            1,
            fleet_port=fleet,
            control_port=control,
            node_ports=[held.getsockname()[1]],
        )
        services = deploy.Services(given)
        try:
            with pytest.raises(RuntimeError, match="supernode-0 exited"):
                deploy.start_on_free_ports(given, services)
        finally:
            services.stop()
        assert given.node_ports == [held.getsockname()[1]]


def test_deploy_refuses_a_supernode_without_registered_key_or_without_the_ca(tmp_path):
    plan = deploy.Plan(tmp_path, 1, auth=True)
    services = deploy.Services(plan)
    try:
        deploy.start_on_free_ports(plan, services)  # node 0 registered, connects
        assert "SuperNode ID" in services.log("supernode-0").read_text()
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ecdsa",
                "-b",
                "384",
                "-N",
                "",
                "-f",
                str(tmp_path / "stranger.key"),
            ],
            check=True,
            timeout=30,
        )
        node = deploy.commands(plan)["supernode-0"]
        fleet = node[node.index("--superlink") + 1]
        ca = ["--root-certificates", str(plan.certs / "ca.crt")]
        attempts = {
            "unregistered": [
                *ca,
                "--auth-supernode-private-key",
                str(tmp_path / "stranger.key"),
            ],
            "without-ca": [
                "--auth-supernode-private-key",
                str(plan.certs / "supernode-0"),
            ],
        }
        for name, flags in attempts.items():
            port = deploy.free_ports(1)[0]
            proc = services.start(
                name,
                [
                    "flower-supernode",
                    *flags,
                    "--superlink",
                    fleet,
                    "--isolation",
                    "process",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--max-retries",
                    "1",
                    "--max-wait-time",
                    "20",
                ],
            )
            assert proc.wait(90) != 0, name
            assert "SuperNode ID" not in services.log(name).read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in services.log("without-ca").read_text()
        link = services.log("superlink").read_text()
        assert "No SuperNode found with the given public key" in link
        assert link.count("Activated node_id") == 1  # only the registered node
    finally:
        services.stop()
    assert leftovers(tmp_path) == []


LAUNCH = """
import json, signal, sys
from pathlib import Path
from deploy import launch as deploy
spec = json.loads(sys.argv[1])
deploy.become_subreaper()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
plan = deploy.Plan(Path(spec["work"]), **spec["plan"])
deploy.deploy(spec["overrides"], plan, Path(spec["out"]), timeout=600)
print("[deploy] finished:completed", flush=True)
"""  # the launcher with a Plan the command line does not offer


def test_deploy_reports_a_failed_run_and_stops_everything(tiny_bert, tmp_path):
    spec = {
        "work": str(tmp_path / "work"),
        "out": str(tmp_path / "run"),
        "plan": {"num_supernodes": 1},
        "overrides": [
            f"model.name={tiny_bert}",
            "federation.num_clients=1",
            "federation.min_train_clients=9",
        ],
    }  # the ServerApp refuses
    log = run_python(["-c", LAUNCH, json.dumps(spec)], tmp_path / "work", ok=False)
    assert "ended finished:failed" in log and "min_train_clients=9" in log


# 3 SuperNodes x 3 rounds, train messages only: SuperNode i receives its r-th train
# message in round r
DRILL = [
    "federation.num_clients=3",
    "federation.min_train_clients=2",
    "federation.rounds=3",
    *TASK,
    *NO_FEDERATED_EVAL,
]
NODE_UNAVAILABLE = "Node Unavailable"  # Flower's reply for a node that missed 2
# heartbeats (2 x 30 s): what ends the round of a killed node, not round_timeout


def received(services: deploy.Services, node: str) -> int:
    """Train messages SuperNode ``node`` has taken (its log, since its first start)."""
    return services.log(node).read_text().count("Receiving: train message")


def partitions(row: dict) -> list[int]:
    """The partitions whose updates a round aggregated."""
    return sorted(int(c["partition-id"]) for c in row["client_replies"])


def drill(
    tmp_path: Path, model: Path, watch: deploy.Watch, *overrides: str
) -> tuple[dict, list[dict], Path]:
    """Deploy ``DRILL`` on 3 SuperNodes in this process, ``watch`` injecting faults;
    assert it completed and no process outlived it. Returns the summary, the rows of
    ``metrics.jsonl`` and the work folder (logs)."""
    work, out = tmp_path / "work", tmp_path / "run"
    try:
        summary = deploy.deploy(
            [f"model.name={model}", *DRILL, *overrides],
            # the node the drills kill runs its ClientApp in-process: its reply
            # then comes seconds after the message (the imports), not the worker's
            # fraction of a second, so the kill lands before it
            deploy.Plan(work, 3, node_config={2: "worker=false"}),
            out,
            timeout=600,
            watch=watch,
        )
    finally:
        left = leftovers(work)
        for line in left:
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert left == [], f"processes outlived the launcher: {left}"
    assert json.loads((out / "deployment.json").read_text())["status"] == (
        "finished:completed"
    )
    return summary, rows(out), work


def restart_node_2_in_round_2(restarted: list[bool]) -> deploy.Watch:
    """A watch that SIGKILLs supernode-2 once it has taken round 2's message and
    starts it again right away (appending to ``restarted`` when it did)."""

    def watch(services: deploy.Services, lines: list[str]) -> None:
        if not restarted and received(services, "supernode-2") == 2:
            services.kill("supernode-2")
            services.restart("supernode-2")
            restarted.append(True)

    return watch


def assert_round_2_lost_node_2(metrics: list[dict], work: Path) -> None:
    """Round 1 had all three nodes; in round 2 node 2 took its message, died before
    replying, and the round aggregated the other two, recording one failure."""
    assert [r["round"] for r in metrics] == [0, 1, 2, 3]
    r1, r2 = metrics[1], metrics[2]
    assert (r1["clients_sampled"], r1["clients"], r1["failures"]) == (3, 3, 0)
    assert partitions(r1) == [0, 1, 2]
    assert (r2["clients_sampled"], r2["clients"], r2["failures"]) == (3, 2, 1)
    assert partitions(r2) == [0, 1]
    [failure] = r2["failure_reasons"]
    assert NODE_UNAVAILABLE in failure["reason"]
    log = (work / "supernode-2.log").read_text()
    assert log.count("Sending: train message") >= 1  # replied in round 1 ...
    before_kill = log.split("Starting Flower SuperNode")[1]
    assert before_kill.count("Receiving: train message") == 2  # ... took round 2's
    assert before_kill.count("Sending: train message") == 1  # ... and never replied


def test_deploy_goes_on_without_a_supernode_killed_mid_round(tiny_bert, tmp_path):
    """SIGKILL supernode-2 once it has taken round 2's message, and never restart it:
    round 2 records the failure, round 3 samples the two nodes left, the run ends
    ``finished:completed``. ``min_available_clients=2``: with the default (all 3
    nodes) round 3 would wait for the dead node forever."""
    killed = []

    def watch(services: deploy.Services, lines: list[str]) -> None:
        if not killed and received(services, "supernode-2") == 2:
            services.kill("supernode-2")
            killed.append(True)

    summary, metrics, work = drill(
        tmp_path, tiny_bert, watch, "federation.min_available_clients=2"
    )
    assert killed
    assert_round_2_lost_node_2(metrics, work)
    r3 = metrics[3]
    assert (r3["clients_sampled"], r3["clients"], r3["failures"]) == (2, 2, 0)
    assert partitions(r3) == [0, 1]
    assert summary["rounds"] == 3 and summary["failures"] == 1


def test_deploy_a_restarted_supernode_rejoins(tiny_bert, tmp_path):
    """SIGKILL supernode-2 once it has taken round 2's message and start it again
    right away with the same flags and partition (a crash, then a supervisor's
    restart). The old node's reply to round 2 is still lost; the new process joins
    under a new node id, and round 3, which begins once the SuperLink has given up on
    the old one, samples all three nodes again (default ``min_available_clients``)."""
    restarted: list[bool] = []
    watch = restart_node_2_in_round_2(restarted)
    summary, metrics, work = drill(tmp_path, tiny_bert, watch)
    assert restarted
    assert_round_2_lost_node_2(metrics, work)
    r3 = metrics[3]
    assert (r3["clients_sampled"], r3["clients"], r3["failures"]) == (3, 3, 0)
    assert partitions(r3) == [0, 1, 2]
    log = (work / "supernode-2.log").read_text()
    ids = re.findall(r"SuperNode ID: (\d+)", log)
    assert len(ids) == 2 and ids[0] != ids[1]  # a new node id for the same partition
    assert log.count("Receiving: train message") == 3  # rounds 1, 2 (lost) and 3
    assert summary["rounds"] == 3 and summary["failures"] == 1


WAIT = 20  # federation.wait_timeout of the drill below, seconds


def test_deploy_wait_timeout_ends_the_run(tiny_bert, tmp_path):
    """2 SuperNodes over gRPC with TLS, 3 rounds, ``federation.wait_timeout=20``.
    SIGKILL supernode-1 once it has taken round 1's train message and never restart
    it: round 1 aggregates node 0's update (node 1: ``Node Unavailable``) and is
    checkpointed; round 2 waits for its 2 nodes with 1 connected. 20 s later the run
    ends ``finished:failed`` with an error naming the key and the checkpoint to
    resume from (instead of waiting for ever), and no process outlives it."""
    work, out = tmp_path / "work", tmp_path / "run"
    seen: dict[str, float] = {}

    def watch(services: deploy.Services, lines: list[str]) -> None:
        if "kill" not in seen and received(services, "supernode-1") == 1:
            services.kill("supernode-1")
            seen["kill"] = time.monotonic()
        if "wait" not in seen and any("waiting for the rest" in x for x in lines):
            seen["wait"] = time.monotonic()  # round 2 began to wait (as logged)

    try:
        with pytest.raises(RuntimeError, match="ended finished:failed") as info:
            deploy.deploy(
                [
                    f"model.name={tiny_bert}",
                    "federation.num_clients=2",
                    "federation.min_train_clients=2",
                    "federation.rounds=3",
                    f"federation.wait_timeout={WAIT}",
                    *TASK,
                    *NO_FEDERATED_EVAL,
                ],
                deploy.Plan(work, 2, tls=True, node_config={1: "worker=false"}),
                out,
                timeout=600,
                watch=watch,
            )
        ended = time.monotonic()  # the run has ended and every service is stopped
    finally:
        left = leftovers(work)
        for line in left:
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert left == [], f"processes outlived the launcher: {left}"
    assert "kill" in seen and "wait" in seen
    ckpt = checkpoint.load_latest(out)
    assert ckpt is not None and ckpt.round == 1
    error = str(info.value)
    assert (
        f"NodesUnavailableError: round 2: 1 of the 2 nodes it needs were connected "
        f"for {WAIT} s, longer than federation.wait_timeout={WAIT}; stopping the run"
    ) in error
    assert "lower federation.min_available_clients and federation.min_train_c" in error
    assert f"The last checkpoint is {ckpt.path};" in error
    assert f"resume={out}" in error
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1]
    assert (metrics[1]["clients"], metrics[1]["failures"]) == (1, 1)
    assert NODE_UNAVAILABLE in metrics[1]["failure_reasons"][0]["reason"]
    assert not (out / "summary.json").exists()  # the run did not complete
    assert "Starting Fleet API (gRPC-rere)" in (work / "superlink.log").read_text()
    assert "insecure" not in (work / "supernode-0.log").read_text().lower()  # TLS
    # from the deadline (as logged; the log arrives a little late) to every
    # process stopped
    after = ended - seen["wait"] - WAIT
    print(f"[wait_timeout drill] ended {after:.1f} s after the deadline")
    assert after < 120


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"


@pytest.fixture
def namespaces():
    """Three "hosts": network namespaces ``<tag>-link`` (the SuperLink, on a bridge
    at 10.251.<k>.1) and ``<tag>-n0``, ``<tag>-n1`` (SuperNodes at .10, .11), plus a
    veth from this namespace (.254) for ``flwr``. Torn down afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (ip netns)")
    tag, k = f"fl{os.getpid() % 10000}", 1 + os.getpid() % 250
    link, nodes = f"{tag}-link", [f"{tag}-n{i}" for i in range(2)]
    net = f"10.251.{k}"
    try:
        ip("netns", "add", link)
        ip("-n", link, "link", "set", "lo", "up")
        ip("-n", link, "link", "add", "br0", "type", "bridge")
        ip("-n", link, "addr", "add", f"{net}.1/24", "dev", "br0")
        ip("-n", link, "link", "set", "br0", "up")
        ends = [(ns, f"v{tag}n{i}", f"{net}.{10 + i}") for i, ns in enumerate(nodes)]
        for ns in nodes:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for ns, veth, addr in [*ends, (None, f"v{tag}r", f"{net}.254")]:
            ip("link", "add", veth, "type", "veth", "peer", "name", veth + "b")
            ip("link", "set", veth + "b", "netns", link)
            ip("-n", link, "link", "set", veth + "b", "master", "br0", "up")
            if ns:
                ip("link", "set", veth, "netns", ns)
            where = ["-n", ns] if ns else []
            ip(*where, "addr", "add", f"{addr}/24", "dev", veth)
            ip(*where, "link", "set", veth, "up")
        yield {"host": f"{net}.1", "link": link, "nodes": nodes}
    finally:
        for ns in [*nodes, link]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"v{tag}r"], capture_output=True)


def test_deploy_across_network_namespaces_with_tls_and_auth_matches_the_simulation(
    tiny_bert, simulated, namespaces, tmp_path
):
    """Three hosts (network namespaces), TLS and SuperNode authentication on."""
    work, out = tmp_path / "work", tmp_path / "run"
    exe = ["ip", "netns", "exec"]
    prefix = {
        "superlink": [*exe, namespaces["link"]],
        "superexec-serverapp": [*exe, namespaces["link"]],
    }
    for i, ns in enumerate(namespaces["nodes"]):
        prefix[f"supernode-{i}"] = prefix[f"superexec-clientapp-{i}"] = [*exe, ns]
    spec = {
        "work": str(work),
        "out": str(out),
        "plan": {
            "num_supernodes": 2,
            "auth": True,
            "host": namespaces["host"],
            "prefix": prefix,
        },
        "overrides": [f"model.name={tiny_bert}", *EXPERIMENT, *NO_FEDERATED_EVAL],
    }
    log = run_python(["-c", LAUNCH, json.dumps(spec)], work)
    assert "[deploy] finished:completed" in log
    link = (work / "superlink.log").read_text()
    net = namespaces["host"].rsplit(".", 1)[0]
    assert f"Starting Fleet API (gRPC-rere) on {namespaces['host']}:" in link
    assert f"Uvicorn running on https://{namespaces['host']}:" in link  # TLS
    assert f"{net}.254:" in link  # `flwr` reached the Control API from this host
    assert link.count("[ControlServicer.RegisterNode] Created node_id") == 2
    assert link.count("Activated node_id") == 2  # the SuperNodes, from theirs
    assert "authentication is disabled" not in link and "insecure" not in link.lower()
    for i in range(2):
        assert "insecure" not in (work / f"supernode-{i}.log").read_text().lower()
    commands = json.loads((out / "deployment.json").read_text())["commands"]
    assert f"--superlink {namespaces['host']}:" in " ".join(commands["supernode-0"])
    assert [r["clients"] for r in rows(out)[1:]] == [2, 2]
    assert_same_adapter(out, simulated)


def test_deploy_fedex_lora_a_restarted_supernode_ends_with_the_others_base_weights(
    tiny_bert, tmp_path
):
    """FedEx-LoRA folds each round's residual into every node's base weights. Kill
    supernode-2 once it has taken round 2's message and start it again: the new
    process (a new node id, empty node state) gets the whole sum of the folds, and
    in round 3 every node reports the same folds (round and norm) as the others."""
    restarted: list[bool] = []
    watch = restart_node_2_in_round_2(restarted)
    summary, metrics, work = drill(tmp_path, tiny_bert, watch, "strategy=fedex_lora")
    assert restarted
    assert_round_2_lost_node_2(metrics, work)
    r3 = metrics[3]
    assert (r3["clients"], r3["failures"], r3["rejected"]) == (3, 0, [])
    assert partitions(r3) == [0, 1, 2]
    replies = r3["client_replies"]
    assert {c["base-round"] for c in replies} == {2}  # the folds of rounds 1 and 2
    norms = [c["base-norm"] for c in replies]
    assert norms[0] > 0
    np.testing.assert_allclose(norms, norms[0], rtol=1e-6)
    assert all(r["aggregation_error"] < 1e-5 for r in metrics[1:])
    assert summary["rounds"] == 3


# 3 SuperNodes that state their own LoRA ranks in their node configs
RANKS = [2, 4, 8]
RANKED = [
    "federation.num_clients=3",
    "federation.min_train_clients=3",
    "federation.rounds=2",
    *TASK,
    "strategy=hetlora",
    f"adapter.r={max(RANKS)}",
    *NO_FEDERATED_EVAL,
]


def test_deploy_supernodes_state_their_own_ranks_in_their_node_configs(
    tiny_bert, tmp_path
):
    """Each SuperNode trains the rank its node config states (``rank=2/4/8``; the
    server is told nothing and cannot read node configs): every reply reports its
    rank, the server aggregates by the reported ranks, bytes are split by rank, and
    the final adapter equals the simulation's with ``adapter.client_ranks=[2,4,8]``
    bit for bit."""
    sim = tmp_path / "sim"
    run_python(
        [
            "-m",
            "experiments.run",
            f"hydra.run.dir={sim}",
            f"model.name={tiny_bert}",
            "quiet=true",
            *RANKED,
            f"adapter.client_ranks=[{','.join(map(str, RANKS))}]",
        ],
        sim,
    )
    work, out = tmp_path / "work", tmp_path / "run"
    node_config = [f"{i}:rank={r}" for i, r in enumerate(RANKS)]
    log = launch(
        work,
        out,
        *[arg for entry in node_config for arg in ("--node-config", entry)],
        f"model.name={tiny_bert}",
        *RANKED,
    )
    assert "[deploy] finished:completed" in log
    commands = json.loads((out / "deployment.json").read_text())["commands"]
    for i, r in enumerate(RANKS):
        assert f"rank={r}" in commands[f"supernode-{i}"][-1]
    for row in rows(out)[1:]:
        assert (row["clients"], row["failures"], row["rejected"]) == (3, 0, [])
        reported = {
            int(c["partition-id"]): int(c["adapter-rank"])
            for c in row["client_replies"]
        }
        assert reported == dict(enumerate(RANKS))
        up = row["bytes_up_by_rank"]
        assert sorted(up) == ["2", "4", "8"]
        assert up["2"] < up["4"] < up["8"] and sum(up.values()) == row["bytes_up"]
        assert "aggregation_error_by_rank" in row
    final = adapter(out)
    assert all(v.shape[0] == max(RANKS) for k, v in final.items() if "lora_A" in k)
    assert_same_adapter(out, adapter(sim))


# SecAgg+ over 3 SuperNodes: every node holds a share of every other's secrets
# (k = 2), 2 of 3 rebuild one, so one node could drop and the round still close
SECURE = [
    "federation.num_clients=3",
    "federation.min_train_clients=3",
    "federation.rounds=2",
    *TASK,
    "secure_aggregation=secaggplus",
    *NO_FEDERATED_EVAL,
]


def test_deploy_secure_aggregation_matches_the_simulation(tiny_bert, tmp_path):
    """SecAgg+ over gRPC with TLS. Each stage (keys, shares, masked input, unmask)
    is a message of its own, run in a fresh ClientApp process: a node's session
    (key pairs, the shares it holds, its mask seeds) survives between them only in
    ``context.state``; a lost session would fail the round. Masks cancel exactly
    and quantising is a deterministic rounding, so the server decodes the same
    integer sum as in the simulation: the final adapters are equal bit for bit."""
    sim = tmp_path / "sim"
    reference = simulate(tiny_bert, sim, *SECURE)
    work, out = tmp_path / "work", tmp_path / "run"
    log = launch(work, out, "--tls", f"model.name={tiny_bert}", *SECURE)
    assert "[deploy] finished:completed" in log
    for i in range(3):
        assert "insecure" not in (work / f"supernode-{i}.log").read_text().lower()
    for run in (rows(sim), rows(out)):
        assert [r["round"] for r in run] == [0, 1, 2]
        for r in run[1:]:
            assert r["secure_aggregation"] is True
            assert (r["clients"], r["failures"], r["secagg_dropouts"]) == (3, 0, 0)
            assert "secagg_failure" not in r and r["aggregation_error"] is None
            assert 0 < r["secagg_error_bound"] < 1e-6 and r["secagg_clipped"] == 0
    assert_same_adapter(out, reference)
