"""A simulation without ``simulation.ray_address`` starts a Ray of its own: real
``ray.init`` with the front door's backend arguments, under a ``RAY_ADDRESS`` that
Ray alone would try to join."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from experiments.run import backend_config
from strategies.server_app import compose_settings

REPO = Path(__file__).resolve().parents[2]


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


def test_a_ray_started_early_in_the_background_serves_the_run_after_ready(
    monkeypatch,
):
    """``EarlyRay`` (the front door's own Ray, started beside the checks): after
    ``ready()`` the cluster serves tasks, seconds later too (Ray's processes die
    with the thread that started them unless it lives), the workers see the
    driver's import path and were warmed (the setup hook ran); leaving shuts Ray
    down."""
    ray = pytest.importorskip("ray")
    from clients import warmup
    from experiments import ray_head

    monkeypatch.delenv(ray_head.RUNTIME_ENV_HOOK, raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    sim = compose_settings(["simulation.ray_num_cpus=1"]).simulation
    with ray_head.EarlyRay(backend_config(sim)["init_args"], "not json") as early:
        early.ready()
        assert ray.is_initialized() and early.seconds is not None
        time.sleep(3)  # long after the thread's ray.init returned

        @ray.remote(num_cpus=1)
        def seen() -> tuple[str, str | None]:
            return os.environ.get("PYTHONPATH", ""), os.environ.get(warmup.SETTINGS_ENV)

        path, warm = ray.get(seen.remote(), timeout=120)
        assert str(REPO) in path.split(os.pathsep)
        assert warm == "not json"  # the warm-up's settings reached the worker
    assert not ray.is_initialized()
    assert ray_head.RUNTIME_ENV_HOOK not in os.environ


def test_an_early_ray_that_fails_to_start_raises_in_ready():
    ray = pytest.importorskip("ray")
    from experiments import ray_head

    early = ray_head.EarlyRay({"address": "local", "num_cpus": -1}, False)
    with pytest.raises(ValueError, match="nonnegative"), early:
        early.ready()
    assert not ray.is_initialized()
