"""Checks on client updates, applied by the server before any aggregation.

A rejected update is excluded and its reason recorded; it never reaches the
global model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlora.aggregation import SMALL_ENTRIES  # checked for NaN and Inf together

MAX_EXAMPLES = 10**9  # an example count above this is taken as garbage


def check_update(
    state: dict[str, Any], expected: dict[str, tuple[int, ...]], num_examples: Any
) -> str | None:
    """Reason to reject one client's update, or None if it is well formed.

    Checks: exactly the expected keys; each value a floating array of the expected
    shape with finite entries; a positive integer example count below MAX_EXAMPLES.
    """
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        return f"keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
    small: list[str] = []  # checked for NaN and Inf together: one call, not two each
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            return (
                f"{key}: expected a float array, got {type(value).__name__} "
                f"{getattr(value, 'dtype', '')}"
            )
        if value.shape != tuple(shape):
            return f"{key}: expected shape {tuple(shape)}, got {value.shape}"
        if value.size <= SMALL_ENTRIES:
            small.append(key)
        elif not np.isfinite(value).all():  # the method: no dispatch wrapper
            return _first_not_finite(state, [*small, key])
    if (
        small
        and not np.isfinite(np.concatenate([state[k].ravel() for k in small])).all()
    ):
        return _first_not_finite(state, small)
    if isinstance(num_examples, bool) or not isinstance(
        num_examples, (int, np.integer)
    ):
        return f"num-examples must be an integer, got {num_examples!r}"
    if not 0 < int(num_examples) < MAX_EXAMPLES:
        return f"num-examples {num_examples} is not in (0, {MAX_EXAMPLES})"
    return None


def _first_not_finite(state: dict[str, Any], keys: list[str]) -> str | None:
    """The reason naming the first of ``keys`` whose array holds NaN or Inf."""
    for key in keys:
        if not np.isfinite(state[key]).all():
            return f"{key}: contains NaN or Inf"
    return None


def update_norm_outliers(
    states: Sequence[dict[str, np.ndarray]],
    reference: dict[str, np.ndarray],
    factor: float,
) -> list[str | None]:
    """Reject updates whose norm ``||x_k - x_ref||`` exceeds ``factor`` x the median
    of the round's update norms (needs 3 or more updates; ``factor <= 0`` disables)."""
    if factor <= 0 or len(states) < 3:
        return [None] * len(states)
    norms = [
        float(
            np.sqrt(
                sum(
                    np.sum((s[k].astype(np.float64) - reference[k]) ** 2)
                    for k in reference
                )
            )
        )
        for s in states
    ]
    limit = factor * float(np.median(norms))
    return [
        None
        if n <= limit
        else f"update norm {n:.3g} > {factor:g} x the round's median "
        f"({limit / factor:.3g})"
        for n in norms
    ]
