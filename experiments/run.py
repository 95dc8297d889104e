"""The Hydra front door: ``python -m experiments.run [overrides]`` (``-m`` sweeps).

Composes ``conf/``, checks it, runs the federation on Flower's simulation engine (in
this process, :func:`simulate`) and leaves everything in Hydra's output directory
(``hydra.run.dir=...``).

``resume=<run dir>`` continues that run from its newest valid checkpoint up to
``federation.rounds`` (see :func:`strategies.server_app.resume_config`).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from clients.client_app import app as client_app
from experiments import ray_head
from fedlora.console import hush_libraries, summary_table
from fedlora.errors import ClientConfigError, ConfigError
from fedlora.preflight import preflight
from fedlora.privacy import CLIENT_DIR_ENV
from fedlora.settings import Settings
from fedlora.validate import validate
from strategies.server_app import resume_config, run_server, settings

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def backend_config(sim: Any) -> dict[str, Any]:
    """Flower's Ray backend config for ``simulation`` settings ``sim``. Without an
    address to attach to, a Ray of the run's own (``address: local``): Ray alone
    would join any cluster it finds on the machine (``RAY_ADDRESS``, or the latest
    ``ray start`` head), without the clients' environment."""
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "error",
        "address": "local",
    }
    if sim.ray_num_cpus:
        init_args["num_cpus"] = int(sim.ray_num_cpus)
    return {
        "client_resources": {
            "num_cpus": float(sim.client_num_cpus),
            "num_gpus": float(sim.client_num_gpus),
        },
        "init_args": init_args,
    }


#: the longest settings JSON handed to the workers in their environment (Linux
#: refuses a variable over 128 kB); longer: they warm their imports only
WARM_SETTINGS_MAX = 64 * 1024


def warm_settings(s: Settings, plain: dict[str, Any]) -> str | None:
    """The settings ``plain`` (of ``s``) as JSON, for the workers of a run's own Ray
    to build their model and read their data with as they start; None (imports
    only) when a worker could go without a client in a round (it would hold a
    model it never uses: an LLM's memory for nothing) or the JSON is too long."""
    sim = s.simulation
    workers = int(sim.ray_num_cpus or os.cpu_count() or 1)
    if float(sim.client_num_cpus) > 0:
        workers = int(workers // float(sim.client_num_cpus))
    if float(sim.client_num_gpus) > 0:
        import torch

        gpus = torch.cuda.device_count()
        workers = min(workers, int(gpus // float(sim.client_num_gpus)))
    if workers > s.federation.sampled_clients:
        return None
    text = json.dumps(plain)
    return text if len(text) <= WARM_SETTINGS_MAX else None


def client_environment(s: Settings) -> None:
    """This process's environment as the simulated clients need it, set before
    Ray starts (its workers inherit it): quiet libraries and, with
    ``simulation.client_dir``, the clients' own folder (privacy ledgers, node
    state), as a deployed node's data-dir."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if s.simulation.client_dir:
        os.environ[CLIENT_DIR_ENV] = str(Path(s.simulation.client_dir).resolve())


def early_ray(s: Settings, plain: dict[str, Any]) -> ray_head.EarlyRay:
    """The run's own Ray (not a cluster's), started now in the background with
    what Flower's backend would start it with, its workers warmed
    (``simulation.warm_workers``) as they start; :func:`simulate` waits for it."""
    client_environment(s)
    sim = s.simulation
    warm = warm_settings(s, plain) if sim.warm_workers is not False else False
    return ray_head.EarlyRay(backend_config(sim)["init_args"], warm)


def simulate(
    cfg: DictConfig,
    run_dir: Path,
    ray_address: str | None = None,
    early: ray_head.EarlyRay | None = None,
) -> dict[str, Any]:
    """Simulate ``federation.num_clients`` SuperNodes; return the run's summary.

    Ray is shut down afterwards, also on failure, so no worker outlives the run;
    on a running cluster (``simulation.ray_address``, else ``ray_address``: a
    sweep's shared head) the run only detaches from it, and it goes on running.
    ``early``: the run's own Ray, already starting (:func:`early_ray`).
    """
    from flwr.simulation import run_simulation

    plain = settings(cfg)
    s = Settings.from_dict(plain)  # validated by the caller
    client_environment(s)
    hush_libraries(bool(s.verbose))
    out: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        out["summary"] = run_server(grid, cfg, run_dir)

    sim = s.simulation
    address = sim.ray_address or ray_address
    if address:  # a running cluster: attach (the run's end only detaches)
        ray_head.attach(str(address))
    # a Ray of our own, started by Flower's backend (unless started early)
    warm = not address and early is None and sim.warm_workers is not False
    try:
        if early is not None:
            early.ready()  # Flower's backend finds Ray initialised
        with ray_head.warm_workers(warm_settings(s, plain)) if warm else nullcontext():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=int(s.federation.num_clients),
                backend_config=backend_config(sim),
            )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "summary" not in out:
        raise RuntimeError(
            f"the simulation ended without a result; see the log above and {run_dir}"
        )
    return out["summary"]


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns :func:`objective` (for sweepers).

    A configuration error, found before the run or reported by the clients during
    it, ends it with one line on stderr and exit status 2 (no traceback)."""
    try:
        # 1. check the configuration before any work (a resumed run: the
        #    checkpoint's settings, more rounds allowed), then (Ray starting
        #    meanwhile) the model's modules and the data the simulated clients
        #    will read
        if validate(settings(cfg)).resume:
            cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
        plain = settings(cfg)
        s = Settings.from_dict(plain)
        sim = s.simulation
        sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        shared_head = sweep and sim.shared_ray is not False and not sim.ray_address
        # a Ray of the run's own starts now, beside the checks and the server's
        # start (a cluster's or a sweep's head is already running)
        own = not sim.ray_address and not shared_head
        with early_ray(s, plain) if own else nullcontext() as early:
            preflight(s, data=True)
            # 2. the run directory is Hydra's output directory
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            quiet = bool(cfg.quiet)
            if not quiet:
                print(f"[fedlora] run directory: {run_dir}", flush=True)
            # 3. simulate and report (a sweep's runs share one Ray head)
            shared = ray_head.sweep_address(sim.ray_num_cpus) if shared_head else None
            summary = simulate(cfg, run_dir, shared, early)
    except (ConfigError, ClientConfigError) as exc:
        print(f"[fedlora] configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not quiet:
        print("[fedlora] done\n" + summary_table(summary, str(run_dir)), flush=True)
    return objective(summary)


def objective(summary: dict[str, Any]) -> float | None:
    """What a sweeper maximises: the final validation accuracy when
    ``data.validation_fraction`` held out training rows (tuned sweeps never see
    the reported split), else the final server accuracy."""
    if summary.get("final_validation_accuracy") is not None:
        return summary["final_validation_accuracy"]
    return summary.get("final_eval_accuracy")


if __name__ == "__main__":
    main()
