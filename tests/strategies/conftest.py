"""Fixtures of the secure-aggregation tests (test_secagg, test_distributed_dp)."""

from __future__ import annotations

import numpy as np
import pytest

from clients import secagg as client_secagg


@pytest.fixture
def client_inputs(monkeypatch):
    """Each client's update and example count, as its train handler masks them."""
    seen = {}
    real = client_secagg.masked_reply

    def spy(msg, context, cfg, start, update, public, weighting):
        delta = {k: v.astype(np.float64) - start[k] for k, v in update.items()}
        seen[context.node_id] = (delta, float(public["num-examples"]))
        return real(msg, context, cfg, start, update, public, weighting)

    monkeypatch.setattr(client_secagg, "masked_reply", spy)
    return seen
