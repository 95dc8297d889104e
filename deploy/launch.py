"""Local deployment without Docker: a SuperLink and N SuperNodes as processes.

    python -m deploy.launch [--tls] [--auth] [--out DIR] [--work DIR]
                                 [--timeout S] [--node-config I:KEY=VALUE ...]
                                 [--resume RUN_DIR] [hydra overrides ...]

It starts the services of ``docker-compose.yml`` with the same flags
(:func:`commands`): ``superlink`` (Fleet API on gRPC, Control/Runtime API on HTTP),
``superexec-serverapp`` (runs the ServerApp), and for each of the
``federation.num_clients`` nodes ``supernode-i`` (node config ``partition-id=i
num-partitions=N data-dir=<work>/node-i``, plus what ``--node-config i:...`` adds,
e.g. ``--node-config 0:rank=2``: that node trains LoRA rank 2) and
``superexec-clientapp-i`` (one ClientApp process per message). Then it submits the
experiment with ``flwr run . <connection> --run-config <toml>`` (the Hydra overrides
and the output directory), waits for ``finished:completed``, checks the run directory
and stops every process it started, by PID, also when the run fails.

The SuperLink keeps its state in ``<work>/state/superlink.db`` (emptied at each
launch): if it exits mid-run, the launcher starts it again on that database and the
run continues. A run that fails anyway (e.g. its ServerApp died) is continued from
its newest checkpoint with ``--resume RUN_DIR`` (the launcher prints the command).
The SuperLink and SuperNodes serve gRPC health checks (``--health-server-address``).

Fault drills: :meth:`Services.kill` SIGKILLs one service's process group and
:meth:`Services.restart` starts it again with the same flags; a ``watch`` callback
given to :func:`deploy` sees the run's log as it grows and may call them mid-run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from fedlora.ports import free_ports

if TYPE_CHECKING:
    from fedlora.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flower-superlink & co. of this environment
CONNECTION = "fedlora"
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "plots/accuracy_vs_round.png",
)
ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` at run time
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Plan:
    """Where one local deployment's services listen and keep their files.

    Attributes
    ----------
    work : Path
        Logs, certificates, the nodes' data locations and the Flower homes.
    num_supernodes : int
        SuperNodes to start; node ``i`` holds partition ``i`` of ``num_supernodes``.
    tls, auth : bool
        TLS with a fresh CA; SuperNode authentication (implies TLS).
    host : str
        The SuperLink's address, bound and dialled.
    fleet_port, control_port, node_ports : int, int, list of int
        Fleet API, Control/Runtime API, SuperNodes' Runtime APIs (0: free ports).
    health_ports : list of int
        The gRPC health servers (``grpc.health.v1``, no TLS, on 127.0.0.1) of the
        SuperLink, then of each SuperNode (empty: free ports).
    prefix : dict
        Service name -> command prefix, e.g. ``["ip", "netns", "exec", "ns0"]``.
    node_config : dict
        Node index -> extra ``key=value`` entries of its node config, e.g.
        ``{0: "rank=2"}`` (the rank that SuperNode trains).
    """

    work: Path
    num_supernodes: int
    tls: bool = False
    auth: bool = False
    host: str = "127.0.0.1"
    fleet_port: int = 0
    control_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    health_ports: list[int] = field(default_factory=list)
    prefix: dict[str, list[str]] = field(default_factory=dict)
    node_config: dict[int, str] = field(default_factory=dict)

    drawn: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.tls = self.tls or self.auth  # Flower's node authentication needs TLS
        self.drawn = {"service"} if not self.fleet_port else set()
        self.drawn |= {"health"} if not self.health_ports else set()
        self.draw_ports()

    def draw_ports(self) -> None:
        """Draw free ports again for those the plan was not given (0 or empty)."""
        if "service" in self.drawn:
            self.fleet_port, self.control_port, *self.node_ports = free_ports(
                2 + self.num_supernodes
            )
        if "health" in self.drawn:
            self.health_ports = free_ports(1 + self.num_supernodes)

    @property
    def certs(self) -> Path:
        return self.work / "certs"

    @property
    def control_address(self) -> str:
        return f"{self.host}:{self.control_port}"

    @property
    def database(self) -> Path:
        """The SuperLink's state (runs, nodes, messages): it survives a restart."""
        return self.work / "state" / "superlink.db"

    def health_address(self, service: str) -> str:
        """``127.0.0.1:<port>`` of the health server of ``superlink`` or
        ``supernode-<i>``."""
        index = 0 if service == "superlink" else 1 + int(service.rsplit("-", 1)[1])
        return f"127.0.0.1:{self.health_ports[index]}"


def commands(plan: Plan) -> dict[str, list[str]]:
    """Each service's command line; ``docker-compose.yml`` runs the same flags.

    Returns
    -------
    dict
        ``{service name: argv}`` for ``superlink``, ``superexec-serverapp``,
        ``supernode-<i>`` and ``superexec-clientapp-<i>``.
    """
    certs, n = plan.certs, plan.num_supernodes
    fleet = f"{plan.host}:{plan.fleet_port}"
    server_tls = (
        [
            "--ssl-ca-certfile",
            f"{certs}/ca.crt",
            "--ssl-certfile",
            f"{certs}/superlink.crt",
            "--ssl-keyfile",
            f"{certs}/superlink.key",
        ]
        if plan.tls
        else ["--insecure"]
    )
    client_tls = (
        ["--root-certificates", f"{certs}/ca.crt"] if plan.tls else ["--insecure"]
    )
    out = {
        "superlink": [
            "flower-superlink",
            *server_tls,
            "--isolation",
            "process",
            "--host",
            plan.host,
            "--port",
            str(plan.control_port),
            "--fleet-api-address",
            fleet,
            "--disable-runtime-dependency-installation",
            "--database",
            str(plan.database),
            "--health-server-address",
            plan.health_address("superlink"),
            *(["--enable-supernode-auth"] if plan.auth else []),
        ],
        "superexec-serverapp": [
            "flower-superexec",
            *client_tls,
            "--runtime-api-address",
            plan.control_address,
        ],
    }
    for i, port in enumerate(plan.node_ports):
        key = ["--auth-supernode-private-key", f"{certs}/supernode-{i}"]
        out[f"supernode-{i}"] = [
            "flower-supernode",
            *client_tls,
            *(key if plan.auth else []),
            "--superlink",
            fleet,
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--health-server-address",
            plan.health_address(f"supernode-{i}"),
            "--node-config",  # last: drills and tests read it there
            " ".join(
                [
                    f"partition-id={i} num-partitions={n}",
                    f'data-dir="{plan.work}/node-{i}"',
                    *([plan.node_config[i]] if plan.node_config.get(i) else []),
                ]
            ),
        ]
        out[f"superexec-clientapp-{i}"] = [
            "flower-superexec",
            "--insecure",
            "--runtime-api-address",
            f"127.0.0.1:{port}",
        ]
    return out


class Services:
    """The processes this launcher started; :meth:`stop` ends each one by PID.

    Every service leads its own process group, so stopping it also stops the
    ServerApp/ClientApp processes its SuperExec started.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0  # of the SuperLink, by :func:`restart_superlink`

    def env(self, home: str) -> dict[str, str]:
        """This environment plus quiet Flower settings and its own ``FLWR_HOME``."""
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        return {
            **os.environ,
            **ENV,
            "PATH": path,
            "FLWR_HOME": str(self.plan.work / home),
        }

    def start(
        self, name: str, argv: list[str], home: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (after the plan's prefix for ``name``), logging to
        ``<work>/<name>.log``, with ``FLWR_HOME=<work>/<home or name>``."""
        (self.plan.work / (home or name)).mkdir(parents=True, exist_ok=True)
        # a SIGTERM between the fork and the bookkeeping would leave a service that
        # stop() does not know of: its exit waits until the service is recorded
        with open(self.log(name), "ab") as log, hold_termination():
            proc = subprocess.Popen(
                [*self.plan.prefix.get(name, []), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(home or name),
                cwd=self.plan.work,
                start_new_session=True,
            )
            self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.plan.work / f"{name}.log"

    def kill(self, name: str) -> None:
        """SIGKILL service ``name``'s process group (a crash, for fault drills), reap
        it and stop expecting it: :meth:`check_alive` no longer raises for it."""
        proc = self.procs.pop(name)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start service ``name`` again, as :func:`start` did: the same command line
        (a SuperNode keeps its node config and port), log and ``FLWR_HOME``."""
        if name in self.procs:
            raise RuntimeError(f"{name} is running; kill it first")
        return self.start(name, commands(self.plan)[name])

    def check_alive(self) -> None:
        """Raise, with the end of its log, when a service has exited."""
        for name in commands(self.plan).keys() & self.procs.keys():
            if (proc := self.procs[name]).poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}:\n"
                    + tail(self.log(name))
                )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service's process group, SIGKILL what is left after
        ``grace`` seconds, and reap the processes that were theirs."""
        family = [p for proc in self.procs.values() for p in _descendants(proc.pid)]
        for proc in reversed(self.procs.values()):  # apps first, SuperLink last
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        for p in family:  # left their group (a new session) or outlived it
            _kill_and_reap(p)
        self.procs.clear()


class _Termination:
    """The launcher's SIGTERM: ``sys.exit(143)`` (so ``finally`` stops the
    services), held while :func:`hold_termination` is active."""

    held = 0
    pending = False


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler of the launcher: exit now, or once nothing holds it."""
    if _Termination.held:
        _Termination.pending = True
    else:
        sys.exit(143)


@contextlib.contextmanager
def hold_termination() -> Iterator[None]:
    """While active, a SIGTERM (with :func:`on_sigterm` installed) only marks the
    exit as pending; it happens when the outermost hold ends."""
    _Termination.held += 1
    try:
        yield
    finally:
        _Termination.held -= 1
        if not _Termination.held and _Termination.pending:
            _Termination.pending = False
            sys.exit(143)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_and_reap(proc: Any, timeout: float = 5.0) -> None:
    """SIGKILL a ``psutil.Process``; wait until it is gone or a zombie, and reap it
    if it became our child (see :func:`become_subreaper`)."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc.kill()
        while time.monotonic() < deadline:
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return
            time.sleep(0.05)
    except psutil.NoSuchProcess:
        pass


def become_subreaper() -> None:
    """Adopt orphaned descendants (Linux), so :meth:`Services.stop` can reap them."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log file."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def wait_for(
    what: str, ready: Callable[[], bool], services: Services, timeout: float
) -> None:
    """Poll ``ready()`` until true; raise if a service dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        services.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.2)


def port_open(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def flwr(services: Services, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr <args> --format json`` with the launcher's ``FLWR_HOME``; its JSON."""
    proc = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        cwd=ROOT,
        env=services.env("cli"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        out = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        out = {}
    if not out.get("success"):
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return out


def write_connection(plan: Plan) -> None:
    """``[superlink.fedlora]`` in the CLI's ``$FLWR_HOME/config.toml``."""
    security = (
        f'root-certificates = "{plan.certs}/ca.crt"' if plan.tls else "insecure = true"
    )
    home = plan.work / "cli"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{plan.control_address}"\n{security}\n'
    )


def make_certs(plan: Plan) -> None:
    """CA, SuperLink certificate (valid for ``plan.host``) and SuperNode keys."""
    subprocess.run(
        [
            "bash",
            str(ROOT / "deploy" / "certs.sh"),
            "-o",
            str(plan.certs),
            "-n",
            str(plan.num_supernodes),
            plan.host,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def start(plan: Plan, services: Services, timeout: float = 120) -> None:
    """Start the SuperLink, register the SuperNodes' keys (``auth``), start the
    SuperNodes and the SuperExecs; return once every SuperNode is connected."""
    plan.work.mkdir(parents=True, exist_ok=True)
    plan.database.parent.mkdir(exist_ok=True)
    for stale in plan.database.parent.glob(plan.database.name + "*"):
        stale.unlink()  # a launch starts with an empty SuperLink state (the runs
        # and nodes of an earlier launch are gone); a restart within it keeps it
    if plan.tls:
        make_certs(plan)
    write_connection(plan)
    cmds = commands(plan)
    services.start("superlink", cmds["superlink"])
    wait_for(
        "SuperLink",
        lambda: (
            port_open(plan.host, plan.control_port)
            and port_open(plan.host, plan.fleet_port)
        ),
        services,
        timeout,
    )
    services.start("superexec-serverapp", cmds["superexec-serverapp"])
    for i in range(plan.num_supernodes) if plan.auth else ():
        flwr(
            services,
            "supernode",
            "register",
            f"{plan.certs}/supernode-{i}.pub",
            CONNECTION,
        )
    for i in range(plan.num_supernodes):
        services.start(f"supernode-{i}", cmds[f"supernode-{i}"])
        services.start(f"superexec-clientapp-{i}", cmds[f"superexec-clientapp-{i}"])
    for i in range(plan.num_supernodes):
        wait_for(
            f"supernode-{i}",
            lambda i=i: "SuperNode ID" in tail(services.log(f"supernode-{i}"), 100_000),
            services,
            timeout,
        )


#: start-ups one launch tries when a service finds a drawn port taken meanwhile
PORT_ATTEMPTS = 3

#: what a service's log says when its port is taken (uvicorn, gRPC, Python)
PORT_TAKEN = re.compile(
    r"address already in use|Errno 98|Failed to bind|Failed to add port", re.I
)


def start_on_free_ports(
    plan: Plan, services: Services, attempts: int = PORT_ATTEMPTS
) -> None:
    """:func:`start`; when a service dies at start-up because a port the plan drew
    was taken between the draw and its bind (another program's listener), stop what
    started, draw new ports and start again, up to ``attempts`` times. Ports the
    plan was given are never changed: that failure is raised."""
    for attempt in range(1, attempts + 1):
        try:
            start(plan, services)
            return
        except RuntimeError as err:
            if not (plan.drawn and PORT_TAKEN.search(str(err)) and attempt < attempts):
                raise
            print(
                f"[deploy] a port was taken while the services started (attempt "
                f"{attempt} of {attempts}); starting again on new ports",
                flush=True,
            )
            services.stop()
            plan.draw_ports()


#: ``watch(services, lines)``: called about once a second while a run is going, with
#: the complete lines its log (the ServerApp's output) gained since the last call
#: (often none); e.g. ``[fedlora] round 1/3: ...`` once round 1 has ended
Watch = Callable[[Services, list[str]], None]


def run_experiment(
    plan: Plan,
    services: Services,
    overrides: list[str],
    out: Path,
    timeout: float,
    watch: Watch | None = None,
) -> dict[str, Any]:
    """``flwr run`` the experiment, wait for it to finish; return its ``flwr ls`` row.

    ``watch`` (see :data:`Watch`) may inject faults mid-run, e.g. kill a SuperNode
    when a round starts. Raises if the run does not end as ``finished:completed``
    within ``timeout``.
    """
    (out / "summary.json").unlink(missing_ok=True)
    run_config = plan.work / "run-config.toml"
    run_config.write_text(
        f"overrides = {json.dumps(shlex.join(overrides))}\n"
        f"output-dir = {json.dumps(str(out))}\n"
    )
    run_id = flwr(
        services, "run", str(ROOT), CONNECTION, "--run-config", str(run_config)
    )["run-id"]
    print(
        f"[deploy] run {run_id} submitted; its log: {services.log('run')}", flush=True
    )
    follow = [str(BIN / "flwr"), "log", str(run_id), CONNECTION, "--stream"]
    follower = services.start("run", follow, home="cli")
    followed = services.restarts  # SuperLink restarts the log stream has seen
    shown, printed = 0, set()

    def show_progress() -> list[str]:  # the ServerApp's "[fedlora] round ..." lines
        nonlocal shown
        text = tail(services.log("run"), 10**8)
        lines = text[: text.rfind("\n") + 1].splitlines()  # complete lines only
        new, shown = lines[shown:], len(lines)
        for line in new:  # a stream started again repeats the log from its start
            if line.startswith("[fedlora]") and line not in printed:
                printed.add(line)
                print(line, flush=True)
        return new

    # `flwr ls` costs a second of CPU: ask every 15 s, and as soon as the ServerApp
    # process (a child of superexec-serverapp) has come and gone
    deadline, asked = time.monotonic() + timeout, time.monotonic()
    seen = ended = False
    while True:
        time.sleep(1)
        lines = show_progress()
        if watch is not None:
            watch(services, lines)
        restart_superlink(services, run_id)
        services.check_alive()
        running = bool(_descendants(services.procs["superexec-serverapp"].pid))
        ended, seen = ended or (seen and not running), seen or running
        if ended or time.monotonic() - asked > 15:
            asked = time.monotonic()
            try:
                ls = flwr(services, "ls", CONNECTION, "--run-id", str(run_id))
            except (RuntimeError, subprocess.TimeoutExpired):
                ls = None  # the SuperLink is not answering (yet): ask again later
            row = ls["runs"][0] if ls else {"status": "unknown"}
            if row["status"].startswith("finished"):
                break
        if (
            services.restarts > followed
            and follower.poll() is not None
            and port_open(plan.host, plan.control_port)
        ):  # the log stream broke with the SuperLink: follow the run again
            followed = services.restarts
            follower = services.start("run", follow, home="cli")
        if time.monotonic() > deadline:
            flwr(services, "stop", str(run_id), CONNECTION)
            raise TimeoutError(f"run {run_id} still running after {timeout} s")
    try:
        follower.wait(15)  # the log stream ends with the run
    except subprocess.TimeoutExpired:
        pass
    show_progress()
    if row["status"] != "finished:completed":
        raise RuntimeError(
            f"run {run_id} ended {row['status']}: "
            f"{row.get('status-details')}\n"
            + tail(services.log("run"))
            + resume_hint(out, plan.work)
        )
    return row


def resume_hint(out: Path, work: Path) -> str:
    """How to continue a failed run from the newest checkpoint in ``out`` (or that
    there is none)."""
    from fedlora import checkpoint

    ckpt = checkpoint.load_latest(out)
    if ckpt is None:
        return f"\n[deploy] {out} holds no checkpoint: the run cannot be resumed"
    return (
        f"\n[deploy] {out} holds the checkpoint of round {ckpt.round}; continue the "
        f"run with: python -m deploy.launch --resume {out} --work {work}"
    )


#: restarts of the SuperLink one launch allows before it gives up
SUPERLINK_RESTARTS = 3


def restart_superlink(services: Services, run_id: int) -> bool:
    """Start the SuperLink again if it has exited (as a supervisor would), on its
    database, and say so; True when it did. The SuperNodes and SuperExecs
    reconnect by themselves and the run goes on where it was. After
    :data:`SUPERLINK_RESTARTS` restarts it is left dead (:meth:`Services.check_alive`
    then reports it)."""
    proc = services.procs.get("superlink")
    if proc is None or proc.poll() is None or services.restarts >= SUPERLINK_RESTARTS:
        return False
    services.restarts += 1
    plan = services.plan
    print(
        f"[deploy] the SuperLink exited with code {proc.returncode}; restarting it "
        f"on its database {plan.database} ({services.restarts} of "
        f"{SUPERLINK_RESTARTS} restarts)",
        flush=True,
    )
    del services.procs["superlink"]
    services.restart("superlink")
    wait_for(
        "SuperLink",
        lambda: port_open(plan.host, plan.fleet_port),
        services,
        120,
    )
    print(
        f"[deploy] the SuperLink is back: run {run_id} continues "
        "(the SuperNodes reconnect by themselves)",
        flush=True,
    )
    return True


def check_run_dir(out: Path) -> None:
    """Raise if the run directory lacks a file of the contract."""
    missing = [name for name in RUN_FILES if not (out / name).is_file()]
    if missing:
        raise RuntimeError(f"run directory {out} lacks {', '.join(missing)}")


def deploy(
    overrides: list[str],
    plan: Plan,
    out: Path,
    timeout: float = 3600,
    watch: Watch | None = None,
) -> dict[str, Any]:
    """Start the deployment, run the experiment, check ``out``, stop everything.

    Parameters
    ----------
    overrides : list of str
        Hydra overrides of ``conf/``, passed to the ServerApp in the run config.
    plan : Plan
        The services to start.
    out : Path
        The run directory the ServerApp fills.
    timeout : float
        Seconds the run may take.
    watch : callable, optional
        Called while the run goes on, to inject faults (see :data:`Watch`).

    Returns
    -------
    dict
        The run's ``summary.json``; ``out/deployment.json`` records the run id,
        status, commands and timings.

    Raises
    ------
    RuntimeError, TimeoutError
        A service died, the run did not end ``finished:completed`` in time, or the
        run directory is incomplete. Every started process is stopped first.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"status": "running", **plan_record(plan)}
    (out / "deployment.json").write_text(json.dumps(record, indent=2))  # --resume
    services = Services(plan)
    started = time.perf_counter()
    try:
        start_on_free_ports(plan, services)
        ready = time.perf_counter()
        row = run_experiment(plan, services, overrides, out, timeout, watch)
        check_run_dir(out)
    finally:
        services.stop()
    record = {
        "run_id": row["run-id"],
        "status": row["status"],
        "startup_seconds": ready - started,
        "run_seconds": time.perf_counter() - ready,
        **plan_record(plan),
        "commands": commands(plan),
    }
    (out / "deployment.json").write_text(json.dumps(record, indent=2))
    return json.loads((out / "summary.json").read_text())


def planned_rounds(run_dir: Path) -> int | None:
    """The ``federation.rounds`` of the run whose newest checkpoint is in
    ``run_dir``; None when there is none."""
    from fedlora import checkpoint

    ckpt = checkpoint.load_latest(run_dir)
    if ckpt is None:
        return None
    return int(ckpt.state["settings"]["federation"]["rounds"])


def plan_record(plan: Plan) -> dict[str, Any]:
    """What ``deployment.json`` keeps of the plan for ``--resume``: the work folder
    (the nodes' data: caches, DP-SGD privacy ledgers), TLS, authentication and
    the node-config entries."""
    return {
        "work": str(plan.work),
        "tls": plan.tls,
        "auth": plan.auth,
        "node_config": {str(i): entry for i, entry in plan.node_config.items()},
    }


def recorded_plan(run_dir: Path) -> dict[str, Any]:
    """The plan options ``run_dir/deployment.json`` records (:func:`plan_record`;
    ``work`` only if that folder still exists); ``{}`` without the file."""
    record = Path(run_dir) / "deployment.json"
    if not record.is_file():
        return {}
    saved = json.loads(record.read_text())
    out = {k: saved[k] for k in ("tls", "auth", "node_config") if k in saved}
    if "work" in saved and Path(saved["work"]).is_dir():
        out["work"] = Path(saved["work"])
    return out


def resume_args(args: argparse.Namespace) -> None:
    """``--resume RUN_DIR``: what the command line leaves out comes from the run's
    ``deployment.json`` (run directory, work folder, TLS, authentication,
    node-config entries) and its checkpoint (``federation.rounds``)."""
    args.resume = args.resume.resolve()
    recorded = recorded_plan(args.resume)
    args.out = args.out or args.resume
    args.work = args.work or recorded.get("work")
    args.tls = args.tls or bool(recorded.get("tls"))
    args.auth = args.auth or bool(recorded.get("auth"))
    if not args.node_config:
        args.node_config = [
            f"{i}:{entry}" for i, entry in recorded.get("node_config", {}).items()
        ]
    args.overrides = [*args.overrides, f"resume={args.resume}"]
    rounds = planned_rounds(args.resume)
    if rounds and not any(o.startswith("federation.rounds=") for o in args.overrides):
        args.overrides.append(f"federation.rounds={rounds}")  # not conf/'s default


def parse_node_config(entries: list[str], n: int) -> dict[int, str]:
    """``["0:rank=2", "1:rank=4"]`` -> ``{0: "rank=2", 1: "rank=4"}`` (entries for
    one node joined by spaces).

    Raises
    ------
    ConfigError
        An entry not of the form ``I:KEY=VALUE`` or ``I`` outside ``0..n-1``.
    """
    from fedlora.errors import ConfigError

    out: dict[int, list[str]] = {}
    for entry in entries:
        index, sep, pair = entry.partition(":")
        if not sep or not index.strip().isdigit() or "=" not in pair:
            raise ConfigError(
                "--node-config", entry, "expected I:KEY=VALUE, e.g. 0:rank=2"
            )
        if not 0 <= int(index) < n:
            raise ConfigError(
                "--node-config",
                entry,
                f"node index must be 0..{n - 1} (federation.num_clients={n})",
            )
        out.setdefault(int(index), []).append(pair.strip())
    return {i: " ".join(pairs) for i, pairs in out.items()}


def experiment(overrides: list[str]) -> Settings:
    """``conf/`` composed with ``overrides`` and checked, as the ServerApp will
    (with ``resume=<run dir>``: the checkpoint's settings)."""
    from fedlora.validate import validate
    from strategies.server_app import compose, resume_config, settings

    cfg = compose(overrides)
    if cfg.resume:
        cfg = resume_config(cfg, overrides)
    return validate(settings(cfg))


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    from fedlora.console import summary_table
    from fedlora.errors import ConfigError

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/")
    parser.add_argument("--tls", action="store_true", help="TLS with a fresh CA")
    parser.add_argument(
        "--auth", action="store_true", help="SuperNode authentication (implies --tls)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="run directory (default: outputs/deployment/<date>_<time>)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="logs, certificates, node data "
        "and Flower homes (default: a new temporary folder)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds the run may take"
    )
    parser.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="I:KEY=VALUE",
        help="add KEY=VALUE to SuperNode I's node config, e.g. 0:rank=2 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint (default --out "
        "RUN_DIR; --work, --tls, --auth, --node-config: what its deployment.json "
        "records)",
    )
    args = parser.parse_args(argv)
    if args.resume:
        resume_args(args)
    try:
        cfg = experiment(args.overrides)
        node_config = parse_node_config(
            args.node_config, int(cfg.federation.num_clients)
        )
    except ConfigError as exc:
        print(f"[deploy] configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    become_subreaper()
    signal.signal(signal.SIGTERM, on_sigterm)  # exit 143, services stopped first
    n = int(cfg.federation.num_clients)  # one SuperNode per client
    work = args.work or Path(tempfile.mkdtemp(prefix="fedlora-deploy-"))
    out = args.out or ROOT / "outputs/deployment" / time.strftime("%Y-%m-%d_%H-%M-%S")
    plan = Plan(work, n, tls=args.tls, auth=args.auth, node_config=node_config)
    print(
        f"[deploy] {n} SuperNodes, TLS {'on' if plan.tls else 'off'}, "
        f"auth {'on' if plan.auth else 'off'}; logs in {plan.work}",
        flush=True,
    )
    try:
        summary = deploy(args.overrides, plan, out, args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"[deploy] {exc}\n[deploy] logs in {plan.work}", file=sys.stderr)
        raise SystemExit(1) from None
    table = summary_table(summary, str(out))
    print(f"[deploy] finished:completed\n{table}", flush=True)


if __name__ == "__main__":
    main()
