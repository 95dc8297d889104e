"""``export.rank``: every method exports a PEFT adapter of a chosen rank.

References are dense float64 numpy: the delta ``s B A`` formed from the (float32)
factors and numpy's SVD (Eckart-Young: the best rank-``k`` approximation, and the
relative error ``sqrt(sum of the dropped s_i^2 / sum of all s_i^2)``). Factors are
at LoRA scale (``B ~ 1e-3``, ``A ~ 1e-1``) and stored in float32, as on the wire.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedlora.adapters import get_frozen_state, get_state, set_state
from fedlora.build import build
from fedlora.errors import ConfigError
from fedlora.export import ExportPlan, truncate_adapter
from fedlora.lora_sb import keys as sb_keys
from fedlora.methods import from_settings
from fedlora.methods.fedavg_lora import FedAvgLoRA
from fedlora.models import load_base_model
from fedlora.ranks import RANK_KEY
from fedlora.results import save_adapter
from fedlora.settings import Settings, with_
from strategies.server_app import RESUMABLE, compose
from tests.conftest import (
    FEDAVG_LORA,
    FEDSB,
    FFA_LORA,
    LORA_FAIR,
    assert_same_logits,
)

#: (d_out, d_in) of the adapted layers
LAYERS = {"l0.query": (48, 40), "l0.value": (40, 48), "l1.query": (12, 20)}
HEAD = "classifier.weight"
R, ALPHA = 4, 8.0  # s = 2 (rsLoRA: 4)
HETLORA = "fedlora.methods.hetlora.HetLoRA"
FLEXLORA = "fedlora.methods.flexlora.FlexLoRA"
FLORA = "fedlora.methods.flora.FLoRA"
FEDSA = "fedlora.methods.fedsa_lora.FedSALoRA"
ROLORA = "fedlora.methods.rolora.RoLoRA"


def as64(x):
    return np.asarray(x, dtype=np.float64)


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def lora_state(rng, rank=R, layers=LAYERS, used=None):
    """A global adapter at LoRA scale, float32; only the first ``used`` columns
    of ``B`` and rows of ``A`` non-zero (as zero-padding leaves them)."""
    used = rank if used is None else used
    out = {HEAD: rng.standard_normal((2, 16)).astype(np.float32)}
    for layer, (d_out, d_in) in layers.items():
        b = np.zeros((d_out, rank))
        a = np.zeros((rank, d_in))
        b[:, :used] = rng.standard_normal((d_out, used)) * 1e-3
        a[:used] = rng.standard_normal((used, d_in)) * 1e-1
        out[f"{layer}.lora_B.weight"] = b.astype(np.float32)
        out[f"{layer}.lora_A.weight"] = a.astype(np.float32)
    return out


def reference(state, scaling, k):
    """Per layer the dense delta ``s B A``, its best rank-``k`` approximation, and
    the relative truncation errors (all layers, largest layer), numpy's SVD."""
    best, tail, total, worst = {}, 0.0, 0.0, 0.0
    for layer in LAYERS:
        b = as64(state[f"{layer}.lora_B.weight"])
        a = as64(state[f"{layer}.lora_A.weight"])
        delta = scaling * b @ a
        u, sv, vt = np.linalg.svd(delta, full_matrices=False)
        best[layer] = (delta, (u[:, :k] * sv[:k]) @ vt[:k])
        tail, total = tail + np.sum(sv[k:] ** 2), total + np.sum(sv**2)
        worst = max(worst, np.sqrt(np.sum(sv[k:] ** 2) / np.sum(sv**2)))
    return best, np.sqrt(tail / total), worst


def method_at(settings, target, rank, *changes):
    """The method ``target`` built as the server builds it, ``export.rank=rank``."""
    s = with_(
        settings,
        "strategy",
        {"_target_": target},
        "adapter.r",
        R,
        "adapter.alpha",
        ALPHA,
        "export.rank",
        rank,
        *changes,
    )
    return from_settings(s), s


def check_truncated(exported, state, scaling, k, record):
    """``exported`` is the rank-``k`` truncation of ``state``'s deltas at scale 1
    (to float32 storage) and ``record`` its numpy-reference errors."""
    best, error, worst = reference(state, scaling, k)
    assert exported.keys() == state.keys()
    np.testing.assert_array_equal(exported[HEAD], state[HEAD])  # the head as it is
    for layer, (d_out, d_in) in LAYERS.items():
        b = exported[f"{layer}.lora_B.weight"]
        a = exported[f"{layer}.lora_A.weight"]
        assert b.shape == (d_out, k) and a.shape == (k, d_in)
        assert b.dtype == a.dtype == np.float32
        assert rel(as64(b) @ as64(a), best[layer][1]) < 1e-6  # Eckart-Young
    assert record["export_rank"] == k
    assert record["export_truncation_error"] == pytest.approx(
        error, rel=1e-9, abs=1e-12
    )
    assert record["export_truncation_error_max_layer"] == pytest.approx(
        worst, rel=1e-9, abs=1e-12
    )


# --- the factored truncation against numpy's dense SVD ----------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_truncation_from_the_factors_is_the_dense_svds_best_approximation(k):
    state = lora_state(np.random.default_rng(k))
    exported, record = truncate_adapter(state, 2.0, k)
    check_truncated(exported, state, 2.0, k, record)
    assert 1e-3 < record["export_truncation_error"] < 1  # something was dropped


def test_a_rank_above_the_deltas_pads_with_zeros_and_is_exact():
    state = lora_state(np.random.default_rng(5))
    exported, record = truncate_adapter(state, 2.0, R + 2)
    best, _, _ = reference(state, 2.0, R + 2)
    for layer in LAYERS:
        b = exported[f"{layer}.lora_B.weight"]
        a = exported[f"{layer}.lora_A.weight"]
        assert not b[:, R:].any() and not a[R:].any()
        assert rel(as64(b) @ as64(a), best[layer][0]) < 1e-6
    assert record["export_truncation_error"] == 0
    assert record["export_truncation_error_max_layer"] == 0


# --- every method whose delta is s B A ----------------------------------------------
@pytest.mark.parametrize(
    "target", [FEDAVG_LORA, HETLORA, FLEXLORA, FFA_LORA, LORA_FAIR, ROLORA]
)
@pytest.mark.parametrize("rslora", [False, True])
def test_each_method_exports_the_truncated_svd_of_its_delta(settings, target, rslora):
    method, s = method_at(settings, target, 2, "adapter.use_rslora", rslora)
    scaling = s.adapter.scaling
    assert scaling == (ALPHA / 2 if rslora else ALPHA / R)
    state = lora_state(np.random.default_rng(11))
    # FFA-LoRA's A is frozen: it reaches the export through ``frozen``
    frozen = {k: v for k, v in state.items() if ".lora_A." in k}
    trained = {k: v for k, v in state.items() if k not in frozen}
    exported = method.export(trained, frozen)
    check_truncated(exported, state, scaling, 2, method.summary_notes())
    # the exported adapter's settings: rank 2 at scale 1, B' A' is the delta
    assert method.export_overrides() == {"r": 2, "alpha": 2.0, "use_rslora": False}


@pytest.mark.parametrize("target", [FEDAVG_LORA, HETLORA, FLEXLORA, FFA_LORA])
def test_at_the_trained_rank_the_export_is_the_adapter_as_trained(settings, target):
    method, _ = method_at(settings, target, R)
    state = lora_state(np.random.default_rng(12))
    exported = method.export(state, {})
    assert exported.keys() == state.keys()
    for key, value in state.items():  # bit-identical, as before export.rank
        assert exported[key].dtype == value.dtype
        np.testing.assert_array_equal(exported[key], value)
    assert method.export_overrides() == {}  # the training adapter's r and alpha
    assert method.summary_notes() == {
        "export_rank": R,
        "export_truncation_error": 0.0,
        "export_truncation_error_max_layer": 0.0,
    }
    # null: the default, here adapter.r (no client ranks); as trained too
    default, _ = method_at(settings, target, None)
    assert default.export_plan.rank == R and default.export_overrides() == {}


def test_fedsb_exports_the_truncated_svd_of_s_b_r_a(settings):
    method, s = method_at(settings, FEDSB, 2, "strategy.init", "random_orthogonal")
    rng = np.random.default_rng(13)
    trained, frozen, plain = {HEAD: rng.standard_normal((2, 16)).astype("f4")}, {}, {}
    for layer, (d_out, d_in) in LAYERS.items():
        b_key, r_key, a_key = sb_keys(layer)
        frozen[b_key] = rng.standard_normal((d_out, R)).astype("f4") * 0.1
        frozen[a_key] = rng.standard_normal((R, d_in)).astype("f4") * 0.1
        trained[r_key] = (rng.standard_normal((R, R)) * 1e-3).astype("f4")
        plain[b_key] = (as64(frozen[b_key]) @ trained[r_key]).astype("f4")  # B R
        plain[a_key] = frozen[a_key]
    exported = method.export(trained, frozen)
    record = method.summary_notes()
    check_truncated(
        exported, {**plain, HEAD: trained[HEAD]}, s.adapter.scaling, 2, record
    )
    assert record["export_rank"] == 2 and 0 < record["export_truncation_error"] < 1


# --- a rank per client ------------------------------------------------------------
def padded_round(method, ranks, rng):
    """One FedAvg-LoRA round of clients at ``ranks``: replies at LoRA scale,
    padded back to the global rank by the method and averaged."""
    replies = []
    for r in ranks:
        reply = lora_state(rng, rank=r)
        replies.append(method.from_client(reply, {RANK_KEY: r}))
    weights = method.weights([10.0] * len(ranks))
    return method.aggregate(replies, weights, replies[0])


def client_rank_settings(settings, ranks, r, rank=None):
    return with_(
        settings,
        "strategy",
        {"_target_": FEDAVG_LORA},
        "adapter.r",
        r,
        "adapter.alpha",
        2.0 * r,
        "adapter.client_ranks",
        ranks,
        "federation.num_clients",
        len(ranks),
        "export.rank",
        rank,
    )


def test_the_default_export_rank_is_the_largest_client_rank(settings):
    s = client_rank_settings(settings, [2, 4], 8)
    assert from_settings(s).export_plan.rank == 4
    assert from_settings(with_(s, "adapter.client_ranks", None)).export_plan.rank == 8
    for target in (HETLORA, FLEXLORA):
        assert (
            from_settings(with_(s, "strategy._target_", target)).export_plan.rank == 4
        )
    # FLoRA keeps the global rank: its merged delta gathers every client's rank
    assert from_settings(with_(s, "strategy._target_", FLORA)).export_plan.rank == 8
    # settings written before the export section existed: the same default
    old = Settings.from_dict({k: v for k, v in s.to_dict().items() if k != "export"})
    assert old.export is None and from_settings(old).export_plan.rank == 4


def test_client_ranks_2_4_8_export_exactly_at_8_and_truncated_at_2(settings):
    s = client_rank_settings(settings, [2, 4, 8], 8)
    method = from_settings(s)
    assert method.export_plan.rank == 8  # the default: the largest client rank
    glob = padded_round(method, [2, 4, 8], np.random.default_rng(21))
    exported = method.export(glob, {})
    assert all(np.array_equal(exported[k], v) for k, v in glob.items())
    assert method.summary_notes()["export_truncation_error"] == 0.0
    assert method.export_overrides() == {}

    at_2 = from_settings(with_(s, "export.rank", 2))
    exported = at_2.export(glob, {})
    record = at_2.summary_notes()
    check_truncated(exported, glob, s.adapter.scaling, 2, record)
    assert 1e-2 < record["export_truncation_error"] < 1


def test_padded_ranks_below_the_global_rank_export_exactly_at_the_largest(settings):
    """Ranks [2, 4] in a rank-8 global adapter: its delta has rank 4, so the
    default (rank 4) export goes through the truncation and drops nothing."""
    s = client_rank_settings(settings, [2, 4], 8)
    method = from_settings(s)
    glob = padded_round(method, [2, 4], np.random.default_rng(22))
    exported = method.export(glob, {})
    record = method.summary_notes()
    check_truncated(exported, glob, s.adapter.scaling, 4, record)
    assert record["export_truncation_error"] < 1e-7
    assert method.export_overrides() == {"r": 4, "alpha": 4.0, "use_rslora": False}


# --- the exported adapter loads with PEFT -----------------------------------------
@pytest.mark.parametrize("rank", [2, 1])
def test_the_exported_adapter_loads_in_peft(settings, tmp_path, rank):
    """Ranks [1, 2] in a rank-4 adapter: exported at rank 2 (the default) the
    loaded model gives the trained model's logits; at rank 1 its deltas are the
    numpy reference's best rank-1 approximations."""
    from peft import PeftModel

    s = client_rank_settings(settings, [1, 2], 4, None if rank == 2 else rank)
    method = from_settings(s)
    assert method.export_plan.rank == rank
    model, tok = build(s)
    rng = np.random.default_rng(30)
    state = get_state(model)
    for key, value in state.items():
        value = (0.1 * rng.standard_normal(value.shape)).astype(np.float32)
        if ".lora_B." in key:
            value[:, 2:] = 0  # clients of ranks 1 and 2 fill two columns at most
        if ".lora_A." in key:
            value[2:] = 0
        state[key] = value
    set_state(model, state)
    exported = method.export(state, get_frozen_state(model))
    # as the server saves it (strategies/server_app.py, step 5)
    overrides = method.export_overrides()
    plain = with_(s, *(x for k, v in overrides.items() for x in (f"adapter.{k}", v)))
    save_adapter(build(plain, plain=True)[0], exported, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        load_base_model(s.model, seed=99), str(tmp_path / "adapter")
    )
    assert loaded.peft_config["default"].r == rank
    lora = {
        name: module
        for name, module in loaded.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert lora
    for name, module in lora.items():
        assert module.scaling["default"] == 1.0
        layer = name.removeprefix("base_model.model.")  # PEFT's wrapper prefix
        [a_key] = [k for k in state if k.endswith(f"{layer}.lora_A.weight")]
        b = as64(state[a_key.replace(".lora_A.", ".lora_B.")])
        delta = s.adapter.scaling * b @ as64(state[a_key])
        u, sv, vt = np.linalg.svd(delta, full_matrices=False)
        best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
        got = module.get_delta_weight("default").detach().double().numpy()
        assert rel(got, best) < 1e-6
    if rank == 2:  # exact: the same model
        assert_same_logits(model, loaded, s, tok)


# --- refusals, settings -------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1", "2.5", "true"])
def test_a_rank_below_1_or_not_an_integer_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^export\.rank=.*positive integer"):
        compose([f"export.rank={value}"])


def test_fedsa_lora_refuses_an_export_rank_naming_the_key():
    with pytest.raises(ConfigError, match=r"^export\.rank=2: fedsa_lora.*personal"):
        compose(["strategy=fedsa_lora", "export.rank=2"])
    compose(["strategy=fedsa_lora"])  # null: the adapter as trained


@pytest.mark.parametrize("strategy", ["flora", "fedex_lora"])
def test_the_moved_strategy_key_names_export_rank(strategy):
    with pytest.raises(
        ConfigError, match=re.escape("strategy.export_rank=3: moved to export.rank")
    ):
        compose([f"strategy={strategy}", "+strategy.export_rank=3"])


def test_the_export_section_round_trips_and_refuses_unknown_keys(settings):
    plain = with_(settings, "export.rank", 3).to_dict()
    assert plain["export"] == {"rank": 3}
    assert Settings.from_dict(plain).export.rank == 3
    plain["export"] = {"rnk": 3}
    with pytest.raises(ConfigError, match=r"^export\.rnk=3: no such setting"):
        Settings.from_dict(plain)
    assert "export" in RESUMABLE  # it only shapes the adapter saved at the end


def test_a_method_built_without_a_plan_exports_as_trained():
    state = lora_state(np.random.default_rng(40))
    method = FedAvgLoRA()
    assert method.export(state, {}) == state and method.export_overrides() == {}
    assert method.summary_notes() == {}
    assert ExportPlan(3, R, 2.0).as_trained is False
