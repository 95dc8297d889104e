"""A node's long-lived ClientApp worker: serves the messages :mod:`clients.forward`
hands it, one at a time, with :mod:`clients.client_app` imported once.

    python -P -m clients.worker --socket PATH --watch PID [--idle-timeout S]

It listens on ``PATH`` (mode 0600, in the forwarder's 0700 folder) and serves only
its own user. Each connection carries one message and the node's context; the
worker runs the real ClientApp on them and answers with a header (its pid, the CPU
seconds the message took, the ClientApp's exception if it raised), the reply and
the context. It exits after ``S`` seconds without a message and as soon as process
``PID`` (the SuperExec) is gone. Between messages it keeps what a Ray worker of the
simulation keeps (the model built for the same settings, tokenised partitions)
except that a message of another Flower run starts from freshly built models, and
torch's thread count is reset to the one a fresh process starts with.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from clients.forward import decode, encode, recv_frame, send_frames


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a dead process its parent has not reaped yet
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Worker:
    """The listening socket and the ClientApp it serves."""

    def __init__(self, path: Path, watch: int, idle: float) -> None:
        self.path, self.watch, self.idle = path, watch, idle
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = Path(f"{path}.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        self.listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        self.listener.listen(8)
        os.replace(tmp, path)  # atomic: replaces a dead worker's socket
        self.inode = os.stat(path).st_ino
        self.app: Any = None
        self.run_id: int | None = None
        self.threads = 0

    def remove_socket(self) -> None:
        """Unlink the socket if it is still this worker's, and its lock and (empty)
        log: a worker that exits leaves nothing behind but what it logged."""
        try:
            if os.stat(self.path).st_ino != self.inode:
                return
            os.unlink(self.path)
            stem = str(self.path).removesuffix(".sock")
            Path(f"{stem}.lock").unlink(missing_ok=True)
            if os.path.getsize(f"{stem}.log") == 0:
                os.unlink(f"{stem}.log")
        except OSError:
            pass

    def on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM (its SuperExec's process group stopped): exit now, tidily."""
        self.remove_socket()
        os._exit(128 + signum)

    def watch_superexec(self) -> None:
        """Exit (at once, even mid-message) when the SuperExec is gone."""
        while alive(self.watch):
            time.sleep(0.5)
        self.remove_socket()
        os._exit(0)

    def load(self) -> None:
        """Import the real ClientApp (once)."""
        if self.app is None:
            import torch

            from clients import client_app

            self.app, self.threads = client_app.app, torch.get_num_threads()

    def serve_forever(self) -> None:
        """Serve connections one at a time until idle for ``idle`` seconds."""
        signal.signal(signal.SIGTERM, self.on_sigterm)
        threading.Thread(target=self.watch_superexec, daemon=True).start()
        self.listener.settimeout(self.idle)
        try:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    return
                with conn:
                    conn.settimeout(None)
                    if _same_user(conn):
                        self.serve(conn)
        finally:
            self.remove_socket()

    def serve(self, conn: socket.socket) -> None:
        """One message: the ClientApp's reply (or its exception) and the context."""
        try:
            header = json.loads(recv_frame(conn))
            message, context = decode(recv_frame(conn), recv_frame(conn))
        except (ConnectionError, ValueError):
            return  # a forwarder that went away: nothing to answer
        start = time.process_time()
        self.load()
        self.reset(context.run_id, header.get("task"))
        error = None
        try:
            reply = self.app(message, context)
        except Exception as exc:  # noqa: BLE001  (replied to the forwarder)
            reply, error = (
                None,
                {
                    "module": type(exc).__module__,
                    "qualname": type(exc).__qualname__,
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                },
            )
            print(error["traceback"], file=sys.stderr, flush=True)
        reply_bytes, ctx_bytes = encode(reply, context)
        out = {"pid": os.getpid(), "cpu_s": time.process_time() - start}
        try:
            send_frames(conn, json.dumps({**out, "error": error}).encode())
            send_frames(conn, reply_bytes, ctx_bytes)
        except OSError:
            pass  # the forwarder is gone (its SuperExec stopped it)

    def reset(self, run_id: int, task: list[int | None] | None) -> None:
        """What a fresh process would start the message with: torch's thread count,
        Flower's task identity and, for another Flower run, no cached models."""
        import torch
        from flwr.supercore.task_identity import TaskIdentity

        from fedlora import build

        torch.set_num_threads(self.threads)
        if task:
            ids = dict(zip(("task_id", "run_id", "node_id"), task, strict=True))
            for name, value in ids.items():
                if value is not None:
                    setattr(TaskIdentity, name, value)
        if run_id != self.run_id:
            build.clear_cache()
            self.run_id = run_id


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this user (Linux: SO_PEERCRED; elsewhere the
    socket's 0700 folder is the only gate)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--watch", type=int, required=True, help="the SuperExec's pid")
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    Worker(args.socket, args.watch, args.idle_timeout).serve_forever()


if __name__ == "__main__":
    main()
