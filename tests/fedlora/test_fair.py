"""LoRA-FAIR's ``gd`` solver on LoRA-scale factors (float64, dense references).

The problems are one layer of a realistic round: an old global adapter ``(B_old,
A_old)`` with Kaiming-uniform ``A`` (entries ~0.09 for d_in = 384) and ``B`` entries
from 1e-4 to 1e-2 (zero in round 1, as PEFT initialises it), and K = 3 clients that
moved both factors from it. The ``N(0, 1)`` problems of test_methods.py cannot show
scale bugs: there an absolute ``lambda`` and a fixed step size happen to fit.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedlora import fair
from fedlora.aggregation import client_weights
from fedlora.fair import gd_correction, ridge_correction
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.methods.lora_fair import LoRAFAIR
from strategies.strategy import LoRAStrategy
from strategies.wire import record_to_state, state_to_record

D_OUT, D_IN, R, K = 384, 384, 8, 3
LAM = 0.01
SEEDS = range(6)


def lora_problem(seed, d_out=D_OUT, d_in=D_IN, r=R, k=K):
    """``(bs, as_, p, b_old, a_old)``: seeds 0-2 are a round 1 (``B_old = 0``),
    3-5 a later round; the clients' drift of ``A`` is 1%, 10% or 50% of its
    entries' size (seed % 3)."""
    rng = np.random.default_rng(seed)
    drift = (0.01, 0.1, 0.5)[seed % 3]
    bound = np.sqrt(3.0 / d_in)  # Kaiming-uniform's bound with a = sqrt(5) x sqrt(3)
    a_old = rng.uniform(-bound, bound, (r, d_in))
    b_old = np.zeros((d_out, r)) if seed < 3 else rng.standard_normal((d_out, r)) * 1e-3

    def b_step():  # entries of scale 1e-4 .. 1e-2 (log-uniform)
        return rng.standard_normal((d_out, r)) * 10 ** rng.uniform(-4, -2, (d_out, r))

    bs = [b_old + b_step() for _ in range(k)]
    as_ = [a_old + rng.standard_normal((r, d_in)) * bound * drift for _ in range(k)]
    p = client_weights(rng.integers(50, 500, k), "num_examples")
    return bs, as_, p, b_old, a_old


def dense(bs, as_, p):
    """``(ideal, Abar, Bbar)`` as dense float64 arrays."""
    ideal = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=True))
    abar = sum(w * a for w, a in zip(p, as_, strict=True))
    bbar = sum(w * b for w, b in zip(p, bs, strict=True))
    return ideal, abar, bbar


def cos(x, y):
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def scale_free_objective(db, ideal, abar, bbar, lam=LAM):
    """``J = 1 - cos(ideal, M Abar) + lam sin^2(M, Bbar)``, ``M = Bbar + dB``: the
    paper's objective with ``lam`` relative to ``||Bbar||^2``, minimised over the
    scale of ``M`` (which the cosine ignores); ``J(0) = 1 - cos(ideal, Bbar Abar)``.
    """
    m = bbar + db
    return 1 - cos(ideal, m @ abar) + lam * (1 - max(cos(m, bbar), 0.0) ** 2)


def aggregation_error(db, ideal, abar, bbar, b_old, a_old):
    """``||ideal - (Bbar + dB) Abar|| / ||ideal - B_old A_old||`` (dense)."""
    new = (bbar + db) @ abar
    return np.linalg.norm(ideal - new) / np.linalg.norm(ideal - b_old @ a_old)


@pytest.mark.parametrize("seed", SEEDS)
def test_gd_improves_the_objective_on_plain_averaging(seed):
    """(a) The scale-free objective at the solver's dB is below its value at dB = 0
    (the old Adam solver returned dB = 0 on the small-drift seeds, and on others a
    dB several times Bbar that raised J)."""
    bs, as_, p, _, _ = lora_problem(seed)
    ideal, abar, bbar = dense(bs, as_, p)
    db = gd_correction(bs, as_, p, LAM)
    j0 = scale_free_objective(np.zeros_like(db), ideal, abar, bbar)
    j1 = scale_free_objective(db, ideal, abar, bbar)
    assert j1 < j0 * (1 - 1e-3)
    # not above the best the cosine can reach with Abar fixed (the projection)
    bound = cos(ideal, ideal @ np.linalg.pinv(abar) @ abar)
    assert cos(ideal, (bbar + db) @ abar) <= bound + 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_gd_aggregation_error_is_never_above_fedavg_lora(seed):
    """(b) ``||ideal - (Bbar + dB) Abar||`` relative to the old global product, against
    FedAvg-LoRA's (dB = 0). The least-squares scale makes it ``||ideal|| sin theta``
    with ``cos theta`` at least FedAvg's, so it can only be lower; and the product is
    no larger than ``ideal`` (no inflation)."""
    bs, as_, p, b_old, a_old = lora_problem(seed)
    ideal, abar, bbar = dense(bs, as_, p)
    db = gd_correction(bs, as_, p, LAM)
    fedavg = aggregation_error(0 * db, ideal, abar, bbar, b_old, a_old)
    corrected = aggregation_error(db, ideal, abar, bbar, b_old, a_old)
    assert corrected <= fedavg * (1 + 1e-9)
    assert np.linalg.norm((bbar + db) @ abar) <= np.linalg.norm(ideal) * (1 + 1e-12)
    assert np.linalg.norm(db) <= 0.5 * np.linalg.norm(bbar)


def reference_solution(bs, as_, p, lam):
    """An independent solve of the same objective: SciPy's L-BFGS on the paper's
    objective with ``lam`` relative to ``||Bbar||^2``,
    ``f(dB) = 1 - cos(ideal, (Bbar + dB) Abar) + lam ||dB||^2 / ||Bbar||^2``, over
    all ``d_out r`` entries of ``dB``, with the dense ``ideal`` (no factored
    formulas, no subspace, no scale elimination). ``dB`` is optimised in units of
    ``||Bbar||``, a plain change of variables.

    The cosine is blind to the scale of ``M = Bbar + dB``, so ``f``'s minimiser
    takes its scale from the penalty (the projection of ``Bbar`` on ``M``'s ray),
    weakly determined when ``lam`` is small; the solver instead fits the scale by
    least squares. Only the direction of ``M`` is therefore compared: the
    reference's ``M`` is rescaled the same way, ``M <- t M`` with ``t = <ideal, M
    Abar> / ||M Abar||^2`` (the ``t`` minimising ``||ideal - t M Abar||_F``), and
    ``dB = t M - Bbar`` is compared entry by entry.
    """
    scipy_optimize = pytest.importorskip("scipy.optimize")
    ideal, abar, bbar = dense(bs, as_, p)
    nb, ni = np.linalg.norm(bbar), np.linalg.norm(ideal)

    def f(z):
        db = z.reshape(bbar.shape) * nb
        x = (bbar + db) @ abar
        nx, dot = np.linalg.norm(x), np.sum(ideal * x)
        value = 1 - dot / (ni * nx) + lam * np.sum(db * db) / nb**2
        grad_x = -ideal / (ni * nx) + dot * x / (ni * nx**3)
        grad = (grad_x @ abar.T + 2 * lam * db / nb**2) * nb
        return value, grad.ravel()

    res = scipy_optimize.minimize(
        f,
        np.zeros(bbar.size),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20000, "gtol": 1e-14, "ftol": 1e-16, "maxcor": 30},
    )
    m = bbar + res.x.reshape(bbar.shape) * nb
    x = m @ abar
    return np.sum(ideal * x) / np.sum(x * x) * m - bbar


@pytest.mark.parametrize("lam", [LAM, 1.0])
@pytest.mark.parametrize("seed", [0, 2, 4])
def test_gd_matches_an_independent_lbfgs_solve(seed, lam):
    """(c) dB itself agrees with SciPy's L-BFGS on the dense objective (the scale
    pinned by least squares in both; see :func:`reference_solution`). ``lam = 1``
    makes the penalty matter: there dB is far from the unpenalised projection."""
    bs, as_, p, _, _ = lora_problem(seed)
    db = gd_correction(bs, as_, p, lam)
    ref = reference_solution(bs, as_, p, lam)
    assert np.linalg.norm(db - ref) <= 1e-5 * np.linalg.norm(ref)
    if lam == 1.0:  # the comparison does see the penalty
        projection = ridge_correction(bs, as_, p, 0.0)
        assert np.linalg.norm(db - projection) > 1e-2 * np.linalg.norm(ref)


def test_gd_with_lambda_zero_is_the_exact_projection():
    """Without the penalty the cosine's optimum in Abar's row space, scaled by least
    squares, is the projection ``ideal Abar^T (Abar Abar^T)^-1``: ridge at 0."""
    bs, as_, p, _, _ = lora_problem(4)
    np.testing.assert_allclose(
        gd_correction(bs, as_, p, 0.0),
        ridge_correction(bs, as_, p, 0.0),
        rtol=0,
        atol=1e-7 * np.abs(ridge_correction(bs, as_, p, 0.0)).max(),
    )


def test_gd_is_scale_invariant():
    """Rescaling every B_k by s rescales dB by s; rescaling every A_k leaves dB as it
    is (the old solver's fixed lr and absolute lambda did neither)."""
    bs, as_, p, _, _ = lora_problem(5)
    db = gd_correction(bs, as_, p, LAM)
    for s_b, s_a in ((100.0, 1.0), (1.0, 10.0), (0.01, 0.1)):
        scaled = gd_correction([s_b * b for b in bs], [s_a * a for a in as_], p, LAM)
        np.testing.assert_allclose(
            scaled / s_b, db, rtol=0, atol=1e-6 * np.abs(db).max()
        )


def test_larger_lambda_turns_the_correction_towards_bbar():
    """The penalty weighs the angle between ``Bbar + dB`` and ``Bbar``: it shrinks as
    lambda grows; for a huge lambda only the least-squares rescale of ``Bbar`` is
    left."""
    bs, as_, p, _, _ = lora_problem(5)
    ideal, abar, bbar = dense(bs, as_, p)
    sines = []
    for lam in (0.001, 0.1, 10.0, 1e6):
        m = bbar + gd_correction(bs, as_, p, lam)
        sines.append(np.sqrt(max(1 - cos(m, bbar) ** 2, 0.0)))
    assert sines[0] > sines[1] > sines[2] > sines[3]
    assert sines[3] < 1e-4
    x = bbar @ abar
    t = np.sum(ideal * x) / np.sum(x * x)
    m = bbar + gd_correction(bs, as_, p, 1e6)
    np.testing.assert_allclose(m, t * bbar, rtol=0, atol=1e-4 * np.abs(bbar).max())


@pytest.mark.parametrize("seed", SEEDS)
def test_gd_reports_what_it_did(seed):
    """The solver's record matches the dense objective and says it converged."""
    bs, as_, p, _, _ = lora_problem(seed)
    ideal, abar, bbar = dense(bs, as_, p)
    db, info = fair.gd_solve(bs, as_, p, LAM)
    assert info["converged"] and 0 < info["iterations"] < 100
    assert info["grad_norm"] <= fair.GRAD_TOL
    j0 = scale_free_objective(np.zeros_like(db), ideal, abar, bbar)
    j1 = scale_free_objective(db, ideal, abar, bbar)
    np.testing.assert_allclose(
        [info["objective_start"], info["objective_end"]], [j0, j1], rtol=1e-6
    )
    np.testing.assert_allclose(
        info["db_ratio"], np.linalg.norm(db) / np.linalg.norm(bbar), rtol=1e-9
    )
    json.dumps(info)  # plain Python values, for metrics.jsonl


def test_step_limit_is_reported_and_still_no_worse_than_fedavg():
    """Stopped early, the solver says so, and what it returns still does not raise
    the objective or the aggregation error above plain averaging."""
    bs, as_, p, b_old, a_old = lora_problem(3)
    ideal, abar, bbar = dense(bs, as_, p)
    db, info = fair.gd_solve(bs, as_, p, 1.0, max_iter=1)
    assert not info["converged"] and info["iterations"] == 1
    assert info["grad_norm"] > fair.GRAD_TOL
    assert info["objective_end"] <= info["objective_start"]
    assert aggregation_error(db, ideal, abar, bbar, b_old, a_old) <= aggregation_error(
        0 * db, ideal, abar, bbar, b_old, a_old
    )


# --- through the strategy, with real Flower messages ------------------------------
LAYERS = ("enc.0.query", "enc.0.value")


def round_states(seed):
    """The global state sent and K clients' float32 replies, two LoRA layers and a
    head, each layer a :func:`lora_problem`."""
    sent, clients = {}, [{} for _ in range(K)]
    for i, layer in enumerate(LAYERS):
        bs, as_, _, b_old, a_old = lora_problem(seed + i, d_out=64, d_in=96)
        sent[f"{layer}.lora_A.weight"], sent[f"{layer}.lora_B.weight"] = a_old, b_old
        for c, b, a in zip(clients, bs, as_, strict=True):
            c[f"{layer}.lora_A.weight"], c[f"{layer}.lora_B.weight"] = a, b
    rng = np.random.default_rng(seed)
    sent["head.weight"] = rng.standard_normal((2, 96))
    for c in clients:
        c["head.weight"] = sent["head.weight"] + 0.01 * rng.standard_normal((2, 96))
    as32 = [{k: v.astype(np.float32) for k, v in s.items()} for s in (sent, *clients)]
    return as32[0], as32[1:]


def strategy(method):
    """The Flower strategy around ``method``, for fake nodes."""
    return LoRAStrategy(method, min_available_nodes=1)


def exchange(strategy, sent, clients, num_examples):
    """Flower train messages to ``len(clients)`` fake nodes and their replies."""
    arrays = state_to_record(sent)
    strategy.begin_round(1, record_to_state(arrays))  # as configure_train does
    replies = []
    for node, (state, n) in enumerate(zip(clients, num_examples, strict=True), 1):
        msg = Message(
            content=RecordDict({"arrays": arrays}),
            dst_node_id=node,
            message_type="train",
        )
        reply = Message(
            content=RecordDict(
                {
                    "arrays": state_to_record(state),
                    "metrics": MetricRecord(
                        {"num-examples": n, "partition-id": node, "train_loss": 0.5}
                    ),
                }
            ),
            reply_to=msg,
        )
        reply.metadata.__dict__["_src_node_id"] = node
        replies.append(reply)
    return replies


def run_round(strategy, sent, clients, num_examples=(120, 40, 300)):
    arrays, _ = strategy.aggregate_train(
        1, exchange(strategy, sent, clients, num_examples)
    )
    assert isinstance(arrays, ArrayRecord)
    return record_to_state(arrays), strategy.round_log[1]


@pytest.mark.usefixtures("task_identity")
def test_strategy_records_the_solver_and_beats_fedavg_through_messages():
    """(d) LoRAFAIR.aggregate_train on real Flower messages: the round log carries
    the solver's record (converged on every layer, objective lowered, dB small), the
    aggregation error is not above FedAvg-LoRA's on the same replies, and B is
    Bbar + dB with A the average."""
    sent, clients = round_states(0)
    new, entry = run_round(strategy(LoRAFAIR()), sent, clients)
    _, plain = run_round(strategy(FedAvgLoRA()), sent, clients)

    record = entry["lora_fair"]
    assert record["solver"] == "gd" and record["layers"] == len(LAYERS)
    assert record["unconverged"] == 0 and record["unconverged_layers"] == []
    assert 0 < record["iterations_max"] < 100
    assert record["objective_end"] < record["objective_start"]
    assert record["objective_worse"] == 0
    assert 0 < record["db_ratio"] <= record["db_ratio_max"] < 0.5
    assert record["cos_end"] >= record["cos_start"]
    json.dumps(entry)  # the ServerApp writes it to metrics.jsonl
    assert entry["aggregation_error"] <= plain["aggregation_error"] * (1 + 1e-6)

    p = client_weights([120, 40, 300], "num_examples")
    avg = FedAvgLoRA().aggregate(clients, p, clients[0])
    for layer in LAYERS:
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        np.testing.assert_allclose(new[a], avg[a], rtol=1e-6)
        db = gd_correction([c[b] for c in clients], [c[a] for c in clients], p, LAM)
        np.testing.assert_allclose(
            new[b], avg[b] + db, rtol=0, atol=1e-5 * np.abs(avg[b]).max()
        )


@pytest.mark.usefixtures("task_identity")
def test_strategy_logs_and_records_a_round_that_hits_the_step_limit(caplog):
    """A round whose solver stops at ``max_iter`` is not silent: a warning names
    the layers and the round log counts them."""
    sent, clients = round_states(3)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        _, entry = run_round(strategy(LoRAFAIR(lam=1.0, max_iter=1)), sent, clients)
    record = entry["lora_fair"]
    assert record["unconverged"] == len(LAYERS)
    assert record["unconverged_layers"] == list(LAYERS)
    assert record["iterations_max"] == 1
    assert record["objective_end"] <= record["objective_start"]
    assert any("hit its step limit" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("task_identity")
def test_ridge_solver_is_recorded_too():
    sent, clients = round_states(0)
    _, entry = run_round(strategy(LoRAFAIR(solver="ridge")), sent, clients)
    record = entry["lora_fair"]
    assert record["solver"] == "ridge" and record["unconverged"] == 0
    assert record["objective_end"] <= record["objective_start"]
