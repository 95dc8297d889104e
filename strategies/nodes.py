"""Waiting for nodes, with a deadline (``federation.wait_timeout``).

Flower samples a round's nodes with ``sample_nodes``, which polls the grid every
second until enough nodes are connected and never gives up: a node that never comes
back would stall the run for ever. :func:`wait_for_nodes` does that wait first, with
a deadline, and hands Flower a :class:`Snapshot` of the nodes it found, so Flower's
own wait finds enough nodes at once and never loops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fedlora.errors import NodesUnavailableError

log = logging.getLogger(__name__)


def wait_for_nodes(
    grid: Any,
    needed: int,
    timeout: float | None,
    *,
    what: str,
    keys: str = "federation.min_available_clients",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll: float = 1.0,
) -> list[int]:
    """The ids of the connected nodes, once there are at least ``needed``.

    Parameters
    ----------
    grid : Grid
        Flower's grid (only ``get_node_ids`` is called).
    needed : int
        Connected nodes to wait for.
    timeout : float or None
        Seconds to wait at most (``federation.wait_timeout``); None: no limit.
    what : str
        What waits, for the messages (``"round 3"``).
    keys : str
        The settings that ask for ``needed`` nodes, for the error's fix.
    clock, sleep, poll
        The clock and the pause between two counts (seconds), for tests.

    Raises
    ------
    NodesUnavailableError
        Fewer than ``needed`` nodes were connected for ``timeout`` seconds.
    """
    start = clock()
    warned = False
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            if warned:
                log.warning("%s: %d nodes connected; going on", what, len(nodes))
            return nodes
        waited = clock() - start
        if timeout is not None and waited >= timeout:
            raise NodesUnavailableError(
                f"{what}: {len(nodes)} of the {needed} nodes it needs were connected "
                f"for {waited:.0f} s, longer than federation.wait_timeout="
                f"{timeout:g}; stopping the run. Start the missing SuperNodes and "
                f"resume, or lower {keys} (rounds then go on with fewer nodes), or "
                "raise federation.wait_timeout (null: wait as long as it takes)",
                len(nodes),
                needed,
            )
        if not warned:
            log.warning(
                "%s: %d of the %d nodes it needs are connected; waiting for the "
                "rest (federation.wait_timeout=%s)",
                what,
                len(nodes),
                needed,
                "null" if timeout is None else f"{timeout:g}",
            )
            warned = True
        sleep(poll if timeout is None else max(0.0, min(poll, timeout - waited)))


class Snapshot:
    """``grid`` whose ``get_node_ids`` answers the ids a wait found: Flower's
    sampling then counts and samples exactly those, without waiting again (a node
    that drops out in between is sampled and fails as a node lost mid-round does).
    Everything else goes to ``grid``."""

    def __init__(self, grid: Any, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
