"""SecAgg+'s math (fedlora.secagg): quantisation and its bound, AES-CTR masks,
Shamir's threshold, the sessions' masks cancelling, dropout recovery."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from Crypto.Cipher import AES  # pycryptodome: an independent AES-CTR

from fedlora import secagg
from fedlora.secagg import ClientSession, ProtocolError, Quantiser


# --- quantisation ------------------------------------------------------------------
@pytest.mark.parametrize("clients", [1, 3, 10, 1000])
def test_quantised_sum_is_within_the_derived_bound(clients):
    rng = np.random.default_rng(clients)
    q = Quantiser(bound=0.25, clients=clients)
    xs = rng.uniform(-0.25, 0.25, size=(clients, 5000))
    xs[:, :4] = [-0.25, 0.25, 0.0, 1e-12]  # the range's ends, zero, a tiny value
    codes = [q.encode(x)[0] for x in xs]
    total = np.zeros(xs.shape[1], dtype=np.uint32)
    for c in codes:
        total += c  # uint32 wraps: the sum must stay below 2^32
    exact = xs.sum(axis=0)  # float64 reference
    err = np.abs(q.decode_sum(total, clients) - exact).max()
    assert err <= q.sum_error(clients)
    assert err >= q.sum_error(clients) / 20  # the bound is not loose by orders
    assert q.levels * clients < secagg.MODULUS


def test_float32_quantisation_would_break_the_bound():
    """Why float64: in float32, ``x + c`` keeps 24 bits, far fewer than L's 32."""
    q = Quantiser(bound=1.0, clients=1)
    x = np.random.default_rng(0).uniform(-1, 1, 10_000)
    as32 = np.rint(((x.astype(np.float32) + np.float32(1)) / np.float32(q.step)))
    err32 = np.abs(as32.astype(np.float64) * q.step - 1.0 - x).max()
    err64 = np.abs(q.decode_sum(q.encode(x)[0], 1) - x).max()
    assert err64 <= q.sum_error(1) < err32 / 100


def test_clipping_is_counted():
    q = Quantiser(bound=1.0, clients=4)
    codes, clipped = q.encode(np.array([-3.0, -1.0, 0.5, 1.0, 2.0, np.nextafter(1, 2)]))
    assert clipped == 3
    back = q.decode_sum(codes, 1)
    assert back[0] == pytest.approx(-1.0) and back[4] == pytest.approx(1.0)


def test_weighted_mean_error_bound():
    rng = np.random.default_rng(3)
    k, c = 6, 0.5
    values, weights = Quantiser(c, k), Quantiser(1.0, k)
    w = rng.uniform(0.001, 0.01, k)  # small weights: the bound grows as 1/S_w
    x = rng.uniform(-c, c, (k, 300))
    sx = sum(values.encode(wi * xi)[0] for wi, xi in zip(w, x, strict=True))
    sw = sum(weights.encode(np.array([wi]))[0] for wi in w)
    s_w = weights.decode_sum(sw, k)[0]
    mean = values.decode_sum(sx, k) / s_w
    exact = (w[:, None] * x).sum(0) / w.sum()
    bound = secagg.mean_error(values, weights, k, s_w)
    assert np.abs(mean - exact).max() <= bound


# --- masks ---------------------------------------------------------------------------
def test_expand_mask_is_aes256_ctr_of_the_whole_seed():
    seed = bytes(range(32))
    ref = AES.new(seed, AES.MODE_CTR, nonce=b"", initial_value=0).encrypt(bytes(4000))
    assert secagg.expand_mask(seed, 1000).tobytes() == ref
    flipped = bytes([seed[0]]) + bytes([seed[1] ^ 0x80]) + seed[2:]  # a high-byte bit
    assert not np.array_equal(
        secagg.expand_mask(seed, 1000), secagg.expand_mask(flipped, 1000)
    )
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.expand_mask(seed[:4], 10)


def test_mask_words_look_uniform():
    words = secagg.expand_mask(bytes(32), 200_000)
    counts = np.bincount(words >> 28, minlength=16)  # the top 4 bits
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 45  # 15 degrees of freedom: p ~ 1e-4


# --- Shamir ---------------------------------------------------------------------
def test_any_threshold_of_shares_rebuild_and_fewer_do_not():
    secret = bytes(range(1, 33))
    shares = secagg.split_secret(secret, 3, 5)
    for subset in itertools.combinations(shares, 3):
        assert secagg.combine_shares(list(subset)) == secret
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ProtocolError):
            secagg.combine_shares(list(subset))


def test_share_threshold_is_above_half():
    for holders in range(2, 40):
        for fraction in (0.5, 0.6, 2 / 3, 0.9):
            t = secagg.share_threshold(holders, fraction)
            assert holders / 2 < t <= holders


def test_ring_is_symmetric_with_k_neighbours():
    nodes = [17, 4, 99, 23, 8, 61, 42]
    graph = secagg.ring(nodes, 4)
    assert all(len(v) == 4 and u not in v for u, v in graph.items())
    assert all(u in graph[v] for u in graph for v in graph[u])
    assert all(len(v) == 6 for v in secagg.ring(nodes, None).values())


# --- sessions -------------------------------------------------------------------
def run_protocol(inputs, k=None, drop_before_share=(), drop_before_mask=()):
    """Every stage for clients ``1..len(inputs)``; returns the unmasked sum of the
    survivors' quantised inputs and the survivors."""
    nodes = list(range(1, len(inputs) + 1))
    graph = secagg.ring(nodes, k)
    sessions = {u: ClientSession.start(u, 7, 0.5) for u in nodes}
    keyed = [u for u in nodes if u not in drop_before_share]
    public = {u: (sessions[u].enc.public, sessions[u].mask.public) for u in keyed}
    outbox = {
        u: sessions[u].share({v: public[v] for v in [u, *graph[u]] if v in public})
        for u in keyed
    }
    for u in keyed:
        sessions[u].receive({v: box[u] for v, box in outbox.items() if u in box})
    alive = [u for u in keyed if u not in drop_before_mask]
    dropped = [u for u in keyed if u in drop_before_mask]
    total = np.zeros(inputs[0].size, dtype=np.uint32)
    for u in alive:
        total += sessions[u].masked(inputs[u - 1])
    shares = {}
    for u in alive:
        # each holder is told only about its own peers
        peers = sessions[u].peers
        revealed = sessions[u].reveal(
            [v for v in alive if v in peers], [v for v in dropped if v in peers]
        )
        for v, s in revealed.items():
            shares.setdefault(v, []).append(s)
    out = secagg.unmask(
        total,
        7,
        alive,
        dropped,
        shares,
        {u: sessions[u].threshold for u in keyed},
        {u: sessions[u].mask.public for u in keyed},
        {u: sessions[u].masked_with for u in alive},
    )
    return out, alive


@pytest.mark.parametrize("k", [None, 2, 4])
def test_masks_cancel_in_the_sum(k):
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 2**20, 50, dtype=np.uint32) for _ in range(7)]
    out, _ = run_protocol(inputs, k)
    assert np.array_equal(out, np.sum(inputs, axis=0, dtype=np.uint32))


@pytest.mark.parametrize("stage", ["share", "mask"])
def test_the_survivors_sum_after_a_dropout(stage):
    rng = np.random.default_rng(2)
    inputs = [rng.integers(0, 2**20, 40, dtype=np.uint32) for _ in range(6)]
    drop = (
        {"drop_before_share": (3,)} if stage == "share" else {"drop_before_mask": (3,)}
    )
    out, alive = run_protocol(inputs, 4, **drop)
    assert 3 not in alive
    expected = np.sum([inputs[u - 1] for u in alive], axis=0, dtype=np.uint32)
    assert np.array_equal(out, expected)


def test_a_masked_input_alone_looks_uniform():
    q = np.zeros(100_000, dtype=np.uint32)  # the most structured input there is
    session = ClientSession.start(1, 1, 0.5)
    others = {v: ClientSession.start(v, 1, 0.5) for v in (2, 3)}
    public = {
        v: (s.enc.public, s.mask.public) for v, s in {1: session, **others}.items()
    }
    session.share(public)
    session.receive({})
    session.masked_with = [2, 3]
    y = session.masked(q)
    counts = np.bincount(y >> 28, minlength=16)
    assert float(((counts - counts.mean()) ** 2 / counts.mean()).sum()) < 45


def test_reveal_never_gives_both_secrets_and_needs_the_threshold():
    nodes = [1, 2, 3, 4]
    sessions = {u: ClientSession.start(u, 1, 0.5) for u in nodes}
    public = {u: (s.enc.public, s.mask.public) for u, s in sessions.items()}
    boxes = {u: sessions[u].share(public) for u in nodes}
    for u in nodes:
        sessions[u].receive({v: b[u] for v, b in boxes.items() if u in b})
    with pytest.raises(ProtocolError, match="both"):
        sessions[1].reveal([2, 3], [3])
    with pytest.raises(ProtocolError, match="threshold"):
        sessions[1].reveal([1, 2], [3, 4])  # 2 of 4 holders: t = 3


def test_a_session_survives_its_round_trip_through_plain_values():
    nodes = [5, 6, 7]
    sessions = {u: ClientSession.start(u, 2, 0.5) for u in nodes}
    public = {u: (s.enc.public, s.mask.public) for u, s in sessions.items()}
    boxes = {u: sessions[u].share(public) for u in nodes}
    back = ClientSession.from_dict(sessions[5].to_dict())
    back.receive({v: b[5] for v, b in boxes.items() if 5 in b})
    sessions[5].receive({v: b[5] for v, b in boxes.items() if 5 in b})
    assert back.to_dict() == sessions[5].to_dict()
    x = np.arange(10, dtype=np.uint32)
    assert np.array_equal(back.masked(x), sessions[5].masked(x))


def test_a_tampered_share_does_not_decrypt():
    a, b = ClientSession.start(1, 1, 0.5), ClientSession.start(2, 1, 0.5)
    c = ClientSession.start(3, 1, 0.5)
    public = {s.node: (s.enc.public, s.mask.public) for s in (a, b, c)}
    boxes = a.share(public)
    b.share(public)
    bad = bytearray(boxes[2])
    bad[-1] ^= 1
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        b.receive({1: bytes(bad)})
