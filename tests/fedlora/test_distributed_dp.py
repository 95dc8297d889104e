"""Distributed Gaussian noise (fedlora.distributed_dp): the encoding through the
modular sum, the noise the sum carries, and its accounting, checked against
float64 references, sample statistics and the exact Gaussian mechanism (scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from fedlora import distributed_dp as ddp
from fedlora.secagg import ClientSession, ProtocolError

C = 0.5


def modular_sum(vectors):
    total = np.zeros(vectors[0].size, dtype=np.uint32)
    for v in vectors:
        total += v
    return total


def lora_updates(n, size, seed=0, scale=1e-3):
    """LoRA-scale updates (entries around 1e-3)."""
    rng = np.random.default_rng(seed)
    return [{"b": rng.normal(0, scale, size)} for _ in range(n)]


def clipped(update, norm=C):
    """Reference clipping in float64 (one L2 norm over the whole update)."""
    x = np.asarray(update["b"], np.float64)
    return x * min(1.0, norm / np.sqrt(np.sum(x * x)))


def test_noise_clients_defaults_to_more_than_the_threshold():
    assert ddp.noise_clients(10, 0.5, None) == 6
    assert ddp.noise_clients(4, 0.5, None) == 3
    assert ddp.noise_clients(2, 0.5, None) == 2
    assert ddp.noise_clients(10, 0.5, 9) == 9


def test_the_sum_decodes_to_the_clipped_mean_plus_noise_of_the_calibrated_size():
    """Noise: the decoded mean minus the float64 mean of the clipped updates has
    the std ``z C sqrt(n / t) / n`` an entry (sample std over 200k entries), mean
    0 and Gaussian shape."""
    n, t, z, d = 5, 3, 1.2, 200_000
    noise = ddp.DistributedGaussian(z, C, clients=6, min_clients=t)
    updates = lora_updates(n, d)
    updates[0] = {"b": updates[0]["b"] * 1e4}  # one far above C: clipped
    words = [noise.encode(u)[0] for u in updates]
    mean, info = noise.decode_mean(modular_sum(words), {"b": (d,)}, n)
    ref = np.mean([clipped(u) for u in updates], axis=0)
    err = mean["b"] - ref
    expected = z * C * math.sqrt(n / t) / n
    assert np.std(err) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(err)) < 5 * expected / math.sqrt(d)
    assert stats.kurtosis(err) == pytest.approx(0.0, abs=0.05)  # Gaussian
    assert info["distributed_noise_multiplier"] == pytest.approx(z * math.sqrt(n / t))
    assert info["distributed_noise_std"] == pytest.approx(expected, rel=1e-3)
    assert info["distributed_updates"] == n


def test_with_little_noise_the_sum_is_the_clipped_sum():
    """z small: the decoded mean equals the float64 mean of the clipped updates
    to within the rounding (half a step each) and the small noise."""
    n, d, z = 4, 3000, 1e-4
    noise = ddp.DistributedGaussian(z, C, clients=4, min_clients=2)
    updates = lora_updates(n, d, seed=1)
    updates[2] = {"b": updates[2]["b"] * 1e3}  # norm ~ 55: clipped to C
    words = [noise.encode(u)[0] for u in updates]
    mean, _ = noise.decode_mean(modular_sum(words), {"b": (d,)}, n)
    ref = np.mean([clipped(u) for u in updates], axis=0)
    tol = noise.step + 6 * z * C  # rounding plus 6 std of the noise
    assert np.abs(mean["b"] - ref).max() < tol
    # the clipped update's direction and norm survive
    assert np.linalg.norm(clipped(updates[2])) == pytest.approx(C)


def test_extreme_sums_decode_without_wrapping():
    """Every client's whole norm C in one entry, both signs: the sum reaches
    +-K C, the edge of what a clipped sum can be, and decodes exactly."""
    k, d = 8, 10
    noise = ddp.DistributedGaussian(1e-4, C, clients=k, min_clients=2)
    up = [{"b": np.eye(d)[0] * C}] * k
    down = [{"b": -np.eye(d)[1] * 5.0}] * k  # clipped to -C
    for updates, entry, sign in ((up, 0, 1), (down, 1, -1)):
        words = [noise.encode(u)[0] for u in updates]
        mean, _ = noise.decode_mean(modular_sum(words), {"b": (d,)}, k)
        assert mean["b"][entry] == pytest.approx(sign * C, abs=1e-3)


def test_the_noise_comes_from_the_os_not_numpys_global_seed():
    noise = ddp.DistributedGaussian(1.0, C, clients=3, min_clients=2)
    update = lora_updates(1, 500)[0]
    np.random.seed(0)
    first = noise.encode(update)[0]
    np.random.seed(0)
    second = noise.encode(update)[0]
    assert not np.array_equal(first, second)


def test_meta_words_count_contributions_and_nothing_else():
    noise = ddp.DistributedGaussian(1.0, C, clients=3, min_clients=2)
    words, norm = noise.encode({"b": np.full(10, 3.0)})
    assert list(words[-3:]) == [1, 0, 0]  # no clipping count leaves the client
    assert norm == pytest.approx(3.0 * math.sqrt(10))
    with pytest.raises(ValueError, match="meta words"):
        noise.decode_mean(modular_sum([words, words]), {"b": (10,)}, 3)


def test_fewer_survivors_than_calibrated_are_refused():
    noise = ddp.DistributedGaussian(1.0, C, clients=5, min_clients=4)
    words = [noise.encode({"b": np.zeros(4)})[0] for _ in range(3)]
    with pytest.raises(ValueError, match="calibrated for 4"):
        noise.decode_mean(modular_sum(words), {"b": (4,)}, 3)
    with pytest.raises(ValueError, match="min_clients"):
        ddp.DistributedGaussian(1.0, C, clients=3, min_clients=4)


def test_a_client_reveals_nothing_for_a_sum_below_its_noise_floor():
    session = ClientSession.start(1, 1, 0.5)
    session.min_alive = 3
    restored = ClientSession.from_dict(session.to_dict())
    assert restored.min_alive == 3
    with pytest.raises(ProtocolError, match="calibrated"):
        restored.reveal([1, 2], [], survivors=2)
    with pytest.raises(ProtocolError, match="calibrated"):
        restored.reveal([1, 2, 3], [])  # a server that does not say


def test_too_coarse_a_noise_is_refused():
    """z = 1: 20,000 clients a round still get 1e3 integer steps of noise;
    30,000 would not (near the guard's edge on both sides)."""
    fine = ddp.DistributedGaussian(1.0, C, 20_000, ddp.noise_clients(20_000, 0.5, None))
    assert fine.client_std(4) > ddp.MIN_INTEGER_STD
    fine.encode({"b": np.zeros(4)})
    coarse = ddp.DistributedGaussian(
        1.0, C, 30_000, ddp.noise_clients(30_000, 0.5, None)
    )
    with pytest.raises(ValueError, match="too coarse"):
        coarse.encode({"b": np.zeros(4)})


def exact_gaussian_epsilon(mu, delta):
    """The tight epsilon of a Gaussian mechanism with ``mu = sensitivity / std``
    (Balle and Wang 2018): ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps
    Phi(-eps/mu - mu/2)``, solved for eps."""

    def gap(eps):
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return optimize.brentq(gap, 1e-9, 100.0)


@pytest.mark.parametrize("multipliers", [[1.0] * 3, [1.1547, 1.0, 1.2247, 1.1547]])
def test_the_accountant_bounds_the_exact_gaussian_epsilon(multipliers):
    """T Gaussian releases of multipliers z_i compose to one of
    ``mu = sqrt(sum 1 / z_i^2)``; RDP's epsilon is an upper bound on the exact
    one, and not loose by more than half of it."""
    delta = 1e-5
    accountant = ddp.ReleaseAccountant(delta)
    assert accountant.epsilon == 0.0 and accountant.releases == 0
    for z in multipliers:
        accountant.release(z)
    mu = math.sqrt(sum(1 / z**2 for z in multipliers))
    exact = exact_gaussian_epsilon(mu, delta)
    assert exact <= accountant.epsilon <= 1.5 * exact
    assert accountant.releases == len(multipliers)
    again = ddp.ReleaseAccountant(delta)
    again.load(accountant.history())
    assert again.epsilon == accountant.epsilon


def test_releases_reach_the_disk_and_a_resume_takes_those_after_its_checkpoint(
    tmp_path,
):
    """A server that crashed after unmasking round 3 but before checkpointing it:
    the checkpoint holds 2 releases, the file 3; the resumed run counts 3."""
    kept = tmp_path / "old" / ddp.LEDGER_FILE
    kept.parent.mkdir()
    first = ddp.ReleaseAccountant(1e-5)
    first.keep_at(kept)
    first.release(1.0)
    first.release(1.2)
    checkpointed = first.history()
    first.release(0.9)  # then the crash
    resumed = ddp.ReleaseAccountant(1e-5)
    resumed.keep_at(tmp_path / ddp.LEDGER_FILE, previous=kept)
    resumed.load(checkpointed)
    assert resumed.releases == 3 and resumed.epsilon == first.epsilon
    resumed.release(1.0)  # the resumed run goes on in its own file
    assert len((tmp_path / ddp.LEDGER_FILE).read_text().splitlines()) == 4
    assert len(kept.read_text().splitlines()) == 3
