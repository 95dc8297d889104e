"""Ray for the simulation: attach to a running cluster, or start one head that a
whole Hydra sweep shares.

Flower's Ray backend starts Ray when a run begins and shuts it down when it ends, so
each run of a sweep pays Ray's start-up (several seconds on a laptop). A sweep run
from the front door (``-m``, Hydra's basic launcher: its runs one after another in
one process) instead starts one local head on the first run (:func:`sweep_address`),
attaches every run to it and stops it when the process exits.

Attaching (``simulation.ray_address`` or the sweep's head): the workers are started
by the cluster, not by this process, so they do not inherit its environment; the
variables the clients read (:data:`FORWARDED`) travel in the job's runtime
environment instead (:func:`attach`).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from fedlora.ports import free_ports

#: environment variables the simulated clients read, forwarded to a cluster's
#: workers: their own folder (privacy ledgers, node state), offline hubs, quiet
#: libraries
FORWARDED_PREFIXES = ("FEDLORA_", "HF_", "TRANSFORMERS_", "FLWR_", "TOKENIZERS_")
RAY = str(Path(sys.executable).with_name("ray"))


def forwarded_env() -> dict[str, str]:
    """The variables of this process the clients need (:data:`FORWARDED_PREFIXES`)
    and Python's import path, as Flower's own Ray start passes it."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def attach(address: str) -> None:
    """Connect this process to the cluster at ``address`` with the clients'
    environment in the job's runtime environment. Flower's backend then finds Ray
    initialised and uses it; its ``ray.shutdown()`` at the run's end only
    disconnects."""
    import ray

    ray.init(
        address=address,
        runtime_env={"env_vars": forwarded_env()},
        logging_level="error",
        include_dashboard=False,
    )


#: what Ray runs in each worker process of a run's own Ray as it starts
WARM_HOOK = "clients.warmup.warm"
#: Ray's driver-side hook on the job's runtime environment (a function's path)
RUNTIME_ENV_HOOK = "RAY_RUNTIME_ENV_HOOK"
_WARM_ENV: dict[str, str] = {}  # the variables the warm-up reads, this run's


def warm_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``runtime_env`` (Flower's, for the Ray it starts) with the warm-up added:
    :data:`WARM_HOOK` as each worker's setup hook, the variables it reads among
    the workers' environment. Ray calls it in ``ray.init`` under
    :func:`warm_workers`."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), **_WARM_ENV}
    env["worker_process_setup_hook"] = WARM_HOOK
    return env


@contextmanager
def warm_workers(warm_settings: str | None) -> Iterator[None]:
    """Within it, a Ray that Flower starts warms each worker as it starts
    (:mod:`clients.warmup`: the ClientApp's imports, and with ``warm_settings``,
    the settings as JSON, its model and data), while the server starts and
    evaluates round 0, so the first round does not pay for them. Flower still
    starts Ray (beside the server's start, as before) with its own arguments;
    this only adds to the job's runtime environment, through Ray's
    ``RAY_RUNTIME_ENV_HOOK`` (a hook of the user's own is left alone: no
    warm-up)."""
    from clients.warmup import SETTINGS_ENV

    if os.environ.get(RUNTIME_ENV_HOOK):
        yield
        return
    _WARM_ENV.clear()
    if warm_settings is not None:
        _WARM_ENV[SETTINGS_ENV] = warm_settings
    os.environ[RUNTIME_ENV_HOOK] = f"{__name__}.warm_runtime_env"
    try:
        yield
    finally:
        del os.environ[RUNTIME_ENV_HOOK]
        _WARM_ENV.clear()


class EarlyRay:
    """A run's own Ray, started in a background thread as soon as the settings
    are known, so that Ray's processes (and with :func:`warm_workers`, the
    workers' warm-up) start on the other cores while this process checks the
    model and data and builds the server's model, instead of after. Flower's
    backend then finds Ray initialised and uses it; what Ray is started with is
    what Flower's backend would start it with (``init_args``, the driver's
    import path in the workers' environment and in ``PYTHONPATH``).

    Use it as a context manager; :meth:`ready` waits for Ray (raising what
    ``ray.init`` raised); leaving shuts Ray down (also when the run never
    started: a configuration error found meanwhile)."""

    def __init__(self, init_args: dict[str, Any], warm: str | None | bool) -> None:
        self.init_args = dict(init_args)
        self.init_args.setdefault("include_dashboard", False)
        #: the settings JSON to warm with, None for the imports only, False: no
        #: warm-up
        self.warm = warm
        self._stack = ExitStack()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._up, self._release = threading.Event(), threading.Event()
        self.seconds: float | None = None  #: how long ``ray.init`` took

    def __enter__(self) -> EarlyRay:
        if self.warm is not False:
            self._stack.enter_context(warm_workers(self.warm or None))
        pythonpath = os.pathsep.join(sys.path)  # as Flower's backend passes it
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
        env = {"env_vars": {"PYTHONPATH": pythonpath}}
        self._thread = threading.Thread(
            target=self._init, args=(env,), name="fedlora-ray-init", daemon=True
        )
        self._thread.start()
        return self

    def _init(self, runtime_env: dict[str, Any]) -> None:
        import ray

        start = time.perf_counter()
        try:
            ray.init(runtime_env=runtime_env, **self.init_args)
        except BaseException as exc:  # noqa: BLE001 - raised again in ready()
            self._error = exc
        self.seconds = time.perf_counter() - start
        self._up.set()
        # Ray's processes die with the thread that started them (Linux's
        # parent-death signal is per thread): this one lives until Ray is shut
        self._release.wait()

    def ready(self) -> None:
        """Wait until Ray is up.

        Raises
        ------
        Exception
            What ``ray.init`` raised.
        """
        self._up.wait()
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc: object) -> None:
        import ray

        try:
            self._up.wait()
            if ray.is_initialized():
                ray.shutdown()
        finally:
            self._release.set()
            if self._thread is not None:
                self._thread.join()
            self._stack.close()


def cluster_up(address: str) -> bool:
    """Whether ``ray status`` reaches a cluster at ``address``."""
    proc = subprocess.run(
        [RAY, "status", "--address", address], capture_output=True, text=True
    )
    return proc.returncode == 0 and "node_" in proc.stdout


class RayHead:
    """A local Ray head (``ray start --head --block``) in its own process group.

    Parameters
    ----------
    num_cpus : int, optional
        CPUs the head offers (default: Ray's, all cores).
    temp_dir : str or Path, optional
        Ray's session folder (default: a new short folder under /tmp; Ray's
        socket paths must stay short).
    """

    def __init__(self, num_cpus: int | None = None, temp_dir: str | None = None):
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = Path(temp_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.num_cpus = num_cpus
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> str:
        """Start the head and wait until it serves; its address.

        Raises
        ------
        RuntimeError
            If ``ray start`` exits, or the head does not serve within ``timeout``.
        """
        cmd = [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            *([f"--num-cpus={self.num_cpus}"] if self.num_cpus else []),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
        )
        deadline = time.monotonic() + timeout
        while not cluster_up(self.address):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited ({self.proc.returncode})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not serve within {timeout:.0f} s")
            time.sleep(1)
        return self.address

    def alive(self) -> bool:
        """Whether the head's ``ray start`` process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the head and every process of its group (SIGTERM, then SIGKILL)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.5)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a process we may not signal
        return True
    return True


_SWEEP_HEAD: RayHead | None = None


def sweep_address(num_cpus: int | None) -> str:
    """The address of this process's sweep head, started on first use (with
    ``num_cpus``, the sweep's ``simulation.ray_num_cpus``) and stopped when the
    process exits."""
    global _SWEEP_HEAD
    if _SWEEP_HEAD is None or not _SWEEP_HEAD.alive():
        head = RayHead(num_cpus=num_cpus)
        head.start()
        atexit.register(head.stop)
        _SWEEP_HEAD = head
        print(
            f"[fedlora] sweep: one Ray head for all runs at {head.address}",
            flush=True,
        )
    return _SWEEP_HEAD.address
