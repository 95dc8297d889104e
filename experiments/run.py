"""The Hydra front door: ``python -m experiments.run [overrides]`` (``-m`` sweeps).

Composes ``conf/``, checks it, runs the federation on Flower's simulation engine and
leaves everything in Hydra's output directory (``hydra.run.dir=...``).

``resume=<run dir>`` continues that run from its newest valid checkpoint up to
``federation.rounds`` (see :func:`experiments.server_app.resume_config`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.server_app import resume_config, settings
from experiments.simulation import simulate
from fedlora.errors import ConfigError
from fedlora.validate import validate


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns the final server accuracy (for sweepers)."""
    # 1. check the configuration before any work
    #    (a resumed run: the checkpoint's settings, more rounds allowed)
    try:
        validate(settings(cfg))
        if cfg.get("resume"):
            cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as exc:
        print(f"[fedlora] configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # 2. the run directory is Hydra's output directory
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    print(f"[fedlora] run directory: {run_dir}", flush=True)
    # 3. simulate and report
    summary = simulate(cfg, run_dir)
    print("[fedlora] summary: " + json.dumps(summary), flush=True)
    return summary.get("final_eval_accuracy")


if __name__ == "__main__":
    main()
