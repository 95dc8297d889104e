"""Deployment pieces that need no running federation: the compose file against the
launcher's commands, the certificate script, the tokenisation cache, process cleanup.
(End-to-end deployments: test_deploy_e2e.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from deploy import launch as deploy
from fedlora.settings import with_
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
AUTH = REPO / "deploy" / "compose.auth.yml"
FILES = {
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--root-certificates",
    "--auth-supernode-private-key",
    "--database",
}  # compared by file name
ADDRESSES = {
    "--fleet-api-address",
    "--superlink",
    "--runtime-api-address",
    "--health-server-address",
}  # compared by port
#: one-shot compose services that prepare volumes; the launcher has no such step
INIT = {"superlink-state-init"}
PROGRAMS = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "fedlora-app": "flower-superexec",
}


def compose_services(*files: Path) -> dict[str, dict]:
    """The services of compose files merged as docker-compose does for ``command``."""
    services: dict[str, dict] = {}
    for path in files:
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            services.setdefault(name, {}).update(svc)
    return services


def normalised(argv: list[str]) -> dict[str, object]:
    """``{flag: value}`` with what differs between hosts masked: paths keep their
    file name, addresses their port, node configs their keys."""
    out: dict[str, object] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        value = (
            argv[i + 1]
            if i + 1 < len(argv) and not argv[i + 1].startswith("--")
            else None
        )
        i += 1 if value is None else 2
        if flag in FILES:
            value = Path(str(value)).name
        elif flag in ADDRESSES:
            value = str(value).rsplit(":", 1)[1]
        elif flag == "--host":
            value = "<host>"
        elif flag == "--node-config":
            value = sorted(kv.split("=")[0] for kv in str(value).split())
        out[flag] = value
    return out


@pytest.mark.parametrize("auth", [False, True], ids=["tls", "tls+auth"])
def test_deploy_compose_services_run_the_launchers_commands(auth):
    files = (COMPOSE, AUTH) if auth else (COMPOSE,)
    services = compose_services(*files)
    plan = deploy.Plan(
        Path("/w"),
        2,
        tls=True,
        auth=auth,
        fleet_port=9092,
        control_port=9093,
        node_ports=[9094, 9095],
        health_ports=[9080, 9081, 9082],
    )
    launcher = deploy.commands(plan)
    assert INIT <= set(services)
    services = {n: svc for n, svc in services.items() if n not in INIT}
    assert sorted(services) == sorted(launcher)
    for name, svc in services.items():
        image = svc["image"].split(":")[0]
        assert PROGRAMS[image] == launcher[name][0], name
        assert normalised([str(a) for a in svc["command"]]) == normalised(
            launcher[name][1:]
        ), name


def test_deploy_images_use_the_installed_flower_version():
    import flwr

    services = compose_services(COMPOSE)
    tags = {
        re.sub(r"^.*:\$\{FLWR_VERSION:-(.+)\}$", r"\1", svc["image"])
        for svc in services.values()
        if svc["image"].startswith("flwr/")
    }
    assert tags == {flwr.__version__}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={flwr.__version__}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile


@pytest.mark.skipif(
    not shutil.which("docker-compose"),
    reason="needs docker-compose (CI installs the Debian package)",
)
@pytest.mark.parametrize("auth", [False, True], ids=["tls", "tls+auth"])
def test_deploy_docker_compose_config_is_valid(auth):
    files = ["-f", str(COMPOSE)] + (["-f", str(AUTH)] if auth else [])
    proc = subprocess.run(
        ["docker-compose", *files, "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["services"]["superlink"]["image"].startswith("flwr/superlink:")
    assert (
        "--enable-supernode-auth" in config["services"]["superlink"]["command"]
    ) == auth


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")),
    reason="needs openssl and ssh-keygen",
)
def test_deploy_certs_script_makes_a_ca_signed_certificate_and_node_keys(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    subprocess.run(
        [
            "bash",
            str(REPO / "deploy" / "certs.sh"),
            "-o",
            str(tmp_path),
            "-n",
            "3",
            "10.9.8.7",
            "link.example",
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "ca.crt"),
            str(tmp_path / "superlink.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        [
            "openssl",
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            str(tmp_path / "superlink.crt"),
        ],
        capture_output=True,
        text=True,
    ).stdout
    for name in (
        "DNS:superlink",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:10.9.8.7",
        "DNS:link.example",
    ):
        assert name in san
    for i in range(3):
        public = load_ssh_public_key((tmp_path / f"supernode-{i}.pub").read_bytes())
        private = load_ssh_private_key((tmp_path / f"supernode-{i}").read_bytes(), None)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1"  # what `flwr supernode register` takes
        assert private.public_key() == public
        assert (tmp_path / f"supernode-{i}").stat().st_mode & 0o077 == 0  # private


def test_deploy_tokenised_partitions_are_cached_at_the_data_location(
    settings, tmp_path, monkeypatch
):
    from fedlora import data
    from fedlora.models import load_tokenizer

    tok = load_tokenizer(settings.model)
    data._TOKENISED.clear()  # earlier tests in this process tokenised it in memory
    first = data.client_examples(settings, tok, 1, 2, tmp_path)
    assert len(list(tmp_path.glob("tokenised-*.json"))) == 1
    data._TOKENISED.clear()  # what a fresh ClientApp process starts with

    def no_work(*args, **kwargs):
        raise AssertionError("a cached partition was loaded or tokenised again")

    monkeypatch.setattr(data, "load_splits", no_work)
    monkeypatch.setattr(data, "tokenise", no_work)
    assert data.client_examples(settings, tok, 1, 2, tmp_path) == first
    data._TOKENISED.clear()
    monkeypatch.undo()
    other = data.client_examples(settings, tok, 0, 2, tmp_path)  # another key
    assert other != first and len(list(tmp_path.glob("tokenised-*.json"))) == 2


def test_deploy_a_fresh_clientapp_process_reads_labels_and_partition_from_disk(
    settings, tmp_path
):
    """After a node's first message, a fresh ClientApp process takes the labels and
    its tokenised partition from ``<data-dir>/cache``: the same examples, without
    reading the data, tokenising or importing pandas (0.4 s of its start-up)."""
    from fedlora import data
    from fedlora.models import load_tokenizer

    data.clear_caches()  # what the node's first ClientApp process starts with
    first = data.client_examples(
        settings, load_tokenizer(settings.model), 1, 2, tmp_path
    )
    assert len(list(tmp_path.glob("labels-*.json"))) == 1
    code = (
        "import json, sys\n"
        "from clients import client_app\n"
        "from fedlora.settings import Settings\n"
        "s = Settings.from_dict(json.loads(sys.argv[1]))\n"
        "cfg = client_app.resolve_labels(s, sys.argv[2])\n"
        "found = client_app.client_examples(cfg, None, 1, 2, sys.argv[2])\n"
        "print(json.dumps({'pandas': 'pandas' in sys.modules, 'found': found}))\n"
    )
    args = [sys.executable, "-c", code, json.dumps(settings.to_dict()), str(tmp_path)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["found"] == [first[0], first[1]]
    assert out["pandas"] is False


def test_deploy_a_cached_partition_is_not_reused_after_its_data_file_changed(
    settings, tmp_path
):
    """The cache is keyed by the data files' sizes and times too: a file rewritten
    in place is read, labelled and tokenised again, as without a cache."""
    import pandas as pd

    from fedlora import data
    from fedlora.models import load_tokenizer

    tok = load_tokenizer(settings.model)
    path = tmp_path / "train.csv"
    section = yaml.safe_load((REPO / "conf/data/local.yaml").read_text())
    section.update({"path": str(path), "seed": 0, "text_column": "sentence"})
    local = with_(settings, "data", section, "model.num_labels", None)
    words = ["alpha", "beta", "gamma"]
    rows = {"sentence": [f"row {i}" for i in range(60)], "label": [0, 1] * 30}
    pd.DataFrame(rows).to_csv(path, index=False)
    data.clear_caches()
    before = data.client_examples(local, tok, 0, 2, tmp_path / "cache")
    rows = {"sentence": [f"{words[i % 3]} {i}" for i in range(60)]}
    rows["label"] = [0, 1, 2] * 20
    pd.DataFrame(rows).to_csv(path, index=False)  # the site's data, updated
    data.clear_caches()  # a fresh process
    after = data.client_examples(local, tok, 0, 2, tmp_path / "cache")
    data.clear_caches()
    assert after == data.client_examples(local, tok, 0, 2)  # as without a cache
    assert after != before
    assert data.resolve_labels(local, tmp_path / "cache").model.num_labels == 3


def test_deploy_services_stop_kills_process_groups_and_escaped_children(tmp_path):
    plan = deploy.Plan(tmp_path, 1)
    services = deploy.Services(plan)
    escaped = (
        "import subprocess, time; subprocess.Popen(['sleep', '300'], "
        "start_new_session=True); time.sleep(300)"
    )
    services.start("group", ["sh", "-c", "sleep 300 & sleep 300"])
    services.start("escaper", [sys.executable, "-c", escaped])
    services.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 300"])
    time.sleep(1.0)
    leaders = [psutil.Process(proc.pid) for proc in services.procs.values()]
    pids = {p.pid for leader in leaders for p in [leader, *leader.children(True)]}
    assert len(pids) >= 6
    services.stop(grace=2.0)
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.NoSuchProcess:
            pass
    assert alive == []


def test_deploy_launcher_stops_its_services_when_terminated(tmp_path):
    """SIGTERM while the launcher starts its services: it still stops them all."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.launch",
            "--work",
            str(tmp_path),
            "federation.num_clients=1",
            "federation.min_train_clients=1",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "supernode-0.log").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert len(leftovers(tmp_path)) >= 3  # SuperLink, SuperExec, SuperNode
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) != 0
    finally:
        proc.kill()
        proc.wait()
    assert leftovers(tmp_path) == []


def leftovers(work: Path) -> list[str]:
    """Live processes that a launcher started for ``work`` (their ``FLWR_HOME``)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(
                "FLWR_HOME", ""
            ).startswith(str(work)):
                found.append(f"{p.pid} {' '.join(p.cmdline())}")
        except psutil.Error:
            pass
    return found


def test_deploy_a_sigterm_while_a_service_starts_waits_until_it_is_recorded(
    tmp_path, monkeypatch
):
    """The launcher's SIGTERM exit (143) never falls between a service's fork and its
    bookkeeping, where stop() would miss it (a SuperExec once outlived a launcher)."""
    plan = deploy.Plan(tmp_path, 1)
    services = deploy.Services(plan)

    class Forked:  # stands in for the Popen of a service that has started
        pid = 4242

    def popen(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-start
        time.sleep(0.05)  # the handler has run by now
        return Forked()

    monkeypatch.setattr(deploy.subprocess, "Popen", popen)
    previous = signal.signal(signal.SIGTERM, deploy.on_sigterm)
    try:
        with pytest.raises(SystemExit) as exited:
            services.start("superexec-clientapp-0", ["flower-superexec"])
        assert exited.value.code == 143
        assert isinstance(services.procs["superexec-clientapp-0"], Forked)
        with pytest.raises(SystemExit):  # unheld, it exits at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_deploy_node_config_entries_reach_their_supernode_only():
    extra = deploy.parse_node_config(["0:rank=2", "2:rank=8", "0:note=x"], 3)
    assert extra == {0: "rank=2 note=x", 2: "rank=8"}
    cmds = deploy.commands(deploy.Plan(Path("/w"), 3, node_config=extra))
    configs = [cmds[f"supernode-{i}"][-1].split() for i in range(3)]
    assert configs[0][-2:] == ["rank=2", "note=x"]
    assert not any(kv.startswith("rank=") for kv in configs[1])
    assert configs[2][-1] == "rank=8"
    assert configs[1][:2] == ["partition-id=1", "num-partitions=3"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("rank=2", "expected I:KEY=VALUE"),
        ("0:rank", "expected I:KEY=VALUE"),
        ("3:rank=2", "node index must be 0..2"),
    ],
)
def test_deploy_node_config_refuses_malformed_entries(entry, message):
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        deploy.parse_node_config([entry], 3)
    assert err.value.key == "--node-config"


def test_deploy_resume_takes_what_the_command_line_leaves_out_from_the_record(
    tmp_path,
):
    """``--resume RUN_DIR`` alone continues the run as it was launched: its work
    folder, TLS, authentication and node-config entries come from its
    ``deployment.json``; what the command line gives still wins."""
    import argparse
    import json

    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir(), run.mkdir()
    extra = deploy.parse_node_config(["0:rank=2", "2:rank=8", "0:note=x"], 3)
    plan = deploy.Plan(work, 3, auth=True, node_config=extra)
    (run / "deployment.json").write_text(json.dumps(deploy.plan_record(plan)))

    def resumed(**given):
        args = argparse.Namespace(
            resume=run, out=None, work=None, tls=False, auth=False, node_config=[]
        )
        args.overrides = ["federation.rounds=6"]
        vars(args).update(given)
        deploy.resume_args(args)
        return args

    args = resumed()
    assert (args.out, args.work, args.tls, args.auth) == (run, work, True, True)
    assert deploy.parse_node_config(args.node_config, 3) == extra
    assert args.overrides == ["federation.rounds=6", f"resume={run}"]
    assert resumed(node_config=["1:rank=4"]).node_config == ["1:rank=4"]
    shutil.rmtree(work)  # a work folder that is gone: a new one is made
    assert resumed().work is None
    (run / "deployment.json").unlink()  # no record: the command line alone
    args = resumed(tls=True)
    assert (args.work, args.tls, args.auth, args.node_config) == (None, True, False, [])
