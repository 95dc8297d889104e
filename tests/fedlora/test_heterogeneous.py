"""Heterogeneous ranks (docs/algorithms.md, section 5): FLoRA's stack, FlexLoRA's
factored SVD, HetLoRA's rescaling and weights, padded FedIT and the diagnostic,
each against an independent dense float64 formula (numpy SVD, explicit sums).

Scales as in training: B entries ~1e-3, A entries ~0.1, s_k = alpha / r_k.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from fedlora.heterogeneous import (
    factored_svd,
    flexlora,
    hetero_aggregation_error,
    hetero_error_sums,
    hetlora_aggregate,
    hetlora_from_client,
    hetlora_to_client,
    hetlora_weights,
    lora_scale,
    pad,
    padded_average,
    stack,
    truncate,
)

ALPHA = 16.0
D_OUT, D_IN = 40, 30
RANKS = (2, 4, 8)


def lora_pair(rng, r, d_out=D_OUT, d_in=D_IN):
    """``(B, A)`` at trained-adapter scales: B ~1e-3, A ~0.1."""
    return 1e-3 * rng.standard_normal((d_out, r)), 0.1 * rng.standard_normal((r, d_in))


def clients(rng, ranks=RANKS, d_out=D_OUT, d_in=D_IN, counts=None):
    pairs = [lora_pair(rng, r, d_out, d_in) for r in ranks]
    counts = (
        np.arange(1, len(ranks) + 1, dtype=np.float64) if counts is None else counts
    )
    p = np.asarray(counts, np.float64) / np.sum(counts)
    scales = [ALPHA / r for r in ranks]
    return [b for b, _ in pairs], [a for _, a in pairs], p, scales


def dense_delta(bs, as_, p, scales):
    """``sum_k p_k s_k B_k A_k``, the dense float64 reference."""
    return sum(pk * s * (b @ a) for b, a, pk, s in zip(bs, as_, p, scales, strict=True))


def dense_truncation(delta, r):
    """Rank-``r`` truncation and its relative tail, by numpy's dense SVD."""
    u, sv, vt = np.linalg.svd(delta, full_matrices=False)
    trunc = (u[:, :r] * sv[:r]) @ vt[:r]
    total = np.sum(sv**2)
    share = np.sqrt(np.sum(sv[r:] ** 2) / total) if total > 0 else 0.0
    return trunc, share, sv


def rel(x, ref):
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


# --- scales and FLoRA ------------------------------------------------------------
def test_lora_scale_plain_and_rslora():
    assert lora_scale(16, 4) == 4.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError):
        lora_scale(16, 0)


def test_stack_equals_dense_weighted_sum_with_each_clients_scale():
    rng = np.random.default_rng(0)
    bs, as_, p, scales = clients(rng)
    b_st, a_st = stack(bs, as_, p, scales)
    assert b_st.shape == (D_OUT, sum(RANKS)) and a_st.shape == (sum(RANKS), D_IN)
    assert rel(b_st @ a_st, dense_delta(bs, as_, p, scales)) < 1e-12


def test_stack_refuses_mismatched_inputs():
    rng = np.random.default_rng(1)
    bs, as_, p, scales = clients(rng)
    with pytest.raises(ValueError, match="one B, A, weight and scale"):
        stack(bs, as_[:2], p, scales)
    with pytest.raises(ValueError, match="client 1"):
        stack(bs, [as_[0], as_[2], as_[1]], p, scales)


# --- FlexLoRA ---------------------------------------------------------------------
def check_flexlora(bs, as_, p, scales, ranks_out, tol=1e-10):
    scales_out = [ALPHA / r for r in ranks_out]
    factors, shares = flexlora(bs, as_, p, scales, ranks_out, scales_out)
    delta = dense_delta(bs, as_, p, scales)
    norm = np.linalg.norm(delta)
    for (b, a), r, s, share in zip(factors, ranks_out, scales_out, shares, strict=True):
        trunc, ref_share, sv = dense_truncation(delta, r)
        assert b.shape == (delta.shape[0], r) and a.shape == (r, delta.shape[1])
        assert np.linalg.norm(s * b @ a - trunc) <= tol * norm
        assert share == pytest.approx(ref_share, abs=tol)
        # split evenly: s B^T B = s A A^T = diag(S_r) (zero-padded past rank(Delta))
        head = np.zeros(r)
        head[: min(r, sv.size)] = sv[:r]
        np.testing.assert_allclose(s * b.T @ b, np.diag(head), rtol=0, atol=tol * norm)
        np.testing.assert_allclose(s * a @ a.T, np.diag(head), rtol=0, atol=tol * norm)
    return factors, shares


def test_flexlora_equals_dense_truncated_svd():
    rng = np.random.default_rng(2)
    bs, as_, p, scales = clients(rng)
    _, shares = check_flexlora(bs, as_, p, scales, [1, 2, 4, 8, 13])
    assert np.all(np.diff(shares) < 0) and shares[-1] > 0  # rank(Delta) = 14 > 13


def test_flexlora_when_the_ranks_sum_past_the_layer_size():
    rng = np.random.default_rng(3)
    ranks = (4, 8, 8)  # sum 20 > min(d_out, d_in) = 9
    bs, as_, p, scales = clients(rng, ranks, d_out=12, d_in=9)
    _, shares = check_flexlora(bs, as_, p, scales, [2, 4, 8, 9])
    assert shares[-1] == pytest.approx(0.0, abs=1e-12)


def test_flexlora_pads_ranks_above_the_rank_of_delta_with_zeros():
    rng = np.random.default_rng(4)
    bs, as_, p, scales = clients(rng, (2, 4))
    bs[1] = np.zeros_like(bs[1])  # Delta has rank 2
    factors, shares = check_flexlora(bs, as_, p, scales, [2, 6, 35])  # 35 > d_in
    for b, a in factors[1:]:
        assert np.all(b[:, 2:] == 0) and np.all(a[2:] == 0)
    np.testing.assert_array_equal(shares, 0.0)


def test_flexlora_of_a_zero_update_is_zero():
    rng = np.random.default_rng(5)
    bs, as_, p, scales = clients(rng)
    zero = [np.zeros_like(b) for b in bs]
    factors, shares = flexlora(zero, as_, p, scales, [2, 8], [ALPHA / 2, ALPHA / 8])
    assert all(np.all(b == 0) and np.all(a == 0) for b, a in factors)
    np.testing.assert_array_equal(shares, 0.0)
    # a sum that cancels to zero (two clients with opposite updates) reads 0 too
    b, a = lora_pair(rng, 4)
    factors, shares = flexlora([b, -b], [a, a], [0.5, 0.5], [4.0, 4.0], [4], [4.0])
    assert np.all(factors[0][0] == 0) and np.all(factors[0][1] == 0)
    assert shares[0] == 0.0


def test_factored_svd_matches_numpy_singular_values():
    rng = np.random.default_rng(6)
    b, a = lora_pair(rng, 10)
    u, s, vt = factored_svd(b, a)
    np.testing.assert_allclose(
        s, np.linalg.svd(b @ a, compute_uv=False)[:10], rtol=1e-10
    )
    np.testing.assert_allclose(u.T @ u, np.eye(10), atol=1e-12)
    assert rel((u * s) @ vt, b @ a) < 1e-12


def test_flexlora_never_forms_the_dense_delta():
    # d_out = d_in = 20000: a dense float64 Delta alone is 3.2 GB (and its SVD hours)
    rng = np.random.default_rng(7)
    d = 20_000
    ranks = (4, 8, 16)
    bs, as_, p, scales = clients(rng, ranks, d_out=d, d_in=d)
    tracemalloc.start()
    start = time.perf_counter()
    factors, shares = flexlora(bs, as_, p, scales, ranks, [ALPHA / r for r in ranks])
    b_st, a_st = stack(bs, as_, p, scales)
    sums = hetero_error_sums(
        (b_st, a_st),
        [(s * b, a) for (b, a), s in zip(factors, scales, strict=True)],
        [(np.zeros((d, 1)), np.zeros((1, d)))] * 3,
        p,
        ranks,
    )
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"  # measured ~40 MB: a few d x 28
    assert elapsed < 20.0
    assert factors[-1][0].shape == (d, 16) and 0 < shares[-1] < shares[0] < 1
    # the diagnostic's numerator is the truncated tail: sum p_k share_k^2 ||Delta||^2
    num = sum(v[0] for v in sums.values())
    den = sum(v[1] for v in sums.values())
    assert np.sqrt(num / den) == pytest.approx(np.sqrt(p @ shares**2), rel=1e-8)


# --- padded FedIT and HetLoRA ----------------------------------------------------
def test_pad_and_truncate_keep_products_and_dtypes():
    rng = np.random.default_rng(8)
    b, a = (x.astype(np.float32) for x in lora_pair(rng, 3))
    pb, pa = pad(b, a, 8)
    assert pb.shape == (D_OUT, 8) and pa.shape == (8, D_IN) and pb.dtype == np.float32
    np.testing.assert_array_equal(pb @ pa, b @ a)
    tb, ta = truncate(pb, pa, 3)
    np.testing.assert_array_equal(tb, b)
    np.testing.assert_array_equal(ta, a)
    with pytest.raises(ValueError, match="truncate"):
        pad(b, a, 2)
    with pytest.raises(ValueError, match="not in 1..8"):
        truncate(pb, pa, 9)


def test_padded_average_is_the_p_weighted_mean_of_zero_padded_factors():
    rng = np.random.default_rng(9)
    bs, as_, p, _ = clients(rng)
    b, a = padded_average(bs, as_, p, 8)
    ref_b = np.zeros((D_OUT, 8))
    ref_a = np.zeros((8, D_IN))
    for bk, ak, pk in zip(bs, as_, p, strict=True):
        ref_b[:, : bk.shape[1]] += pk * bk
        ref_a[: ak.shape[0]] += pk * ak
    np.testing.assert_allclose(b, ref_b, rtol=1e-14, atol=0)
    np.testing.assert_allclose(a, ref_a, rtol=1e-14, atol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_hetlora_round_trip_and_effective_delta(rslora):
    rng = np.random.default_rng(10)
    r_max = 8
    b, a = lora_pair(rng, r_max)
    s_max = lora_scale(ALPHA, r_max, rslora)
    for r in (2, 4, 8):
        s_k = lora_scale(ALPHA, r, rslora)
        b_k, a_k = hetlora_to_client(b, a, r, s_max, s_k)
        assert b_k.shape == (D_OUT, r) and a_k.shape == (r, D_IN)
        # the client's effective delta is the global one's truncation
        reference = s_max * b[:, :r] @ a[:r]
        assert rel(s_k * b_k @ a_k, reference) < 1e-12
        # and its reply, unchanged, comes back as the padded truncation
        back_b, back_a = hetlora_from_client(b_k, a_k, r_max, s_max, s_k)
        ref_b, ref_a = np.zeros_like(b), np.zeros_like(a)
        ref_b[:, :r], ref_a[:r] = b[:, :r], a[:r]
        np.testing.assert_allclose(back_b, ref_b, rtol=1e-14, atol=0)
        np.testing.assert_allclose(back_a, ref_a, rtol=1e-14, atol=0)


def test_hetlora_weights_are_normalised_dense_update_norms():
    rng = np.random.default_rng(11)
    bs, as_, _, scales = clients(rng)
    norms = [np.linalg.norm(s * b @ a) for b, a, s in zip(bs, as_, scales, strict=True)]
    np.testing.assert_allclose(
        hetlora_weights(bs, as_, scales), np.asarray(norms) / sum(norms), rtol=1e-12
    )
    # the same numbers from the server-side (rescaled, padded) factors at s_max
    s_max = scales[-1]
    padded = [
        hetlora_from_client(b, a, 8, s_max, s)
        for b, a, s in zip(bs, as_, scales, strict=True)
    ]
    np.testing.assert_allclose(
        hetlora_weights([b for b, _ in padded], [a for _, a in padded], [s_max] * 3),
        np.asarray(norms) / sum(norms),
        rtol=1e-12,
    )
    zero = [np.zeros_like(b) for b in bs]
    np.testing.assert_array_equal(hetlora_weights(zero, as_, scales), [1 / 3] * 3)
    w = hetlora_weights([zero[0], *bs[1:]], as_, scales)
    assert w[0] == 0.0 and w.sum() == pytest.approx(1.0)


def test_hetlora_aggregate_is_the_factorwise_weighted_sum():
    rng = np.random.default_rng(12)
    bs, as_, _, scales = clients(rng)
    s_max = scales[-1]
    padded = [
        hetlora_from_client(b, a, 8, s_max, s)
        for b, a, s in zip(bs, as_, scales, strict=True)
    ]
    w = hetlora_weights(bs, as_, scales)
    b, a = hetlora_aggregate([b for b, _ in padded], [a for _, a in padded], w)
    np.testing.assert_allclose(
        b, np.einsum("k,kij->ij", w, np.stack([b for b, _ in padded])), rtol=1e-14
    )
    np.testing.assert_allclose(
        a, np.einsum("k,kij->ij", w, np.stack([a for _, a in padded])), rtol=1e-14
    )
    with pytest.raises(ValueError, match="pad every reply"):
        hetlora_aggregate(bs, as_, w)


# --- the diagnostic --------------------------------------------------------------
LAYERS = ("enc.0.attn.query", "enc.0.attn.value", "enc.1.attn.query")


def dense_error(delta, new, old, p, ranks, layers=LAYERS):
    """The section-5 formula on dense float64 matrices, overall and per tier."""

    def dist(e, layer):
        return np.sum((delta[layer] - e[layer][0] @ e[layer][1]) ** 2)

    def ratio(ks):
        num = sum(p[k] * dist(new[k], layer) for k in ks for layer in layers)
        den = sum(p[k] * dist(old[k], layer) for k in ks for layer in layers)
        return np.sqrt(num / den)

    tiers = {r: ratio([k for k in range(len(p)) if ranks[k] == r]) for r in set(ranks)}
    return ratio(range(len(p))), tiers


@pytest.mark.parametrize(
    "d_out, d_in, ranks",
    [(D_OUT, D_IN, (2, 2, 4, 8)), (12, 9, (4, 8, 8, 2))],  # 2nd: sum r_k > d_out
)
def test_hetero_aggregation_error_equals_dense_formula(d_out, d_in, ranks):
    rng = np.random.default_rng(13)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    scales = [ALPHA / r for r in ranks]
    delta_f, delta_d, new, old = {}, {}, [{} for _ in ranks], [{} for _ in ranks]
    for layer in LAYERS:
        pairs = [lora_pair(rng, r, d_out, d_in) for r in ranks]
        delta_f[layer] = stack([b for b, _ in pairs], [a for _, a in pairs], p, scales)
        delta_d[layer] = delta_f[layer][0] @ delta_f[layer][1]
        for k, (r, s) in enumerate(zip(ranks, scales, strict=True)):
            b, a = lora_pair(rng, r, d_out, d_in)  # what it receives: inexact
            new[k][layer] = (s * b, a)
            old[k][layer] = (s * pairs[k][0] * 0.3, pairs[k][1])
    overall, tiers, groups = hetero_aggregation_error(
        delta_f, new, old, p, ranks, group=lambda name: name.rsplit(".", 1)[-1]
    )
    ref_overall, ref_tiers = dense_error(delta_d, new, old, p, ranks)
    assert overall == pytest.approx(ref_overall, rel=1e-10)
    assert tiers.keys() == ref_tiers.keys()
    for r in tiers:
        assert tiers[r] == pytest.approx(ref_tiers[r], rel=1e-10)
    ref_query, _ = dense_error(
        delta_d, new, old, p, ranks, layers=("enc.0.attn.query", "enc.1.attn.query")
    )
    assert sorted(groups) == ["query", "value"]
    assert groups["query"] == pytest.approx(ref_query, rel=1e-10)


def test_hetero_aggregation_error_is_zero_for_exact_stacking():
    rng = np.random.default_rng(14)
    bs, as_, p, scales = clients(rng)
    delta = {"l": stack(bs, as_, p, scales)}
    new = [{"l": delta["l"]}] * 3  # FLoRA: every party merges the whole stack
    old = [{"l": (np.zeros((D_OUT, 1)), np.zeros((1, D_IN)))}] * 3
    overall, tiers, _ = hetero_aggregation_error(delta, new, old, p, RANKS)
    assert overall < 1e-12 and max(tiers.values()) < 1e-12
    # a single-client, unstacked equivalent: the same delta as one rank-14 pair
    b_st, a_st = delta["l"]
    rot = np.linalg.qr(rng.standard_normal((14, 14)))[0]
    overall, _, _ = hetero_aggregation_error(
        delta, [{"l": (b_st @ rot, rot.T @ a_st)}] * 3, old, p, RANKS
    )
    assert overall < 1e-12


def test_hetero_aggregation_error_of_flexlora_is_its_truncation():
    rng = np.random.default_rng(15)
    bs, as_, p, scales = clients(rng)
    factors, shares = flexlora(bs, as_, p, scales, RANKS, scales)
    delta = {"l": stack(bs, as_, p, scales)}
    new = [{"l": (s * b, a)} for (b, a), s in zip(factors, scales, strict=True)]
    old = [{"l": (np.zeros((D_OUT, 1)), np.zeros((1, D_IN)))}] * 3  # from zero
    overall, tiers, _ = hetero_aggregation_error(delta, new, old, p, RANKS)
    assert overall == pytest.approx(np.sqrt(p @ shares**2), rel=1e-10)
    for r, share in zip(RANKS, shares, strict=True):
        assert tiers[r] == pytest.approx(share, rel=1e-10)


def test_flexlora_rank_r_is_the_head_of_one_unit_scale_split():
    # so a server may send one rank-r_max split at scale 1 and each client take its
    # rank-r_k head at its own scale (hetlora_to_client with s_max = 1)
    rng = np.random.default_rng(16)
    bs, as_, p, scales = clients(rng)
    (full,), _ = flexlora(bs, as_, p, scales, [8], [1.0])
    for r in RANKS:
        ((b, a),), _ = flexlora(bs, as_, p, scales, [r], [ALPHA / r])
        b_k, a_k = hetlora_to_client(*full, r, 1.0, ALPHA / r)
        np.testing.assert_allclose(b_k, b, rtol=1e-12, atol=0)
        np.testing.assert_allclose(a_k, a, rtol=1e-12, atol=0)


def _count_qr_bases(monkeypatch):
    """Count the QR bases the diagnostic builds (its exact fallback)."""
    import fedlora.heterogeneous as het

    built = []

    class Counting(het._Basis):
        def __init__(self, b, a):
            built.append(b.shape[1])
            super().__init__(b, a)

    monkeypatch.setattr(het, "_Basis", Counting)
    return built


def _padded_round(rng, ranks, r_max, d_out=D_OUT, d_in=D_IN):
    """Replies of ``ranks`` padded to ``r_max`` (zero columns and rows), the
    global adapter they started from (at rank ``r_max``) and ``p``."""
    bs, as_, p, scales = clients(rng, ranks, d_out, d_in)
    padded = [pad(b, a, r_max) for b, a in zip(bs, as_, strict=True)]
    g_b, g_a = lora_pair(rng, r_max, d_out, d_in)
    return padded, (g_b, g_a), p, scales


@pytest.mark.parametrize("d_out, d_in", [(D_OUT, D_IN), (300, 120)])
def test_hetero_error_sums_of_padded_replies_equal_the_dense_formula(
    monkeypatch, d_out, d_in
):
    """Zero-padded replies of ranks 2, 4, 8 at LoRA scale (B ~1e-3): per tier,
    both sums equal the dense float64 formula, from Gram matrices alone (no QR),
    and the padding is dropped (the stack holds sum r_k = 14 pairs, not 24)."""
    built = _count_qr_bases(monkeypatch)
    rng = np.random.default_rng(21)
    ranks = (2, 4, 8)
    padded, (g_b, g_a), p, scales = _padded_round(rng, ranks, 8, d_out, d_in)
    s = ALPHA / 8
    delta = stack([b for b, _ in padded], [a for _, a in padded], p, [s] * 3)
    avg_b, avg_a = padded_average(  # FedAvg of the padded factors
        [b for b, _ in padded], [a for _, a in padded], p, 8
    )
    new = [(s * avg_b[:, :r], avg_a[:r]) for r in ranks]
    old = [(s * g_b[:, :r], g_a[:r]) for r in ranks]
    sums = hetero_error_sums(delta, new, old, p, ranks)
    dense = delta[0] @ delta[1]
    for k, r in enumerate(ranks):
        want_num = p[k] * np.sum((dense - new[k][0] @ new[k][1]) ** 2)
        want_den = p[k] * np.sum((dense - old[k][0] @ old[k][1]) ** 2)
        assert sums[r][0] == pytest.approx(want_num, rel=1e-10)
        assert sums[r][1] == pytest.approx(want_den, rel=1e-10)
    assert built == []  # nothing cancels here: the Gram path throughout


def test_hetero_error_sums_fall_back_to_qr_where_the_distance_cancels(monkeypatch):
    """An exact method (E = Delta, FLoRA's merged stack, here padded and with its
    pairs in another order) reads round-off, and an E within 1e-6 of Delta its
    dense distance: there the Gram trace would be off (~1e-8 and ~1e-2
    relative), so the check takes the QR path, built once on the 14 pairs."""
    built = _count_qr_bases(monkeypatch)
    rng = np.random.default_rng(22)
    ranks = (2, 4, 8)
    padded, _, p, _ = _padded_round(rng, ranks, 8)
    s = ALPHA / 8
    delta = stack([b for b, _ in padded], [a for _, a in padded], p, [s] * 3)
    b_st, a_st = delta
    perm = rng.permutation(b_st.shape[1])
    exact = (b_st[:, perm], a_st[perm])
    bump = 1e-6 * np.linalg.norm(b_st) / np.sqrt(b_st.size)
    near = (b_st + bump * rng.standard_normal(b_st.shape), a_st)
    zero = (np.zeros((D_OUT, 1)), np.zeros((1, D_IN)))
    sums = hetero_error_sums(delta, [exact, near, exact], [zero] * 3, p, ranks)
    dense = b_st @ a_st
    norm_sq = np.sum(dense**2)
    assert sums[2][0] / (p[0] * norm_sq) < 1e-28  # ~1e-16 on the norm
    assert sums[8][0] / (p[2] * norm_sq) < 1e-28
    want = p[1] * np.sum((dense - near[0] @ near[1]) ** 2)
    assert sums[4][0] == pytest.approx(want, rel=1e-8)
    for k, r in enumerate(ranks):
        assert sums[r][1] == pytest.approx(p[k] * norm_sq, rel=1e-12)
    assert built == [14]
