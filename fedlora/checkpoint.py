"""Round checkpoints of a run: what the server needs to continue after a crash.

A checkpoint is a round number, named groups of arrays (the global adapter, frozen
factors, RNG states...) and a JSON-able ``state`` dict (strategy counters, the
metrics so far, the settings...). No pickle anywhere: arrays go to safetensors,
the rest to JSON.

Layout in ``<run_dir>/checkpoints/``, for a checkpoint of round ``N``::

    round-00000N.safetensors     the arrays, keyed ``<group>/<name>``
    round-00000N.json            the state
    round-00000N.manifest.json   round, groups, size and sha256 of the two files

Each file is written to a temporary file in the same folder, flushed, fsynced and
moved into place with :func:`os.replace` (atomic on POSIX); the folder is fsynced
after each move. The manifest is written last, so a checkpoint exists only once its
manifest does, and it is valid only if both payload files still have the manifest's
sizes and sha256s. A crash mid-write therefore leaves at worst an older valid
checkpoint plus debris, and :func:`load_latest` returns the newest valid one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedlora.errors import FedLoraError

log = logging.getLogger("fedlora")

CHECKPOINT_DIR = "checkpoints"
KEEP = 2  # checkpoints kept: the newest and the one before it
FORMAT = 1
_NAME = re.compile(r"^round-(\d{6,})\.(safetensors|json|manifest\.json)$")

Groups = Mapping[str, Mapping[str, np.ndarray]]


class CheckpointError(FedLoraError):
    """A checkpoint is missing, torn or corrupted (the message says which file)."""


@dataclass(frozen=True)
class Checkpoint:
    """One loaded, verified checkpoint.

    Attributes
    ----------
    round : int
        The last completed round it holds.
    arrays : dict[str, dict[str, numpy.ndarray]]
        The array groups as saved: every saved group (maybe empty), each with its
        arrays in the order they were saved (positional consumers such as Flower's
        DP wrapper pair arrays by position).
    state : dict[str, Any]
        The JSON state as saved.
    path : pathlib.Path
        Its manifest file.
    """

    round: int
    arrays: dict[str, dict[str, np.ndarray]]
    state: dict[str, Any]
    path: Path


def checkpoint_dir(run_dir: Path | str) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_DIR


def _stem(round_: int) -> str:
    return f"round-{round_:06d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file whole.

    The bytes go to a temporary file in the same folder, which is flushed, fsynced
    and moved over ``path`` with :func:`os.replace`; the folder is fsynced too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def save(
    run_dir: Path | str,
    round_: int,
    arrays: Groups,
    state: Mapping[str, Any],
    keep: int = KEEP,
) -> Path:
    """Save round ``round_``'s checkpoint atomically; keep only the newest ``keep``.

    Parameters
    ----------
    run_dir : path
        The run directory; files go to ``run_dir/checkpoints/``.
    round_ : int
        The last completed round (``>= 0``).
    arrays : mapping of str to mapping of str to numpy.ndarray
        Named groups of arrays, e.g. ``{"global": ..., "rng": ...}``. Group names
        must not contain ``/``; any dtype safetensors knows is kept exactly.
    state : mapping
        Everything else, JSON-serialisable (``NaN`` is allowed).
    keep : int
        How many checkpoints to keep: after the save, this one and the ``keep - 1``
        newest of the earlier rounds stay. Checkpoints of *later* rounds are deleted
        too: they belong to a timeline abandoned by a resume from an earlier round.

    Returns
    -------
    pathlib.Path
        The manifest of the new checkpoint.
    """
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    flat: dict[str, np.ndarray] = {}
    for group, named in arrays.items():
        if "/" in group or not group:
            raise ValueError(f"group names must be non-empty without '/': {group!r}")
        for name, value in named.items():
            flat[f"{group}/{name}"] = np.ascontiguousarray(value)
    payload = st_save(flat)
    state_bytes = json.dumps(dict(state), sort_keys=True).encode()
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = _stem(round_)
    manifest = {
        "format": FORMAT,
        "round": int(round_),
        "groups": {g: list(named) for g, named in arrays.items()},  # keeps the order
        "files": {
            f"{stem}.safetensors": {"bytes": len(payload), "sha256": _sha256(payload)},
            f"{stem}.json": {"bytes": len(state_bytes), "sha256": _sha256(state_bytes)},
        },
    }
    write_atomic(folder / f"{stem}.safetensors", payload)
    write_atomic(folder / f"{stem}.json", state_bytes)
    path = folder / f"{stem}.manifest.json"
    write_atomic(path, json.dumps(manifest, sort_keys=True, indent=1).encode())
    _prune(folder, round_, keep)
    return path


def _rounds_on_disk(folder: Path) -> dict[int, list[Path]]:
    out: dict[int, list[Path]] = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _NAME.match(path.name)
        if match:
            out.setdefault(int(match.group(1)), []).append(path)
    return out


def _prune(folder: Path, newest: int, keep: int) -> None:
    """Delete all but ``newest`` and the ``keep - 1`` latest checkpoints before it."""
    files = _rounds_on_disk(folder)
    with_manifest = sorted(
        (
            r
            for r, paths in files.items()
            if r < newest and any(p.name.endswith(".manifest.json") for p in paths)
        ),
        reverse=True,
    )
    kept = {newest, *with_manifest[: keep - 1]}
    for round_, paths in files.items():
        if round_ not in kept:
            # the manifest first, so a crash here never leaves a manifest whose
            # payload is gone
            for path in sorted(
                paths, key=lambda p: not p.name.endswith("manifest.json")
            ):
                path.unlink(missing_ok=True)
    for tmp in folder.glob(".round-*.tmp"):  # debris of writers that died
        tmp.unlink(missing_ok=True)


def load(manifest_path: Path | str) -> Checkpoint:
    """Load and verify one checkpoint from its manifest.

    Raises
    ------
    CheckpointError
        If the manifest is unreadable, a payload file is missing, or a file's size or
        sha256 differs from the manifest's (a torn or corrupted checkpoint).
    """
    path = Path(manifest_path)
    try:
        manifest = json.loads(path.read_bytes())
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}")
        round_ = int(manifest["round"])
        files = manifest["files"]
        stem = _stem(round_)
        blobs: dict[str, bytes] = {}
        for suffix in (".safetensors", ".json"):
            name = stem + suffix
            data = (path.parent / name).read_bytes()
            if (
                len(data) != files[name]["bytes"]
                or _sha256(data) != files[name]["sha256"]
            ):
                raise CheckpointError(
                    f"{path.parent / name}: size or sha256 differs "
                    "from the manifest (torn or corrupted)"
                )
            blobs[suffix] = data
        flat = st_load(blobs[".safetensors"])
        arrays = {
            group: {name: flat.pop(f"{group}/{name}") for name in names}
            for group, names in manifest["groups"].items()
        }
        if flat:
            raise CheckpointError(f"{path}: arrays not in the manifest: {sorted(flat)}")
        state = json.loads(blobs[".json"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    return Checkpoint(round=round_, arrays=arrays, state=state, path=path)


def load_latest(run_dir: Path | str) -> Checkpoint | None:
    """The newest valid checkpoint of ``run_dir``, or None when there is none.

    Checkpoints are tried from the highest round down; one that fails verification
    (see :func:`load`) is logged as a warning and skipped, so a checkpoint torn by a
    crash falls back to the one before it.
    """
    folder = checkpoint_dir(run_dir)
    manifests = sorted(
        (
            (r, p)
            for r, paths in _rounds_on_disk(folder).items()
            for p in paths
            if p.name.endswith(".manifest.json")
        ),
        reverse=True,
    )
    for _, path in manifests:
        try:
            return load(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def rewrite_lines(path: Path | str, rows: list[dict[str, Any]]) -> None:
    """Atomically replace ``path`` with ``rows`` as JSON lines (sorted keys).

    Used on resume to make ``metrics.jsonl`` hold exactly the checkpoint's rows:
    rows written after the checkpoint by the crashed run, or a torn last line, go.
    """
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    write_atomic(Path(path), text.encode())


# --- random number generators ---------------------------------------------------
def rng_state() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The process-global RNG states: ``(arrays, json_state)``.

    Covers Python's :mod:`random` (Flower samples nodes with it), NumPy's legacy
    global generator (``np.random.*``, e.g. central-DP noise) and torch's CPU
    generator. CUDA generators are not included (the server draws nothing on GPU).
    """
    import torch

    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    arrays = {
        "numpy_key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "torch_cpu": torch.get_rng_state().numpy().copy(),
    }
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    return arrays, state


def set_rng_state(arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
    """Restore the RNG states returned by :func:`rng_state`."""
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {
                "key": np.asarray(arrays["numpy_key"], np.uint32),
                "pos": int(np_state["pos"]),
            },
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        }
    )
    torch.set_rng_state(torch.from_numpy(np.array(arrays["torch_cpu"], dtype=np.uint8)))
