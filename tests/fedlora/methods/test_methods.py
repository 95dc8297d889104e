"""The methods' identities for FFA-LoRA, Fed-SB and LoRA-FAIR (float64).

FFA-LoRA's and Fed-SB's exactness (and FedAvg-LoRA's inexactness) are checked on
the real path: the real ClientApp trains 3 clients of different sizes from the same
global state, its reply messages go through the real strategy, and the new global
effective delta is compared with a dense float64 average of the clients' own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients import client_app
from fedlora.adapters import get_frozen_state, get_state
from fedlora.aggregation import client_weights
from fedlora.build import build
from fedlora.fair import gd_correction, ridge_correction
from fedlora.lora_sb import init_from_gradient, init_random_orthogonal, to_plain_lora
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.lora_fair import LoRAFAIR
from fedlora.settings import Settings
from strategies.server_app import compose, settings
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_CONFIG,
    KEY_EXPERIMENT,
    record_to_state,
    state_to_record,
)

D_OUT, D_IN, R, K = 20, 14, 3, 4
LAYERS = ("l0.query", "l0.value", "l1.query")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def p():
    return client_weights([3, 1, 4, 2], "num_examples")


# --- exactness through the real path: ClientApp replies -> the real strategy -------
class FakeGrid:
    """The nodes a strategy samples from (no SuperLink)."""

    def __init__(self, num_nodes):
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return self.nodes


@pytest.fixture
def client_frozen(monkeypatch):
    """Each client's own frozen factors, read from its model as it replies."""
    seen = []
    real = client_app.get_state

    def get_state(model):
        seen.append(get_frozen_state(model))
        return real(model)

    monkeypatch.setattr(client_app, "get_state", get_state)
    return seen


def experiment(model_dir, strategy, *extra):
    """3 clients of different sizes (Dirichlet), a few local AdamW steps each."""
    return compose(
        [
            f"model.name={model_dir}",
            f"strategy={strategy}",
            "adapter.r=4",
            "federation.num_clients=3",
            "data.num_examples=150",
            "partition.type=dirichlet",
            "partition.alpha=1.0",
            "partition.min_partition_size=10",
            "train.device=cpu",
            "train.lr=1e-3",
            "train.batch_size=16",
            *extra,
        ]
    )


@dataclass
class Round:
    """One federated round: what the server sent and got, and what it made."""

    strategy: Any
    sent: dict[str, np.ndarray]
    replies: list[Any]  # the ClientApp's reply messages
    client_frozen: list[dict[str, np.ndarray]]  # each client's own frozen factors
    new: dict[str, np.ndarray] | None  # the strategy's new global state
    messages: list[Any]  # the strategy's train messages
    server_round: int
    contexts: dict[int, Any]  # each node's Flower context (its state across rounds)


def edit_experiment(nodes, edit):
    """A tamper for :func:`federated_round`: the train message of each node in
    ``nodes`` carries the experiment settings as ``edit(settings dict)`` changed
    them (a node with other local settings)."""

    def tamper(node, msg):
        if node not in nodes:
            return msg
        cfg = json.loads(str(msg.content[KEY_CONFIG][KEY_EXPERIMENT]))
        edit(cfg)
        config = ConfigRecord(
            {**dict(msg.content[KEY_CONFIG]), KEY_EXPERIMENT: json.dumps(cfg)}
        )
        return Message(
            content=RecordDict({**dict(msg.content.items()), KEY_CONFIG: config}),
            message_type=msg.metadata.message_type,
            dst_node_id=node,
        )

    return tamper


def node_context(node: int, num_nodes: int) -> Context:
    """A fresh Flower context of simulated node ``node`` (partition ``node - 1``)."""
    return Context(
        run_id=1,
        node_id=node,
        node_config={"partition-id": node - 1, "num-partitions": num_nodes},
        state=RecordDict(),
        run_config={},
    )


def federated_round(cfg, client_frozen, tamper=None, previous=None):
    """Initialise the real strategy, send its train messages to the real ClientApp
    ``train`` (one node per partition, each with its own Flower context) and
    aggregate the replies with it.

    ``tamper(node, message)`` may replace a node's message (a faulty client);
    ``previous`` (a :class:`Round`) continues that run with its next round."""
    typed = Settings.from_dict(settings(cfg))
    config = ConfigRecord({KEY_EXPERIMENT: json.dumps(typed.to_dict())})
    grid = FakeGrid(typed.federation.num_clients)
    if previous is None:
        model, _ = build(typed)
        strategy = LoRAStrategy.from_settings(typed)
        arrays = strategy.initialize(
            grid, state_to_record(get_state(model)), get_frozen_state(model), config
        )
        server_round, contexts = 1, {}
    else:
        strategy, arrays = previous.strategy, state_to_record(previous.new)
        server_round, contexts = previous.server_round + 1, previous.contexts
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    client_frozen.clear()
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        if tamper is not None:
            msg = tamper(node, msg)
        context = contexts.setdefault(node, node_context(node, len(grid.nodes)))
        reply = client_app.train(msg, context)
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    new, _ = strategy.aggregate_train(server_round, replies)
    return Round(
        strategy,
        record_to_state(arrays),
        replies,
        list(client_frozen),
        None if new is None else record_to_state(new),
        messages,
        server_round,
        contexts,
    )


def as64(state):
    return {k: np.asarray(v, np.float64) for k, v in state.items()}


def layer_names(state):
    suffix = ".lora_B.weight"
    return sorted(k[: -len(suffix)] for k in state if k.endswith(suffix))


def delta(state, layer, s):
    """``s B A``, or ``s B R A`` (LoRA-SB), of one layer of a full float64 state."""
    b, a = state[f"{layer}.lora_B.weight"], state[f"{layer}.lora_A.weight"]
    r = state.get(f"{layer}.lora_R.weight")
    return s * (b @ a if r is None else b @ r @ a)


@dataclass
class Check:
    error: float  # ||sum p_k E_k - E_new|| / ||sum p_k E_k - E_old||, all layers
    head_error: float  # max |head_new - sum p_k head_k| / max |head|
    p: np.ndarray  # p_k = n_k / sum n, from the replies' example counts
    clients: list[dict[str, np.ndarray]]  # each client's full float64 state


def dense_check(rnd, accepted=None):
    """The dense float64 reference over the clients ``accepted`` (indices into
    ``rnd.replies``; default all): their effective deltas ``E_k``, each from the
    client's own frozen factors and its reply, against the new global's."""
    strategy = rnd.strategy
    keep = range(len(rnd.replies)) if accepted is None else accepted
    n = np.array(
        [float(rnd.replies[i].content["metrics"]["num-examples"]) for i in keep]
    )
    p = n / n.sum()
    clients = [
        {
            **as64(rnd.client_frozen[i]),
            **as64(record_to_state(rnd.replies[i].content["arrays"])),
        }
        for i in keep
    ]
    frozen = as64(strategy.frozen)
    new, old = {**frozen, **as64(rnd.new)}, {**frozen, **as64(rnd.sent)}
    num = den = 0.0
    for layer in layer_names(new):
        ideal = sum(
            w * delta(c, layer, strategy.scaling)
            for w, c in zip(p, clients, strict=True)
        )
        num += np.sum((ideal - delta(new, layer, strategy.scaling)) ** 2)
        den += np.sum((ideal - delta(old, layer, strategy.scaling)) ** 2)
    head = [k for k in rnd.new if "lora_" not in k]
    assert head  # the classification head is averaged with the same p_k
    head_error = max(
        np.abs(
            new[key] - sum(w * c[key] for w, c in zip(p, clients, strict=True))
        ).max()
        / np.abs(new[key]).max()
        for key in head
    )
    return Check(float(np.sqrt(num / den)), float(head_error), p, clients)


def trained_factor_scale(rnd, key):
    """Largest |entry| of a trained factor over the replies (e.g. ``lora_B``)."""
    return max(
        float(np.max(np.abs(v)))
        for r in rnd.replies
        for k, v in record_to_state(r.content["arrays"]).items()
        if key in k
    )


@pytest.mark.parametrize("method", ["ffa_lora", "fedsb"])
def test_exact_methods_aggregate_the_average_of_the_clients_deltas(
    method, tiny_bert, task_identity, client_frozen
):
    extra = ["strategy.init=random_orthogonal"] if method == "fedsb" else []
    rnd = federated_round(experiment(tiny_bert, method, *extra), client_frozen)
    assert rnd.strategy.round_log[1]["rejected"] == []
    assert len(rnd.replies) == 3 and rnd.new is not None
    check = dense_check(rnd)
    assert np.ptp(check.p) > 0.05  # clients of different sizes: p_k not uniform
    if method == "ffa_lora":  # B from 0 after a few steps: realistic scale
        assert 1e-4 < trained_factor_scale(rnd, "lora_B") < 1e-1
    else:  # R from 0 (random orthogonal B, A)
        assert 1e-4 < trained_factor_scale(rnd, "lora_R") < 1e-1
    assert check.error < 1e-5  # float32 round-off only
    assert check.head_error < 1e-5
    assert rnd.strategy.round_log[1]["aggregation_error"] < 1e-5


def test_fedavg_lora_is_inexact_by_exactly_the_cross_term(
    tiny_bert, task_identity, client_frozen
):
    rnd = federated_round(experiment(tiny_bert, "fedavg_lora"), client_frozen)
    check = dense_check(rnd)
    p, clients = check.p, check.clients
    assert np.ptp(p) > 0.05  # clients of different sizes: p_k not uniform
    assert 1e-4 < trained_factor_scale(rnd, "lora_B") < 1e-1
    assert check.error > 1e-3  # well above float32 round-off
    reported = rnd.strategy.round_log[1]["aggregation_error"]
    assert reported == pytest.approx(check.error, rel=1e-3)
    new = as64(rnd.new)
    for layer in layer_names(new):
        a_key, b_key = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        bbar, abar = new[b_key], new[a_key]  # what FedAvgLoRA produced
        ideal = sum(w * c[b_key] @ c[a_key] for w, c in zip(p, clients, strict=True))
        cross = sum(
            w * (c[b_key] - bbar) @ (c[a_key] - abar)
            for w, c in zip(p, clients, strict=True)
        )
        gap = ideal - bbar @ abar
        assert np.abs(gap).max() > 0
        np.testing.assert_allclose(gap, cross, rtol=0, atol=1e-2 * np.abs(gap).max())


def fair_problem(rng, k=K):
    bs = [rng.standard_normal((D_OUT, R)) for _ in range(k)]
    as_ = [rng.standard_normal((R, D_IN)) for _ in range(k)]
    return bs, as_


def cos(x, y):
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("solver", ["gd", "ridge"])
def test_lora_fair_cosine_between_plain_average_and_projection_bound(seed, solver, p):
    bs, as_ = fair_problem(np.random.default_rng(seed))
    ideal = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=False))
    abar, bbar = (
        sum(w * a for w, a in zip(p, as_, strict=False)),
        sum(w * b for w, b in zip(p, bs, strict=False)),
    )
    db = (gd_correction if solver == "gd" else ridge_correction)(bs, as_, p, 0.01)
    bound = cos(ideal, ideal @ np.linalg.pinv(abar) @ abar)
    corrected, plain = cos(ideal, (bbar + db) @ abar), cos(ideal, bbar @ abar)
    assert corrected <= bound + 1e-12
    assert corrected >= plain - 1e-12
    assert corrected > plain + 1e-3  # and it does correct something


@pytest.mark.parametrize("solver", ["gd", "ridge"])
def test_lora_fair_larger_lambda_gives_smaller_correction(solver, rng, p):
    bs, as_ = fair_problem(rng)
    solve = gd_correction if solver == "gd" else ridge_correction
    norms = [np.linalg.norm(solve(bs, as_, p, lam)) for lam in (0.001, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def test_ridge_solver_matches_a_dense_numpy_solve(rng, p):
    bs, as_ = fair_problem(rng)
    lam = 0.05
    ideal = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=False))
    abar, bbar = (
        sum(w * a for w, a in zip(p, as_, strict=False)),
        sum(w * b for w, b in zip(p, bs, strict=False)),
    )
    # normal equations of min ||ideal - (Bbar + dB) Abar||^2 + lam ||dB||^2
    lhs = abar @ abar.T + lam * np.eye(R)
    reference = np.linalg.solve(lhs, ((ideal - bbar @ abar) @ abar.T).T).T
    np.testing.assert_allclose(ridge_correction(bs, as_, p, lam), reference, atol=1e-10)


def test_lora_fair_aggregation_corrects_b_and_averages_a(rng, p):
    states = [
        {"x.lora_A.weight": a, "x.lora_B.weight": b, "head": rng.standard_normal(2)}
        for b, a in zip(*fair_problem(rng), strict=False)
    ]
    out = LoRAFAIR(lam=0.01, solver="ridge").aggregate(states, p, states[0])
    avg = FedAvgLoRA().aggregate(states, p, states[0])
    np.testing.assert_allclose(out["x.lora_A.weight"], avg["x.lora_A.weight"])
    np.testing.assert_allclose(out["head"], avg["head"])
    assert not np.allclose(out["x.lora_B.weight"], avg["x.lora_B.weight"])


def test_lora_sb_init_is_the_truncated_sign_update(rng):
    grad = rng.standard_normal((D_OUT, D_IN))
    b, r0, a = init_from_gradient(grad, R, eta=1e-3)
    np.testing.assert_allclose(b.T @ b, np.eye(R), atol=1e-5)  # orthonormal columns
    np.testing.assert_allclose(a @ a.T, np.eye(R), atol=1e-5)  # orthonormal rows
    u, s, vt = np.linalg.svd(-1e-3 * np.sign(grad))
    truncated = u[:, :R] * s[:R] @ vt[:R]
    np.testing.assert_allclose(b @ r0 @ a, truncated, atol=1e-6)
    assert np.all(np.diag(r0) > 0) and np.count_nonzero(r0 - np.diag(np.diag(r0))) == 0


def test_random_orthogonal_init_starts_at_w0(rng):
    b, r0, a = init_random_orthogonal(D_OUT, D_IN, R, rng)
    np.testing.assert_allclose(b.T @ b, np.eye(R), atol=1e-5)
    assert not np.any(r0) and a.shape == (R, D_IN)


def test_plain_lora_export_reproduces_b_r_a(rng):
    frozen = {
        "x.lora_B.weight": rng.standard_normal((D_OUT, R)),
        "x.lora_A.weight": rng.standard_normal((R, D_IN)),
    }
    trained = {"x.lora_R.weight": rng.standard_normal((R, R)), "head": np.ones(2)}
    plain = to_plain_lora(frozen, trained)
    assert set(plain) == {"x.lora_B.weight", "x.lora_A.weight", "head"}
    np.testing.assert_allclose(
        plain["x.lora_B.weight"] @ plain["x.lora_A.weight"],
        frozen["x.lora_B.weight"]
        @ trained["x.lora_R.weight"]
        @ frozen["x.lora_A.weight"],
        rtol=1e-5,
    )
