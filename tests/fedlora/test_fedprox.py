"""FedProx in the client trainers: the proximal term, plain and under DP-SGD."""

from __future__ import annotations

import pytest
import torch

from fedlora import privacy
from fedlora.build import build
from fedlora.data import client_examples, synthetic_table, tokenise
from fedlora.errors import ConfigError
from fedlora.settings import PrivacySettings, Settings, with_
from fedlora.train import collate, proximal_term, train_local
from strategies.server_app import compose_settings
from tests.conftest import BASE_OVERRIDES

CPU = torch.device("cpu")
MU = 1.0  # FedProx's largest usual value (Li et al. sweep 0.001 ... 1)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The same steps with and without the term, not different dropout masks."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters, by name."""
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def sgd(settings: Settings, lr: float, steps: int, batch: int) -> Settings:
    """Plain SGD (no momentum, no decay): a step is exactly ``-lr x gradient``."""
    return with_(
        settings,
        "train.optimizer",
        "sgd",
        "train.lr",
        lr,
        "train.momentum",
        0.0,
        "train.weight_decay",
        0.0,
        "train.local_steps",
        steps,
        "train.batch_size",
        batch,
    )


def train_plain(settings, examples, pad_id, mu, **changes):
    """Start and end trainable parameters of one round of ``train_local``."""
    settings = with_(settings, "train.proximal_mu", mu)
    for key, value in changes.items():
        settings = with_(settings, f"train.{key}", value)
    model = no_dropout(build(settings)[0])
    start = trainable(model)
    train_local(model, examples, settings.train, CPU, pad_id, seed=0)
    return start, trainable(model)


def test_mu_zero_runs_the_plain_trainer_unchanged(settings):
    model, tok = build(settings)
    params = [p for p in model.parameters() if p.requires_grad]
    assert settings.train.proximal_mu == 0.0  # conf/config.yaml: off by default
    assert proximal_term(params, settings.train) is None
    # settings from a checkpoint written before the key existed: off, the same run
    old = with_(settings, "train.proximal_mu", None)
    assert proximal_term(params, old.train) is None
    examples, _ = client_examples(settings, tok, 0, 2)
    _, zero = train_plain(settings, examples, tok.pad_token_id, 0.0)
    _, absent = train_plain(old, examples, tok.pad_token_id, None)
    for name in zero:
        assert torch.equal(zero[name], absent[name]), name


def test_second_sgd_step_differs_by_lr_mu_times_the_first_steps_drift(settings):
    """Step 1 starts at theta_global (no pull); step 2 from theta_1 with the same
    batch: the steps with and without the term differ by ``-lr mu (theta_1 -
    theta_global)``."""
    _, tok = build(settings)
    examples = client_examples(settings, tok, 0, 2)[0][:32]
    lr = 0.5
    one = sgd(settings, lr, steps=1, batch=len(examples))
    two = sgd(settings, lr, steps=2, batch=len(examples))
    start, theta1 = train_plain(one, examples, tok.pad_token_id, MU)
    _, plain = train_plain(two, examples, tok.pad_token_id, 0.0)
    _, prox = train_plain(two, examples, tok.pad_token_id, MU)
    pulled = 0
    for name in start:
        expected = -lr * MU * (theta1[name] - start[name])
        torch.testing.assert_close(
            prox[name] - plain[name], expected, rtol=1e-4, atol=1e-7
        )
        pulled += float(expected.abs().max()) > 1e-4
    assert pulled >= 2  # a pull the comparison can see (head, value B)


def test_sgd_with_mu_follows_the_explicit_proximal_loss_in_float64(settings):
    """Three full-batch SGD steps equal a float64 loop on ``loss + mu/2 ||theta -
    theta_global||^2`` with autograd, and differ from it without the term."""
    _, tok = build(settings)
    examples = client_examples(settings, tok, 0, 2)[0][:24]
    lr, steps = 0.5, 3
    cfg = sgd(settings, lr, steps=steps, batch=len(examples))
    _, trained = train_plain(cfg, examples, tok.pad_token_id, MU)

    def reference(mu: float) -> dict[str, torch.Tensor]:
        model = no_dropout(build(cfg)[0]).double()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        anchor = {n: p.detach().clone() for n, p in params.items()}
        batch = collate(examples, tok.pad_token_id)
        for _ in range(steps):
            model.zero_grad()
            proximal = sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
            (model(**batch).loss + mu / 2 * proximal).backward()
            with torch.no_grad():
                for p in params.values():
                    p -= lr * p.grad
        return {n: p.detach().float() for n, p in params.items()}

    with_term, without = reference(MU), reference(0.0)
    gap = 0.0
    for name in trained:
        torch.testing.assert_close(trained[name], with_term[name], rtol=1e-4, atol=2e-6)
        gap = max(gap, float((with_term[name] - without[name]).abs().max()))
    assert gap > 1e-3  # the term matters far beyond the tolerance


def test_mu_keeps_the_local_model_closer_to_the_global_one(settings):
    """With AdamW over three local epochs (18 steps), the drift from the global
    adapter shrinks as mu grows."""
    _, tok = build(settings)
    examples, _ = client_examples(settings, tok, 0, 2)

    def drift(mu: float) -> float:
        start, end = train_plain(
            settings, examples, tok.pad_token_id, mu, local_epochs=3
        )
        return float(torch.sqrt(sum(((end[n] - start[n]) ** 2).sum() for n in start)))

    none, small, large = drift(0.0), drift(0.1), drift(MU)
    assert large < small < 0.5 * none


def test_physical_pieces_take_the_same_proximal_steps_as_the_whole_batch(settings):
    """The pull is added once per optimizer step, not once per physical piece."""
    _, tok = build(settings)
    ex = tokenise(synthetic_table(23, seed=4), tok, settings.data, "seq_cls", 48)
    cfg = sgd(settings, 0.5, steps=3, batch=len(ex))
    pad = tok.pad_token_id
    start, whole = train_plain(cfg, ex, pad, MU, max_physical_batch_size=0)
    _, pieces = train_plain(cfg, ex, pad, MU, max_physical_batch_size=5)  # 5 pieces
    _, plain = train_plain(cfg, ex, pad, 0.0, max_physical_batch_size=0)
    gap = 0.0
    for name in whole:
        torch.testing.assert_close(
            pieces[name] - start[name], whole[name] - start[name], rtol=1e-3, atol=1e-6
        )
        gap = max(gap, float((whole[name] - plain[name]).abs().max()))
    assert gap > 1e-3


def dp_of(physical: int | None, norm: float) -> PrivacySettings:
    """DP-SGD settings (flat clipping at ``norm``)."""
    return PrivacySettings.from_dict(
        {
            "mode": "dp_sgd",
            "target_epsilon": 3.0,
            "target_delta": None,
            "max_grad_norm": norm,
            "clipping": "flat",
            "accountant": "rdp",
            "max_physical_batch_size": physical,
            "planned_rounds": None,
            "reproducible_noise": True,
        },
        "privacy",
    )


@pytest.mark.parametrize("physical", [None, 3])
def test_dp_adds_the_proximal_gradient_after_the_noise(settings, physical):
    """Same seeds, so the same Poisson batches and noise: step 1 (at theta_global)
    is the same with and without the term, and step 2 differs by exactly
    ``-lr mu (theta_1 - theta_global)``, neither clipped nor divided by the batch
    size, and added once however the logical batch is split."""
    _, tok = build(settings)
    examples = client_examples(settings, tok, 0, 2)[0][:64]
    lr, batch, norm, seed = 0.5, 8, 0.1, 7
    dp = dp_of(physical, norm)

    def run(mu: float, steps: int):
        cfg = with_(sgd(settings, lr, steps, batch), "train.proximal_mu", mu)
        model = no_dropout(build(cfg)[0])
        start = trainable(model)
        plan = privacy.DPPlan(1.0, batch / len(examples), steps, 1, 1e-5, 3.0, "rdp")
        privacy.train_local_dp(
            model,
            examples,
            cfg.train,
            dp,
            plan,
            privacy.make_accountant("rdp"),
            CPU,
            tok.pad_token_id,
            noise_seed=seed,
        )
        return start, trainable(model)

    start, theta1 = run(MU, 1)
    _, theta1_plain = run(0.0, 1)
    _, plain = run(0.0, 2)
    _, prox = run(MU, 2)
    pulled = 0
    for name in start:
        torch.testing.assert_close(theta1[name], theta1_plain[name])  # no pull yet
        expected = -lr * MU * (theta1[name] - start[name])
        torch.testing.assert_close(
            prox[name] - plain[name], expected, rtol=1e-4, atol=1e-7
        )
        pulled += float(expected.abs().max()) > 1e-3
    assert pulled >= 2  # noise of sigma C / batch = 0.0125 moves every tensor


@pytest.mark.parametrize("mu", [-0.01, float("nan"), "0.1"])
def test_a_bad_mu_names_the_key(tiny_bert, settings, mu):
    overrides = [*BASE_OVERRIDES, f"model.name={tiny_bert}"]
    with pytest.raises(ConfigError, match=r"^train\.proximal_mu="):
        compose_settings([*overrides, f"train.proximal_mu={mu!r}"])  # '0.1': text
    model, tok = build(settings)
    ex = client_examples(settings, tok, 0, 2)[0][:4]
    with pytest.raises(ConfigError, match=r"^train\.proximal_mu="):
        train_local(
            model,
            ex,
            with_(settings, "train.proximal_mu", mu).train,
            CPU,
            tok.pad_token_id,
            seed=0,
        )


def test_settings_without_the_key_still_load(settings):
    """A checkpoint from before FedProx keeps its settings: the key is absent."""
    plain = settings.to_dict()
    del plain["train"]["proximal_mu"]
    old = Settings.from_dict(plain)
    assert old.train.proximal_mu is None
    assert "proximal_mu" not in old.to_dict()["train"]
