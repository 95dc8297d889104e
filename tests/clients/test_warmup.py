"""A simulation worker's warm-up (clients/warmup.py): it fills the very caches the
first message reads, so that message neither builds the model nor reads the data;
and the front door hands it to the Ray it starts, and to no other."""

from __future__ import annotations

import json
import os

import pytest

from clients import warmup
from clients.client_app import node_model
from experiments import ray_head
from experiments.run import warm_settings
from fedlora import build, data
from fedlora.settings import Settings, with_


@pytest.fixture
def fresh(monkeypatch):
    """No model or data cached in this process, before and after."""
    monkeypatch.setattr(build, "_CACHE", {})
    data.clear_caches()
    yield
    data.clear_caches()


def refuse(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"the first message {what} again")

    return fail


def test_the_first_message_after_the_warm_up_builds_and_reads_nothing(
    base_settings, fresh, monkeypatch
):
    text = json.dumps(base_settings.to_dict())  # as the train messages carry it
    monkeypatch.setenv(warmup.SETTINGS_ENV, text)
    warmup.warm()
    warmed = next(iter(build._CACHE.values()))[0]
    # what a message's _setup and train handler then do, for another partition
    monkeypatch.setattr(build, "build", refuse("built the model"))
    monkeypatch.setattr(data, "load_splits", refuse("read the data"))
    cfg, model, tokenizer, _ = node_model(Settings.from_dict(json.loads(text)))
    assert model is warmed
    train, _ = data.client_examples(cfg, tokenizer, 1, 2)
    assert train  # partition 1 tokenised from the table the warm-up read


def test_without_settings_the_warm_up_imports_only(fresh, monkeypatch):
    monkeypatch.delenv(warmup.SETTINGS_ENV, raising=False)
    warmup.warm()
    assert not build._CACHE


def test_a_failed_warm_up_leaves_the_error_to_the_first_message(fresh, monkeypatch):
    monkeypatch.setenv(warmup.SETTINGS_ENV, '{"model": {}}')  # not settings
    warmup.warm()  # the worker starts regardless
    assert not build._CACHE


def test_the_runtime_env_gains_the_hook_and_keeps_flowers_variables(monkeypatch):
    monkeypatch.delenv(ray_head.RUNTIME_ENV_HOOK, raising=False)
    flowers = {"env_vars": {"PYTHONPATH": "/somewhere"}}
    with ray_head.warm_workers('{"a": 1}'):
        path = os.environ[ray_head.RUNTIME_ENV_HOOK]
        assert path == "experiments.ray_head.warm_runtime_env"
        env = ray_head.warm_runtime_env(flowers)
    assert ray_head.RUNTIME_ENV_HOOK not in os.environ  # only around the run
    assert env["worker_process_setup_hook"] == "clients.warmup.warm"
    assert env["env_vars"] == {
        "PYTHONPATH": "/somewhere",
        warmup.SETTINGS_ENV: '{"a": 1}',
    }
    assert flowers == {"env_vars": {"PYTHONPATH": "/somewhere"}}  # not changed


def test_a_users_own_runtime_env_hook_is_left_alone(monkeypatch):
    monkeypatch.setenv(ray_head.RUNTIME_ENV_HOOK, "mine.hook")
    with ray_head.warm_workers("{}"):
        assert os.environ[ray_head.RUNTIME_ENV_HOOK] == "mine.hook"
    assert os.environ[ray_head.RUNTIME_ENV_HOOK] == "mine.hook"


def test_workers_warm_their_model_only_when_each_gets_a_client(base_settings):
    plain = base_settings.to_dict()
    two = with_(base_settings, "simulation.ray_num_cpus", 2)  # two workers
    assert json.loads(warm_settings(two, plain)) == plain  # two clients a round
    four = with_(two, "simulation.ray_num_cpus", 4)
    assert warm_settings(four, plain) is None  # two of four workers idle
    half = with_(four, "simulation.client_num_cpus", 2.0)
    assert warm_settings(half, plain) is not None
