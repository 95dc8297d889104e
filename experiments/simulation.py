"""Run one experiment on Flower's simulation engine (Ray), in this process."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from clients.client_app import app as client_app
from experiments.server_app import run_server
from fedlora.privacy import CLIENT_DIR_ENV

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def simulate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Simulate ``federation.num_clients`` SuperNodes; return the run's summary.

    Ray is shut down afterwards, also on failure, so no worker outlives the run.
    """
    from flwr.simulation import run_simulation

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # the simulated clients' own folder (privacy ledgers), as a deployed node's
    # data-dir; Ray's workers inherit the environment
    if cfg.simulation.client_dir:
        os.environ[CLIENT_DIR_ENV] = str(Path(cfg.simulation.client_dir).resolve())
    if cfg.get("quiet"):
        logging.getLogger("flwr").setLevel(logging.WARNING)
    out: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        out["summary"] = run_server(grid, cfg, run_dir)

    sim = cfg.simulation
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "error"}
    if sim.ray_num_cpus:
        init_args["num_cpus"] = int(sim.ray_num_cpus)
    backend_config = {
        "client_resources": {
            "num_cpus": float(sim.client_num_cpus),
            "num_gpus": float(sim.client_num_gpus),
        },
        "init_args": init_args,
    }
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=int(cfg.federation.num_clients),
            backend_config=backend_config,
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
