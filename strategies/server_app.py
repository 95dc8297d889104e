"""ServerApp: build the global adapter, run the strategy, write the run directory.

The same code serves the simulation (``experiments.run`` hands it the composed
config) and a deployment (``flwr run .``: it composes ``conf/`` itself from the
run config's ``overrides``).
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedlora import checkpoint, distributed_dp, results, tracking
from fedlora.adapters import (
    get_frozen_state,
    get_state,
    set_base_delta,
    set_frozen_state,
    set_state,
)
from fedlora.build import build
from fedlora.console import Progress, hush_libraries
from fedlora.data import (
    resolve_labels,
    server_calibration_examples,
    server_examples,
    server_validation_examples,
    write_labels,
)
from fedlora.errors import ConfigError, NodesUnavailableError
from fedlora.lora_sb import gradient_sums
from fedlora.models import resolve_device
from fedlora.settings import Settings, with_, with_privacy_defaults
from fedlora.train import evaluate
from fedlora.validate import validate
from strategies.strategy import LoRAStrategy
from strategies.wire import (
    KEY_EXPERIMENT,
    KEY_RUN_ID,
    record_to_state,
    state_to_record,
)

log = logging.getLogger("fedlora")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: the settings a resumed run may change; all others come from the checkpoint (a
#: key among these that the resumed run lacks, e.g. the test-only ``faults`` added
#: with ``+faults...``, is dropped, not carried over). ``export`` shapes only the
#: adapter saved at the end; ``logger`` only where the run is tracked (see
#: :data:`KEPT`).
RESUMABLE = (
    "federation.rounds",
    "federation.round_timeout",
    "federation.wait_timeout",
    "train.device",
    "simulation",
    "quiet",
    "verbose",
    "faults",
    "resume",
    "export",
    "logger",
)
#: resumable settings a resumed run keeps from the checkpoint unless the command
#: line sets them (``resume=<run dir>`` alone goes on logging where the run did)
KEPT = ("logger",)
_MISSING = object()


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved experiment settings as a plain dict (what clients receive and
    the run directory's ``config.yaml`` records), the keys left null for the
    privacy mode to choose filled in (:data:`fedlora.settings.PRIVACY_DEFAULTS`)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return with_privacy_defaults(plain)  # type: ignore[arg-type]


def run_server(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the federation for ``cfg`` and fill ``run_dir``; return the summary.

    After every round (and after round 0) a checkpoint goes to
    ``run_dir/checkpoints/`` (see :mod:`fedlora.checkpoint`). With ``resume`` set to
    a run directory, the run continues from that directory's newest valid
    checkpoint up to ``federation.rounds``: the global adapter, the strategy's
    state and the RNG states are restored, the initialisation (Fed-SB's init
    round) and round 0's evaluation are not repeated, ``metrics.jsonl`` is reset to
    the checkpoint's rows and the new rounds keep their real numbers.

    The experiment tracker of ``logger`` (:mod:`fedlora.tracking`) gets the config,
    every metrics row, the summary and the files as they are written, and is
    closed at the end, marked failed if the run fails.
    """
    logger = Settings.from_dict(settings(cfg)).logger
    with tracking.from_settings(logger) as tracker:
        return _serve(grid, cfg, run_dir, tracker)


def _serve(
    grid: Grid, cfg: DictConfig, run_dir: Path, tracker: tracking.Tracker
) -> dict[str, Any]:
    """:func:`run_server` with its tracker."""
    # 1. the global model, from the shared seed, and the server's evaluation data
    #    (``cfg`` was validated by whoever composed it: typed once here)
    s = resolve_labels(Settings.from_dict(settings(cfg)))  # the same ids everywhere
    plain = s.to_dict()  # what the clients receive and checkpoints keep
    ckpt = None
    if s.resume:
        ckpt = load_resume_checkpoint(s.resume)
        check_resume(s, ckpt)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain))
    write_labels(run_dir, s)
    if ckpt is None:
        (run_dir / results.METRICS_FILE).unlink(missing_ok=True)
    else:  # drop rows the crashed run wrote after its checkpoint (and torn lines)
        checkpoint.rewrite_lines(run_dir / results.METRICS_FILE, ckpt.state["metrics"])
    model, tokenizer = build(s)
    device = resolve_device(s.train.device)
    model.to(device)
    eval_examples = server_examples(s, tokenizer)
    # data.validation_fraction: training rows held out, the tuning objective
    validation_examples = server_validation_examples(s, tokenizer)
    initial = get_state(model)

    # 2. the strategy: Flower's sampling around the method of conf/strategy/
    method = LoRAStrategy.from_settings(s)
    strategy: Any = method
    if s.privacy.wrapper:  # client-level DP around the strategy
        strategy = instantiate(
            plain["privacy"]["wrapper"],
            strategy=method,
            num_sampled_clients=s.federation.sampled_clients,
            delta=s.privacy.target_delta,
        )
    ledger = method.secure.accountant if method.secure is not None else None
    if ledger is not None:  # privacy=distributed: releases on disk as they happen
        kept = run_dir / distributed_dp.LEDGER_FILE
        if ckpt is None:
            kept.unlink(missing_ok=True)  # a new run spends from nothing
        resumed = Path(s.resume) / distributed_dp.LEDGER_FILE if s.resume else None
        ledger.keep_at(kept, resumed)
    rounds = int(s.federation.rounds)
    done = ckpt.round if ckpt is not None else 0
    progress = Progress(rounds, quiet=s.quiet)
    if s.privacy.mode == "dp_sgd" and s.privacy.reproducible_noise:
        log.warning(
            "privacy.reproducible_noise=true: the clients' DP-SGD noise and sampling "
            "follow the public seed, so this server could remove the noise; the "
            "reported epsilon does not hold against it (research use only)"
        )
    # the run's id keys every client's privacy ledger: kept across a resume
    run_id = (ckpt.state.get("run_id") if ckpt is not None else None) or new_run_id()
    previous = ckpt.state["metrics"] if ckpt is not None else []
    elapsed = (previous[-1].get("wall_time") or 0.0) if previous else 0.0
    started = time.perf_counter() - elapsed  # wall_time goes on from the checkpoint
    saved: list[Path] = [ckpt.path] if ckpt is not None else []  # newest last
    tracker.start(run_dir, plain, run_id, previous)

    # 3. centralised evaluation each round, which also writes the round's metrics
    #    and the round's checkpoint
    def evaluate_fn(server_round: int, arrays: Any) -> MetricRecord | None:
        if ckpt is not None and server_round == 0:
            return None  # round 0 was evaluated before the checkpoint
        server_round += done  # Flower counts the rounds of this process from 1
        eval_start = time.perf_counter()
        set_state(model, record_to_state(arrays))
        if method.method.folds_into_base:
            set_base_delta(model, method.folds.total.matrices())

        def on(examples: list[Any]) -> dict[str, float]:
            return evaluate(
                model,
                examples,
                s.model.task,
                device,
                tokenizer.pad_token_id,
                s.train.eval_batch_size,
            )

        metrics = on(eval_examples)
        validation = on(validation_examples) if validation_examples else {}
        row = {
            "round": server_round,
            **metrics,
            **{
                f"validation_{k.removeprefix('eval_')}": v
                for k, v in validation.items()
            },
            "server_eval_time": time.perf_counter() - eval_start,
            "wall_time": time.perf_counter() - started,
            "bytes_up": 0,
            "bytes_down": 0,
            "clients": 0,
            "failures": 0,
            "aggregation_error": None,
            # the round's log goes to its metrics row and is dropped: the server
            # keeps no client's record past its round
            **strategy.round_log.pop(server_round, {}),
        }
        results.append_metrics(run_dir, row)
        tracker.log_round(row)
        progress(row)
        saved.append(
            save_checkpoint(run_dir, server_round, arrays, strategy, plain, run_id)
        )
        return MetricRecord({k: v for k, v in metrics.items()})

    # 4. the method's initialisation (Fed-SB's init round), or the checkpoint's
    #    state; then Flower's round loop for the rounds still to run
    train_config = ConfigRecord({KEY_EXPERIMENT: json.dumps(plain), KEY_RUN_ID: run_id})

    def server_gradient(n: int) -> dict[str, Any]:  # Fed-SB init=server_data
        # the server's own calibration file, never the clients' data
        calib = server_calibration_examples(s, tokenizer, n)
        return gradient_sums(
            model,
            calib,
            s.train.batch_size,
            tokenizer.pad_token_id,
            device,
        )

    try:  # a round that cannot get its nodes stops the run, checkpoints kept
        if ckpt is None:
            initial_arrays = strategy.initialize(
                grid,
                state_to_record(initial),
                get_frozen_state(model),
                train_config,
                server_gradient=server_gradient,
            )
        else:
            prefix = "strategy."
            strategy.restore_state(
                {
                    k[len(prefix) :]: v
                    for k, v in ckpt.arrays.items()
                    if k.startswith(prefix)
                },
                ckpt.state["strategy"],
            )
            method.round_offset = done
            initial_arrays = state_to_record(ckpt.arrays["global"])
            checkpoint.set_rng_state(ckpt.arrays["rng"], ckpt.state["rng"])
            if not s.quiet:
                print(
                    f"[fedlora] round {done}/{rounds}: resumed from {ckpt.path}",
                    flush=True,
                )
        if strategy.frozen:
            set_frozen_state(model, strategy.frozen)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=rounds - done,
            timeout=float(s.federation.round_timeout),
            train_config=train_config,
            evaluate_config=ConfigRecord(dict(train_config)),
            evaluate_fn=evaluate_fn,
        )
    except NodesUnavailableError as exc:
        hint = _resume_hint(saved, run_dir)
        raise NodesUnavailableError(
            f"{exc}. {hint}", exc.connected, exc.needed
        ) from None

    # 5. final adapter (PEFT format), summary and plots
    final = (
        record_to_state(result.arrays)
        if len(result.arrays)
        else record_to_state(initial_arrays)
    )
    exported = strategy.export(final)
    export_overrides = method.method.export_overrides()  # e.g. another rank
    export_settings = with_(
        s, *(x for k, v in export_overrides.items() for x in (f"adapter.{k}", v))
    )
    export_model, _ = build(export_settings, plain=True)  # ordinary PEFT LoRA
    adapter_dir = results.save_adapter(export_model, exported, run_dir / "adapter")
    write_labels(adapter_dir, s)
    results.save_tensor_files(adapter_dir, method.export_files(final))
    rows = results.read_metrics(run_dir)
    extra = {
        "strategy": strategy.name,
        "privacy": s.privacy.mode,
        "wall_time": time.perf_counter() - started,
    }
    extra["run_id"] = run_id
    extra.update(method.method.summary_notes())
    if s.privacy.mode == "dp_sgd":
        extra["accountant"] = s.privacy.accountant
        extra["target_epsilon"] = s.privacy.target_epsilon
        extra["reproducible_noise"] = bool(s.privacy.reproducible_noise)
    summary = results.summarise(rows, extra)
    results.write_summary(run_dir, summary)
    plots = results.plot_run(run_dir, rows)
    tracker.log_summary(summary)
    files = ("config.yaml", results.METRICS_FILE, results.SUMMARY_FILE)
    tracker.log_files([*(run_dir / f for f in files), *plots])
    return summary


# --- checkpoints and resume ---------------------------------------------------------
def new_run_id() -> str:
    """A fresh run id: start time and 32 random bits (``20261130-041200-9f3a1c2e``)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: Any,
    strategy: Any,
    plain: dict[str, Any],
    run_id: str,
) -> Path:
    """Checkpoint the end of ``server_round`` (after its metrics row is written).

    Arrays: the global adapter (``global``), the RNG states (``rng``) and the
    strategy's groups (``strategy.<name>``, e.g. Fed-SB's frozen ``B`` and ``A``).
    JSON: the run's id (a resume keeps it, so clients go on with their privacy
    ledgers), the settings, the strategy's state, the RNG states and every metrics
    row so far.
    """
    strategy_arrays, strategy_state = strategy.checkpoint_state()
    rng_arrays, rng_json = checkpoint.rng_state()
    groups = {
        "global": record_to_state(arrays),
        "rng": rng_arrays,
        **{f"strategy.{k}": v for k, v in strategy_arrays.items()},
    }
    state = {
        "run_id": run_id,
        "settings": plain,
        "strategy": strategy_state,
        "rng": rng_json,
        "metrics": results.read_metrics(run_dir),
    }
    return checkpoint.save(run_dir, server_round, groups, state)


def _resume_hint(saved: list[Path], run_dir: Path) -> str:
    """What a run stopped early leaves to go on from: its newest checkpoint."""
    if not saved:
        return (
            "No round has been checkpointed yet (the run stopped before round 0 "
            "ended): start it again once the nodes are connected"
        )
    return (
        f"The last checkpoint is {saved[-1]}; once the nodes are back, go on from "
        f"it with resume={run_dir} (the same overrides otherwise)"
    )


def load_resume_checkpoint(resume: str | Path) -> checkpoint.Checkpoint:
    """The newest valid checkpoint of the run directory ``resume``.

    Raises
    ------
    ConfigError
        ``resume``: when the directory holds no valid checkpoint.
    """
    ckpt = checkpoint.load_latest(Path(resume))
    if ckpt is None:
        folder = checkpoint.checkpoint_dir(resume)
        raise ConfigError(
            "resume",
            str(resume),
            f"no valid checkpoint in {folder}; point resume at a run "
            "directory, or start a new run without it",
        )
    return ckpt


def _resumable(key: str) -> bool:
    return any(_under(key, k) for k in RESUMABLE)


def _under(key: str, section: str) -> bool:
    """Whether the dotted ``key`` is ``section`` or one of its keys."""
    return key == section or key.startswith(section + ".")


def _override_key(override: str) -> str:
    """The dotted key a command-line override sets (``+a.b@pkg=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _select(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _differences(new: Any, old: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings trees."""
    if isinstance(new, dict) and isinstance(old, dict):
        return [
            d
            for k in sorted(set(new) | set(old), key=str)
            for d in _differences(
                new.get(k, _MISSING), old.get(k, _MISSING), f"{prefix}{k}."
            )
        ]
    return [] if new == old else [prefix.rstrip(".")]


def check_resume(settings: Settings, ckpt: checkpoint.Checkpoint) -> None:
    """Refuse a resume that could not continue the checkpointed run faithfully.

    Raises
    ------
    ConfigError
        ``resume`` of a ``privacy.mode=dp_sgd`` run whose checkpoint holds no run
        id (written before the clients kept their ledgers by it, so they could not
        find the privacy already spent); ``federation.rounds`` below the rounds
        the checkpoint holds; a setting outside :data:`RESUMABLE` that differs
        from the checkpoint's.
    """
    s, plain = settings, settings.to_dict()  # checkpoints keep the plain dict
    if s.privacy.mode == "dp_sgd" and not ckpt.state.get("run_id"):
        raise ConfigError(
            "resume",
            s.resume,
            f"the checkpoint {ckpt.path} of this privacy.mode=dp_sgd run holds no "
            "run id, so its clients' privacy ledgers cannot be found and the "
            "privacy already spent would be forgotten. Start a new run instead",
        )
    if s.privacy.mode == "dp_sgd":
        before = _select(ckpt.state["settings"], "simulation.client_dir")
        after = s.simulation.client_dir
        if before is not _MISSING and after != before:
            raise ConfigError(
                "simulation.client_dir",
                after,
                f"the simulated clients of this privacy.mode=dp_sgd run keep their "
                f"privacy ledgers in {before!r}; a resume elsewhere would forget "
                "the privacy already spent. Keep it as it was",
            )
    rounds = int(s.federation.rounds)
    if rounds < ckpt.round:
        raise ConfigError(
            "federation.rounds",
            rounds,
            f"the checkpoint {ckpt.path} already holds {ckpt.round} "
            f"rounds; ask for at least {ckpt.round}",
        )
    saved = copy.deepcopy(ckpt.state["settings"])
    _move_export_rank(saved)  # a key that moved is no difference
    changed = [k for k in _differences(plain, saved) if not _resumable(k)]
    if changed:
        raise ConfigError(
            "resume",
            s.resume,
            f"these settings differ from the checkpoint's: "
            f"{', '.join(changed)}; a resumed run may change only "
            f"{', '.join(RESUMABLE)}",
        )


def _move_export_rank(merged: dict[str, Any]) -> None:
    """Settings saved before ``export.rank``: FedEx-LoRA's and FLoRA's
    ``strategy.export_rank`` becomes ``export.rank`` unless the resumed run sets
    that (a checkpoint's settings cannot be edited by the user)."""
    old = (merged.get("strategy") or {}).pop("export_rank", None)
    export = merged.setdefault("export", {"rank": None})
    if old is not None and export.get("rank") is None:
        export["rank"] = old


def resume_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The configuration of a resumed run: the checkpoint's settings, except the
    keys in :data:`RESUMABLE`, which come from ``cfg`` (e.g. more rounds); of
    those, the keys in :data:`KEPT` stay the checkpoint's unless an override sets
    them.

    ``overrides`` are the command line's overrides: one that sets a key outside
    :data:`RESUMABLE` to a value other than the checkpoint's is refused, rather than
    silently ignored. Passing the original run's overrides again is fine.

    Raises
    ------
    ConfigError
        No valid checkpoint in ``resume``; a conflicting override; or any reason
        of :func:`check_resume`.
    """
    current = settings(cfg)  # overrides name dotted keys of this plain dict
    resume = Settings.from_dict(current).resume
    ckpt = load_resume_checkpoint(str(resume))
    saved = ckpt.state["settings"]
    keys = [_override_key(o) for o in overrides if "=" in o]
    for override in overrides:
        key = _override_key(override)
        if "=" not in override or key.startswith("hydra") or _resumable(key):
            continue
        new, old = _select(current, key), _select(saved, key)
        if new != old:
            raise ConfigError(
                key,
                None if new is _MISSING else new,
                f"the run being resumed ({resume}) has "
                f"{key}={None if old is _MISSING else old!r}, and a resumed run keeps "
                f"its settings except {', '.join(RESUMABLE)}; drop the override or "
                "start a new run",
            )
    merged = copy.deepcopy(saved)
    for key in RESUMABLE:
        value = _select(current, key)
        if key in KEPT and not any(_under(k, key) for k in keys):
            kept = _select(saved, key)
            value = value if kept is _MISSING else kept
        parts = key.split(".")
        node = merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is _MISSING:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = copy.deepcopy(value)
    _move_export_rank(merged)
    check_resume(Settings.from_dict(merged), ckpt)
    validate(merged)
    return OmegaConf.create(merged)


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``conf/`` with Hydra overrides (as the front door would), validated."""
    return _compose(overrides)[0]


def compose_settings(overrides: list[str]) -> Settings:
    """The typed, validated settings of ``conf/`` composed with ``overrides``."""
    return _compose(overrides)[1]


def _compose(overrides: list[str]) -> tuple[DictConfig, Settings]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return cfg, validate(settings(cfg))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: ``flwr run . <connection> --run-config ...``."""
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg = compose(overrides)
    if cfg.resume:  # resume=<run dir> among the overrides
        cfg = resume_config(cfg, overrides)
    hush_libraries(bool(cfg.verbose))
    run_server(
        grid, cfg, Path(str(context.run_config.get("output-dir", "outputs/deployment")))
    )
