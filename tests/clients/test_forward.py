"""The deployment's ClientApp (clients/forward.py) and the node's long-lived worker
(clients/worker.py): each message runs in a fresh forwarding process, as Flower's
``flwr-clientapp`` does, and the worker it reaches is the real one (it imports the
real ClientApp). A process that stands in for the SuperExec is the one the worker
watches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients import forward
from clients.client_app import app as real_app
from fedlora.build import build_cached, initial_state
from fedlora.settings import with_
from strategies.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_EXPERIMENT,
    KEY_METRICS,
    KEY_ROUND,
    KEY_RUN_ID,
    KEY_STATE_LOCAL,
    record_to_state,
    state_to_record,
)
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("task_identity")

FEDSA = "fedlora.methods.fedsa_lora.FedSALoRA"  # keeps its own B in context.state
#: a fresh ClientApp process: forward one message (files in the folder argv[-1])
CHILD = """
import json, sys
from pathlib import Path
from flwr.supercore.task_identity import TaskIdentity
for name in ("task_id", "run_id", "node_id"):
    setattr(TaskIdentity, name, 1)
from clients import forward
d = Path(sys.argv[-1])
msg, ctx = forward.decode((d / "msg").read_bytes(), (d / "ctx").read_bytes())
out = {"torch": False}
try:
    reply = forward.app(msg, ctx)
except Exception as exc:
    reply, out["error"] = None, [str(type(exc)), str(exc)]
r, c = forward.encode(reply, ctx)
(d / "reply").write_bytes(r)
(d / "ctx.out").write_bytes(c)
out["torch"] = "torch" in sys.modules
print(json.dumps({**out, **forward.last}))
"""


def node_settings(settings, *changes):
    return with_(
        settings,
        "strategy",
        {"_target_": FEDSA, "weighting": "num_examples", "max_update_norm_ratio": 0},
        "train.local_steps",
        2,
        "train.num_threads",
        1,
        *changes,
    )


def train_message(cfg, server_round=1, kind="train") -> Message:
    model, _ = build_cached(cfg)
    config = ConfigRecord(
        {
            KEY_EXPERIMENT: json.dumps(cfg.to_dict()),
            KEY_ROUND: server_round,
            KEY_RUN_ID: "fwd-test",
        }
    )
    content = {KEY_CONFIG: config, KEY_ARRAYS: state_to_record(initial_state(model))}
    return Message(content=RecordDict(content), dst_node_id=1, message_type=kind)


def node(data_dir: Path, **extra) -> Context:
    config = {"partition-id": 0, "num-partitions": 2, "data-dir": str(data_dir)}
    return Context(
        run_id=7,
        node_id=1,
        node_config={**config, **extra},
        state=RecordDict(),
        run_config={},
    )


@pytest.fixture
def superexec():
    """A process standing in for the SuperExec that starts ClientApp processes;
    whatever workers the test started are killed at the end."""
    proc = subprocess.Popen(["sleep", "600"])
    started: list[int] = []
    yield proc, started
    proc.kill()
    proc.wait()
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def short_dir():
    """A folder with a short path (a socket's path is limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fwd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fresh_process(
    message: Message,
    context: Context,
    work: Path,
    superexec,
    tree: Path = REPO,
    wait: bool = True,
):
    """Forward ``message`` from a fresh interpreter (code from ``tree``) whose
    SuperExec is ``superexec``; the child's report, the reply and the context that
    came back (or the Popen with ``wait=False``)."""
    proc, started = superexec
    work.mkdir(parents=True, exist_ok=True)
    msg, ctx = forward.encode(message, context)
    (work / "msg").write_bytes(msg)
    (work / "ctx").write_bytes(ctx)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "FEDLORA_CLIENT_WORKER": "1",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [sys.executable, "-c", CHILD, "--parent-pid", str(proc.pid), str(work)]
    child = subprocess.Popen(
        argv, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if not wait:
        return child
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err.decode()[-3000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    if "pid" in report:
        started.append(report["pid"])
    reply, back = forward.decode(
        (work / "reply").read_bytes(), (work / "ctx.out").read_bytes()
    )
    return report, reply, back


def wait_gone(pid: int, seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def assert_same_reply(got: Message, want: Message) -> None:
    a, b = (
        record_to_state(got.content[KEY_ARRAYS]),
        record_to_state(want.content[KEY_ARRAYS]),
    )
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    m1, m2 = dict(got.content[KEY_METRICS]), dict(want.content[KEY_METRICS])
    for key in ("num-examples", "train_loss", "steps"):
        assert m1.get(key) == m2.get(key), key


def test_forward_a_nodes_messages_reach_one_worker_and_its_state_comes_back(
    settings, tmp_path, superexec, short_dir
):
    """Two messages, each from a fresh ClientApp process that never imports
    torch: one worker serves both (same pid, started once), its replies are the
    in-process ClientApp's bit for bit, and the node state the worker's handler
    wrote (FedSA-LoRA's own B) reaches the forwarder's context; the socket folder
    is private."""
    cfg = node_settings(settings)
    first_ctx = node(short_dir / "node")
    report, reply, back = fresh_process(
        train_message(cfg, 1), first_ctx, tmp_path / "m1", superexec
    )
    assert report.get("started") is True and report["torch"] is False
    ref_ctx = node(tmp_path / "ref")
    want = real_app(train_message(cfg, 1), ref_ctx)
    assert_same_reply(reply, want)
    assert KEY_STATE_LOCAL in back.state  # written in the worker, came back
    held = record_to_state(back.state[KEY_STATE_LOCAL])
    ref = record_to_state(ref_ctx.state[KEY_STATE_LOCAL])
    for key in ref:
        np.testing.assert_array_equal(held[key], ref[key], err_msg=key)

    again, reply2, back2 = fresh_process(
        train_message(cfg, 2), back, tmp_path / "m2", superexec
    )
    assert again["pid"] == report["pid"] and "started" not in again
    assert_same_reply(reply2, real_app(train_message(cfg, 2), ref_ctx))
    sock = Path(again["socket"])
    assert sock.parent == short_dir / "node" / "worker"  # <data-dir>/worker
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert sock.parent.stat().st_uid == os.getuid()


def test_forward_an_exception_in_the_worker_is_raised_as_the_clientapp_raised_it(
    settings, tmp_path, superexec
):
    """Flower's error reply reads the exception's type and message: the forwarder
    raises the ClientApp's own (an injected fault) and the worker serves on."""
    cfg = node_settings(settings, "faults", {"raise_partition": 0})
    ctx = node(tmp_path / "node")
    with pytest.raises(RuntimeError) as direct:
        real_app(train_message(cfg, 1), node(tmp_path / "ref"))
    report, _, _ = fresh_process(train_message(cfg, 1), ctx, tmp_path / "m1", superexec)
    assert report["error"] == [str(type(direct.value)), str(direct.value)]
    ok, reply, _ = fresh_process(
        train_message(node_settings(settings), 1), ctx, tmp_path / "m2", superexec
    )
    assert ok["pid"] == report["pid"] and not reply.has_error()


def test_forward_a_worker_killed_mid_message_fails_that_message_only(
    settings, tmp_path, superexec
):
    """SIGKILL the worker while it trains: that ClientApp process raises (Flower
    replies with an error: a failed client); the next message starts a fresh
    worker and succeeds."""
    slow = node_settings(settings, "train.local_steps", 100_000)
    ctx = node(tmp_path / "node")
    child = fresh_process(
        train_message(slow), ctx, tmp_path / "m1", superexec, wait=False
    )
    cache = tmp_path / "node" / "cache"
    deadline = time.monotonic() + 300
    while not list(cache.glob("tokenised-*.json")):  # the worker reached the data
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.2)
    workers = [
        p.pid
        for p in psutil.Process(child.pid).children(recursive=True)
        if "clients.worker" in p.cmdline()
    ]
    assert len(workers) == 1
    superexec[1].append(workers[0])
    os.kill(workers[0], signal.SIGKILL)
    out, err = child.communicate(timeout=120)
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert "WorkerError" in report["error"][0] and "mid-message" in report["error"][1]
    again, reply, _ = fresh_process(
        train_message(node_settings(settings)), ctx, tmp_path / "m2", superexec
    )
    assert again.get("started") is True and again["pid"] != workers[0]
    assert not reply.has_error()


def test_forward_the_worker_exits_when_idle_and_when_its_superexec_is_gone(
    settings, tmp_path, superexec
):
    """``worker-idle-timeout`` seconds without a message end the worker (its
    socket removed); so does the end of the SuperExec, whatever the timeout."""
    cfg = node_settings(settings)
    idle = node(tmp_path / "idle", **{"worker-idle-timeout": 1})
    report, _, _ = fresh_process(train_message(cfg), idle, tmp_path / "m1", superexec)
    assert wait_gone(report["pid"])
    assert not Path(report["socket"]).exists()

    ctx = node(tmp_path / "node")
    report, _, _ = fresh_process(train_message(cfg), ctx, tmp_path / "m2", superexec)
    superexec[0].kill()
    superexec[0].wait()
    assert wait_gone(report["pid"])


def test_forward_other_code_gets_another_worker(settings, tmp_path, superexec):
    """The same node forwarding from another copy of the code (another FAB)
    reaches another worker, which imports that copy."""
    copy = tmp_path / "fab"
    for package in ("clients", "fedlora", "strategies"):
        shutil.copytree(
            REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    cfg = node_settings(settings)
    ctx = node(tmp_path / "node")
    ours, _, _ = fresh_process(train_message(cfg), ctx, tmp_path / "m1", superexec)
    theirs, _, _ = fresh_process(
        train_message(cfg), ctx, tmp_path / "m2", superexec, tree=copy
    )
    assert theirs.get("started") is True and theirs["pid"] != ours["pid"]
    cmdline = Path(f"/proc/{theirs['pid']}/environ").read_bytes().split(b"\0")
    path = [v for v in cmdline if v.startswith(b"PYTHONPATH=")][0].decode()
    assert path.split("=", 1)[1].split(os.pathsep)[0] == str(copy)


def test_forward_opt_out_runs_the_clientapp_in_process(settings, tmp_path, monkeypatch):
    """Node config ``worker=false``: the real ClientApp runs in this process (no
    worker, no socket folder), with the in-process reply."""
    cfg = node_settings(settings)
    forward.last.clear()
    monkeypatch.setenv(forward.WORKER_ENV, "1")  # the node config wins over it
    ctx = node(tmp_path / "node", worker=False)
    got = forward.app(train_message(cfg), ctx)
    assert_same_reply(got, real_app(train_message(cfg), node(tmp_path / "ref")))
    assert not (tmp_path / "node" / "worker").exists() and forward.last == {}
    assert KEY_STATE_LOCAL in ctx.state


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        ({"worker": "maybe"}, {}, "node config worker='maybe'"),
        ({}, {forward.WORKER_ENV: "sometimes"}, "FEDLORA_CLIENT_WORKER='sometimes'"),
        ({"worker-idle-timeout": 0}, {}, "node config worker-idle-timeout=0"),
    ],
)
def test_forward_bad_worker_settings_are_configuration_errors(
    settings, tmp_path, monkeypatch, config, env, message
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reply = forward.app(train_message(settings), node(tmp_path, **config))
    assert reply.has_error() and reply.error.reason.startswith(message)
