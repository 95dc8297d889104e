"""Heterogeneous ranks: the per-layer math of FLoRA, FlexLoRA, HetLoRA and padded
FedIT, and their aggregation-error diagnostic (docs/algorithms.md, section 5).

Per adapted layer, client ``k = 1..K`` holds ``B_k`` (``d_out x r_k``) and ``A_k``
(``r_k x d_in``) at its own scale ``s_k`` (``alpha / r_k``, rsLoRA
``alpha / sqrt(r_k)``: :func:`lora_scale`) and weight ``p_k`` (summing to 1). The
target of every method is the average of what the clients learned, each at its own
scale::

    Delta = sum_k p_k s_k B_k A_k                                  (d_out, d_in)
          = B_st A_st,  B_st = [p_1 s_1 B_1 .. p_K s_K B_K]        (d_out, m)
                        A_st = [A_1; ..; A_K]                      (m, d_in)

with ``m = sum_k r_k`` (:func:`stack`, FLoRA). ``Delta`` is never formed: every
function works on factors, in float64, at ``O((d_out + d_in) m^2)`` per layer at
most (a dense float64 ``Delta`` of a 4096 x 4096 layer is 134 MB; its SVD ``O(d^3)``).

- FLoRA (5a): :func:`stack`, exact.
- FlexLoRA (5b): :func:`flexlora`, the rank-``r`` truncated SVD of ``Delta`` from
  the thin QR of the stacked factors, split evenly at the client's scale.
- HetLoRA (5c): :func:`hetlora_to_client`, :func:`hetlora_from_client`,
  :func:`hetlora_weights`, :func:`hetlora_aggregate`. Rank self-pruning is not
  implemented (see :func:`hetlora_aggregate`).
- Padded FedIT (the baseline): :func:`pad`, :func:`truncate`,
  :func:`padded_average`.
- The diagnostic: :func:`hetero_aggregation_error`.

Nothing here imports torch, Flower or Hydra.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Factors = tuple[np.ndarray, np.ndarray]  # (B: (d_out, r), A: (r, d_in))

_EPS = float(np.finfo(np.float64).eps)


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), a client's own LoRA scale."""
    if rank < 1:
        raise ValueError(f"a LoRA rank must be >= 1, got {rank}")
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _check_factors(b: np.ndarray, a: np.ndarray, what: str) -> None:
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"{what}: expected B (d_out x r) and A (r x d_in), got {b.shape} and "
            f"{a.shape}"
        )


# --- FLoRA (5a) -------------------------------------------------------------------
def stack(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    scales: Sequence[float] | np.ndarray,
) -> Factors:
    """``(B_st, A_st)``, float64, with ``B_st A_st = Delta = sum_k p_k s_k B_k A_k``.

    ``B_st = [p_1 s_1 B_1, .., p_K s_K B_K]`` (``d_out x sum r_k``),
    ``A_st = [A_1; ..; A_K]`` (``sum r_k x d_in``): exact (FLoRA's stacking).

    Raises
    ------
    ValueError
        Factors that do not pair up, or lists of different lengths.
    """
    if not (len(bs) == len(as_) == len(weights) == len(scales)) or not bs:
        raise ValueError(
            f"stack: need one B, A, weight and scale per client, got {len(bs)}, "
            f"{len(as_)}, {len(weights)}, {len(scales)}"
        )
    for k, (b, a) in enumerate(zip(bs, as_, strict=True)):
        _check_factors(np.asarray(b), np.asarray(a), f"client {k}")
    b_st = np.hstack(
        [
            float(p) * float(s) * _f64(b)
            for b, p, s in zip(bs, weights, scales, strict=True)
        ]
    )
    a_st = np.vstack([_f64(a) for a in as_])
    return b_st, a_st


# --- FlexLoRA (5b) ----------------------------------------------------------------
def factored_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, ...]:
    """The thin SVD ``B A = U diag(S) V^T`` without forming ``B A``.

    ``B = Q_B R_B``, ``A^T = Q_A R_A`` (thin QR), ``R_B R_A^T = U_c diag(S) V_c^T``
    (the SVD of the small core), ``U = Q_B U_c``, ``V = Q_A V_c``: ``O((d_out +
    d_in) m^2 + m^3)`` for ``m`` columns of ``B``. Singular values at round-off
    level, ``S_i <= m eps ||R_B||_F ||R_A||_F`` (the floor of any factored
    computation; all of them where the sum cancels to zero), are set to exactly 0.

    Returns
    -------
    u : ndarray
        ``(d_out, n)``, orthonormal columns, ``n <= min(m, d_out, d_in)``.
    s : ndarray
        ``(n,)``, non-increasing, ``>= 0``.
    vt : ndarray
        ``(n, d_in)``, orthonormal rows.
    """
    b, a = _f64(b), _f64(a)
    _check_factors(b, a, "factored_svd")
    q_b, r_b = np.linalg.qr(b)  # (d_out, n_b), (n_b, m); n_b = min(d_out, m)
    q_a, r_a = np.linalg.qr(a.T)  # (d_in, n_a), (n_a, m)
    u_c, s, vt_c = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    floor = max(b.shape[1], 1) * _EPS * np.linalg.norm(r_b) * np.linalg.norm(r_a)
    s = np.where(s > floor, s, 0.0)
    return q_b @ u_c, s, vt_c @ q_a.T


def split_truncation(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, scale: float
) -> Factors:
    """``(B, A)`` of rank ``rank`` with ``scale B A = U_r diag(S_r) V_r^T``, split
    evenly: ``B = U_r diag(sqrt(S_r)) / sqrt(scale)``,
    ``A = diag(sqrt(S_r)) V_r^T / sqrt(scale)``. Where ``rank`` exceeds the
    number of non-zero singular values the extra columns and rows are 0."""
    if rank < 1 or not scale > 0:
        raise ValueError(f"need rank >= 1 and scale > 0, got {rank} and {scale}")
    k = min(rank, s.size)
    root = np.sqrt(s[:k] / float(scale))
    b = np.zeros((u.shape[0], rank))
    a = np.zeros((rank, vt.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    return b, a


def truncation_share(s: np.ndarray, rank: int) -> float:
    """``||Delta - trunc_r(Delta)||_F / ||Delta||_F = sqrt(sum_{i>r} S_i^2 /
    sum_i S_i^2)`` (0 for ``Delta = 0``)."""
    total = float(np.sum(s**2))
    return float(np.sqrt(np.sum(s[rank:] ** 2) / total)) if total > 0 else 0.0


def flexlora(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    scales: Sequence[float] | np.ndarray,
    ranks_out: Sequence[int],
    scales_out: Sequence[float],
) -> tuple[list[Factors], np.ndarray]:
    """FlexLoRA's redistribution: for each requested rank ``r`` (at scale ``s``)
    the rank-``r`` truncation of ``Delta = sum_k p_k s_k B_k A_k``, split evenly,

        ``s B_r A_r = trunc_r(Delta) = U_r diag(S_r) V_r^T``,

    from :func:`stack` and :func:`factored_svd` (never the dense ``Delta``), and
    the share of ``Delta`` each rank cannot hold, ``||Delta - trunc_r(Delta)||_F /
    ||Delta||_F``. The SVD is computed once for all requested ranks.

    A rank above the rank of ``Delta`` (at most ``min(sum r_k, d_out, d_in)``) gets
    zero columns and rows beyond it (and share 0); ``Delta = 0`` gives zero factors
    and share 0.

    Returns
    -------
    factors : list of (ndarray, ndarray)
        ``(B_r, A_r)`` per requested rank, float64, ``(d_out, r)`` and ``(r, d_in)``.
    shares : ndarray
        The truncation share per requested rank.
    """
    if len(ranks_out) != len(scales_out):
        raise ValueError(
            f"flexlora: {len(ranks_out)} ranks but {len(scales_out)} scales"
        )
    u, s, vt = factored_svd(*stack(bs, as_, weights, scales))
    factors = [
        split_truncation(u, s, vt, int(r), float(sc))
        for r, sc in zip(ranks_out, scales_out, strict=True)
    ]
    shares = np.array([truncation_share(s, int(r)) for r in ranks_out])
    return factors, shares


# --- padded FedIT (the baseline) --------------------------------------------------
def pad(b: np.ndarray, a: np.ndarray, rank: int) -> Factors:
    """``(B, A)`` zero-padded to ``rank``: ``[B, 0]`` and ``[A; 0]`` (same product,
    same dtype)."""
    _check_factors(b, a, "pad")
    r = b.shape[1]
    if rank < r:
        raise ValueError(f"pad: cannot pad rank {r} down to {rank} (truncate it)")
    b_out = np.zeros((b.shape[0], rank), dtype=b.dtype)
    a_out = np.zeros((rank, a.shape[1]), dtype=a.dtype)
    b_out[:, :r], a_out[:r] = b, a
    return b_out, a_out


def truncate(b: np.ndarray, a: np.ndarray, rank: int) -> Factors:
    """``(B[:, :rank], A[:rank])``, copies in the same dtype."""
    _check_factors(b, a, "truncate")
    if not 1 <= rank <= b.shape[1]:
        raise ValueError(f"truncate: rank {rank} is not in 1..{b.shape[1]}")
    return b[:, :rank].copy(), a[:rank].copy()


def padded_average(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    rank: int,
) -> Factors:
    """FedIT with zero-padding: ``B = sum_k w_k pad(B_k)``, ``A = sum_k w_k
    pad(A_k)`` at ``rank`` (``>= max r_k``), float64. With ``w = p`` this is the
    baseline; with HetLoRA's weights it is :func:`hetlora_aggregate` of unpadded
    factors. Inexact: ``B A != sum_k w_k B_k A_k`` in general."""
    padded = [pad(_f64(b), _f64(a), rank) for b, a in zip(bs, as_, strict=True)]
    return hetlora_aggregate([b for b, _ in padded], [a for _, a in padded], weights)


# --- HetLoRA (5c) -----------------------------------------------------------------
def _hetlora_factor(s_max: float, s_k: float) -> float:
    if not (s_max > 0 and s_k > 0):
        raise ValueError(f"LoRA scales must be > 0, got {s_max} and {s_k}")
    return math.sqrt(float(s_max) / float(s_k))


def hetlora_to_client(
    b: np.ndarray, a: np.ndarray, rank: int, s_max: float, s_k: float
) -> Factors:
    """What client ``k`` (rank ``r_k``, scale ``s_k``) starts from, float64:
    ``B' = c B[:, :r_k]``, ``A' = c A[:r_k]`` with ``c = sqrt(s_max / s_k)``, so
    ``s_k B' A' = s_max B[:, :r_k] A[:r_k]``: its effective delta is the truncation
    of the global one (rank ``r_max``, scale ``s_max``)."""
    c = _hetlora_factor(s_max, s_k)
    b_k, a_k = truncate(_f64(b), _f64(a), rank)
    return c * b_k, c * a_k


def hetlora_from_client(
    b_k: np.ndarray, a_k: np.ndarray, r_max: int, s_max: float, s_k: float
) -> Factors:
    """A client's reply at the server's rank and scale, float64: both factors
    divided by ``c = sqrt(s_max / s_k)`` and zero-padded to ``r_max``, so
    ``s_max B A = s_k B_k A_k`` (the inverse of :func:`hetlora_to_client`)."""
    c = _hetlora_factor(s_max, s_k)
    return pad(_f64(b_k) / c, _f64(a_k) / c, r_max)


def hetlora_weights(
    bs: Sequence[np.ndarray],
    as_: Sequence[np.ndarray],
    scales: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """HetLoRA's sparsity weights ``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F``.

    Each norm from the ``r_k x r_k`` Gram matrices, ``||B A||_F^2 =
    sum((B^T B) * (A A^T))`` (``O((d_out + d_in) r_k^2)``, no ``d_out x d_in``
    product). Pass the replies with their own scales (or, the same numbers, the
    :func:`hetlora_from_client` factors with ``s_max``). All-zero updates: uniform.
    """
    norms = []
    for b, a, s in zip(bs, as_, scales, strict=True):
        b, a = _f64(b), _f64(a)
        _check_factors(b, a, "hetlora_weights")
        sq = float(np.sum((b.T @ b) * (a @ a.T)))
        norms.append(abs(float(s)) * math.sqrt(max(sq, 0.0)))
    w = np.asarray(norms)
    total = float(w.sum())
    return w / total if total > 0 else np.full(w.size, 1.0 / w.size)


def hetlora_aggregate(
    padded_bs: Sequence[np.ndarray],
    padded_as: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
) -> Factors:
    """``B = sum_k w_k B_k``, ``A = sum_k w_k A_k`` of factors already padded to
    ``r_max`` (:func:`hetlora_from_client`), float64; factor by factor, so inexact
    like FedIT. Weights: :func:`hetlora_weights` (HetLoRA) or ``p_k`` (padded FedIT).

    HetLoRA's local rank self-pruning (Cho et al., EMNLP 2024) is not implemented:
    the sources at hand (the abstract and summaries) only say that clients prune
    their own rank during local training; its regulariser, pruning rule and
    constants could not be pinned down from the paper's text, which the docs
    require.
    """
    if not (len(padded_bs) == len(padded_as) == len(weights)) or not padded_bs:
        raise ValueError(
            f"hetlora_aggregate: {len(padded_bs)} B, {len(padded_as)} A, "
            f"{len(weights)} weights"
        )
    shapes = {
        (np.shape(b), np.shape(a)) for b, a in zip(padded_bs, padded_as, strict=True)
    }
    if len(shapes) != 1:
        raise ValueError(
            f"hetlora_aggregate: pad every reply to r_max first, got {sorted(shapes)}"
        )
    b_out = sum(float(w) * _f64(b) for b, w in zip(padded_bs, weights, strict=True))
    a_out = sum(float(w) * _f64(a) for a, w in zip(padded_as, weights, strict=True))
    return np.asarray(b_out), np.asarray(a_out)


# --- the diagnostic (section 5) ---------------------------------------------------
# Trust the Gram path where its estimated relative error of ||Delta - E||_F^2 is at
# most this (so about half of it on the distances and the ratios); else QR.
_GRAM_RTOL = 1e-8


def _drop_zero_terms(b: np.ndarray, a: np.ndarray) -> Factors:
    """``(B, A)`` without the pairs ``(B[:, j], A[j])`` whose product is 0 (a zero
    column of ``B`` or a zero row of ``A``: the zero padding of a reply below the
    global rank), so ``B A`` is unchanged, exactly. Keeps one pair where all are
    zero, so the shapes stay valid."""
    keep = np.any(b != 0, axis=0) & np.any(a != 0, axis=1)
    if keep.all():
        return b, a
    if not keep.any():
        keep[:1] = True
    return b[:, keep], a[keep]


class _Basis:
    """Thin QR of ``Delta``'s stacked factors, ``B_st = Q_B R_B``,
    ``A_st^T = Q_A R_A``, to take ``||Delta - E||_F`` of many ``E = B_E A_E``
    at ``O((d_out + d_in) m r)`` each (see :meth:`distance_sq`): the exact
    fallback of :class:`_Distances`."""

    def __init__(self, b: np.ndarray, a: np.ndarray) -> None:
        b, a = _f64(b), _f64(a)
        _check_factors(b, a, "delta")
        self.q_b, self.r_b = np.linalg.qr(b)
        self.q_a, self.r_a = np.linalg.qr(a.T)

    @staticmethod
    def _split(q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x = q c + rest``: coefficients on ``q`` and the remainder, projected
        twice so ``rest`` stays orthogonal to ``q`` to round-off."""
        c = q.T @ x
        rest = x - q @ c
        c2 = q.T @ rest
        rest -= q @ c2
        return c + c2, rest

    def distance_sq(self, b_e: np.ndarray, a_e: np.ndarray) -> float:
        """``||Delta - B_E A_E||_F^2``.

        With ``B_E = Q_B C_B + P_B`` and ``A_E^T = Q_A C_A + P_A`` (``P``
        orthogonal to ``Q``), ``Delta - E = Q_B (R_B R_A^T - C_B C_A^T) Q_A^T
        - Q_B C_B P_A^T - P_B C_A^T Q_A^T - P_B P_A^T``, four mutually orthogonal
        terms: the squared norm is the small core's plus three Gram traces of
        products without cancellation between ``Delta`` and ``E``. Where ``E =
        Delta`` it reads round-off (~1e-16 relative), not the ~1e-8 of ``||Delta||^2
        - 2 <Delta, E> + ||E||^2``; no factorisation beyond the basis.
        """
        b_e, a_e = _f64(b_e), _f64(a_e)
        _check_factors(b_e, a_e, "client delta")
        c_b, p_b = self._split(self.q_b, b_e)
        c_a, p_a = self._split(self.q_a, a_e.T)
        core = self.r_b @ self.r_a.T - c_b @ c_a.T
        g_b, g_a = p_b.T @ p_b, p_a.T @ p_a
        return float(
            np.sum(core**2)
            + np.sum((c_b.T @ c_b) * g_a)
            + np.sum(g_b * (c_a.T @ c_a))
            + np.sum(g_b * g_a)
        )


class _Distances:
    """``||Delta - E||_F^2`` for many ``E = B_E A_E`` against one ``Delta = B A``:
    from Gram matrices where that is accurate, else from :class:`_Basis`.

    Gram path: ``||B A - B_E A_E||_F^2 = <G_B, G_A> - 2 <B^T B_E, A A_E^T>
    + <B_E^T B_E, A_E A_E^T>`` (``G_B = B^T B``, ``G_A = A A^T``, ``<X, Y> =
    sum X * Y``): matrix products only, ``O((d_out + d_in) m r)`` per ``E`` and
    ``O((d_out + d_in) m^2)`` once, no factorisation. Its round-off is absolute,
    about ``sqrt(n) eps t^2`` with ``n = d_out + d_in`` and ``t = sum_j ||b_j||
    ||a_j||`` over the pairs of both stacks (each Gram entry is off by about
    ``sqrt(n) eps`` times the product of its columns' norms), so it is relatively
    accurate only where the distance is not small against the terms: where
    ``E ~ Delta`` (FLoRA, FedEx-LoRA: ~1e-16) it would read ~1e-8 instead of 0.

    The cheap check: the Gram value ``x2`` is kept where ``2 sqrt(n) eps t^2 <=
    _GRAM_RTOL x2`` (estimated relative error at most 1e-8; for trained adapters
    of uncorrelated pairs ``t^2 ~ m ||Delta||^2``, so distances above a few
    percent of ``||Delta||``). Below it the distance is taken again on the thin
    QR of ``Delta``'s stacks (:class:`_Basis`, built on first use, two QRs per
    layer; each such ``E`` costs projections and small products only), which
    leaves no cancellation between ``Delta`` and ``E`` to the Gram traces.
    """

    def __init__(self, b: np.ndarray, a: np.ndarray) -> None:
        b, a = _f64(b), _f64(a)
        _check_factors(b, a, "delta")
        self.b, self.a = _drop_zero_terms(b, a)
        self.norm_sq = float(np.sum((self.b.T @ self.b) * (self.a @ self.a.T)))
        self.t = _pair_norms(self.b, self.a)
        self.n = b.shape[0] + a.shape[1]
        self._basis: _Basis | None = None

    def __call__(self, b_e: np.ndarray, a_e: np.ndarray) -> float:
        b_e, a_e = _f64(b_e), _f64(a_e)
        _check_factors(b_e, a_e, "client delta")
        if b_e.shape[0] != self.b.shape[0] or a_e.shape[1] != self.a.shape[1]:
            raise ValueError(
                f"client delta: shape {b_e.shape[0]} x {a_e.shape[1]} against "
                f"delta {self.b.shape[0]} x {self.a.shape[1]}"
            )
        b_e, a_e = _drop_zero_terms(b_e, a_e)
        cross = float(np.sum((self.b.T @ b_e) * (self.a @ a_e.T)))
        own = float(np.sum((b_e.T @ b_e) * (a_e @ a_e.T)))
        x2 = self.norm_sq - 2.0 * cross + own
        t = self.t + _pair_norms(b_e, a_e)
        if 2.0 * math.sqrt(self.n) * _EPS * t * t <= _GRAM_RTOL * x2:
            return x2
        if self._basis is None:
            self._basis = _Basis(self.b, self.a)
        return self._basis.distance_sq(b_e, a_e)


def _pair_norms(b: np.ndarray, a: np.ndarray) -> float:
    """``sum_j ||B[:, j]|| ||A[j]||``, the scale of the Gram path's round-off."""
    return float(np.linalg.norm(b, axis=0) @ np.linalg.norm(a, axis=1))


def hetero_error_sums(
    delta: Factors,
    new: Sequence[Factors],
    old: Sequence[Factors],
    weights: Sequence[float] | np.ndarray,
    ranks: Sequence[int],
) -> dict[int, tuple[float, float]]:
    """One layer's terms of :func:`hetero_aggregation_error`, per rank tier:
    ``{r: (sum_{k: r_k = r} p_k ||Delta - E_new,k||_F^2,
    sum_{k: r_k = r} p_k ||Delta - E_old,k||_F^2)}``.

    ``delta`` is ``(B_st, A_st)`` (:func:`stack`); ``new[k]`` and ``old[k]`` are
    client ``k``'s effective deltas as factors with the scale folded in,
    ``(s_k B_k, A_k)``, of any rank. Computed from the factors, never a
    ``d_out x d_in`` matrix: zero padding dropped, then Gram matrices where they
    are accurate and the thin QR where the distance cancels (:class:`_Distances`).
    """
    if not (len(new) == len(old) == len(weights) == len(ranks)):
        raise ValueError(
            f"hetero_error_sums: {len(new)} new, {len(old)} old, {len(weights)} "
            f"weights, {len(ranks)} ranks"
        )
    distance_sq = _Distances(*delta)
    out: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e_new, e_old, p, r in zip(new, old, weights, ranks, strict=True):
        out[int(r)][0] += float(p) * distance_sq(*e_new)
        out[int(r)][1] += float(p) * distance_sq(*e_old)
    return {r: (num, den) for r, (num, den) in sorted(out.items())}


def hetero_aggregation_error(
    delta: Mapping[str, Factors],
    new: Sequence[Mapping[str, Factors]],
    old: Sequence[Mapping[str, Factors]],
    weights: Sequence[float] | np.ndarray,
    ranks: Sequence[int],
    group: Callable[[str], str] | None = None,
) -> tuple[float, dict[int, float], dict[str, float]]:
    """The aggregation error when clients hold different adapters::

        sqrt(sum_k p_k ||Delta - E_new,k||_F^2)
        / sqrt(sum_k p_k ||Delta - E_old,k||_F^2)

    over all layers together (Frobenius norm of the concatenation), with ``E_new,k``
    / ``E_old,k`` what client ``k`` receives next / received this round.

    Parameters
    ----------
    delta : mapping
        ``{layer: (B_st, A_st)}``, the round's target ``Delta`` (:func:`stack`).
    new, old : sequence of mappings
        Per client ``{layer: (s_k B, A)}``, its effective delta (scale folded in).
    weights : array_like
        ``p_k``.
    ranks : sequence of int
        ``r_k``, the tiers of the breakdown.
    group : callable, optional
        Layer name -> group of the third result (e.g. the module name); default
        the layer name itself.

    Returns
    -------
    overall : float
        The ratio (0.0 where the denominator is 0).
    by_tier : dict
        ``{r: ratio over the clients of rank r}``.
    by_group : dict
        ``{group: ratio over its layers}``.
    """
    tiers: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for layer, factors in delta.items():
        sums = hetero_error_sums(
            factors, [e[layer] for e in new], [e[layer] for e in old], weights, ranks
        )
        g = group(layer) if group is not None else layer
        for r, (num, den) in sums.items():
            tiers[r][0] += num
            tiers[r][1] += den
            groups[g][0] += num
            groups[g][1] += den
    num = sum(v[0] for v in tiers.values())
    den = sum(v[1] for v in tiers.values())
    return (
        _ratio(num, den),
        {r: _ratio(*v) for r, v in sorted(tiers.items())},
        {g: _ratio(*v) for g, v in sorted(groups.items())},
    )


def _ratio(num: float, den: float) -> float:
    num, den = max(num, 0.0), max(den, 0.0)  # round-off can dip below 0
    return 0.0 if den == 0.0 else float(np.sqrt(num / den))
