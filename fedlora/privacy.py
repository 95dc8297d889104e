"""Sample-level DP-SGD in the clients (Opacus), accounted across rounds.

A client's privacy loss composes over every DP-SGD step it runs in every round it
takes part in. The noise multiplier is calibrated ONCE for the whole planned run
(planned participations x local steps per round); the accountant's history (a small
JSON-safe state) travels between rounds in the client's state; before each round
the client checks that the round would not take it past its target and declines
otherwise. Server aggregation is post-processing.

Settings (``privacy.*``): ``target_epsilon``, ``target_delta`` (null: ``0.1 / N_k``,
below 1/N_k), ``max_grad_norm``, ``clipping`` (flat | per_layer), ``accountant``
(rdp | prv), ``max_physical_batch_size``, ``reproducible_noise``.

Threat model: the noise protects a client's examples against everyone who sees its
update, the server first. So the noise and the Poisson sampling are drawn from
generators seeded with fresh OS entropy (:func:`fresh_seed`) that never leave the
client; only the research switch ``privacy.reproducible_noise=true`` derives them from
the public experiment seed (then the server can subtract the noise: no protection).

Ledger: a client's plan and accountant history live in a file the client owns
(:class:`Ledger`), keyed by the run's id, so a resumed run goes on composing the
same ledger and a new run starts a new one. The server never keeps it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.data import Example
from fedlora.errors import ConfigError
from fedlora.settings import PrivacySettings, TrainSettings
from fedlora.train import (
    ProximalTerm,
    collate,
    make_optimizer,
    physical_batches,
    proximal_term,
)

log = logging.getLogger("fedlora")

ACCOUNTANTS = ("rdp", "prv")
CLIPPINGS = ("flat", "per_layer")
PRV_MAX_EPSILON = 50.0  # Opacus' PRV takes 0.55 GB at 50, 1 GB at 200, >4.5 GB at 1e4


@dataclass(frozen=True)
class DPPlan:
    """One client's DP-SGD plan, fixed for the whole run."""

    noise_multiplier: float
    sample_rate: float  # Poisson rate q = 1 / batches per epoch (Opacus' convention)
    steps_per_round: int
    planned_rounds: int
    delta: float
    target_epsilon: float
    accountant: str
    num_examples: int = 0  # N_k, public to the accountant (q and delta use it)

    def expected_examples(self) -> int:
        """Examples a round is planned to use, ``steps * q * N_k``: the client's
        aggregation weight under DP (the Poisson counts themselves are private)."""
        return max(
            1, round(self.steps_per_round * self.sample_rate * self.num_examples)
        )

    def to_json(self) -> str:
        """Serialise (kept in the client's state between rounds)."""
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> DPPlan:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def check_settings(privacy: PrivacySettings) -> None:
    """Raise ConfigError on impossible DP settings (target, delta, norm, names)."""
    eps = privacy.target_epsilon
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ConfigError("privacy.target_epsilon", eps, "must be a number > 0")
    delta = privacy.target_delta
    if delta is not None and not (0 < float(delta) < 1):
        raise ConfigError(
            "privacy.target_delta",
            delta,
            "must be in (0, 1) or null (null: 0.1 / N_k, below 1 / N_k)",
        )
    if privacy.accountant not in ACCOUNTANTS:
        raise ConfigError("privacy.accountant", privacy.accountant, "choose rdp or prv")
    if privacy.accountant == "prv" and eps > PRV_MAX_EPSILON:
        raise ConfigError(  # Opacus' PRV grid grows with epsilon: 1 GB at 200
            "privacy.target_epsilon",
            eps,
            f"is above {PRV_MAX_EPSILON:g} with the PRV accountant, whose "
            "computation then takes gigabytes or never ends; set "
            "privacy.accountant=rdp for such large targets",
        )
    if privacy.clipping not in CLIPPINGS:
        raise ConfigError(
            "privacy.clipping", privacy.clipping, "choose flat or per_layer"
        )
    norm = privacy.max_grad_norm
    if not isinstance(norm, (int, float)) or norm <= 0:
        raise ConfigError("privacy.max_grad_norm", norm, "must be a number > 0")
    if not isinstance(privacy.reproducible_noise, bool):
        raise ConfigError(
            "privacy.reproducible_noise",
            privacy.reproducible_noise,
            "must be true or false (false: noise from OS entropy, the default)",
        )


def plan(
    privacy: PrivacySettings,
    train: TrainSettings,
    num_examples: int,
    planned_rounds: int,
) -> DPPlan:
    """Calibrate the noise multiplier once for ``planned_rounds`` x local steps
    (``planned_rounds``: :attr:`fedlora.settings.Settings.dp_planned_rounds`).

    ``sigma = get_noise_multiplier(eps, delta, q, steps=planned_rounds * steps)``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    check_settings(privacy)
    assert privacy.target_epsilon is not None and privacy.accountant is not None
    steps = train.steps_per_round(num_examples)
    delta = privacy.target_delta or 0.1 / num_examples
    q = 1.0 / train.batches_per_epoch(num_examples)
    sigma = get_noise_multiplier(
        target_epsilon=float(privacy.target_epsilon),
        target_delta=float(delta),
        sample_rate=q,
        steps=steps * planned_rounds,
        accountant=privacy.accountant,
    )
    return DPPlan(
        float(sigma),
        q,
        steps,
        planned_rounds,
        float(delta),
        float(privacy.target_epsilon),
        privacy.accountant,
        int(num_examples),
    )


def make_accountant(name: str, state: str | None = None) -> Any:
    """A fresh Opacus accountant, or one restored from its JSON state."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(name)
    if state:
        loaded = json.loads(state)
        loaded["history"] = [tuple(h) for h in loaded["history"]]
        accountant.load_state_dict(loaded)
    return accountant


def accountant_state(accountant: Any) -> str:
    """The accountant's history as JSON (``{history, mechanism}``)."""
    state = accountant.state_dict()
    return json.dumps(
        {
            "history": [list(h) for h in state["history"]],
            "mechanism": state["mechanism"],
        }
    )


def fresh_seed() -> int:
    """63 bits of OS entropy (:mod:`secrets`): a seed no other party can know."""
    return secrets.randbits(63)


#: environment variable naming the folder a client keeps its state in, where the
#: node config names no ``data-dir`` (the simulation launcher sets it)
CLIENT_DIR_ENV = "FEDLORA_CLIENT_DIR"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Ledger:
    """One client's privacy ledger for one run: its DP plan (fixed at its first
    round) and its accountant's history, in ``<root>/<run id>/partition-<k>.json``.

    The file lives with the client (its node's data folder), never with the server,
    and is keyed by the run's id, which the server's checkpoint records: a resumed
    run finds the ledger and goes on composing; a new run, with a new id, starts a
    new one. Each save is atomic (temporary file, fsync, rename), and a client
    saves before it replies, so no update leaves unaccounted.
    """

    def __init__(self, root: Path | str, run_id: str, partition: int) -> None:
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            raise ValueError(
                f"run id {run_id!r} is not a plain name (letters, digits, _ . -); "
                "refusing to keep a privacy ledger under it"
            )
        self.path = (
            Path(root).expanduser() / run_id / f"partition-{int(partition)}.json"
        )

    def load(self) -> tuple[DPPlan, str | None, list[int]] | None:
        """``(plan, accountant state, rounds trained)``, or None for a new ledger."""
        if not self.path.exists():
            return None
        data = json.loads(self.path.read_text())
        return (
            DPPlan.from_json(data["plan"]),
            data.get("accountant"),
            [int(r) for r in data.get("rounds", [])],
        )

    def save(self, p: DPPlan, accountant: Any, rounds: list[int]) -> None:
        """Write the plan and the accountant's history atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {
                "plan": p.to_json(),
                "accountant": accountant_state(accountant),
                "rounds": list(rounds),
                "epsilon": float(accountant.get_epsilon(p.delta)),
            }
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def epsilon_after_round(p: DPPlan, state: str | None) -> float:
    """Epsilon the client would have spent after one more round of ``p``."""
    accountant = make_accountant(p.accountant, state)
    accountant.history.append((p.noise_multiplier, p.sample_rate, p.steps_per_round))
    return float(accountant.get_epsilon(p.delta))


def _dp_step(optimizer: Any, proximal: ProximalTerm | None) -> None:
    """``DPOptimizer.step()``, with FedProx's gradient added after the noise.

    Opacus' ``pre_step`` clips the per-example gradients and adds them up; unless
    the step is signalled skipped (a physical piece before the last), it then adds
    the noise, divides by the expected batch size, records the step with the
    accountant and returns True, leaving the private gradient in ``.grad``. The
    proximal gradient (no data in it: post-processing) goes there, once per
    logical step, before the wrapped optimizer's update.
    """
    if optimizer.pre_step():
        if proximal is not None:
            proximal.add_gradient()
        optimizer.original_optimizer.step()


def train_local_dp(
    model: torch.nn.Module,
    examples: Sequence[Example],
    train: TrainSettings,
    privacy: PrivacySettings,
    p: DPPlan,
    accountant: Any,
    device: torch.device,
    pad_id: int,
    noise_seed: int | None = None,
    *,
    poisson: bool = True,
) -> dict[str, float]:
    """One round of DP-SGD on the trainable parameters (Opacus, hooks mode).

    Per-example gradients are clipped (flat, or per parameter tensor), summed,
    noised with ``N(0, (sigma C)^2)`` and divided by the expected batch size.
    Batches are Poisson-sampled; an empty one is a noise-only step (still
    accounted). A logical batch runs as physical batches of at most
    ``max_physical_batch_size``, longest first (:func:`physical_batches`). The
    accountant is updated in place by the optimizer's step hook. With
    ``train.proximal_mu > 0`` (FedProx) each step adds ``mu (theta - theta_global)``
    to the noised gradient (:func:`_dp_step`): no privacy cost, no clipping.

    ``noise_seed`` None (the default, and the only choice the product makes unless
    ``privacy.reproducible_noise``) seeds the noise and the Poisson sampler with two
    independent draws of OS entropy, unknown to anyone outside this call.
    ``poisson=False`` (tests and benchmarks only; the accountant would not hold)
    takes fixed batches in data order.

    Returns ``num_examples`` (examples seen), ``steps``, ``train_loss`` and
    ``train_time``: statistics of the private data, for this process only; what a
    client may send is :func:`public_metrics`.
    """
    from opacus import PrivacyEngine

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(params, train)
    proximal = proximal_term(params, train)  # theta_global: the server's values
    engine = PrivacyEngine(accountant=p.accountant)
    engine.accountant = accountant
    sampling_seed, noise_seed = (
        (fresh_seed(), fresh_seed())
        if noise_seed is None
        else (noise_seed, noise_seed + 1)
    )
    loader = torch.utils.data.DataLoader(
        list(examples),
        batch_size=int(train.batch_size),
        shuffle=False,
        generator=torch.Generator().manual_seed(sampling_seed),
    )  # only its batch sampler (Poisson, after make_private) is used; Opacus'
    # DPDataLoader draws the Poisson masks from this loader's generator
    norm = float(privacy.max_grad_norm or 0)
    per_layer = privacy.clipping == "per_layer"
    hooks, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=p.noise_multiplier,
        max_grad_norm=[norm / math.sqrt(len(params))] * len(params)
        if per_layer
        else norm,
        clipping=privacy.clipping,
        poisson_sampling=poisson,
        grad_sample_mode="hooks",
        wrap_model=False,
        noise_generator=torch.Generator(device=device).manual_seed(noise_seed),
    )
    physical = int(privacy.max_physical_batch_size or 0)  # null: whole batches
    lengths = [len(e["input_ids"]) for e in examples]
    model.train()
    quiet = warnings.catch_warnings()
    quiet.__enter__()  # Opacus' hook and PRV warnings are expected here; see README
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
    start, steps, seen, loss_sum, forwards = time.perf_counter(), 0, 0, 0.0, 0
    try:
        while steps < p.steps_per_round:
            # one logical batch per step: Poisson-sampled indices (or a fixed batch)
            for logical in loader.batch_sampler:
                chunks = physical_batches(list(logical), lengths, physical)
                if not chunks:  # empty Poisson batch: noise only (BERT can't run on 0)
                    for q in params:
                        q.grad_sample = torch.zeros((0, *q.shape), device=q.device)
                    _dp_step(optimizer, proximal)
                for i, chunk in enumerate(chunks):
                    batch = collate([examples[j] for j in chunk], pad_id)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    loss = model(**batch).loss
                    loss.backward()
                    loss_sum += float(loss.detach())
                    forwards += 1
                    seen += len(chunk)
                    # all but the last chunk: clip and accumulate, no step yet
                    optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
                    _dp_step(optimizer, proximal)
                    optimizer.zero_grad(set_to_none=True)
                steps += 1
                if steps >= p.steps_per_round:
                    break
    finally:
        hooks.cleanup()
        quiet.__exit__(None, None, None)
    return {
        "num_examples": float(seen),
        "steps": float(steps),
        "train_loss": loss_sum / max(forwards, 1),
        "train_time": time.perf_counter() - start,
    }
