"""Client-level (central) DP: Flower's server-side fixed-clipping wrapper around a
fedlora strategy, with the noise scaled to the updates actually averaged and every
release accounted without amplification.

Each round every replying client's update (reply - global, over all communicated
arrays) is clipped to L2 norm ``C = clipping_norm``; the wrapped strategy checks the
updates and takes their uniform mean over the ``m'`` it accepts; Gaussian noise of
standard deviation ``z C / m'`` (``z = noise_multiplier``) is added to that mean.
That is the Gaussian mechanism on the sum of the clipped updates (sensitivity ``C``
when one client is added or removed) with noise ``z C``, divided by ``m'``: every
release has noise multiplier ``z``, however many of the sampled clients failed,
declined or were rejected. It protects the plain means (FedAvg-LoRA, FFA-LoRA,
Fed-SB); LoRA-FAIR's correction reads each client's factors beyond their mean, so
it is refused (see fedlora.validate).

What differs from Flower's ``DifferentialPrivacyServerSideFixedClipping`` (1.39),
whose constructor, ``configure_train`` and evaluation hooks are used as they are:

* Flower adds noise ``z C / m`` with ``m = num_sampled_clients`` fixed, also when
  fewer updates are averaged; the effective multiplier then drops to ``z m' / m``
  while ``z`` would be accounted. Here the noise follows ``m'``.
* Flower skips the whole round when any reply is an error; here the wrapped
  strategy records the failure and averages the rest (with noise for ``m'``), as
  it does without DP.
* Flower clips by the position of each array in the record, and a reply whose
  arrays do not line up with the global ones raises in the server. Here updates
  are clipped by name; a malformed reply is passed on unclipped and the wrapped
  strategy rejects it (:func:`fedlora.updates.check_update`, the same checks).
* Flower draws the noise from NumPy's process-global generator, whose state the
  run's checkpoints save and restore (:func:`fedlora.checkpoint.rng_state`): from a
  round's checkpoint the next round's noise could be regenerated and subtracted.
  Here each release draws from a fresh generator seeded with 128 bits from the OS
  (:mod:`secrets`), not from ``federation.seed`` or anything else clients or
  readers of the run directory know. The server itself adds the noise, so central
  DP protects clients against the other clients and the model's users, never
  against the server.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedlora.distributed_dp import SAMPLE_RATE, ReleaseAccountant
from fedlora.errors import ConfigError
from fedlora.updates import check_update
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_ARRAYS,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    payload_bytes,
    record_to_state,
    state_to_record,
)

log = logging.getLogger(__name__)


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's wrapper with noise for the updates averaged and epsilon accounting;
    other attributes (``round_log``, ``initialize``, ``export``, ...) are the
    wrapped strategy's.

    Epsilon: one Gaussian release of noise multiplier ``noise_multiplier`` per round
    that publishes an aggregate, at sample rate 1 (no amplification), composed by
    Opacus' RDP accountant and reported at ``delta``. A checkpoint keeps the
    accountant's history, so a resumed run goes on composing.

    Each round's ``round_log`` entry gets ``central_epsilon`` (spent so far),
    ``central_delta``, ``central_accountant`` (``rdp``), ``central_sample_rate``,
    ``central_releases`` and ``central_updates`` (updates averaged, ``m'``); a
    round that publishes an aggregate also ``central_noise_multiplier`` (the
    multiplier applied: noise std over the sensitivity ``C / m'``) and
    ``central_noise_std``.

    Parameters
    ----------
    strategy : LoRAStrategy
        The fedlora strategy to wrap (uniform weighting).
    noise_multiplier : float
        ``z`` > 0: noise std over the sensitivity of the mean.
    clipping_norm : float
        ``C`` > 0: the L2 bound on each client's update.
    num_sampled_clients : int
        Clients sampled per round (``m``); for Flower's checks and the log only,
        since the noise follows the updates actually averaged.
    delta : float
        The delta epsilon is reported at.
    """

    def __init__(
        self,
        strategy: LoRAStrategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        delta: float,
    ) -> None:
        if not float(noise_multiplier) > 0:
            raise ConfigError(
                "privacy.wrapper.noise_multiplier",
                noise_multiplier,
                "must be positive: without noise no epsilon holds",
            )
        if strategy.method.weighting != "uniform":
            raise ConfigError(
                "strategy.weighting",
                strategy.method.weighting,
                "privacy=central needs strategy.weighting=uniform, or null, "
                "which it turns into uniform (the noise scale assumes a "
                "uniform average)",
            )
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.ledger = ReleaseAccountant(delta)
        self.delta = float(delta)

    @property
    def rdp(self) -> Any:
        """The accountant's Opacus RDP accountant."""
        return self.ledger.rdp

    # --- what the ServerApp asks of a strategy besides Flower's hooks: the
    # wrapped strategy's, delegated explicitly
    @property
    def name(self) -> str:
        """The wrapped method's name."""
        return self.strategy.name

    @property
    def round_log(self) -> dict[int, dict[str, Any]]:
        """The wrapped strategy's round log (with this wrapper's records)."""
        return self.strategy.round_log

    @property
    def frozen(self) -> dict[str, np.ndarray]:
        """The wrapped strategy's frozen factors."""
        return self.strategy.frozen

    def initialize(self, *args: Any, **kwargs: Any) -> ArrayRecord:
        """The wrapped strategy's initialisation."""
        return self.strategy.initialize(*args, **kwargs)

    def export(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The wrapped strategy's export."""
        return self.strategy.export(state)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update, let the wrapped strategy check and average them, add
        noise for the ``m'`` updates it averaged and account the release."""
        reference = record_to_state(self.current_arrays)
        replies = [self._clip(m, reference) for m in replies]
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        finally:
            self.strategy.arrived.clear()
        real_round = server_round + self.strategy.round_offset
        entry = self.strategy.round_log.setdefault(real_round, {})
        averaged = int(entry.get("clients", 0)) if arrays is not None else 0
        if arrays is not None:
            if averaged < 1:
                raise RuntimeError(
                    f"round {real_round}: the wrapped strategy returned an "
                    "aggregate but recorded no averaged updates ('clients'); "
                    "cannot calibrate the central DP noise"
                )
            std = self.noise_multiplier * self.clipping_norm / averaged
            arrays = add_noise(arrays, std)
            self.ledger.release(self.noise_multiplier)
            entry.update(
                central_noise_multiplier=std * averaged / self.clipping_norm,
                central_noise_std=std,
            )
            log.info(
                "central DP: %s of %s sampled updates averaged, noise std %.4g",
                averaged,
                self.num_sampled_clients,
                std,
            )
        entry.update(
            central_epsilon=self.ledger.epsilon,
            central_delta=self.delta,
            central_accountant="rdp",
            central_sample_rate=SAMPLE_RATE,
            central_releases=self.ledger.releases,
            central_updates=averaged,
        )
        return arrays, metrics

    def _clip(self, msg: Message, reference: dict[str, np.ndarray]) -> Message:
        """``msg`` with its update clipped to ``clipping_norm`` (in place).

        Only a well-formed update (:func:`check_update` against the global arrays)
        is clipped; any other reply is returned as it is, and the wrapped strategy,
        which applies the same checks, records it as failed, declined or rejected.
        """
        if msg.has_error() or KEY_ARRAYS not in msg.content:
            return msg
        try:
            state = record_to_state(msg.content[KEY_ARRAYS])
            num_examples = msg.content[KEY_METRICS].get(KEY_NUM_EXAMPLES)
            expected = {k: v.shape for k, v in reference.items()}
            if check_update(state, expected, num_examples) is not None:
                return msg
        except Exception:  # noqa: BLE001 - malformed: the wrapped strategy says why
            return msg
        update = {k: state[k].astype(np.float64) - reference[k] for k in reference}
        norm = float(np.sqrt(sum(np.sum(u * u) for u in update.values())))
        scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
        # its bytes as sent (in wire.dtype); the clipped update goes on in float32:
        # rounding it to 16 bits again could take it past the clipping norm
        self.strategy.arrived[id(msg)] = payload_bytes(msg.content)
        msg.content[KEY_ARRAYS] = state_to_record(
            {k: reference[k] + scale * update[k] for k in state}
        )
        return msg

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The wrapped strategy's checkpoint state plus the RDP history."""
        arrays, state = self.strategy.checkpoint_state()
        state["central_rdp_history"] = self.ledger.history()
        return arrays, state

    def restore_state(self, arrays: dict[str, Any], state: dict[str, Any]) -> None:
        """Restore the wrapped strategy and the RDP history (releases so far).

        Every release is accounted at sample rate 1, also one a checkpoint written
        before that fix recorded with the (unfounded) rate ``m / num_clients``.
        """
        self.strategy.restore_state(arrays, state)
        self.ledger.load(state.get("central_rdp_history", []))


def add_noise(arrays: ArrayRecord, std: float) -> ArrayRecord:
    """``arrays`` plus i.i.d. ``N(0, std^2)`` noise, drawn from a generator seeded
    with 128 bits of OS entropy (never from the experiment's seed or NumPy's global
    generator, which checkpoints save and restore)."""
    rng = np.random.default_rng(secrets.randbits(128))
    return state_to_record(
        {
            k: v + rng.normal(0.0, std, v.shape)
            for k, v in record_to_state(arrays).items()
        }
    )
