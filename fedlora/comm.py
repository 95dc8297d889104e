"""Communication accounting: analytic parameter counts and raw payload sizes.

What crosses the wire is measured by the strategies from the serialized messages;
this module gives the reference figures those measurements are compared against.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def num_parameters(state: dict[str, np.ndarray]) -> int:
    """Number of scalars in a state."""
    return int(sum(np.size(v) for v in state.values()))


def raw_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays' data alone (no names, headers or framing)."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def lora_parameters(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """LoRA parameters sent per client per round: ``sum r (d_out + d_in)``.

    ``shapes`` lists ``(d_out, d_in)`` of every adapted layer.
    """
    return int(sum(r * (d_out + d_in) for d_out, d_in in shapes))
