"""LoRA-FAIR server-side correction of ``B`` (Bian et al., ICCV 2025,
https://arxiv.org/abs/2411.14961).

Per layer, with ``Abar``, ``Bbar`` and ``ideal = sum p_k B_k A_k``::

    gd:    dB* = argmin 1 - cos(ideal, (Bbar + dB) Abar) + lambda ||dB||_F^2
    ridge: dB  = (ideal - Bbar Abar) Abar^T (Abar Abar^T + lambda I)^-1

Both are computed from the factors (``ideal Abar^T = sum p_k B_k (A_k Abar^T)``),
never forming a dense ``d_out x d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedlora.errors import ConfigError

SOLVERS = ("ridge", "gd")


def _ideal_dot(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], p: np.ndarray, a: np.ndarray
) -> np.ndarray:
    """``ideal @ a^T`` (d_out, r') from the factors."""
    return sum(w * (b @ (ak @ a.T)) for w, b, ak in zip(p, bs, as_, strict=True))


def _ideal_sqnorm(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], p: np.ndarray
) -> float:
    u = np.concatenate([w * b for w, b in zip(p, bs, strict=True)], axis=1)
    v = np.concatenate(list(as_), axis=0)
    return float(np.sum((u.T @ u) * (v @ v.T)))


def ridge_correction(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], p: np.ndarray, lam: float
) -> np.ndarray:
    """Closed form ``dB = (ideal - Bbar Abar) Abar^T (Abar Abar^T + lambda I)^-1``."""
    bs64 = [b.astype(np.float64) for b in bs]
    as64 = [a.astype(np.float64) for a in as_]
    abar = sum(w * a for w, a in zip(p, as64, strict=True))
    bbar = sum(w * b for w, b in zip(p, bs64, strict=True))
    gram = abar @ abar.T
    rhs = _ideal_dot(bs64, as64, p, abar) - bbar @ gram  # (ideal - Bbar Abar) Abar^T
    lhs = gram + lam * np.eye(gram.shape[0])
    return np.linalg.solve(lhs.T, rhs.T).T  # rhs @ inv(lhs); lhs is symmetric


def gd_correction(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    p: np.ndarray,
    lam: float,
    lr: float = 0.01,
    max_iter: int = 1000,
    tol: float = 1e-6,
    patience: int = 5,
) -> np.ndarray:
    """The paper's solver: Adam on ``f = 1 - cos + lambda ||dB||^2`` from ``dB = 0``,
    stopping when ``f`` changes by less than ``tol`` for ``patience`` steps.
    Returns the best iterate, so the corrected cosine is never below plain averaging.
    Adam runs in the ``2r``-dimensional column space of ``[C, Bbar]`` that holds
    the minimiser (see the comment in the body), so a step costs ``O(r^2)``.

    With ``M = Bbar + dB``, ``C = ideal Abar^T``, ``G = Abar Abar^T`` and
    ``q = sqrt(<M G, M>) = ||M Abar||``: ``cos = <C, M> / (||ideal|| q)`` and
    ``grad f = -C / (||ideal|| q) + <C, M> M G / (||ideal|| q^3) + 2 lambda dB``.
    """
    bs64 = [b.astype(np.float64) for b in bs]
    as64 = [a.astype(np.float64) for a in as_]
    abar = sum(w * a for w, a in zip(p, as64, strict=True))
    bbar_full = sum(w * b for w, b in zip(p, bs64, strict=True))
    gram = abar @ abar.T
    c_full = _ideal_dot(bs64, as64, p, abar)
    ideal_norm = float(np.sqrt(max(_ideal_sqnorm(bs64, as64, p), 0.0)))
    if ideal_norm == 0.0:
        return np.zeros_like(bbar_full)
    # The minimiser lies in the column space of [C, Bbar] (2r dimensions): a
    # component of M orthogonal to it leaves <C, M> unchanged and only adds to
    # ||M Abar|| and to lambda ||dB||^2. Solve there, in orthonormal coordinates
    # (which keep every inner product), at O(r^2) instead of O(d_out r) a step.
    basis, _ = np.linalg.qr(np.concatenate([c_full, bbar_full], axis=1))
    c, bbar = basis.T @ c_full, basis.T @ bbar_full
    db = np.zeros_like(bbar)
    m1, m2 = np.zeros_like(db), np.zeros_like(db)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best, best_f, prev, still = db.copy(), np.inf, None, 0
    for step in range(1, max_iter + 2):
        m = bbar + db
        mg = m @ gram
        q = float(np.sqrt(max(np.sum(mg * m), 1e-300)))
        dot = float(np.sum(c * m))
        f = 1.0 - dot / (ideal_norm * q) + lam * float(np.sum(db * db))
        if f < best_f:
            best, best_f = db.copy(), f
        still = still + 1 if prev is not None and abs(prev - f) < tol else 0
        prev = f
        if still >= patience or step > max_iter:
            break
        grad = -c / (ideal_norm * q) + dot * mg / (ideal_norm * q**3) + 2 * lam * db
        m1 = beta1 * m1 + (1 - beta1) * grad
        m2 = beta2 * m2 + (1 - beta2) * grad * grad
        db = db - lr * (m1 / (1 - beta1**step)) / (
            np.sqrt(m2 / (1 - beta2**step)) + eps
        )
    return basis @ best


def correction(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    p: np.ndarray,
    lam: float,
    solver: str,
) -> np.ndarray:
    """``dB`` for one layer with the chosen solver (``ridge`` or ``gd``)."""
    if solver == "ridge":
        return ridge_correction(bs, as_, p, lam)
    if solver == "gd":
        return gd_correction(bs, as_, p, lam)
    raise ConfigError("strategy.solver", solver, f"choose one of {', '.join(SOLVERS)}")
