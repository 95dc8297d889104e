"""The DP frontier experiment's pieces: the alignment probe and one arm."""

from __future__ import annotations

import pytest
import torch

from experiments import dp_frontier
from fedlora.build import build
from fedlora.data import client_examples
from fedlora.settings import with_
from fedlora.train import collate

DP = {
    "mode": "dp_sgd",
    "target_epsilon": 3.0,
    "target_delta": None,
    "max_grad_norm": 1.0,
    "clipping": "flat",
    "accountant": "rdp",
    "max_physical_batch_size": 4,
    "planned_rounds": None,
    "reproducible_noise": False,
}


def test_alignment_of_one_example_is_its_clipped_norm(settings):
    model, tok = build(settings)
    for m in model.modules():  # the probe runs in training mode: no dropout here
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ex = client_examples(settings, tok, 0, 2)[0][:1]
    model.zero_grad()
    model(**collate(ex, tok.pad_token_id)).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    for clip in (norm / 2, norm * 2):
        align, head = dp_frontier.alignment(model, ex, tok.pad_token_id, clip)
        assert align == pytest.approx(min(norm, clip) / clip, rel=1e-4)
        assert 0.0 < head <= 1.0


def test_an_arm_reports_its_noise_free_twin_and_dp_run(settings):
    settings = with_(
        settings,
        "federation.num_clients",
        1,
        "federation.min_train_clients",
        1,
        "federation.min_available_clients",
        1,
        "federation.rounds",
        1,
        "privacy",
        DP,
        "train.batch_size",
        16,
    )
    twin = dp_frontier.run_arm(settings, noise=False)
    dp = dp_frontier.run_arm(settings, noise=True, probe=8)
    assert twin["epsilon"] == 0.0 and twin["sigma"] == dp["sigma"] > 0
    assert 0 < dp["epsilon"] <= DP["target_epsilon"]
    assert twin["steps"] == dp["steps"] > 0
    assert 0.0 <= dp["accuracy"] <= 1.0 and "alignment" in dp
    table = dp_frontier.table({"n2000_b32_fedavg": {"no_noise": twin, "dp": dp}})
    assert table.count("\n") == 2 and "n2000_b32_fedavg" in table
