"""Free TCP ports for the services a launcher starts.

A port found free by binding to port 0 comes from the kernel's ephemeral range,
the same range every outgoing connection on the machine takes its local port
from: between the check and the service's own bind, any client (a Ray worker, a
gRPC channel, another test) may take it, and the service then fails with
"address already in use". :func:`free_ports` draws its ports below that range
instead, where only an explicit bind can take them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: the lowest port drawn: above Ray's default worker ports (10002-19999), which
#: Ray's workers bind on their own
LOWEST = 20_000

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = map(int, _RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, attempts: int = 1000) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now, drawn at random (from the OS's
    entropy, so that concurrent launchers do not draw alike) between
    :data:`LOWEST` and the start of the ephemeral range. Where that gap is too
    small (an unusual ``ip_local_port_range``), ports the kernel hands out for
    port 0."""
    low = ephemeral_range()[0]
    if low - LOWEST < 1000:
        return _kernel_ports(n)
    draw = random.SystemRandom()
    ports: list[int] = []
    for _ in range(attempts):
        if len(ports) == n:
            break
        port = draw.randrange(LOWEST, low)
        if port not in ports and _bindable(port):
            ports.append(port)
    if len(ports) < n:
        raise RuntimeError(
            f"found only {len(ports)} of {n} free TCP ports in {LOWEST}-{low - 1} "
            f"after {attempts} draws"
        )
    return ports


def _kernel_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
