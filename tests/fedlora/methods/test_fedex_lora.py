"""FedEx-LoRA: the residual folded into the base weights makes the aggregation exact.

References are independent float64 numpy formulas: ``ideal = sum p_k B_k A_k``, the
residual ``s (ideal - Bbar Abar)``, numpy's SVD. The real strategy path (Flower's
sampling, the messages, the reply checks, the fold log) is driven with fake replies
of realistic scale (``B ~ 1e-3``, ``A ~ 1e-1``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.numpy import load_file

from fedlora import results
from fedlora.aggregation import client_weights
from fedlora.errors import ConfigError
from fedlora.export import ExportPlan
from fedlora.methods import from_settings
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.fedex_lora import FedExLoRA, residual_factors
from fedlora.methods.merged_export import MERGED_FILE, truncated_lora
from fedlora.settings import with_
from strategies.server_app import compose
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_BASE,
    KEY_BASE_SYNC,
    KEY_BASE_TO,
    payload_bytes,
    record_to_state,
    state_to_record,
)
from tests.conftest import FEDAVG_LORA, Grid

S = 2.0  # alpha 8, r 4
R = 4
#: (d_out, d_in) of the adapted layers
#: (K - 1) r (d_out + d_in) against d_out d_in, K = 4: l0.* factored, l1 dense
LAYERS = {"l0.query": (48, 40), "l0.value": (48, 40), "l1.query": (12, 20)}
HEAD = "classifier.weight"
FEDEX = "fedlora.methods.fedex_lora.FedExLoRA"


def on_grid(x, step):
    """``x`` rounded to multiples of ``step`` (a power of two): few significant
    bits, so sums with dyadic weights are exact in float32 too."""
    return np.round(np.asarray(x) / step) * step


def global_state(rng, dyadic):
    """The state the server sends first: ``B = 0``, ``A ~ 1e-1``, a head."""
    out = {}
    for layer, (d_out, d_in) in LAYERS.items():
        a = rng.standard_normal((R, d_in)) * 0.1
        out[f"{layer}.lora_A.weight"] = on_grid(a, 2.0**-10) if dyadic else a
        out[f"{layer}.lora_B.weight"] = np.zeros((d_out, R))
    out[HEAD] = rng.standard_normal((2, 16)) * 0.05
    return {k: v.astype(np.float32) for k, v in out.items()}


def client_states(rng, start, k, dyadic):
    """``k`` trained states near ``start``: ``B ~ 1e-3``, ``A`` moved by ~1e-2."""
    out = []
    for _ in range(k):
        state = {}
        for key, value in start.items():
            is_b = ".lora_B." in key
            x = value + rng.standard_normal(value.shape) * (1e-3 if is_b else 1e-2)
            state[key] = on_grid(x, 2.0**-16 if is_b else 2.0**-10) if dyadic else x
        out.append({key: v.astype(np.float32) for key, v in state.items()})
    return out


def play(strategy, grid, server_round, state, replies_for, counts):
    """One round through the real strategy: Flower's sampling and messages (with the
    folds each node lacks), a reply per node from ``replies_for`` (the node's
    partition index -> state) reporting the fold round it was sent, aggregation.
    Returns ``(new global state, the train messages)``."""
    messages = list(
        strategy.configure_train(
            server_round, state_to_record(state), ConfigRecord(), grid
        )
    )
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        metrics = {"num-examples": counts[node - 1], "partition-id": node - 1}
        if KEY_BASE_SYNC in msg.content:  # a method that folds: the node's folds
            metrics["base-round"] = int(msg.content[KEY_BASE_SYNC][KEY_BASE_TO])
        content = RecordDict(
            {
                "arrays": state_to_record(replies_for[node - 1]),
                "metrics": MetricRecord(metrics),
            }
        )
        reply = Message(content=content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node  # Flower's runtime sets it
        replies.append(reply)
    new, _ = strategy.aggregate_train(server_round, replies)
    return record_to_state(new), messages


def fedex_strategy(k, **method_kwargs):
    method = FedExLoRA(scaling=S, **method_kwargs)
    return LoRAStrategy(
        method, scaling=S, min_available_nodes=k, min_train_nodes=k, fraction_train=1.0
    )


def as64(x):
    return np.asarray(x, dtype=np.float64)


def ideal(states, p, layer):
    """``s sum p_k B_k A_k``, float64, from the states as they were sent."""
    return S * sum(
        w * as64(st[f"{layer}.lora_B.weight"]) @ as64(st[f"{layer}.lora_A.weight"])
        for w, st in zip(p, states, strict=True)
    )


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# --- (a) exactness through the real strategy path -----------------------------------
@pytest.mark.parametrize("dyadic,tol", [(True, 1e-12), (False, 1e-6)])
def test_every_party_ends_at_w0_plus_s_ideal_through_the_real_strategy(
    dyadic, tol, task_identity
):
    """After each round, from the returned factors and ``strategy.folds``:
    ``sum of folds + s Bbar Abar = previous folds + s ideal``. With inputs on a
    coarse dyadic grid and dyadic weights every float32 step is exact, so it holds
    to float64 round-off (~1e-16); with generic float32 inputs the wire's float32
    rounding of the means and of the folds' factors leaves ~1e-7."""
    rng = np.random.default_rng(1)
    k = 4
    counts = [1, 1, 2, 4] if dyadic else [30, 10, 45, 15]  # p = 1/8, 1/8, 1/4, 1/2
    p = client_weights(counts, "num_examples")
    strategy, grid = fedex_strategy(k), Grid(range(1, k + 1))
    state, before = global_state(rng, dyadic), {layer: 0.0 for layer in LAYERS}
    for server_round in (1, 2):
        states = client_states(rng, state, k, dyadic)
        state, _ = play(strategy, grid, server_round, state, states, counts)
        assert strategy.round_log[server_round]["rejected"] == []
        folds = strategy.folds.total.matrices()
        for layer in LAYERS:
            b, a = state[f"{layer}.lora_B.weight"], state[f"{layer}.lora_A.weight"]
            after = folds[layer] + S * as64(b) @ as64(a)
            want = before[layer] + ideal(states, p, layer)
            assert rel(after, want) < tol, (server_round, layer, rel(after, want))
        before = folds
        head = sum(w * as64(st[HEAD]) for w, st in zip(p, states, strict=True))
        np.testing.assert_allclose(state[HEAD], head, rtol=1e-6)
    assert strategy.folds.latest == 2


# --- (b) the residual: factored = dense = the reference ----------------------------
def fold_problem(seed, k=4):
    rng = np.random.default_rng(seed)
    p = client_weights(rng.integers(5, 50, size=k).tolist(), "num_examples")
    states = [
        {
            **{
                f"{layer}.lora_B.weight": rng.standard_normal((d_out, R)) * 1e-3
                for layer, (d_out, _) in LAYERS.items()
            },
            **{
                f"{layer}.lora_A.weight": rng.standard_normal((R, d_in)) * 1e-1
                for layer, (_, d_in) in LAYERS.items()
            },
        }
        for _ in range(k)
    ]
    return states, p


def reference_residual(states, p, layer):
    """``s (sum p_k B_k A_k - Bbar Abar)``, densely, float64."""
    b_key, a_key = f"{layer}.lora_B.weight", f"{layer}.lora_A.weight"
    bbar = sum(w * st[b_key] for w, st in zip(p, states, strict=True))
    abar = sum(w * st[a_key] for w, st in zip(p, states, strict=True))
    return ideal(states, p, layer) - S * bbar @ abar


@pytest.mark.parametrize("k", [2, 3, 4])
def test_factored_and_dense_residuals_equal_the_dense_reference(k):
    states, p = fold_problem(k, k)
    dense = FedExLoRA(scaling=S, residual_wire="dense").fold(states, p, {})
    for layer, (d_out, d_in) in LAYERS.items():
        u, v = residual_factors(
            [st[f"{layer}.lora_B.weight"] for st in states],
            [st[f"{layer}.lora_A.weight"] for st in states],
            p,
            S,
        )
        assert u.shape == (d_out, (k - 1) * R) and v.shape == ((k - 1) * R, d_in)
        want = reference_residual(states, p, layer)
        assert np.linalg.norm(want) > 1e-3 * np.linalg.norm(ideal(states, p, layer))
        assert rel(u @ v, want) < 1e-10
        assert rel(dense[layer], want) < 1e-10


def test_the_doc_k_block_form_is_exact_too():
    """``U = [sqrt(p_k)(B_k - Bbar)]_k``, ``V = [sqrt(p_k)(A_k - Abar)]_k`` (one
    block more than ours) gives the same residual."""
    states, p = fold_problem(7)
    u, v = residual_factors(
        [st["l0.query.lora_B.weight"] for st in states],
        [st["l0.query.lora_A.weight"] for st in states],
        p,
        S,
    )
    bs = [st["l0.query.lora_B.weight"] for st in states]
    as_ = [st["l0.query.lora_A.weight"] for st in states]
    bbar = sum(w * b for w, b in zip(p, bs, strict=True))
    abar = sum(w * a for w, a in zip(p, as_, strict=True))
    u_k = np.hstack([np.sqrt(w) * (b - bbar) for w, b in zip(p, bs, strict=True)])
    v_k = np.vstack([np.sqrt(w) * (a - abar) for w, a in zip(p, as_, strict=True)])
    assert rel(u @ v, S * u_k @ v_k) < 1e-12


def test_auto_sends_each_layer_in_its_smaller_form_and_records_both_sizes():
    rng = np.random.default_rng(3)
    k, p = 3, client_weights([10, 20, 30], "num_examples")
    shapes = {"wide": (64, 64, 2), "small": (8, 8, 4)}  # (d_out, d_in, r)
    states = [
        {
            **{
                f"{n}.lora_B.weight": rng.standard_normal((o, r)) * 1e-3
                for n, (o, _, r) in shapes.items()
            },
            **{
                f"{n}.lora_A.weight": rng.standard_normal((r, i)) * 1e-1
                for n, (_, i, r) in shapes.items()
            },
        }
        for _ in range(k)
    ]
    method = FedExLoRA(scaling=S)
    fold = method.fold(states, p, {})
    # wide: (K-1) r (d_out + d_in) = 2 * 2 * 128 = 512 < 64 * 64 = 4096: factored
    # small: 2 * 4 * 16 = 128 > 8 * 8 = 64: dense
    assert isinstance(fold["wide"], tuple) and fold["wide"][0].shape == (64, 4)
    assert isinstance(fold["small"], np.ndarray) and fold["small"].shape == (8, 8)
    assert method.round_record() == {
        "fedex": {
            "residual_params_factored": 512 + 128,
            "residual_params_dense": 4096 + 64,
            "residual_params_sent": 512 + 64,
            "wire": "mixed",
        }
    }
    dense = FedExLoRA(scaling=S, residual_wire="dense")
    assert all(isinstance(v, np.ndarray) for v in dense.fold(states, p, {}).values())
    assert dense.round_record()["fedex"]["wire"] == "dense"
    assert dense.round_record()["fedex"]["residual_params_sent"] == 4096 + 64


def test_one_client_folds_nothing():
    states, _ = fold_problem(0, 1)
    method = FedExLoRA(scaling=S)
    assert method.fold(states, np.ones(1), {}) == {}
    assert method.round_record()["fedex"]["residual_params_sent"] == 0


# --- (c) the diagnostic: FedEx exact, FedAvg-LoRA not, on the same replies ----------
def test_aggregation_error_is_round_off_for_fedex_and_large_for_fedavg(task_identity):
    rng = np.random.default_rng(5)
    k, counts = 4, [30, 10, 45, 15]
    start = global_state(rng, dyadic=False)
    states = client_states(rng, start, k, dyadic=False)
    errors = {}
    for name, strategy in (
        ("fedex", fedex_strategy(k)),
        ("fedavg", LoRAStrategy(FedAvgLoRA(), scaling=S, min_available_nodes=k)),
    ):
        play(strategy, Grid(range(1, k + 1)), 1, start, states, counts)
        errors[name] = strategy.round_log[1]["aggregation_error"]
    assert errors["fedex"] < 1e-7
    assert errors["fedavg"] > 1e-3


# --- what the nodes receive: the folds, and their bytes in bytes_down --------------
def test_the_next_rounds_messages_carry_the_fold_and_bytes_down_counts_it(
    task_identity,
):
    rng = np.random.default_rng(6)
    k, counts = 3, [30, 10, 45]
    strategy, grid = fedex_strategy(k), Grid(range(1, k + 1))
    state = global_state(rng, dyadic=False)
    state, first = play(
        strategy, grid, 1, state, client_states(rng, state, k, False), counts
    )
    sent = strategy.round_log[1]["fedex"]["residual_params_sent"]
    # l0.*: (K-1) r (d_out + d_in) = 2 * 4 * 88 < 48 * 40; l1.query: dense 12 * 20
    assert sent == 2 * (2 * 4 * 88) + 12 * 20
    assert strategy.round_log[1]["fedex"]["wire"] == "mixed"
    assert all(len(m.content[KEY_BASE]) == 0 for m in first)  # nothing folded yet
    state, second = play(
        strategy, grid, 2, state, client_states(rng, state, k, False), counts
    )
    assert strategy.round_log[2]["bytes_down"] == sum(
        payload_bytes(m.content) for m in second
    )
    for m in second:  # the round-1 fold, factored, as float32
        base = record_to_state(m.content[KEY_BASE])
        assert sum(v.size for v in base.values()) == sent
        without = RecordDict(
            {
                key: value
                for key, value in m.content.items()
                if key not in (KEY_BASE, KEY_BASE_SYNC)
            }
        )
        extra = payload_bytes(m.content) - payload_bytes(without)
        assert 4 * sent <= extra <= 4 * sent + 1_000 * (len(base) + 1)  # + headers
    assert (
        strategy.round_log[2]["bytes_down"] - strategy.round_log[1]["bytes_down"]
        >= k * 4 * sent
    )


def test_folds_sent_with_evaluate_messages_count_in_bytes_down(task_identity):
    """With federated evaluation the residual reaches the nodes in the evaluate
    messages (they keep it for training); the next train messages carry none."""
    rng = np.random.default_rng(7)
    k, counts = 3, [30, 10, 45]
    strategy, grid = fedex_strategy(k, residual_wire="dense"), Grid(range(1, k + 1))
    strategy.fraction_evaluate, strategy.min_evaluate_nodes = 1.0, k
    state = global_state(rng, dyadic=False)
    state, _ = play(
        strategy, grid, 1, state, client_states(rng, state, k, False), counts
    )
    sent = strategy.round_log[1]["fedex"]["residual_params_sent"]
    assert sent == sum(o * i for o, i in LAYERS.values())  # dense: d_out d_in
    train_bytes = strategy.round_log[1]["bytes_down"]
    evaluate = list(
        strategy.configure_evaluate(1, state_to_record(state), ConfigRecord(), grid)
    )
    folds = strategy.round_log[1]["bytes_down_folds_eval"]
    # a dense sum travels as float64 (every node holds the server's bits)
    assert 8 * k * sent <= folds <= 8 * k * sent + 1_000 * k * (len(LAYERS) + 1)
    assert strategy.round_log[1]["bytes_down"] == train_bytes + folds
    replies = []
    for msg in evaluate:
        assert sum(v.size for v in record_to_state(msg.content[KEY_BASE]).values()) == (
            sent
        )
        content = RecordDict(
            {"metrics": MetricRecord({"num-examples": 10, "eval_loss": 0.5})}
        )
        reply = Message(content=content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        replies.append(reply)
    strategy.aggregate_evaluate(1, replies)
    _, second = play(
        strategy, grid, 2, state, client_states(rng, state, k, False), counts
    )
    for msg in second:  # the nodes hold round 1's fold already
        assert len(msg.content[KEY_BASE]) == 0
        assert int(msg.content[KEY_BASE_SYNC][KEY_BASE_TO]) == 1


# --- settings, refusals ---------------------------------------------------------------
def test_from_settings_gives_the_method_the_adapters_scale_and_rank(settings):
    s = with_(settings, "strategy", {"_target_": FEDEX}, "adapter.use_rslora", True)
    method = from_settings(s)
    assert method.scaling == pytest.approx(8 / 2.0) == s.adapter.scaling  # 8/sqrt(4)
    assert method.export_plan.rank == 4 == s.adapter.r  # export.rank null: adapter.r
    assert from_settings(with_(s, "export.rank", 7)).export_plan.rank == 7
    with pytest.raises(ConfigError, match=r"strategy\.scaling=3\.0.*derives it"):
        from_settings(with_(s, "strategy.scaling", 3.0))
    # the other methods are built as before
    plain = from_settings(with_(settings, "strategy", {"_target_": FEDAVG_LORA}))
    assert type(plain) is FedAvgLoRA


@pytest.mark.parametrize(
    "override,key",
    [
        ("privacy=central", "privacy"),  # the residual reads every client's update
        ("strategy.residual_wire=sparse", "strategy.residual_wire"),
        ("export.rank=0", "export.rank"),
        ("+strategy.export_rank=3", "strategy.export_rank"),  # moved: export.rank
    ],
)
def test_meaningless_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}="):
        compose(["strategy=fedex_lora", override])


def test_the_yaml_composes_with_its_defaults():
    cfg = compose(["strategy=fedex_lora", "adapter.r=4", "adapter.alpha=8"])
    assert cfg.strategy.residual_wire == "auto" and cfg.export.rank is None
    assert "export_rank" not in cfg.strategy  # one key for every method: export.rank


# --- (g) export ------------------------------------------------------------------
def export_problem(seed):
    """A final global adapter (float32) and summed folds (dense, rank > r)."""
    rng = np.random.default_rng(seed)
    state, base = {HEAD: rng.standard_normal((2, 16)).astype(np.float32)}, {}
    for layer, (d_out, d_in) in LAYERS.items():
        state[f"{layer}.lora_B.weight"] = (
            rng.standard_normal((d_out, R)) * 1e-3
        ).astype(np.float32)
        state[f"{layer}.lora_A.weight"] = (
            rng.standard_normal((R, d_in)) * 1e-1
        ).astype(np.float32)
        base[layer] = rng.standard_normal((d_out, 6)) @ rng.standard_normal((6, d_in))
        base[layer] *= 1e-4
    return state, base


@pytest.mark.parametrize("rank", [R, 2, 13])
def test_export_is_the_truncated_svd_of_the_exact_merged_delta(rank):
    state, base = export_problem(8)
    method = FedExLoRA(scaling=S, export=ExportPlan(rank, R, S))
    files = method.export_files(state, {}, base)
    merged = files[MERGED_FILE]
    assert set(merged) == {f"{layer}.weight" for layer in LAYERS}
    exported = method.export(state, {}, base)
    assert method.export_overrides() == {"r": rank, "alpha": rank, "use_rslora": False}
    np.testing.assert_array_equal(exported[HEAD], state[HEAD])  # the head as it is
    tail = total = 0.0
    for layer in LAYERS:
        b, a = state[f"{layer}.lora_B.weight"], state[f"{layer}.lora_A.weight"]
        exact = base[layer] + S * as64(b) @ as64(a)  # W0-delta + s Bbar Abar
        assert merged[f"{layer}.weight"].dtype == np.float32
        assert rel(as64(merged[f"{layer}.weight"]), exact) < 1e-6
        u, sv, vt = np.linalg.svd(exact, full_matrices=False)
        best = (u[:, :rank] * sv[:rank]) @ vt[:rank]  # Eckart-Young
        e_b = exported[f"{layer}.lora_B.weight"]
        e_a = exported[f"{layer}.lora_A.weight"]
        assert e_b.shape == (exact.shape[0], rank) and e_a.shape == (
            rank,
            exact.shape[1],
        )
        assert rel(as64(e_b) @ as64(e_a), best) < 1e-5  # at export scale 1
        tail += np.sum(sv[rank:] ** 2)
        total += np.sum(sv**2)
    record = method.summary_notes()
    assert record["export_rank"] == rank
    if rank < 10:  # the merged delta has rank 6 + 4: its tail is dropped
        assert 1e-3 < record["export_truncation_error"] < 1
        assert record["export_truncation_error"] == pytest.approx(
            np.sqrt(tail / total), rel=1e-9
        )
    else:  # the whole delta fits
        assert record["export_truncation_error"] < 1e-7


def test_truncated_lora_pads_a_rank_above_the_matrix_rank():
    delta = np.random.default_rng(9).standard_normal((5, 3))
    b, a, tail, total = truncated_lora(delta, 4)
    assert (
        b.shape == (5, 4) and a.shape == (4, 3) and tail == pytest.approx(0, abs=1e-20)
    )
    np.testing.assert_allclose(b @ a, delta, atol=1e-12)
    assert total == pytest.approx(np.sum(delta**2))


def test_export_files_are_saved_beside_the_adapter_under_plain_names(tmp_path):
    state, base = export_problem(10)
    method = FedExLoRA(scaling=S, export=ExportPlan(R, R, S))
    files = method.export_files(state, {}, base)
    results.save_tensor_files(tmp_path, files)
    saved = load_file(str(tmp_path / MERGED_FILE))
    assert saved.keys() == files[MERGED_FILE].keys()
    assert all(np.array_equal(saved[k], v) for k, v in files[MERGED_FILE].items())
    with pytest.raises(ValueError, match="plain file name"):
        results.save_tensor_files(tmp_path, {"../escape.safetensors": {}})
    assert FedAvgLoRA().export_files(state, {}) == {}  # the default: none
