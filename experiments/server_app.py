"""ServerApp: build the global adapter, run the strategy, write the run directory.

The same code serves the simulation (``experiments.run`` hands it the composed
config) and a deployment (``flwr run .``: it composes ``conf/`` itself from the
run config's ``overrides``).
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedlora.validate import validate
from fedlora import results
from fedlora.adapters import (
    get_frozen_state,
    get_state,
    lora_scaling,
    set_frozen_state,
    set_state,
)
from fedlora.build import build
from fedlora.data import client_examples, server_examples
from fedlora.lora_sb import gradient_sums
from fedlora.models import resolve_device
from fedlora.train import evaluate
from strategies.wire import KEY_EXPERIMENT, record_to_state, state_to_record

log = logging.getLogger("fedlora")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved experiment settings as a plain dict (what clients receive)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def run_server(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the federation for ``cfg`` and fill ``run_dir``; return the summary."""
    # 1. the global model, from the shared seed, and the server's evaluation data
    plain = settings(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / results.METRICS_FILE).unlink(missing_ok=True)
    model, tokenizer = build(plain)
    device = resolve_device(plain["train"]["device"])
    model.to(device)
    eval_examples = server_examples(plain, tokenizer)
    initial = get_state(model)

    # 2. the strategy: YAML settings plus runtime values
    strategy = instantiate(cfg.strategy, scaling=lora_scaling(plain["adapter"]))
    if "wrapper" in cfg.privacy:  # client-level DP around the strategy
        fed = plain["federation"]
        sampled = min(fed["num_clients"], max(int(fed["num_clients"] * fed["fraction_train"]),
                                              fed["min_train_clients"]))
        strategy = instantiate(cfg.privacy.wrapper, strategy=strategy,
                               num_sampled_clients=sampled,
                               num_clients=fed["num_clients"],
                               delta=plain["privacy"]["target_delta"])
    rounds = int(plain["federation"]["rounds"])
    started = time.perf_counter()

    # 3. centralised evaluation each round, which also writes the round's metrics
    def evaluate_fn(server_round: int, arrays: Any) -> MetricRecord:
        set_state(model, record_to_state(arrays))
        metrics = evaluate(model, eval_examples, plain["model"]["task"], device,
                           tokenizer.pad_token_id, plain["train"]["eval_batch_size"])
        row = {"round": server_round, **metrics, "wall_time": time.perf_counter() - started,
               "bytes_up": 0, "bytes_down": 0, "clients": 0, "failures": 0,
               "aggregation_error": None, **strategy.round_log.get(server_round, {})}
        results.append_metrics(run_dir, row)
        _progress(row, rounds)
        return MetricRecord({k: v for k, v in metrics.items()})

    # 4. the method's initialisation (Fed-SB's init round), then Flower's round loop
    train_config = ConfigRecord({KEY_EXPERIMENT: json.dumps(plain)})

    def server_gradient() -> dict[str, Any]:  # Fed-SB init=server_data
        calib, _ = client_examples(plain, tokenizer, 0, 1)
        n = int(plain["strategy"].get("calibration_examples", 64))
        return gradient_sums(model, calib[:n], plain["train"]["batch_size"],
                             tokenizer.pad_token_id, device)

    initial_arrays = strategy.initialize(grid, state_to_record(initial),
                                         get_frozen_state(model), train_config,
                                         server_gradient=server_gradient)
    if strategy.frozen:
        set_frozen_state(model, strategy.frozen)
    result = strategy.start(
        grid=grid, initial_arrays=initial_arrays, num_rounds=rounds,
        timeout=float(plain["federation"]["round_timeout"]),
        train_config=train_config, evaluate_config=ConfigRecord(dict(train_config)),
        evaluate_fn=evaluate_fn)

    # 5. final adapter (PEFT format), summary and plots
    final = (record_to_state(result.arrays) if len(result.arrays)
             else record_to_state(initial_arrays))
    export_state, overrides = strategy.export(final)
    export_model, _ = build({**plain, "adapter": {**plain["adapter"], **overrides}})
    results.save_adapter(export_model, export_state, run_dir / "adapter")
    rows = results.read_metrics(run_dir)
    extra = {"strategy": strategy.name, "privacy": plain["privacy"]["mode"],
             "wall_time": time.perf_counter() - started}
    if plain["privacy"]["mode"] == "dp_sgd":
        extra["accountant"] = plain["privacy"]["accountant"]
        extra["target_epsilon"] = plain["privacy"]["target_epsilon"]
    summary = results.summarise(rows, extra)
    results.write_summary(run_dir, summary)
    results.plot_run(run_dir, rows)
    return summary


def _progress(row: dict[str, Any], rounds: int) -> None:
    score = (f"acc {row['eval_accuracy']:.4f}" if "eval_accuracy" in row
             else f"ppl {row.get('eval_perplexity', float('nan')):.3f}")
    err = row.get("aggregation_error")
    print(f"[fedlora] round {row['round']}/{rounds}: clients {row['clients']} ok, "
          f"{row['failures']} failed | server {score}, loss {row['eval_loss']:.4f}"
          + (f" | agg_error {err:.3g}" if err is not None else "")
          + f" | {row['wall_time']:.1f}s", flush=True)


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``conf/`` with Hydra overrides (as the front door would), validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(settings(cfg))
    return cfg


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: ``flwr run . <connection> --run-config ...``."""
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg = compose(overrides)
    run_server(grid, cfg, Path(str(context.run_config.get("output-dir",
                                                          "outputs/deployment"))))
