"""LoRA-FAIR server-side correction of ``B`` (Bian et al., ICCV 2025,
https://arxiv.org/abs/2411.14961).

Per layer, with ``Abar = sum p_k A_k``, ``Bbar = sum p_k B_k``, ``M = Bbar + dB`` and
the clients' average product ``ideal = sum p_k B_k A_k``::

    gd:    the paper's cosine objective with lambda relative to ||Bbar||^2,
               f(dB) = 1 - cos(ideal, M Abar) + lambda ||dB||_F^2 / ||Bbar||_F^2,
           whose minimiser fixes the direction of M; the scale of M, which the
           cosine leaves free, is then fitted by least squares (see gd_solve)
    ridge: dB = (ideal - Bbar Abar) Abar^T (Abar Abar^T + lambda I)^-1

Both are computed from the factors (``ideal Abar^T = sum p_k B_k (A_k Abar^T)``,
``||M Abar||^2 = <M G, M>`` with ``G = Abar Abar^T``), never forming a dense
``d_out x d_in`` matrix. Each solver also reports what it did (:data:`SolverInfo`:
steps, convergence, objective before and after, ``||dB|| / ||Bbar||``), so that a
strategy can log it every round (:func:`summarise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.errors import ConfigError

SOLVERS = ("ridge", "gd")
MAX_ITER = 1000  # the paper's step limit
GRAD_TOL = 1e-9  # on the gradient of the scale-free objective (a pure number)
SolverInfo = dict[str, Any]


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


@dataclass(frozen=True)
class _Layer:
    """One layer's problem in float64: ``Bbar``, ``G = Abar Abar^T``,
    ``C = ideal Abar^T`` and ``||ideal||``; every quantity the solvers need."""

    bbar: np.ndarray
    gram: np.ndarray
    c: np.ndarray
    ideal_norm: float

    @classmethod
    def build(
        cls, bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], p: np.ndarray
    ) -> _Layer:
        bs64 = [b.astype(np.float64) for b in bs]
        as64 = [a.astype(np.float64) for a in as_]
        abar = sum(w * a for w, a in zip(p, as64, strict=True))
        bbar = sum(w * b for w, b in zip(p, bs64, strict=True))
        return cls(
            bbar=bbar,
            gram=abar @ abar.T,
            c=_ideal_dot(bs64, as64, p, abar),
            ideal_norm=float(np.sqrt(max(_ideal_sqnorm(bs64, as64, p), 0.0))),
        )

    def product_norm(self, m: np.ndarray) -> float:
        """``||M Abar||_F``."""
        return float(np.sqrt(max(np.sum((m @ self.gram) * m), 0.0)))

    def cos(self, m: np.ndarray) -> float:
        """``cos(ideal, M Abar)`` (0 where either is zero)."""
        q = self.product_norm(m)
        if q == 0.0 or self.ideal_norm == 0.0:
            return 0.0
        return float(np.sum(self.c * m)) / (self.ideal_norm * q)

    def info(
        self, solver: str, db: np.ndarray, start: float, end: float, **extra: Any
    ) -> SolverInfo:
        bbar_sq = float(np.sum(self.bbar**2))
        db_sq = float(np.sum(db**2))
        q0 = self.product_norm(self.bbar)
        q1 = self.product_norm(self.bbar + db)
        return {
            "solver": solver,
            "iterations": 0,
            "converged": True,
            "grad_norm": 0.0,
            "objective_start": float(start),
            "objective_end": float(end),
            "cos_start": self.cos(self.bbar),
            "cos_end": self.cos(self.bbar + db),
            "db_sqnorm": db_sq,
            "bbar_sqnorm": bbar_sq,
            "db_ratio": float(np.sqrt(db_sq / bbar_sq)) if bbar_sq > 0 else 0.0,
            "product_ratio": q1 / q0 if q0 > 0 else 0.0,
            **extra,
        }


def _ridge_db(layer: _Layer, lam: float) -> np.ndarray:
    """``dB = (C - Bbar G) (G + lambda I)^-1``, ``C - Bbar G = (ideal - Bbar Abar)
    Abar^T``."""
    rhs = layer.c - layer.bbar @ layer.gram
    lhs = layer.gram + lam * np.eye(layer.gram.shape[0])
    return np.linalg.solve(lhs.T, rhs.T).T  # rhs @ inv(lhs); lhs is symmetric


def ridge_correction(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], p: np.ndarray, lam: float
) -> np.ndarray:
    """Closed form ``dB = (ideal - Bbar Abar) Abar^T (Abar Abar^T + lambda I)^-1``."""
    return _ridge_db(_Layer.build(bs, as_, p), lam)


def ridge_solve(
    bs: Sequence[np.ndarray], as_: Sequence[np.ndarray], p: np.ndarray, lam: float
) -> tuple[np.ndarray, SolverInfo]:
    """:func:`ridge_correction` and its :data:`SolverInfo` (one pass over the
    factors for both); the objective reported is ridge's own,
    ``(||ideal - M Abar||^2 + lambda ||dB||^2) / ||ideal||^2``."""
    layer = _Layer.build(bs, as_, p)
    db = _ridge_db(layer, lam)

    def objective(d: np.ndarray) -> float:
        if layer.ideal_norm == 0.0:
            return 0.0
        m = layer.bbar + d
        residual = (
            layer.ideal_norm**2
            - 2 * float(np.sum(layer.c * m))
            + layer.product_norm(m) ** 2
        )
        return (max(residual, 0.0) + lam * float(np.sum(d * d))) / layer.ideal_norm**2

    return db, layer.info("ridge", db, objective(np.zeros_like(db)), objective(db))


def gd_solve(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    p: np.ndarray,
    lam: float,
    max_iter: int = MAX_ITER,
    tol: float = GRAD_TOL,
) -> tuple[np.ndarray, SolverInfo]:
    """The paper's cosine objective, scale-free, solved to convergence; returns
    ``(dB, info)``.

    **Objective.** The paper minimises ``1 - cos(ideal, M Abar) + lambda ||dB||^2``
    (``M = Bbar + dB``) with ``lambda = 0.01``. With LoRA's ``B`` entries ~1e-3
    that absolute ``lambda`` weighs nothing, and the cosine is blind to the scale
    of ``M``, so the minimiser's scale is left to wherever a fixed-step optimiser
    stops (it returned ``dB`` several times ``Bbar``, or nothing). Here
    ``lambda`` is relative to ``||Bbar||^2``::

        f(dB) = 1 - cos(ideal, M Abar) + lambda ||dB||_F^2 / ||Bbar||_F^2

    which does not change when every ``B_k`` or every ``A_k`` is rescaled.

    **Direction.** The cosine term does not depend on the scale ``s > 0`` of
    ``M``; the penalty is smallest, over ``s``, at the projection of ``Bbar`` on
    ``M``'s ray, where ``||dB||^2 / ||Bbar||^2 = sin^2 phi`` (``phi`` the angle
    between ``M`` and ``Bbar``; 1 where ``<M, Bbar> <= 0``). So ``min_s f`` is::

        J(M) = 1 - cos theta(M) + lambda sin^2 phi(M),   cos theta = cos(ideal, M Abar)

    a function of ``M``'s direction only: the angle of the product to ``ideal``
    plus ``lambda`` times the angle of ``M`` to ``Bbar``. ``J(Bbar) = 1 -
    cos(ideal, Bbar Abar)`` is the value at ``dB = 0``. With ``lambda = 0`` the
    minimiser is the exact projection, ``M`` proportional to ``ideal Abar^T G^-1``
    (``G = Abar Abar^T``); a larger ``lambda`` turns ``M`` towards ``Bbar``.

    **Scale.** The scale that the penalty would pick (shrinking ``M`` to the
    projection of ``Bbar``) is an artefact of the regulariser, not of the data; the
    objective itself says nothing about the size of the product. It is set by least
    squares, ``M <- t M`` with ``t = argmin ||ideal - t M Abar||_F = <ideal, M Abar>
    / ||M Abar||^2`` (``t >= 0``), so ``||M Abar|| = ||ideal|| cos theta``, never
    above ``||ideal||``, and ``||ideal - M Abar|| = ||ideal|| sin theta``. As the
    solver only ever lowers ``J`` from ``Bbar``, ``cos theta >= cos(ideal, Bbar
    Abar)`` and the layer's aggregation error ``||ideal - (Bbar + dB) Abar||`` is
    never above FedAvg-LoRA's ``||ideal - Bbar Abar||``, converged or not.

    **Solver.** ``J``'s minimiser lies in the ``2r``-dimensional column space of
    ``[C, Bbar]`` (``C = ideal Abar^T``): a component of ``M`` orthogonal to it
    changes neither ``<C, M>`` nor ``<M, Bbar>`` and only lowers both cosines. In
    orthonormal coordinates of that space, gradient descent on the unit sphere
    (``J`` is scale-free) with Barzilai-Borwein steps and Armijo backtracking, from
    ``M = Bbar``, until the gradient's norm is below ``tol``; preconditioned by the
    change of variables ``Y = M L``, ``L L^T = cos(ideal, Bbar Abar) G / ||Bbar
    Abar||^2 + lambda I / ||Bbar||^2`` (the metrics of the two terms near ``Bbar``),
    which keeps the problem well conditioned however the factors are scaled and
    as ``Abar`` nears singularity (a few to a few tens of steps). A step costs
    ``O(r^3)``. After ``max_iter`` steps without converging, the iterate reached
    (``J`` never above ``J(Bbar)``) is used and
    ``info["converged"]`` is False.

    ``info``: ``iterations``, ``converged``, ``grad_norm``, ``objective_start``
    (``J`` at ``dB = 0``) and ``objective_end``, ``cos_start``/``cos_end``,
    ``db_ratio`` (``||dB|| / ||Bbar||``), ``product_ratio`` (``||(Bbar + dB)
    Abar|| / ||Bbar Abar||``) and ``scale`` (``t ||M|| / ||Bbar||``).
    """
    layer = _Layer.build(bs, as_, p)
    bbar_full = layer.bbar
    r = layer.gram.shape[0]
    g_trace = float(np.trace(layer.gram))
    if layer.ideal_norm == 0.0 or g_trace == 0.0:  # nothing to fit, or no product
        zero = np.zeros_like(bbar_full)
        return zero, layer.info("gd", zero, 0.0, 0.0, lam=float(lam), scale=1.0)
    basis, _ = np.linalg.qr(np.concatenate([layer.c, bbar_full], axis=1))
    c, b = basis.T @ layer.c, basis.T @ bbar_full
    gram, n_i = layer.gram, layer.ideal_norm
    b_sq = float(np.sum(b * b))
    # Y = M L with L L^T = P: a change of variables (a preconditioner); J itself
    # is evaluated in M. P blends the metrics of J's two terms near M = Bbar: the
    # cosine's G / ||Bbar Abar||^2 (times the cosine, its curvature) and the
    # penalty's lambda I / ||Bbar||^2, so the steps suit both however Abar is
    # conditioned; P is unchanged by rescaling every B_k or every A_k.
    q0 = layer.product_norm(bbar_full)
    if q0 > 0.0:
        precond = (max(layer.cos(bbar_full), 1e-3) / q0**2) * gram
    else:
        precond = gram / g_trace
    if b_sq > 0.0:
        precond += (lam / b_sq) * np.eye(r)
    tiny = 1e-12 * float(np.trace(precond)) / r
    chol = np.linalg.cholesky(precond + tiny * np.eye(r))
    l_inv = np.linalg.inv(chol)

    def objective(m: np.ndarray) -> tuple[float, np.ndarray]:
        """``J(M)`` and its gradient in ``M``."""
        mg = m @ gram
        q2 = float(np.sum(mg * m))
        if not q2 > 0.0:
            return np.inf, np.zeros_like(m)
        q = np.sqrt(q2)
        dot = float(np.sum(c * m))
        value = 1.0 - dot / (n_i * q)
        grad = -c / (n_i * q) + dot * mg / (n_i * q**3)
        if b_sq > 0.0:
            s, mm = float(np.sum(m * b)), float(np.sum(m * m))
            if s > 0.0:
                value += lam * (1.0 - s * s / (mm * b_sq))
                grad -= lam * (2 * s / (mm * b_sq)) * (b - (s / mm) * m)
            else:
                value += lam
        return value, grad

    def at(y: np.ndarray) -> tuple[float, np.ndarray]:
        """``J`` and its gradient in ``Y`` (``M = Y L^-1``)."""
        value, grad = objective(y @ l_inv)
        return value, grad @ l_inv.T

    # start at M = Bbar; where Bbar Abar = 0, at the penalty-free optimum instead
    start_m = b if q0 > 0.0 else np.linalg.lstsq(gram, c.T, rcond=None)[0].T
    y = start_m @ chol
    y /= np.linalg.norm(y)
    f, g = at(y)
    f_start = 1.0 - layer.cos(bbar_full)  # J(Bbar): the penalty is 0 there
    y_start, f_first = y, f
    step, iterations, converged = 1.0, 0, False
    slack = 8 * np.finfo(float).eps  # J is O(1): roundoff in comparing two values
    for _ in range(max_iter + 1):
        g_norm = float(np.linalg.norm(g))
        if g_norm <= tol:
            converged = True
            break
        if iterations == max_iter:
            break
        iterations += 1
        for _ in range(60):  # Armijo backtracking on the sphere
            y_new = y - step * g
            y_new /= np.linalg.norm(y_new)
            f_new, g_new = at(y_new)
            if f_new <= f - 1e-4 * step * g_norm**2 + slack:
                break
            step *= 0.5
        else:  # no decrease even at a tiny step: roundoff floor
            break
        s_y, d_g = y_new - y, g_new - g
        curvature = float(np.sum(s_y * d_g))
        step = (
            float(np.sum(s_y * s_y)) / curvature if curvature > 0 else 2 * step
        )  # Barzilai-Borwein
        step = min(max(step, 1e-12), 1e12)
        y, f, g = y_new, f_new, g_new
    if not f <= f_first:  # never worse than where it started
        y, f, g_norm = y_start, f_first, float(np.linalg.norm(at(y_start)[1]))
    m = y @ l_inv
    scale = max(float(np.sum(c * m)) / float(np.sum((m @ gram) * m)), 0.0)
    db = basis @ (scale * m) - bbar_full
    info = layer.info(
        "gd",
        db,
        f_start,
        f,
        iterations=int(iterations),
        converged=bool(converged),
        grad_norm=float(g_norm),
        lam=float(lam),
        scale=float(scale * np.linalg.norm(m) / np.sqrt(b_sq)) if b_sq > 0 else 0.0,
    )
    return db, info


def gd_correction(*args: Any, **kwargs: Any) -> np.ndarray:
    """``dB`` of :func:`gd_solve` (same arguments; it documents the objective and
    the solver)."""
    return gd_solve(*args, **kwargs)[0]


def correction(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    p: np.ndarray,
    lam: float,
    solver: str,
    max_iter: int = MAX_ITER,
) -> tuple[np.ndarray, SolverInfo]:
    """``(dB, info)`` for one layer with the chosen solver (``ridge`` or ``gd``)."""
    if solver == "ridge":
        return ridge_solve(bs, as_, p, lam)
    if solver == "gd":
        return gd_solve(bs, as_, p, lam, max_iter)
    raise ConfigError("strategy.solver", solver, f"choose one of {', '.join(SOLVERS)}")


def summarise(infos: Sequence[SolverInfo]) -> dict[str, Any]:
    """One round's solver record over all layers (for the round log).

    ``unconverged`` counts the layers that hit the step limit; objectives and
    cosines are means over layers, ``db_ratio`` is ``||dB|| / ||Bbar||`` over all
    layers together (and its largest per-layer value), ``product_ratio`` the range
    of ``||(Bbar + dB) Abar|| / ||Bbar Abar||``.
    """
    if not infos:
        return {"layers": 0}

    def mean(key: str) -> float:
        return float(np.mean([i[key] for i in infos]))

    bbar_sq = sum(i["bbar_sqnorm"] for i in infos)
    return {
        "solver": infos[0]["solver"],
        "layers": len(infos),
        "unconverged": sum(not i["converged"] for i in infos),
        "iterations_max": max(i["iterations"] for i in infos),
        "iterations_mean": mean("iterations"),
        "grad_norm_max": max(i["grad_norm"] for i in infos),
        "objective_start": mean("objective_start"),
        "objective_end": mean("objective_end"),
        "objective_worse": sum(
            i["objective_end"] > i["objective_start"] + 1e-12 for i in infos
        ),
        "cos_start": mean("cos_start"),
        "cos_end": mean("cos_end"),
        "db_ratio": (
            float(np.sqrt(sum(i["db_sqnorm"] for i in infos) / bbar_sq))
            if bbar_sq > 0
            else 0.0
        ),
        "db_ratio_max": max(i["db_ratio"] for i in infos),
        "product_ratio_min": min(i["product_ratio"] for i in infos),
        "product_ratio_max": max(i["product_ratio"] for i in infos),
    }
