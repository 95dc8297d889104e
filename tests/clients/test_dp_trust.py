"""DP-SGD against the server: noise it cannot regenerate, nothing private in the
reply, and a privacy ledger the client keeps by run id (so a resume goes on
composing it). Everything goes through the real ClientApp ``train`` function."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.client_app import evaluate as client_evaluate
from clients.client_app import train as client_train
from fedlora import privacy
from fedlora.adapters import get_state, set_state, trainable_parameters
from fedlora.build import build
from fedlora.data import client_examples
from fedlora.errors import ConfigError
from fedlora.models import load_tokenizer
from fedlora.settings import PrivacySettings, Settings, with_
from fedlora.validate import validate
from strategies.server_app import compose_settings
from strategies.wire import (
    KEY_ARRAYS,
    KEY_CONFIG,
    KEY_EXPERIMENT,
    KEY_METRICS,
    KEY_NUM_EXAMPLES,
    KEY_ROUND,
    KEY_RUN_ID,
    record_to_state,
    state_to_record,
)

CPU = torch.device("cpu")
RUN = "20261130-000000-0123abcd"
#: what a DP-SGD client may send: covered by the accountant or data-independent
PUBLIC = {
    KEY_NUM_EXAMPLES,
    "epsilon",
    "delta",
    "noise_multiplier",
    "steps",
    "partition-id",
    "frozen-crc",
    "adapter-rank",  # the client's configured rank, not a figure of its data
}


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert, tmp_path_factory):
    """The tiny BERT without dropout: its masks would differ between two runs for
    reasons that have nothing to do with DP noise."""
    folder = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    shutil.copytree(tiny_bert, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


pytestmark = pytest.mark.usefixtures("task_identity")


def dp_settings(tiny_bert, *extra: str) -> Settings:
    """One SGD step (lr 1) over a whole partition (q = 1: every example in the
    one Poisson batch), so the update is ``(clipped sum + noise) / N``."""
    return compose_settings(
        [
            f"model.name={tiny_bert}",
            "privacy=dp_sgd",
            "privacy.accountant=rdp",
            "federation.fraction_evaluate=0",
            "federation.num_clients=2",
            "data.num_examples=60",
            "data.num_eval_examples=10",
            "train.optimizer=sgd",
            "train.lr=1.0",
            "train.local_steps=1",
            "train.batch_size=64",
            "train.device=cpu",
            *extra,
        ]
    )


def train_message(
    cfg: Settings, state: dict, server_round: int = 1, run=RUN
) -> Message:
    config = {KEY_EXPERIMENT: json.dumps(cfg.to_dict()), KEY_ROUND: server_round}
    if run is not None:
        config[KEY_RUN_ID] = run
    content = RecordDict(
        {KEY_CONFIG: ConfigRecord(config), KEY_ARRAYS: state_to_record(state)}
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def node(data_dir, pid: int = 0) -> Context:
    """A fresh node (empty state, as after a restart) holding partition ``pid``."""
    return Context(
        run_id=1,
        node_id=1,
        node_config={
            "partition-id": pid,
            "num-partitions": 2,
            "data-dir": str(data_dir),
        },
        state=RecordDict(),
        run_config={},
    )


def flat(state: dict, keys) -> np.ndarray:
    return np.concatenate([state[k].astype(np.float64).ravel() for k in keys])


def planned(cfg: Settings) -> privacy.DPPlan:
    """Partition 0's DP plan (its noise multiplier), as the client computes it."""
    examples, _ = client_examples(cfg, load_tokenizer(cfg.model), 0, 2)
    return privacy.plan(cfg.privacy, cfg.train, len(examples), cfg.dp_planned_rounds)


def regenerated_noise(cfg: Settings, model, seed: int) -> np.ndarray:
    """An attacker's copy of Opacus' noise, drawn from a seed it can guess."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    std = planned(cfg).noise_multiplier * float(cfg.privacy.max_grad_norm)
    return np.concatenate(
        [
            torch.normal(0.0, std, size=p.shape, generator=g).double().numpy().ravel()
            for p in trainable_parameters(model).values()
        ]
    )


def noise_in_reply(tiny_bert, tmp_path, *extra: str):
    """(noise the client added, the config, a model) from one real train reply."""
    cfg = dp_settings(tiny_bert, *extra)
    model, tok = build(cfg)
    start = get_state(model)
    keys = list(start)
    reply = client_train(train_message(cfg, start), node(tmp_path / "node"))
    update = flat(start, keys) - flat(record_to_state(reply.content[KEY_ARRAYS]), keys)
    # the clipped sum, without noise: the same step with sigma = 0 (q = 1, so the
    # batch is the whole partition whatever the sampler draws)
    examples, _ = client_examples(cfg, tok, 0, 2)
    p = privacy.plan(cfg.privacy, cfg.train, len(examples), cfg.dp_planned_rounds)
    assert p.sample_rate == 1.0
    set_state(model, start)
    quiet = privacy.DPPlan(**{**p.__dict__, "noise_multiplier": 0.0})
    privacy.train_local_dp(
        model,
        examples,
        cfg.train,
        cfg.privacy,
        quiet,
        privacy.make_accountant("rdp"),
        CPU,
        tok.pad_token_id,
    )
    clipped = flat(start, keys) - flat(get_state(model), keys)
    set_state(model, start)
    return (update - clipped) * len(examples), cfg, model, reply


def best_attack(noise: np.ndarray, cfg: Settings, model) -> float:
    """The smallest relative error of an attacker who regenerates the noise from
    seeds derived from the public config (the old derivation and its neighbours)."""
    public = int(cfg.federation.seed) * 100_003 + 1 * 1_009 + 0  # round 1, k=0
    errors = []
    for seed in (public, public + 1, public - 1, int(cfg.federation.seed)):
        guess = regenerated_noise(cfg, model, seed)
        errors.append(float(np.linalg.norm(noise - guess) / np.linalg.norm(noise)))
    return min(errors)


def test_the_server_cannot_regenerate_a_clients_noise(tiny_bert, tmp_path):
    noise, cfg, model, _ = noise_in_reply(tiny_bert, tmp_path)
    sigma = planned(cfg).noise_multiplier
    expected = sigma * cfg.privacy.max_grad_norm * np.sqrt(noise.size)
    assert 0.8 < np.linalg.norm(noise) / expected < 1.2  # the noise is really there
    # subtracting a guessed noise leaves an error of the noise's own size
    # (about sqrt(2): two independent draws), not the 1e-7 of a regenerated one
    assert best_attack(noise, cfg, model) > 1.0


def test_the_research_switch_makes_the_noise_regenerable(tiny_bert, tmp_path):
    """The control: with ``privacy.reproducible_noise=true`` the same attack
    recovers the clipped update, so the test above can fail."""
    noise, cfg, model, _ = noise_in_reply(
        tiny_bert, tmp_path, "privacy.reproducible_noise=true"
    )
    assert best_attack(noise, cfg, model) < 1e-3


def test_two_clients_with_the_same_config_and_seed_draw_different_noise(
    tiny_bert, tmp_path
):
    cfg = dp_settings(tiny_bert)
    model, _ = build(cfg)
    start = get_state(model)
    a = client_train(train_message(cfg, start), node(tmp_path / "a"))
    b = client_train(train_message(cfg, start), node(tmp_path / "b"))
    got_a = record_to_state(a.content[KEY_ARRAYS])
    got_b = record_to_state(b.content[KEY_ARRAYS])
    assert any(not np.array_equal(got_a[k], got_b[k]) for k in got_a)
    # same public metrics: nothing that differs between them is data
    assert dict(a.content[KEY_METRICS]) == dict(b.content[KEY_METRICS])


def test_a_dp_reply_carries_only_accounted_or_data_free_figures(tiny_bert, tmp_path):
    _, cfg, _, reply = noise_in_reply(tiny_bert, tmp_path)
    metrics = dict(reply.content[KEY_METRICS])
    assert set(metrics) == PUBLIC  # no train_loss, no Poisson counts, no timings
    _, tok = build(cfg)
    examples, _ = client_examples(cfg, tok, 0, 2)
    p = privacy.plan(cfg.privacy, cfg.train, len(examples), cfg.dp_planned_rounds)
    assert metrics[KEY_NUM_EXAMPLES] == p.expected_examples() == len(examples)
    assert 0 < metrics["epsilon"] <= cfg.privacy.target_epsilon + 1e-9


def test_a_dp_client_refuses_to_evaluate_on_its_own_data(tiny_bert, tmp_path):
    cfg = dp_settings(tiny_bert)
    msg = train_message(cfg, get_state(build(cfg)[0]))
    with pytest.raises(PermissionError, match="dp_sgd"):
        client_evaluate(msg, node(tmp_path))
    cfg = with_(cfg, "federation.fraction_evaluate", 1.0)
    with pytest.raises(ConfigError, match=r"^federation\.fraction_evaluate"):
        validate(cfg)


def test_fixed_batches_are_refused_since_the_accountant_assumes_poisson():
    dp = {
        "target_epsilon": 3.0,
        "accountant": "rdp",
        "clipping": "flat",
        "max_grad_norm": 1.0,
        "poisson_sampling": False,
    }
    with pytest.raises(ConfigError, match=r"^privacy\.poisson_sampling=False.*Poisson"):
        privacy.check_settings(PrivacySettings.from_dict(dp, "privacy"))


def test_the_ledger_survives_a_restarted_node_and_is_kept_per_run(tiny_bert, tmp_path):
    cfg = dp_settings(tiny_bert, "privacy.planned_rounds=3")
    model, tok = build(cfg)
    start = get_state(model)
    folder = tmp_path / "site"
    eps = []
    for r in (1, 2):  # a fresh Context each round: the node restarted in between
        reply = client_train(train_message(cfg, start, r), node(folder))
        eps.append(float(reply.content[KEY_METRICS]["epsilon"]))
    # epsilon after two rounds = one accountant over both rounds' steps
    examples, _ = client_examples(cfg, tok, 0, 2)
    p = privacy.plan(cfg.privacy, cfg.train, len(examples), 3)
    reference = privacy.make_accountant("rdp")
    reference.history = [(p.noise_multiplier, p.sample_rate, p.steps_per_round)] * 2
    assert eps[1] == pytest.approx(reference.get_epsilon(p.delta), rel=1e-9)
    assert eps[0] < eps[1]
    ledger = folder / "privacy-ledger" / RUN / "partition-0.json"
    assert json.loads(ledger.read_text())["rounds"] == [1, 2]
    # a new run (another id) starts a new ledger
    other = client_train(train_message(cfg, start, 1, "another-run"), node(folder))
    assert float(other.content[KEY_METRICS]["epsilon"]) == pytest.approx(eps[0])


def test_a_client_without_a_run_id_or_with_an_unsafe_one_refuses(tiny_bert, tmp_path):
    cfg = dp_settings(tiny_bert)
    start = get_state(build(cfg)[0])
    for run in (None, "../../etc"):
        with pytest.raises(ValueError, match="run id"):
            client_train(train_message(cfg, start, run=run), node(tmp_path))
    assert not (tmp_path / "privacy-ledger").exists()
