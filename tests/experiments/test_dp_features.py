"""experiments.dp_features: the margin split (numpy) and, slow, a run read back."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.dp_features import embed, margin_split, mean_pairwise_cosine
from tests.conftest import run_front_door

FEDSB_DATA_FREE = ["strategy.init=random_orthogonal", "adapter.r=8"]


def test_mean_pairwise_cosine_matches_the_pairs():
    h = np.random.default_rng(0).normal(size=(7, 5)) + 2.0
    u = h / np.linalg.norm(h, axis=1, keepdims=True)
    pairs = [u[i] @ u[j] for i in range(7) for j in range(7) if i != j]
    assert np.isclose(mean_pairwise_cosine(h), np.mean(pairs))


def test_shared_plus_varying_is_the_margin_and_collapse_predicts_one_class():
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 20)
    weight, bias = rng.normal(size=(2, 4)), np.array([0.0, 0.3])
    spread = rng.normal(size=(40, 4))
    out = margin_split(spread, y, weight, bias)
    w = weight[1] - weight[0]
    varying = (spread - spread.mean(0)) @ w
    assert np.allclose(out["shared_margin"] + varying, spread @ w + 0.3)
    assert np.isclose(out["varying_std"], varying.std())
    # every embedding (almost) the same vector: one class for all, shared part decides
    collapsed = np.ones((40, 4)) * 3.0 + 1e-4 * spread
    out = margin_split(collapsed, y, weight, bias)
    assert out["predicted_positive"] in (0.0, 1.0) and out["accuracy"] == 0.5
    assert out["varying_std"] < 1e-3 < abs(out["shared_margin"])
    assert out["embedding_mean_cosine"] > 0.999


@pytest.mark.slow
def test_the_checkpoint_read_back_scores_what_the_run_reported(tmp_path, tiny_bert):
    """Rebuilt from the run's last checkpoint, the model classifies the eval set as
    the run said it did (so the embeddings analysed are the run's own)."""
    out = tmp_path / "run"  # Fed-SB: its frozen B and A come from the checkpoint too
    rows = run_front_door(out, tiny_bert, "strategy=fedsb", *FEDSB_DATA_FREE)
    e = embed(out, tmp_path, base=False)
    split = margin_split(e["h"], e["y"], e["weight"], e["bias"])
    assert len(e["y"]) == rows[-1]["eval_examples"]
    assert split["accuracy"] == pytest.approx(rows[-1]["eval_accuracy"], abs=1e-9)
    base = embed(out, tmp_path, base=True)
    assert not np.allclose(base["h"], e["h"])  # R = 0: the pretrained encoder's
