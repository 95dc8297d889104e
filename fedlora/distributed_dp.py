"""Client-level DP with distributed noise under secure aggregation
(``privacy=distributed`` with ``secure_aggregation=secaggplus``).

Central DP (:mod:`strategies.central_dp`) adds the noise at the server, to a sum
the server has seen. Here each client clips its own update and adds its share of
the noise before masking, so the only thing the server ever sees, the unmasked sum
of the survivors' inputs, already carries the full noise.

Per round, with ``K`` clients asked for a masked input, ``n`` of them surviving,
noise multiplier ``z``, clipping norm ``C`` and ``t`` the fewest survivors the
noise is calibrated for (:func:`noise_clients`):

1. client ``k`` clips its update (every sent array, one L2 norm) to ``C``:
   ``x_k``;
2. in integer units of the step ``s`` (:attr:`DistributedGaussian.step`) it rounds
   ``x_k / s`` to the nearest integers ``r_k`` (off by at most 1/2 an entry), so
   one client changes the integer sum by at most ``D = C / s + sqrt(d) / 2`` in
   L2 (``d`` entries): the sensitivity, with its rounding slack;
3. it adds integer noise ``Z_k = round(N(0, sigma^2))`` per entry, ``sigma =
   z D / sqrt(t)``, drawn from a generator seeded with 128 bits of OS entropy
   (never anything the server knows), and masks ``r_k + Z_k`` mod ``2^32``.

The server unmasks ``sum_k (r_k + Z_k)`` (mod ``2^32``, read as signed 32-bit)
and only if ``n >= t``: the noise of the sum has variance ``n sigma^2``, so
its noise multiplier against the sensitivity ``D`` is ``z sqrt(n / t) >= z``.
Each release is accounted with that multiplier by Opacus' RDP accountant at
sample rate 1 (Flower samples a fixed-size set: no amplification). Dividing by
``n`` and the method's step are post-processing.

The noise is a rounded Gaussian on the integers, of standard deviation at least
:data:`MIN_INTEGER_STD` (in practice a few ``1e7``). One client's integer output
is ``r_k + round(N)`` exactly (``r_k`` is an integer). A rounded Gaussian's
probabilities are a discrete Gaussian's to a relative ``O(k^2 / sigma^4 +
1 / sigma^2)`` (about 1e-13 within 10 sigma here); a sum of ``n`` discrete
Gaussians is within a term of order ``exp(-2 pi^2 sigma^2)`` of one of variance
``n sigma^2`` (Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian
Mechanism", ICML 2021), whose Renyi divergence for an integer shift of L2 norm at
most ``D`` is at most the continuous Gaussian's. We account the continuous
Gaussian: the approximations are many orders below the digits we print.
Adjacency: one client's data replaced by zeros (its participation is visible to
the server, which sees who replies; the sum still carries its noise share).

The range: entries of a sum of ``n <= K`` clipped updates lie in ``[-K C, K C]``
and the summed noise within :data:`TAIL` standard deviations with probability
``1 - 1e-23`` an entry; :attr:`DistributedGaussian.bound` covers both, so the
modular sum decodes exactly with no clipping of any entry (a value past it would
wrap, not clip).

What the guarantee assumes: an honest-but-curious server (it follows the
protocol, reports survivors truly) and at least ``t`` survivors whose noise it
does not know; a client colluding with the server removes its own share. A lower
``min_clients`` adds more noise per client and tolerates ``t_protocol - t``
colluders.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODULUS = 2**32  # the masked sum's words (as fedlora.secagg)
TAIL = 10.0  # the range covers this many standard deviations of the summed noise
MIN_INTEGER_STD = 1.0e3  # refuse a noise coarser than this many integer steps
META = (1, 0, 0)  # the three meta words: one contribution, nothing from the data
SAMPLE_RATE = 1.0  # a fixed-size sample of clients: no amplification
LEDGER_FILE = "distributed_releases.jsonl"  # in the run directory


def noise_clients(clients: int, fraction: float, min_clients: int | None) -> int:
    """``t``: the fewest survivors whose noise a round's sum must hold.

    ``min_clients`` if set, else more than ``fraction`` (the share threshold's
    fraction, ``secure_aggregation.threshold``) of the ``clients`` asked for a
    masked input: ``floor(fraction K) + 1``, the protocol's own minimum with
    every client a neighbour of every other. At least 2.
    """
    if min_clients is not None:
        return max(int(min_clients), 2)
    return max(min(int(math.floor(fraction * clients)) + 1, clients), 2)


@dataclass(frozen=True)
class DistributedGaussian:
    """One round's distributed Gaussian noise and its integer encoding.

    Parameters
    ----------
    noise_multiplier : float
        ``z`` > 0: the noise multiplier the sum of ``t`` survivors carries.
    clipping_norm : float
        ``C`` > 0: the L2 bound on a client's whole update.
    clients : int
        ``K``: clients asked for a masked input (the most a sum adds).
    min_clients : int
        ``t`` (:func:`noise_clients`): a sum of fewer is never unmasked.
    """

    noise_multiplier: float
    clipping_norm: float
    clients: int
    min_clients: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.clipping_norm > 0):
            raise ValueError(
                f"noise_multiplier={self.noise_multiplier} and clipping_norm="
                f"{self.clipping_norm} must be positive"
            )
        if not 2 <= self.min_clients <= self.clients:
            raise ValueError(
                f"{self.clients} clients asked for a masked input: fewer than the "
                f"{self.min_clients} the noise is calibrated for (privacy.min_clients)"
            )

    @property
    def bound(self) -> float:
        """``B``: a sum's entries lie in ``(-B, B)``: ``K C`` for the clipped
        updates plus :data:`TAIL` standard deviations of ``K`` clients' noise
        (twice ``z C sqrt(K / t)``: room for the rounding slack in ``D``)."""
        k, c = self.clients, self.clipping_norm
        spread = 2 * self.noise_multiplier * c * math.sqrt(k / self.min_clients)
        return k * c + TAIL * spread

    @property
    def step(self) -> float:
        """``s = 2 B / 2^32``: the real value of one integer unit."""
        return 2.0 * self.bound / MODULUS

    def sensitivity(self, size: int) -> float:
        """``D = C / s + sqrt(d) / 2``: one client's largest L2 change of the
        integer sum (its clipped update, and rounding off by 1/2 an entry)."""
        return self.clipping_norm / self.step + math.sqrt(size) / 2

    def client_std(self, size: int) -> float:
        """``sigma = z D / sqrt(t)``: each client's integer noise std.

        Raises
        ------
        ValueError
            When ``sigma`` is below :data:`MIN_INTEGER_STD` integer steps (the
            rounded Gaussian would no longer be close to a Gaussian; with 32-bit
            words and z = 1 this takes some 30,000 clients a round), or the
            rounding slack is no longer small against ``C / s`` (the range's
            factor 2 would not hold).
        """
        d = self.sensitivity(size)
        std = self.noise_multiplier * d / math.sqrt(self.min_clients)
        slack = math.sqrt(size) / 2  # rounding's share of D
        if std < MIN_INTEGER_STD or slack > self.clipping_norm / self.step:
            raise ValueError(
                f"{self.clients} clients of {size} entries leave a noise of "
                f"{std:.3g} integer steps in a 32-bit sum: too coarse for the "
                "Gaussian analysis; sample fewer clients a round"
            )
        return std

    def effective_multiplier(self, survivors: int) -> float:
        """The noise multiplier of a sum of ``survivors`` inputs:
        ``sigma sqrt(n) / D = z sqrt(n / t)``."""
        return self.noise_multiplier * math.sqrt(survivors / self.min_clients)

    def encode(
        self, update: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, float]:
        """A client's input: its update (every key, sorted, flattened) clipped to
        L2 norm ``C``, rounded to integer steps, plus its integer noise, as
        ``uint32`` words mod ``2^32``, then :data:`META`. Returns it and the
        update's L2 norm before clipping (for the client's own log: it never
        leaves the client).

        ``rng``: tests only; by default a generator seeded with 128 bits from the
        OS (:mod:`secrets`).
        """
        x = np.concatenate(
            [np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(update)]
        )
        norm = float(np.linalg.norm(x))
        if not np.isfinite(norm):
            raise ValueError("an update with non-finite values")
        if norm > self.clipping_norm:
            x = x * (self.clipping_norm / norm)
        std = self.client_std(x.size)
        if rng is None:
            rng = np.random.default_rng(secrets.randbits(128))
        ints = np.rint(x / self.step) + np.rint(rng.normal(0.0, std, x.size))
        words = np.mod(ints.astype(np.int64), MODULUS).astype(np.uint32)
        return np.concatenate([words, np.array(META, dtype=np.uint32)]), norm

    def decode_mean(
        self, total: np.ndarray, shapes: Mapping[str, tuple[int, ...]], survivors: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The noisy mean ``(sum_k x_k + noise) / n`` of ``n = survivors``
        inputs of :meth:`encode` from the modular sum of their words, as float64
        arrays of ``shapes``; and what to record.

        Raises
        ------
        ValueError
            Fewer survivors than ``t``, more than ``K``, or meta words that do not
            count ``n`` contributions.
        """
        if not self.min_clients <= survivors <= self.clients:
            raise ValueError(
                f"{survivors} survivors: the noise is calibrated for "
                f"{self.min_clients} to {self.clients}"
            )
        total = np.asarray(total, dtype=np.uint32)
        meta = [int(v) for v in total[-len(META) :]]
        if meta != [survivors * m for m in META]:
            raise ValueError(f"the sum's meta words {meta} do not count {survivors}")
        sums = total[: -len(META)].view(np.int32).astype(np.float64) * self.step
        out, at = {}, 0
        for key in sorted(shapes):
            size = math.prod(shapes[key])
            out[key] = (sums[at : at + size] / survivors).reshape(shapes[key])
            at += size
        if at != sums.size:
            raise ValueError(f"a sum of {sums.size} entries for {at}")
        std = self.client_std(at) * self.step * math.sqrt(survivors) / survivors
        return out, {
            "distributed_noise_multiplier": self.effective_multiplier(survivors),
            "distributed_noise_std": std,  # of an entry of the mean
            "distributed_min_clients": self.min_clients,
            "distributed_updates": survivors,
            "distributed_clipping_norm": self.clipping_norm,
        }


class ReleaseAccountant:
    """Client-level epsilon of Gaussian releases at sample rate 1: Opacus' RDP
    accountant, its history kept in checkpoints so a resumed run composes on.

    With :meth:`keep_at`, every release is also appended to a file (flushed to
    disk) before it counts, so a release made after the last checkpoint (a
    server that crashed between unmasking and checkpointing) is not forgotten
    by the resumed run.

    Parameters
    ----------
    delta : float
        The delta epsilon is reported at.
    """

    def __init__(self, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.delta = float(delta)
        self.rdp = RDPAccountant()
        self.path: Path | None = None

    def keep_at(self, path: Path, previous: Path | None = None) -> None:
        """Append every release to ``path`` (JSON lines); a resumed run first
        takes the releases of the run it resumes, ``previous`` (when it is
        another file)."""
        self.path = Path(path)
        if previous is not None and Path(previous).is_file():
            if Path(previous).resolve() != self.path.resolve():
                shutil.copyfile(previous, self.path)

    def release(self, noise_multiplier: float) -> None:
        """Account one release of this noise multiplier (on disk first)."""
        z = float(noise_multiplier)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"noise_multiplier": z}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.rdp.step(noise_multiplier=z, sample_rate=SAMPLE_RATE)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0 before any release)."""
        return float(self.rdp.get_epsilon(self.delta)) if self.rdp.history else 0.0

    @property
    def releases(self) -> int:
        """Releases accounted."""
        return sum(steps for _, _, steps in self.rdp.history)

    def history(self) -> list[list[float]]:
        """The accountant's history, JSON-safe."""
        return [list(h) for h in self.rdp.history]

    def load(self, history: list[Any]) -> None:
        """Take back :meth:`history` (every release at sample rate 1); where the
        file of :meth:`keep_at` holds more releases (made after the checkpoint
        that saved ``history``), those."""
        self.rdp.history = [
            (float(sigma), SAMPLE_RATE, int(steps)) for sigma, _, steps in history
        ]
        if self.path is not None and self.path.is_file():
            kept = [
                float(json.loads(line)["noise_multiplier"])
                for line in self.path.read_text().splitlines()
                if line.strip()
            ]
            if len(kept) > self.releases:
                self.rdp.history = [(z, SAMPLE_RATE, 1) for z in kept]


def for_round(privacy: Any, secure: Any, clients: int) -> DistributedGaussian | None:
    """The round's :class:`DistributedGaussian` under ``privacy=distributed``
    (``privacy``, ``secure``: the settings' sections), with ``clients`` asked
    for a masked input; None under any other privacy mode."""
    if privacy is None or privacy.mode != "distributed":
        return None
    return DistributedGaussian(
        float(privacy.noise_multiplier),
        float(privacy.clipping_norm),
        int(clients),
        noise_clients(clients, float(secure.threshold), privacy.min_clients),
    )
