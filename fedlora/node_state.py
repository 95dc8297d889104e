"""What a node keeps of its own between rounds, on its disk (FedSA-LoRA's own ``B``).

A deployed node keeps such state in its Flower context, which lives as long as one
Flower run. A resumed run is a new Flower run, and a restarted SuperNode a new
process: both would start from the seeded initial value. :class:`NodeStore` keeps
a copy on the node's disk, keyed by the run's id (which a resume keeps, as for the
privacy ledger) and the node's partition, one file per round it trained::

    <root>/<run id>/partition-<k>/round-00000N.safetensors

A node that lost its context loads the newest round *before* the one it is asked to
train, so a round a dead server had already sent (and the node trained) is trained
again from the same start as in an uninterrupted run. The last :data:`KEEP` rounds
are kept. Each file is written atomically (:func:`fedlora.checkpoint.write_atomic`)
before the node replies.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as st_save

from fedlora.checkpoint import write_atomic

KEEP = 2
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ROUND = re.compile(r"^round-(\d{6,})\.safetensors$")
_KEPT = "__rounds_kept__"  # how many rounds the node has kept them (reported)


class NodeStore:
    """One node's own arrays for one run (see the module docstring)."""

    def __init__(self, root: Path | str, run_id: str, partition: int) -> None:
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise ValueError(
                f"run id {run_id!r} is not a plain name (letters, digits, _ . -); "
                "refusing to keep node state under it"
            )
        self.folder = Path(root).expanduser() / run_id / f"partition-{int(partition)}"

    def _rounds(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        return {
            int(m.group(1)): p
            for p in self.folder.iterdir()
            if (m := _ROUND.match(p.name))
        }

    def save(self, server_round: int, state: dict[str, np.ndarray], kept: int) -> None:
        """Keep ``state``, trained in ``server_round`` (the ``kept``-th round the
        node trained it); drop all but the newest :data:`KEEP` rounds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
        arrays[_KEPT] = np.asarray([kept], dtype=np.int64)
        path = self.folder / f"round-{server_round:06d}.safetensors"
        write_atomic(path, st_save(arrays))
        for _, path in sorted(self._rounds().items())[:-KEEP]:
            path.unlink(missing_ok=True)

    def load(self, before: int) -> tuple[dict[str, np.ndarray], int] | None:
        """``(state, rounds kept)`` of the newest round before ``before``, or None."""
        earlier = [r for r in self._rounds() if r < before]
        if not earlier:
            return None
        arrays = load_file(str(self._rounds()[max(earlier)]))
        kept = int(arrays.pop(_KEPT)[0])
        return arrays, kept
