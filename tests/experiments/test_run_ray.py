"""A simulation without ``simulation.ray_address`` starts a Ray of its own: real
``ray.init`` with the front door's backend arguments, under a ``RAY_ADDRESS`` that
Ray alone would try to join."""

from __future__ import annotations

import pytest

from experiments.run import backend_config
from strategies.server_app import compose_settings


def test_without_an_address_the_run_starts_its_own_ray(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing serves there
    sim = compose_settings(["simulation.ray_num_cpus=1"]).simulation
    args = backend_config(sim)["init_args"]
    try:
        context = ray.init(**args)
        assert ray.is_initialized()
        assert not context.address_info["gcs_address"].endswith(":9")
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()
