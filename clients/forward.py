"""The ClientApp a deployment runs: it forwards each message to the node's worker.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message. Importing
torch, transformers and PEFT and building the model costs such a process about 7 s
of CPU before it trains. This ClientApp imports Flower and the standard library
only; it hands the message and the node's context to a long-lived worker process
on the same node (:mod:`clients.worker`) that imported :mod:`clients.client_app`
once and keeps its caches, as the simulation's Ray workers do, and copies back
the reply and the context (its ``state`` carries the node's state between
messages, e.g. secure aggregation's secrets between stages).

- Transport: a Unix domain socket in ``<data-dir>/worker`` (node config
  ``data-dir``), else in a per-user runtime folder; the folder has mode 0700 and
  the worker serves only its own user. The Message and Context travel as Flower's
  own protobuf messages (``flwr.common.serde``).
- One worker per SuperExec, code and Python: its key hashes the app folder this
  module was loaded from (with its files' times), ``sys.path``,
  ``sys.executable``, the parent process (the SuperExec that starts ClientApp
  processes) and the socket folder; a message of other code starts another worker.
- Lifecycle: the first message starts the worker; it exits after
  ``worker-idle-timeout`` seconds without a message and as soon as that SuperExec
  is gone. It stays in the SuperExec's process group, so whatever stops the group
  stops it too.
- Failure: a worker that dies mid-message (or cannot start) makes this ClientApp
  raise, which Flower turns into an error reply (a failed client); the next
  message starts a fresh worker. An exception of a handler in the worker is raised
  here under the same name and message, so the error reply is the one the
  ClientApp gives in-process.
- Opt-out: node config ``worker=false`` (or ``FEDLORA_CLIENT_WORKER=0``) runs
  :mod:`clients.client_app` in this process, as before; so does any process but
  Flower's ``flwr-clientapp`` (e.g. ``flwr run . local``'s Ray workers) unless
  ``worker=true`` or ``FEDLORA_CLIENT_WORKER=1`` says otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedlora.errors import ConfigError
from strategies.wire import ERROR_CONFIG

#: the real ClientApp's module (its ``app``); the worker serves it
REAL_APP = "clients.client_app"
#: node config key and environment variable of the opt-out (false: in-process)
WORKER_KEY, WORKER_ENV = "worker", "FEDLORA_CLIENT_WORKER"
#: node config key and environment variable of the worker's idle timeout (seconds)
IDLE_KEY, IDLE_ENV = "worker-idle-timeout", "FEDLORA_WORKER_IDLE_TIMEOUT"
IDLE_DEFAULT_S = 300.0
#: how long a new worker may take to listen on its socket (an interpreter start)
START_TIMEOUT_S = 120.0
_FALSE, _TRUE = ("false", "0", "no", "off"), ("true", "1", "yes", "on")
_SOCKET_PATH_MAX = 100  # sun_path holds 104-108 bytes, depending on the system
APP_DIR = Path(__file__).resolve().parent.parent
#: the latest forwarded message: the worker's ``pid`` and ``cpu_s`` (its CPU for that
#: message), its ``socket``, ``started`` (this message started it); for tests and
#: experiments/startup.py
last: dict[str, Any] = {}


class WorkerError(RuntimeError):
    """The node's worker died mid-message or could not start."""


def _raised_in_worker(module: str, qualname: str) -> type[Exception]:
    """An exception class that prints as the worker's did: Flower's error reply
    reads ``str(type(ex))``, so the reply is the one an in-process ClientApp gives."""
    name = qualname.rsplit(".", 1)[-1]
    return type(name, (Exception,), {"__module__": module, "__qualname__": qualname})


class ForwardingClientApp(ClientApp):
    """A ClientApp that forwards every message type to the node's worker."""

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            use_worker = worker_enabled(context)
            idle = idle_timeout(context)
        except ConfigError as exc:  # as clients.client_app replies to its own
            return Message(Error(code=ERROR_CONFIG, reason=str(exc)), reply_to=message)
        if not use_worker:
            return importlib.import_module(REAL_APP).app(message, context)
        return forward(message, context, idle)


app = ForwardingClientApp()


def _flag(value: Any, key: str) -> bool:
    """A node config or environment on/off value."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _FALSE or text in _TRUE:
        return text in _TRUE
    raise ConfigError(key, value, "set true or false")


def worker_enabled(context: Context) -> bool:
    """Node config ``worker``, else ``$FEDLORA_CLIENT_WORKER``, else whether this
    is a deployment's one-message process (``flwr-clientapp``): Flower's own
    simulation (``flwr run . local``) keeps its Ray workers and runs the app in them."""
    if WORKER_KEY in context.node_config:
        return _flag(context.node_config[WORKER_KEY], f"node config {WORKER_KEY}")
    if WORKER_ENV in os.environ:
        return _flag(os.environ[WORKER_ENV], WORKER_ENV)
    return Path(sys.argv[0]).name == "flwr-clientapp"


def idle_timeout(context: Context) -> float:
    """Node config ``worker-idle-timeout``, else ``$FEDLORA_WORKER_IDLE_TIMEOUT``,
    else 300 (seconds)."""
    key, value = f"node config {IDLE_KEY}", context.node_config.get(IDLE_KEY)
    if value is None:
        key, value = IDLE_ENV, os.environ.get(IDLE_ENV, IDLE_DEFAULT_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(key, value, "give the worker's idle timeout in seconds (> 0)")
    return seconds


def socket_dir(context: Context) -> Path:
    """``<data-dir>/worker`` when the node config names a data location, else
    ``$XDG_RUNTIME_DIR/fedlora-worker``, else ``<tmp>/fedlora-worker-<uid>``."""
    data_dir = context.node_config.get("data-dir")
    if data_dir:
        return Path(str(data_dir)).expanduser().absolute() / "worker"
    return _runtime_dir()


def _runtime_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "fedlora-worker"
    return Path(tempfile.gettempdir()) / f"fedlora-worker-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """``path``, created with mode 0700 if missing; refused unless it is a folder
    of this user (not a link); its mode is made 0700.

    Raises
    ------
    PermissionError
        The folder belongs to another user or is not a folder.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
        raise PermissionError(
            f"{path}: the worker's socket folder must be a folder of user "
            f"{os.getuid()} (found owner {st.st_uid}); remove it or point the node "
            "config's data-dir elsewhere"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def superexec_pid() -> int:
    """The process that starts ClientApp processes: Flower passes it as
    ``--parent-pid``; else this process's parent."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "--parent-pid" and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return os.getppid()


def _code_stamp() -> list[Any]:
    """Each Python file of the app's packages with its time and size: code changed
    in place starts another worker."""
    stamp: list[Any] = []
    for top in sorted(APP_DIR.iterdir()):
        if not (top / "__init__.py").is_file():
            continue
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            for name in sorted(f for f in files if f.endswith(".py")):
                st = os.stat(os.path.join(root, name))
                stamp.append([os.path.join(root, name), st.st_mtime_ns, st.st_size])
    return stamp


def _search_path() -> list[str]:
    """This process's ``sys.path``, absolute (the worker imports what it would)."""
    return [os.path.abspath(p) if p else os.getcwd() for p in sys.path]


def worker_paths(context: Context, parent: int) -> dict[str, Path]:
    """The worker's socket, lock and log for this node, code and SuperExec."""
    folder = socket_dir(context)
    key = json.dumps(
        [str(APP_DIR), sys.executable, _search_path(), _code_stamp(), parent]
        + [str(folder)]
    )
    name = "w-" + hashlib.sha256(key.encode()).hexdigest()[:20]
    if len(str(folder / f"{name}.sock.tmp")) > _SOCKET_PATH_MAX:
        folder = _runtime_dir()  # a long data-dir: the name keys it anyway
    return {
        "dir": folder,
        "socket": folder / f"{name}.sock",
        "lock": folder / f"{name}.lock",
        "log": folder / f"{name}.log",
    }


# ------------------------------------------------------------------- the transport
def send_frames(sock: socket.socket, *frames: bytes) -> None:
    """Each frame as an 8-byte big-endian length and its bytes."""
    for frame in frames:
        sock.sendall(struct.pack("!Q", len(frame)) + frame)


def recv_frame(sock: socket.socket) -> bytes:
    """One frame (:func:`send_frames`).

    Raises
    ------
    ConnectionError
        The other side closed the connection before the whole frame arrived.
    """
    (size,) = struct.unpack("!Q", _recv_exactly(sock, 8))
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError("the connection closed mid-frame")
        got += n
    return bytes(buf)


def encode(message: Message | None, context: Context) -> tuple[bytes, bytes]:
    """The message (None: empty) and the context as Flower's protobuf bytes."""
    msg = message_to_proto(message).SerializeToString() if message else b""
    return msg, context_to_proto(context).SerializeToString()


def decode(message: bytes, context: bytes) -> tuple[Message | None, Context]:
    """:func:`encode`'s inverse (an empty message: None)."""
    msg = message_from_proto(ProtoMessage.FromString(message)) if message else None
    return msg, context_from_proto(ProtoContext.FromString(context))


def _dial(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------- the worker
def _start_worker(paths: dict[str, Path], parent: int, idle: float) -> Any:
    """Start the worker (in this process group, not waited for: it outlives this
    process); its output goes to its log, the previous one kept as ``.log.1``."""
    if paths["log"].exists():
        os.replace(paths["log"], f"{paths['log']}.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_search_path())}
    argv = [sys.executable, "-P", "-m", "clients.worker"]
    argv += ["--socket", str(paths["socket"]), "--watch", str(parent)]
    argv += ["--idle-timeout", str(idle)]
    with open(paths["log"], "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
        )


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect(context: Context, idle: float) -> socket.socket:
    """A connection to this node's worker; starts one when none listens (under a
    file lock: concurrent ClientApp processes of a node start one between them).

    Raises
    ------
    WorkerError
        The worker exited before it listened, or did not listen in time.
    """
    parent = superexec_pid()
    paths = worker_paths(context, parent)
    private_dir(paths["dir"])
    last.clear()
    last["socket"] = str(paths["socket"])
    with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
        return _dial(paths["socket"])
    with _locked(paths["lock"]):
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            return _dial(paths["socket"])  # another message's process started it
        proc = _start_worker(paths, parent, idle)
        last["started"] = True
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                return _dial(paths["socket"])
            if proc.poll() is not None:
                tail = _tail(paths["log"])
                log(ERROR, "the node's worker failed to start:\n%s", tail)
                raise WorkerError(
                    f"the node's worker exited with code {proc.returncode} before "
                    f"it listened; see {paths['log']}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise WorkerError(
                    f"the node's worker did not listen within {START_TIMEOUT_S:.0f} "
                    f"s; see {paths['log']}"
                )
            time.sleep(0.02)


def forward(message: Message, context: Context, idle: float) -> Message:
    """Have the node's worker run the real ClientApp on ``message`` and
    ``context``; copy the context it returns into ``context`` (Flower persists
    that object) and return its reply, built as a reply to ``message``.

    Raises
    ------
    WorkerError
        The worker died mid-message or could not start.
    Exception
        What the ClientApp raised in the worker, under the same name and message.
    """
    from flwr.supercore.task_identity import TaskIdentity

    msg_bytes, ctx_bytes = encode(message, context)
    task = [TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id]
    with connect(context, idle) as sock:
        try:
            send_frames(sock, json.dumps({"task": task}).encode(), msg_bytes, ctx_bytes)
            del msg_bytes, ctx_bytes
            header = json.loads(recv_frame(sock))
            reply_bytes, new_context = recv_frame(sock), recv_frame(sock)
        except OSError as exc:  # ConnectionError included
            raise WorkerError(
                f"the node's worker died mid-message ({exc}); the next message "
                "starts a fresh one"
            ) from None
    last.update(pid=header["pid"], cpu_s=header["cpu_s"])
    reply, returned = decode(reply_bytes, new_context)
    context.state = returned.state  # node state, secure aggregation's secrets
    error = header.get("error")
    if error is not None:
        log(ERROR, "the ClientApp raised in the node's worker:\n%s", error["traceback"])
        raise _raised_in_worker(error["module"], error["qualname"])(error["message"])
    assert reply is not None
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(reply.content, reply_to=message)
