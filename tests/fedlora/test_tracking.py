"""Experiment trackers: each backend writes a few rounds, a summary and files, and
its own reader gets them back (TensorBoard's event accumulator, MLflow's client on
the run's store, W&B's ``wandb leet inspect`` of the offline run's transaction
log); a resumed run continues the same record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

from fedlora import tracking
from fedlora.errors import ConfigError
from fedlora.validate import validate
from strategies.server_app import compose, settings

matplotlib.use("Agg")

CONFIG = {"train": {"lr": 0.001, "batch_size": 16}, "strategy": {"name": "x"}}
RUN_ID = "20261203-120000-0123abcd"


def row(n: int, **extra: Any) -> dict[str, Any]:
    """A metrics row as the server writes one, numbers derived from ``n``."""
    return {
        "round": n,
        "eval_accuracy": 0.5 + n / 10,
        "eval_loss": np.float32(1.0 / (n + 1)),  # numpy scalars occur too
        "aggregation_error": None if n == 0 else 0.01 * n,
        "aggregation_error_by_module": {} if n == 0 else {"query": 0.02 * n},
        "epsilon": {"0": 1.5 * n, "1": 2.0 * n},
        "declined": [{"partition-id": 1, "reason": "budget"}] * (n % 2),
        "failure_reasons": [],
        "lora_fair": {"solver": "lstsq", "residual": 0.25 * n},
        "converged": n > 1,
        "bad": float("nan"),
        **extra,
    }


#: ``row(n)``'s series, written out by hand
def expected(n: int) -> dict[str, float]:
    out = {
        "eval_accuracy": 0.5 + n / 10,
        "eval_loss": 1.0 / (n + 1),
        "epsilon/0": 1.5 * n,
        "epsilon/1": 2.0 * n,
        "declined/count": n % 2,
        "failure_reasons/count": 0,
        "lora_fair/residual": 0.25 * n,
        "converged": 1.0 if n > 1 else 0.0,
    }
    if n:
        out |= {
            "aggregation_error": 0.01 * n,
            "aggregation_error_by_module/query": 0.02 * n,
        }
    return out


SUMMARY = {
    "final_eval_accuracy": 0.8,
    "strategy": "x",
    "epsilon_per_client": {"0": 3.0},
}
SUMMARY_SERIES = {
    "summary/final_eval_accuracy": 0.8,
    "summary/epsilon_per_client/0": 3.0,
}


def run_files(run_dir: Path) -> list[Path]:
    """A run directory's files as the server leaves them: config, metrics,
    summary and one plot (a real PNG, 300 x 200)."""
    import matplotlib.pyplot as plt

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("train:\n  lr: 0.001\n")
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    (run_dir / "summary.json").write_text(json.dumps(SUMMARY))
    (run_dir / "plots").mkdir(exist_ok=True)
    fig = plt.figure(figsize=(3, 2), dpi=100)
    fig.savefig(run_dir / "plots" / "accuracy_vs_round.png")
    plt.close(fig)
    return [
        run_dir / "config.yaml",
        run_dir / "metrics.jsonl",
        run_dir / "summary.json",
        run_dir / "plots" / "accuracy_vs_round.png",
    ]


def track(
    tracker: tracking.Tracker,
    run_dir: Path,
    rounds: range,
    history: list[dict[str, Any]] | None = None,
    end: bool = True,
    crash: bool = False,
    **extra: Any,
) -> None:
    """Drive ``tracker`` as the ServerApp does over ``rounds`` (``end``: then the
    summary and files; ``crash``: then raise, as a failing run)."""
    files = run_files(run_dir)
    with tracker:
        tracker.start(run_dir, CONFIG, RUN_ID, history or [])
        for n in rounds:
            tracker.log_round(row(n, **extra))
        if end:
            tracker.log_summary(SUMMARY)
            tracker.log_files(files)
        if crash:
            raise RuntimeError("the run failed")


def test_scalars_flatten_nested_count_lists_and_skip_what_is_not_a_number():
    assert tracking.scalars({k: v for k, v in row(3).items() if k != "round"}) == (
        pytest.approx(expected(3))
    )
    assert tracking.scalars({"x": {"y": {"z": 1}}, "t": "text", "i": np.int64(4)}) == {
        "x/y/z": 1.0,
        "i": 4.0,
    }


def test_logger_none_builds_the_no_op_tracker_and_writes_nothing(tmp_path):
    tracker = tracking.from_settings(settings(compose([]))["logger"])
    assert type(tracker) is tracking.Tracker
    assert type(tracking.from_settings(None)) is tracking.Tracker  # old settings
    track(tracker, tmp_path / "run", range(3))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "plots",
        "summary.json",
    ]


# --- TensorBoard --------------------------------------------------------------------
def tensorboard_events(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def series(events: Any, tag: str) -> dict[int, float]:
    """A scalar's values by step, which must hold one value each."""
    steps = [e.step for e in events.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_rounds_config_summary_and_plots_read_back(tmp_path):
    run_dir = tmp_path / "run"
    track(tracking.TensorBoard(), run_dir, range(3))
    events = tensorboard_events(run_dir / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert tags == set(expected(1)) | set(SUMMARY_SERIES)
    for tag in expected(1):
        want = {n: expected(n)[tag] for n in range(3) if tag in expected(n)}
        assert series(events, tag) == pytest.approx(want, rel=1e-6), tag  # float32
    for tag, value in SUMMARY_SERIES.items():
        assert series(events, tag) == pytest.approx({2: value})
    text = {
        t: events.Tensors(t)[0].tensor_proto.string_val[0].decode()
        for t in ("config/text_summary", "summary/text_summary")
    }
    assert json.loads(text["config/text_summary"].strip("`\n")) == CONFIG
    assert json.loads(text["summary/text_summary"].strip("`\n")) == SUMMARY
    (image,) = events.Images("plots/accuracy_vs_round")
    assert (image.step, image.width, image.height) == (2, 300, 200)


def test_tensorboard_resume_replaces_the_rounds_after_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # the first run logged rounds 0-3, its last checkpoint holds rounds 0-2
    track(tracking.TensorBoard(), run_dir, range(4), end=False, eval_accuracy=0.0)
    history = [row(n, eval_accuracy=0.0) for n in range(3)]
    track(tracking.TensorBoard(), run_dir, range(3, 5), history, eval_accuracy=1.0)
    events = tensorboard_events(run_dir / "tensorboard")
    assert series(events, "eval_accuracy") == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1}
    assert series(events, "epsilon/1") == pytest.approx({n: 2.0 * n for n in range(5)})


def test_tensorboard_into_a_new_run_directory_holds_the_checkpoints_rounds(tmp_path):
    history = [row(n) for n in range(3)]
    track(tracking.TensorBoard(), tmp_path / "new", range(3, 5), history)
    events = tensorboard_events(tmp_path / "new" / "tensorboard")
    assert sorted(series(events, "eval_accuracy")) == [0, 1, 2, 3, 4]


# --- MLflow -------------------------------------------------------------------------
def mlflow_run(run_dir: Path) -> tuple[Any, Any]:
    """The MLflow client on the run's default store, and the run tagged with
    fedlora's run id."""
    from mlflow.tracking import MlflowClient

    store = run_dir / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("fedlora")
    (run,) = client.search_runs(
        [experiment.experiment_id], f"tags.`fedlora.run_id` = '{RUN_ID}'"
    )
    return client, run


def history_of(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)
    )


def test_mlflow_rounds_params_summary_and_artifacts_read_back(tmp_path):
    run_dir = tmp_path / "run"
    track(tracking.MLflow(), run_dir, range(3))
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert set(run.data.metrics) == set(expected(1)) | set(SUMMARY_SERIES)
    for key in expected(1):
        want = {n: expected(n)[key] for n in range(3) if key in expected(n)}
        points = history_of(client, run, key)
        assert len(points) == len(want)  # each round once
        assert dict(points) == pytest.approx(want), key
    assert run.data.params == {
        "train.lr": "0.001",
        "train.batch_size": "16",
        "strategy.name": "x",
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "metrics.jsonl", "summary.json", "plots"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/accuracy_vs_round.png"
    ]
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == SUMMARY
    assert str((run_dir / "mlruns" / "artifacts").resolve()) in run.info.artifact_uri


def test_mlflow_resume_continues_the_same_run_and_a_failure_marks_it(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError):  # the first run dies after round 3
        track(tracking.MLflow(), run_dir, range(4), end=False, crash=True)
    assert mlflow_run(run_dir)[1].info.status == "FAILED"
    track(tracking.MLflow(), run_dir, range(3, 5), [row(n) for n in range(3)])
    client, run = mlflow_run(run_dir)  # one run, the same one
    assert run.info.status == "FINISHED"
    # rounds 0-2 once, round 3 from both runs (MLflow keeps both), round 4
    steps = [step for step, _ in history_of(client, run, "eval_accuracy")]
    assert steps == [0, 1, 2, 3, 3, 4]


def test_mlflow_store_it_cannot_open_names_the_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()  # MLflow 3 refuses its old file store
    with pytest.raises(ConfigError) as err:
        track(tracking.MLflow(tracking_uri=uri), tmp_path / "run", range(1))
    assert err.value.key == "logger.tracking_uri" and err.value.found == uri


# --- Weights & Biases (offline) -----------------------------------------------------
@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own folders (settings, cache) in ``tmp_path``, not the home folder."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(run_folder: Path) -> list[dict[str, Any]]:
    """The records of an offline run's ``.wandb`` log, as W&B's reader prints them."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_history(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    history: dict[int, dict[str, Any]] = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            history.setdefault(int(item["_step"]), {}).update(item)
    return history


def test_wandb_offline_rounds_config_summary_and_files_read_back(tmp_path, wandb_home):
    run_dir = tmp_path / "run"
    track(tracking.WandB(), run_dir, range(3))
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    assert folder.name.endswith(RUN_ID)
    records = wandb_records(folder)
    history = wandb_history(records)
    assert sorted(history) == [0, 1, 2]
    for n in range(3):
        got = {k: v for k, v in history[n].items() if k in expected(n)}
        assert got == pytest.approx(expected(n)), n
    assert history[2]["plots/accuracy_vs_round._type"] == "image-file"
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["project"], run["run_id"], run["display_name"]) == (
        "fedlora",
        RUN_ID,
        "run",
    )
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config == CONFIG
    summary: dict[str, Any] = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert {k: summary[k] for k in SUMMARY_SERIES} == SUMMARY_SERIES
    saved = {
        f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]
    }
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= saved
    assert json.loads((folder / "files" / "summary.json").read_text()) == SUMMARY
    assert records[-1]["type"] == "exit" and records[-1]["exit"]["exit_code"] == 0


def test_wandb_resume_writes_a_second_offline_run_with_the_same_id(
    tmp_path, wandb_home
):
    run_dir = tmp_path / "run"
    track(tracking.WandB(), run_dir, range(3), end=False)
    time.sleep(1)  # W&B names a run's folder by its start second (a real run lasts)
    track(tracking.WandB(), run_dir, range(3, 5), [row(n) for n in range(3)])
    first, second = sorted((run_dir / "wandb").glob(f"offline-run-*-{RUN_ID}"))
    assert sorted(wandb_history(wandb_records(first))) == [0, 1, 2]
    assert sorted(wandb_history(wandb_records(second))) == [3, 4]  # not re-logged


# --- settings ------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["none", "tensorboard", "mlflow", "wandb"])
def test_every_logger_option_builds_with_its_defaults(option):
    from hydra.utils import instantiate

    section = settings(compose([f"logger={option}"]))["logger"]
    tracker = tracking.from_settings(section)
    assert tracker.name == option
    assert type(instantiate(section)) is type(tracker)  # Hydra builds the same


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["logger=wandb", "logger.mode=cloud"], "logger.mode"),
        (["logger=wandb", "+logger.projekt=x"], "logger.projekt"),
        (["logger=mlflow", "logger.experiment_name="], "logger.experiment_name"),
        (["logger._target_=fedlora.tracking.Nope"], "logger._target_"),
    ],
)
def test_bad_logger_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(settings(compose(overrides)))
    assert err.value.key == key


class NeedsAMissingPackage(tracking.Tracker):
    name = "missing"
    package = "fedlora_no_such_package"


def test_a_missing_backend_package_names_the_logger_and_the_install():
    target = f"{__name__}.NeedsAMissingPackage"
    with pytest.raises(ConfigError) as err:
        validate(settings(compose([f"logger._target_={target}"])))
    assert err.value.key == "logger" and err.value.found == "missing"
    assert 'pip install -e ".[tracking]"' in str(err.value)
