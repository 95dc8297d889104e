"""Secure aggregation (SecAgg+), the math without Flower.

Paper: Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020, https://eprint.iacr.org/2020/704.

Each client ``u`` of a round sends ``y_u = q_u + PRG(b_u) + sum_v +-PRG(s_uv)``
(mod ``2^32``), where ``q_u`` is its quantised input, ``b_u`` a fresh 32-byte seed
and ``s_uv`` the key it agrees with neighbour ``v`` (X25519, HKDF-SHA256); the
pairwise masks cancel in the sum, ``+`` where ``u < v``. The server removes the
survivors' ``PRG(b_u)`` and the dropped clients' pairwise masks from secrets it
rebuilds from Shamir shares (:func:`split_secret`, threshold ``t`` of the ``k + 1``
holders: ``u`` and its ``k`` neighbours, ``t > (k + 1) / 2``); for each client it
asks every holder for one share only, of ``b_u`` if ``u`` survived, of its mask key
if it dropped, so it never holds both.

Pieces:

- :func:`expand_mask`: AES-256-CTR keystream from the full 32-byte seed as
  ``uint32`` words (never a seed folded to 32 bits);
- :class:`KeyPair`, :func:`agree`, :func:`encrypt`/:func:`decrypt` (AES-GCM bound
  to sender, receiver and round), :func:`split_secret`/:func:`combine_shares`
  (Shamir over the prime field ``2^521 - 1``);
- :func:`ring`: the neighbour graph; :func:`share_threshold`;
- :class:`Quantiser`: float64 clipping and quantisation with its error bound;
- :class:`ClientSession`: one client's side of a round, as plain bytes to keep
  between messages; :func:`unmask`: the server's last step.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32  # mask seeds and X25519 keys: 256 bits
MODULUS = 2**32  # masked sums are uint32 arithmetic (wraps mod 2^32)
PRIME = 2**521 - 1  # Shamir's field: a Mersenne prime above any 32-byte secret
_SHARE_BYTES = 66  # a field element, big-endian (521 bits)
_NONCE_BYTES = 12  # AES-GCM


class ProtocolError(RuntimeError):
    """A step of the protocol cannot go on (too few holders or shares, a share
    that does not decrypt, a request that would reveal both of a client's
    secrets)."""


# --- masks -----------------------------------------------------------------------
def expand_mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` pseudorandom ``uint32`` words: the AES-256-CTR keystream of key
    ``seed`` (32 bytes) from counter 0. Each seed is fresh every round and
    expands one vector, so the fixed nonce never repeats under one key."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * size)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def pair_sign(me: int, other: int) -> int:
    """``+1`` where ``me < other``, else ``-1``: the pair's masks cancel."""
    return 1 if me < other else -1


# --- keys and encryption ---------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS's entropy."""
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes_raw(), key.public_key().public_bytes_raw())


def agree(private: bytes, public: bytes, purpose: bytes) -> bytes:
    """32 bytes both ends derive: ``HKDF-SHA256(X25519(private, public))`` with
    ``purpose`` (what the key is for, and its round) as the HKDF info."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )
    return HKDF(
        algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=purpose
    ).derive(shared)


def encrypt(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """AES-256-GCM of ``plaintext`` under ``key``, authenticating ``context``
    (sender, receiver, round); a random nonce leads the ciphertext."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def decrypt(key: bytes, ciphertext: bytes, context: bytes) -> bytes:
    """The plaintext of :func:`encrypt`; raises if it or ``context`` was altered."""
    nonce, body = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
    return AESGCM(key).decrypt(nonce, body, context)


# --- Shamir ----------------------------------------------------------------------
def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of ``secret`` (at most 64 bytes) for holders ``1..holders``:
    ``f(i)`` of a random polynomial of degree ``threshold - 1`` over
    ``GF(2^521 - 1)`` with ``f(0) = secret``; any ``threshold`` of them give it
    back, fewer reveal nothing. A share is ``i`` (2 bytes) and ``f(i)``."""
    if not 1 <= threshold <= holders < 2**16:
        raise ValueError(f"need 1 <= threshold={threshold} <= holders={holders}")
    coeffs = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(struct.pack(">H", x) + y.to_bytes(_SHARE_BYTES, "big"))
    return shares


def combine_shares(shares: Sequence[bytes], size: int = SEED_BYTES) -> bytes:
    """``f(0)`` by Lagrange interpolation of the shares' points, as ``size``
    bytes (the secret when at least the threshold of distinct shares is given)."""
    points = {
        struct.unpack(">H", s[:2])[0]: int.from_bytes(s[2:], "big") for s in shares
    }
    if len(points) != len(shares):
        raise ProtocolError("two shares of one holder")
    secret = 0
    for i, y in points.items():
        num = den = 1
        for j in points:
            if j != i:
                num = num * (-j) % PRIME
                den = den * (i - j) % PRIME
        secret = (secret + y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 256**size:
        raise ProtocolError("the shares do not combine to a secret (too few?)")
    return secret.to_bytes(size, "big")


# --- the neighbour graph ---------------------------------------------------------
def ring(nodes: Sequence[int], k: int | None) -> dict[int, list[int]]:
    """Each node's neighbours: the ``k // 2`` nodes either side of it on the
    ring ``nodes`` (in the order given; the server shuffles it); every other
    node where ``k`` is None or ``k >= len(nodes) - 1`` (classic SecAgg)."""
    n = len(nodes)
    if k is None or k >= n - 1:
        return {u: [v for v in nodes if v != u] for u in nodes}
    half = max(k // 2, 1)
    return {
        u: sorted({nodes[(i + d) % n] for d in range(-half, half + 1) if d} - {u})
        for i, u in enumerate(nodes)
    }


def share_threshold(holders: int, fraction: float) -> int:
    """``t = floor(fraction * holders) + 1`` (at most ``holders``): more than
    ``fraction`` of the holders, and so more than half for ``fraction >= 0.5``."""
    return min(int(math.floor(fraction * holders)) + 1, holders)


# --- quantisation ----------------------------------------------------------------
@dataclass(frozen=True)
class Quantiser:
    """Entries clipped to ``[-c, c]`` and quantised, in float64, to the integers
    ``q = round((x + c) / step)`` in ``[0, L]``, ``step = 2c / L``, with
    ``L = floor((2^32 - 1) / K)``: the sum of ``K`` inputs stays below ``2^32``,
    so it survives the modular sum exactly.

    Error: a clipped entry ``x`` is off by ``|q step - c - x| <= step / 2`` (plus
    float64 rounding); a sum of ``n <= K`` inputs by at most
    :meth:`sum_error` ``= n (step / 2 + 8 eps c)``. In float32 the offset ``x + c``
    would keep only 24 bits: float64 keeps the 32 the modulus offers.

    Parameters
    ----------
    bound : float
        ``c``, the clipping range of an entry.
    clients : int
        ``K``, the most inputs one sum adds.
    """

    bound: float
    clients: int

    def __post_init__(self) -> None:
        if not self.bound > 0 or not 1 <= self.clients < MODULUS:
            raise ValueError(
                f"Quantiser(bound={self.bound}, clients={self.clients}): need a "
                "bound > 0 and at least one client"
            )

    @property
    def levels(self) -> int:
        """``L``: an entry's largest quantised value."""
        return (MODULUS - 1) // self.clients

    @property
    def step(self) -> float:
        """The quantisation step ``2c / L``."""
        return 2.0 * self.bound / self.levels

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """``(q, clipped)``: the quantised entries (uint32) and how many were
        outside ``[-c, c]`` (clipped to it)."""
        x = np.asarray(x, dtype=np.float64)
        c = self.bound
        clipped = int(np.count_nonzero(np.abs(x) > c))
        q = np.rint((np.clip(x, -c, c) + c) / self.step)
        return np.clip(q, 0, self.levels).astype(np.uint32), clipped

    def decode_sum(self, total: np.ndarray, n: int) -> np.ndarray:
        """The float64 sum of ``n`` inputs from the sum of their codes."""
        return np.asarray(total, dtype=np.float64) * self.step - n * self.bound

    def sum_error(self, n: int) -> float:
        """Largest error of :meth:`decode_sum` on ``n`` clipped inputs."""
        return n * (self.step / 2 + 8 * np.finfo(np.float64).eps * self.bound)


def mean_error(
    values: Quantiser, weights: Quantiser, n: int, weight_sum: float
) -> float:
    """Largest error of the weighted mean ``S_x / S_w`` decoded from ``n`` inputs
    ``[w_k, w_k x_k]`` (``|x_k| <= c``, ``w_k`` in ``[0, 1]``), given the decoded
    ``S_w``: ``m^ - m = ((S_x^ - S_x) - m (S_w^ - S_w)) / S_w^`` with ``|m| <= c``,
    so ``(e_x + c e_w) / S_w^``."""
    if weight_sum <= 0:
        return math.inf
    e = values.sum_error(n) + values.bound * weights.sum_error(n)
    return float(e / weight_sum)


META_WORDS = 3  # after the entries: [weight, clipped entries, clipped weight]


def encode_input(
    update: Mapping[str, np.ndarray],
    weight: float,
    weight_clipped: bool,
    values: Quantiser,
    weights: Quantiser,
) -> tuple[np.ndarray, int]:
    """A client's input ``[w x, w, clipped, weight_clipped]`` as one uint32
    vector: ``x`` every key of ``update`` (sorted, flattened) clipped to
    ``[-c, c]`` and times ``w`` in ``[0, 1]``, quantised by ``values``; ``w``
    by ``weights``; the counts as they are (summed exactly). Returns it and the
    number of clipped entries."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"a weight in [0, 1], got {weight}")
    c = values.bound
    parts, clipped = [], 0
    for key in sorted(update):
        x = np.asarray(update[key], dtype=np.float64).ravel()
        clipped += int(np.count_nonzero(np.abs(x) > c))
        parts.append(values.encode(weight * np.clip(x, -c, c))[0])
    meta = np.array(
        [weights.encode(np.array([weight]))[0][0], clipped, int(weight_clipped)],
        dtype=np.uint32,
    )
    return np.concatenate([*parts, meta]), clipped


def decode_mean(
    total: np.ndarray,
    shapes: Mapping[str, tuple[int, ...]],
    n: int,
    values: Quantiser,
    weights: Quantiser,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The weighted mean ``sum w_k x_k / sum w_k`` of ``n`` inputs of
    :func:`encode_input` from the sum of their codes ``total``, as float64 arrays
    of ``shapes``; and ``weight_sum``, ``clipped`` (entries, all clients),
    ``clipped_weights`` (clients) and ``error_bound`` (:func:`mean_error`, the
    largest error of an entry)."""
    total = np.asarray(total, dtype=np.uint32)
    meta = total[-META_WORDS:]
    weight_sum = float(weights.decode_sum(meta[:1], n)[0])
    out, at = {}, 0
    for key in sorted(shapes):
        size = math.prod(shapes[key])
        s_x = values.decode_sum(total[at : at + size], n)
        out[key] = (s_x / weight_sum).reshape(shapes[key])
        at += size
    if at + META_WORDS != total.size:
        raise ValueError(f"a sum of {total.size} words for {at} entries")
    return out, {
        "weight_sum": weight_sum,
        "clipped": int(meta[1]),
        "clipped_weights": int(meta[2]),
        "error_bound": mean_error(values, weights, n, weight_sum),
    }


# --- one client's side of a round -----------------------------------------------
def _purpose(kind: str, server_round: int) -> bytes:
    return f"fedlora-secagg/{kind}/round-{server_round}".encode()


def _route(sender: int, receiver: int, server_round: int) -> bytes:
    return struct.pack(">QQQ", sender, receiver, server_round)


@dataclass
class ClientSession:
    """One client's protocol state in one round (fresh keys every round).

    Stages: :meth:`start` (two key pairs and the seed ``b``; the public keys go to
    the server), :meth:`share` (shares of ``b`` and of the mask key for each
    holder, encrypted to it), :meth:`receive` (the shares its neighbours sent
    it), :meth:`mask` (the masked input), :meth:`reveal` (one share per
    neighbour). :meth:`to_dict`/:meth:`from_dict` carry it between messages as
    plain bytes and ints (a node's private state, never sent).
    """

    node: int
    server_round: int
    fraction: float  # the share threshold's fraction of the holders
    enc: KeyPair  # encrypts shares
    mask: KeyPair  # agrees the pairwise mask seeds
    seed: bytes  # b: the self mask's seed
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    masked_with: list[int] = field(default_factory=list)
    threshold: int = 0
    #: reveal nothing unless at least this many inputs survived (distributed DP's
    #: noise is calibrated for that many; 0: no such floor)
    min_alive: int = 0

    @classmethod
    def start(cls, node: int, server_round: int, fraction: float) -> ClientSession:
        """Fresh key pairs and seed for this round."""
        return cls(
            node,
            server_round,
            float(fraction),
            KeyPair.generate(),
            KeyPair.generate(),
            os.urandom(SEED_BYTES),
        )

    def share(self, public: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shares of ``b`` and of the mask key for the holders: this node and its
        neighbours that sent keys (``public``: node -> (encryption key, mask key),
        this node's own included), each encrypted to its holder; this node keeps
        its own share. Raises :class:`ProtocolError` below the threshold."""
        holders = sorted(public)
        if self.node not in public:
            raise ProtocolError("the key list does not hold this node's own keys")
        self.threshold = share_threshold(len(holders), self.fraction)
        if len(holders) < 2 or self.threshold < 2:
            raise ProtocolError(
                f"{len(holders) - 1} neighbours sent keys: too few to share "
                "secrets safely (at least 2 holders and a threshold of 2)"
            )
        self.peers = {v: public[v] for v in holders}
        seed_shares = split_secret(self.seed, self.threshold, len(holders))
        key_shares = split_secret(self.mask.private, self.threshold, len(holders))
        out = {}
        for v, s_b, s_k in zip(holders, seed_shares, key_shares, strict=True):
            if v == self.node:
                self.held[v] = (s_b, s_k)
                continue
            key = agree(
                self.enc.private, public[v][0], _purpose("share", self.server_round)
            )
            out[v] = encrypt(key, s_b + s_k, _route(self.node, v, self.server_round))
        return out

    def receive(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Decrypt the shares the neighbours ``ciphertexts`` came from sent this
        node; those neighbours (their shares reached this node) are the ones it
        masks with."""
        for v, ct in ciphertexts.items():
            if v not in self.peers or v == self.node:
                raise ProtocolError(f"a share from node {v}, not a neighbour")
            key = agree(
                self.enc.private, self.peers[v][0], _purpose("share", self.server_round)
            )
            plain = decrypt(key, ct, _route(v, self.node, self.server_round))
            half = len(plain) // 2
            self.held[v] = (plain[:half], plain[half:])
        self.masked_with = sorted(ciphertexts)

    def mask_vector(self, size: int) -> np.ndarray:
        """``PRG(b) + sum_v +-PRG(s_uv)`` over the neighbours it masks with."""
        total = expand_mask(self.seed, size)
        for v in self.masked_with:
            seed = agree(
                self.mask.private, self.peers[v][1], _purpose("mask", self.server_round)
            )
            pad = expand_mask(seed, size)
            total = total + pad if pair_sign(self.node, v) > 0 else total - pad
        return total

    def masked(self, q: np.ndarray) -> np.ndarray:
        """The masked input ``q + mask`` (mod ``2^32``)."""
        q = np.asarray(q, dtype=np.uint32)
        return q + self.mask_vector(q.size)

    def reveal(
        self, alive: Iterable[int], dropped: Iterable[int], survivors: int | None = None
    ) -> dict[int, bytes]:
        """One share per holder of whose secrets this node holds a share: of
        ``b_v`` for ``v`` in ``alive`` (its input arrived), of ``v``'s mask key for
        ``v`` in ``dropped``. Refuses a node in both, this node in ``dropped``,
        fewer live holders than the threshold (a near-empty sum), and fewer
        ``survivors`` in all (the server's count) than :attr:`min_alive`."""
        alive, dropped = set(alive), set(dropped)
        if alive & dropped or self.node in dropped:
            raise ProtocolError("a node announced both alive and dropped")
        if self.min_alive and (survivors is None or survivors < self.min_alive):
            raise ProtocolError(
                f"{survivors} inputs survived, fewer than the {self.min_alive} "
                "this node's noise is calibrated for; no share revealed"
            )
        live = [v for v in self.peers if v in alive]
        if len(live) < self.threshold:
            raise ProtocolError(
                f"{len(live)} of this node's {len(self.peers)} holders survived, "
                f"fewer than the threshold {self.threshold}"
            )
        out = {v: self.held[v][0] for v in alive if v in self.held}
        out.update({v: self.held[v][1] for v in dropped if v in self.held})
        return out

    def to_dict(self) -> dict[str, bytes | float | list[bytes]]:
        """The state as bytes and a float (to keep in a node's private state;
        node ids, unsigned 64-bit, packed with :func:`pack_ids`)."""
        peers, held = sorted(self.peers), sorted(self.held)
        return {
            "node": pack_ids([self.node]),
            "round": pack_ids([self.server_round]),
            "threshold": pack_ids([self.threshold]),
            "fraction": self.fraction,
            "keys": [
                self.enc.private,
                self.enc.public,
                self.mask.private,
                self.mask.public,
            ],
            "seed": self.seed,
            "peers": pack_ids(peers),
            "peer-enc": [self.peers[v][0] for v in peers],
            "peer-mask": [self.peers[v][1] for v in peers],
            "held": pack_ids(held),
            "held-seed": [self.held[v][0] for v in held],
            "held-key": [self.held[v][1] for v in held],
            "masked-with": pack_ids(self.masked_with),
            "min-alive": pack_ids([self.min_alive]),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientSession:
        """The session :meth:`to_dict` saved."""
        k = list(d["keys"])
        peers, held = unpack_ids(d["peers"]), unpack_ids(d["held"])
        return cls(
            unpack_ids(d["node"])[0],
            unpack_ids(d["round"])[0],
            float(d["fraction"]),
            KeyPair(k[0], k[1]),
            KeyPair(k[2], k[3]),
            bytes(d["seed"]),
            {
                v: (e, m)
                for v, e, m in zip(peers, d["peer-enc"], d["peer-mask"], strict=True)
            },
            {
                v: (s, x)
                for v, s, x in zip(held, d["held-seed"], d["held-key"], strict=True)
            },
            unpack_ids(d["masked-with"]),
            unpack_ids(d["threshold"])[0],
            unpack_ids(d["min-alive"])[0] if "min-alive" in d else 0,
        )


def pack_ids(ids: Iterable[int]) -> bytes:
    """Node ids (unsigned 64-bit) as 8 big-endian bytes each."""
    return np.asarray(list(ids), dtype=">u8").tobytes()


def unpack_ids(data: bytes) -> list[int]:
    """The node ids :func:`pack_ids` packed."""
    return [int(v) for v in np.frombuffer(data, dtype=">u8")]


# --- the server's last step ------------------------------------------------------
def unmask(
    total: np.ndarray,
    server_round: int,
    alive: Sequence[int],
    dropped: Sequence[int],
    shares: Mapping[int, Sequence[bytes]],
    thresholds: Mapping[int, int],
    mask_keys: Mapping[int, bytes],
    masked_with: Mapping[int, Iterable[int]],
) -> np.ndarray:
    """The sum of the ``alive`` clients' inputs from the sum of their masked
    inputs ``total``: minus ``PRG(b_u)`` for each ``u`` in ``alive`` (``b_u`` from
    ``shares[u]``), minus each pairwise mask an alive ``v`` added with a ``u`` in
    ``dropped`` (``u``'s mask key from ``shares[u]``, agreed with ``v``'s public
    ``mask_keys[v]``; ``masked_with[v]``: the nodes ``v`` masked with).

    Raises
    ------
    ProtocolError
        Fewer than ``thresholds[u]`` shares for a client ``u``.
    """
    out = np.array(total, dtype=np.uint32, copy=True)
    size = out.size
    alive_set = set(alive)

    def rebuild(u: int) -> bytes:
        got = list(shares.get(u, ()))
        if len(got) < thresholds[u]:
            raise ProtocolError(
                f"{len(got)} shares of node {u}'s secret reached the server, fewer "
                f"than its threshold {thresholds[u]}"
            )
        return combine_shares(got)

    for u in alive:
        out -= expand_mask(rebuild(u), size)
    partners = {v: set(masked_with.get(v, ())) for v in alive_set}
    for u in dropped:
        key = rebuild(u)
        for v in sorted(alive_set):
            if u not in partners[v]:
                continue
            seed = agree(key, mask_keys[v], _purpose("mask", server_round))
            pad = expand_mask(seed, size)
            # v added pair_sign(v, u) * pad
            out = out - pad if pair_sign(v, u) > 0 else out + pad
    return out
