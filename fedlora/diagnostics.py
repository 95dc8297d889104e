"""The aggregation-error diagnostic of algorithms.md.

With ``E`` a model's effective adapter delta per layer (``s B A``), ``E_k`` what
client k returned, ``E_old`` what the server sent and ``E_new`` what it sends next::

    aggregation_error = ||sum_k p_k E_k - E_new||_F / ||sum_k p_k E_k - E_old||_F

over all adapted layers together, and per module name (query, value, ...).

Each numerator/denominator is the norm of a sum of low-rank products
``sum_i c_i B_i A_i = U V`` with ``U = [c_1 B_1 .. c_m B_m]`` (d_out, m r) and
``V = [A_1; ..; A_m]`` (m r, d_in). We never form the d_out x d_in matrix:
``||U V||_F = ||R_u R_v^T||_F`` from thin QR factors of ``U`` and ``V^T``, which
costs O(d (m r)^2).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedlora.adapters import lora_layers, module_name

Factors = tuple[np.ndarray, np.ndarray]  # (B: (d_out, r), A: (r, d_in))


def sum_of_products_sqnorm(
    terms: Sequence[tuple[float, np.ndarray, np.ndarray]],
) -> float:
    """``||sum_i c_i B_i A_i||_F^2`` computed in float64 from the factors."""
    u = np.concatenate([c * b.astype(np.float64) for c, b, _ in terms], axis=1)
    v = np.concatenate([a.astype(np.float64) for _, _, a in terms], axis=0)
    # U = Q_u R_u, V^T = Q_v R_v  =>  ||U V||_F = ||R_u R_v^T||_F (no squaring of
    # the condition number, so exact methods read ~1e-16 in float64, not ~1e-8)
    r_u = np.linalg.qr(u, mode="r")
    r_v = np.linalg.qr(v.T, mode="r")
    return float(np.sum((r_u @ r_v.T) ** 2))


def layer_factors(state: dict[str, np.ndarray]) -> dict[str, Factors]:
    """``{layer: (B, A)}`` of a full LoRA state (keys ``...lora_A.weight`` etc.)."""
    return {layer: (state[b], state[a]) for layer, (a, b) in lora_layers(state).items()}


def aggregation_error(
    clients: Sequence[dict[str, Factors]],
    weights: np.ndarray,
    old: dict[str, Factors],
    new: dict[str, Factors],
    scaling: float,
) -> tuple[float, dict[str, float]]:
    """Aggregation error overall and per module name (see module docstring).

    Every argument maps layer -> ``(B, A)``; a method whose effective delta has
    more factors (Fed-SB's ``B R A``) passes ``(B R, A)``. Returns 0.0 where the
    round's average update is exactly zero.
    """
    num: dict[str, float] = defaultdict(float)
    den: dict[str, float] = defaultdict(float)
    for layer in new:
        ideal = [
            (scaling * p, c[layer][0], c[layer][1])
            for c, p in zip(clients, weights, strict=True)
        ]
        mod = module_name(layer)
        num[mod] += sum_of_products_sqnorm(ideal + [(-scaling, *new[layer])])
        den[mod] += sum_of_products_sqnorm(ideal + [(-scaling, *old[layer])])

    def ratio(n: float, d: float) -> float:
        n, d = max(n, 0.0), max(d, 0.0)  # float round-off can dip below 0
        return 0.0 if d == 0.0 else float(np.sqrt(n / d))

    by_module = {m: ratio(num[m], den[m]) for m in sorted(num)}
    return ratio(sum(num.values()), sum(den.values())), by_module
