"""Flower's own CLI on this app: ``flwr run . local`` (docs/deployment.md).

    python -m experiments.flwr_home [--num-supernodes N] [--client-cpus C]
                                    [--name local]
    python -m experiments.flwr_home --stop

The first form writes the ``[superlink.<name>]`` entry (``address = ":local:"``,
``options.num-supernodes``, ``options.backend.client-resources.num-cpus``) into
``$FLWR_HOME/config.toml`` (default ``~/.flwr``), keeping its other entries; it never
touches pyproject.toml. ``flwr run . <name>`` then starts a local SuperLink in
simulation mode, which keeps running after the run: Flower has no command to stop
it, so ``--stop`` ends the one this ``FLWR_HOME`` started (and what it started).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from deploy.launch import _descendants, _kill_and_reap


def flwr_home() -> Path:
    """``$FLWR_HOME``, else Flower's default ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_local(name: str, num_supernodes: int, client_cpus: int) -> Path:
    """Add (or replace) ``[superlink.<name>]`` with ``address = ":local:"`` in
    ``$FLWR_HOME/config.toml``, with Flower's own writer; return the file."""
    from flwr.cli.constant import LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import (
        SimulationBackendConfig,
        SimulationClientResources,
        SuperLinkConnection,
        SuperLinkSimulationOptions,
    )

    resources = SimulationClientResources(num_cpus=client_cpus)
    options = SuperLinkSimulationOptions(
        num_supernodes=num_supernodes,
        backend=SimulationBackendConfig(client_resources=resources),
    )
    write_superlink_connection(
        SuperLinkConnection(
            name=name, address=LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE, options=options
        )
    )
    return flwr_home() / "config.toml"


def local_superlinks(home: Path) -> list:
    """The running ``flower-superlink`` processes that ``flwr run`` started for
    ``home`` (they log to ``<home>/local-superlink/superlink.log``)."""
    import psutil

    log = str(home.resolve() / "local-superlink" / "superlink.log")
    found = []
    for proc in psutil.process_iter():
        try:
            argv = proc.cmdline()
        except psutil.Error:
            continue
        if any(a.endswith("flower-superlink") for a in argv[:2]) and log in argv:
            found.append(proc)
    return found


def strays(home: Path, exclude: set[int]) -> list:
    """Processes that run with this ``FLWR_HOME`` but are no longer below its
    SuperLink (Ray's workers, which outlive the simulation for a few seconds as
    orphans), except this process and its ancestors."""
    import psutil

    me = psutil.Process()
    exclude = exclude | {me.pid} | {p.pid for p in me.parents()}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in exclude and proc.environ().get("FLWR_HOME") == str(home):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def stop_local(home: Path, grace: float = 10.0) -> int:
    """SIGTERM the local SuperLink(s) of ``home``; SIGKILL whatever of them, of
    their descendants (SuperExec, simulation, Ray) and of the :func:`strays` is left
    after ``grace`` seconds.
    Returns how many SuperLinks there were."""
    import psutil

    links = local_superlinks(home)
    family = [p for link in links for p in _descendants(link.pid)]
    family += strays(home, exclude={p.pid for p in links + family})
    for link in links:
        try:
            link.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(links + family, timeout=grace)  # strays: exiting by themselves
    for proc in links + family:
        if proc.is_running():
            _kill_and_reap(proc)
    return len(links)


def main(argv: list[str] | None = None) -> None:
    from strategies.server_app import compose_settings

    defaults = compose_settings([])
    parser = argparse.ArgumentParser(
        prog="python -m experiments.flwr_home", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=int(defaults.federation.num_clients),
        help="simulated SuperNodes: keep it equal to federation.num_clients "
        "(default: conf/'s %(default)s)",
    )
    parser.add_argument(
        "--client-cpus",
        type=int,
        default=max(1, round(defaults.simulation.client_num_cpus)),
        help="Ray CPUs per ClientApp, a whole number (the front door's "
        "simulation.client_num_cpus, default %(default)s)",
    )
    parser.add_argument("--name", default="local", help="the connection's name")
    parser.add_argument(
        "--stop", action="store_true", help="stop this FLWR_HOME's local SuperLink"
    )
    args = parser.parse_args(argv)
    if args.stop:
        n = stop_local(flwr_home())
        print(f"[fedlora] stopped {n} local SuperLink(s) of {flwr_home()}")
        return
    if args.num_supernodes < 1:
        parser.error(f"--num-supernodes must be at least 1, got {args.num_supernodes}")
    path = write_local(args.name, args.num_supernodes, args.client_cpus)
    print(
        f"[fedlora] wrote [superlink.{args.name}] to {path}; run the experiment "
        f"with: flwr run . {args.name} --run-config 'overrides=\"federation."
        f"num_clients={args.num_supernodes} ...\"' --stream"
    )


if __name__ == "__main__":
    main()
