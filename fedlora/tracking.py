"""Experiment tracking: a run's configuration, per-round metrics, summary and plots,
sent to TensorBoard, MLflow or Weights & Biases besides the run directory.

``conf/logger/<name>.yaml`` names the tracker's class (``_target_``) and its options;
:func:`from_settings` builds it (``logger=none``: :class:`Tracker`, which does
nothing). The ServerApp calls, in order::

    start(run_dir, config, run_id, history)   # once, before round 0
    log_round(row)                            # after each row of metrics.jsonl
    log_summary(summary)                      # summary.json
    log_files(paths)                          # config.yaml, metrics.jsonl, plots
    close(failed)                             # also when the run fails

Each backend is imported only when its run starts; a missing package is a
ConfigError as soon as the settings are checked. By default everything a tracker
writes lives under the run directory (``<run dir>/tensorboard/``,
``<run dir>/mlruns/``, ``<run dir>/wandb/``), so the runs of a sweep never mix.

A metrics row holds more than numbers. :func:`scalars` turns it into series: nested
mappings become keys joined with ``/`` (``epsilon/0``, ``bytes_up_by_rank/8``), a
list becomes its length (``declined/count``: its entries are per-client records,
not series), booleans 0 or 1; ``None``, text and non-finite numbers are left out
(``metrics.jsonl``, logged as a file, keeps everything).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from fedlora.errors import ConfigError, build_target

SECTION = "logger"  # the settings section (conf/logger/)
INSTALL = 'pip install -e ".[tracking]"'
#: the MLflow tag (and W&B run id) that carries fedlora's run id, kept by a resume
RUN_ID_TAG = "fedlora.run_id"


def flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """The leaves of nested mappings, their keys joined with ``sep``
    (``{"a": {"b": 1}}`` -> ``{"a<sep>b": 1}``); lists are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, name + sep))
        else:
            out[name] = value
    return out


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row as flat series (see the module doc): nested
    mappings joined with ``/``, a list as ``<key>/count``, booleans as 0 or 1;
    None, text and non-finite numbers left out."""
    out: dict[str, float] = {}
    for key, value in flatten(row, "/").items():
        if isinstance(value, (list, tuple)):
            out[f"{key}/count"] = float(len(value))
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """The tracker interface, and ``logger=none``: every call does nothing.

    A backend overrides the ``_open``, ``_scalars``, ``_summary``, ``_files`` and
    ``_close`` hooks; the public methods turn rows into series and keep the step
    (the round). Building a tracker has no side effect: it checks its options and
    that its package is installed, so the settings check can build one.
    """

    name: ClassVar[str] = "none"
    #: the Python package the backend needs (None: none)
    package: ClassVar[str | None] = None

    def __init__(self) -> None:
        if self.package and importlib.util.find_spec(self.package) is None:
            raise ConfigError(
                SECTION,
                self.name,
                f"needs the Python package {self.package}, which is not installed: "
                f"{INSTALL} (or choose logger=none)",
            )
        self.run_dir = Path(".")
        self.step = 0
        self.started = False

    def start(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        run_id: str,
        history: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Open the backend's run for the run directory ``run_dir`` and log the
        resolved ``config``.

        ``run_id`` is fedlora's run id (kept by a resume). ``history``: a resumed
        run's rows up to its checkpoint; a backend that starts a new record of the
        run logs them first, so that it holds the whole run, and one that
        continues its record leaves them (it logged them before the checkpoint).
        """
        self.run_dir = Path(run_dir)
        fresh = self._open(dict(config), run_id, resumed=bool(history))
        self.started = True
        if fresh:
            for row in history:
                self.log_round(row)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log one ``metrics.jsonl`` row at step ``row["round"]``."""
        self.step = int(row["round"])
        if self.started:
            values = scalars({k: v for k, v in row.items() if k != "round"})
            self._scalars(values, self.step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Log ``summary.json``: its numbers as ``summary/<key>`` at the last
        round's step, and the whole mapping."""
        if self.started:
            self._summary(dict(summary))

    def log_files(self, paths: Iterable[Path]) -> None:
        """Log files of the run directory (PNG plots as images where the backend
        shows images)."""
        if self.started:
            self._files([Path(p) for p in paths if Path(p).is_file()])

    def close(self, failed: bool = False) -> None:
        """End the backend's run (marked failed when ``failed``); idempotent."""
        if self.started:
            self.started = False
            self._close(failed)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)

    # --- the backend's hooks (none here) ---------------------------------------
    def _open(self, config: dict[str, Any], run_id: str, resumed: bool) -> bool:
        """Open the run; return whether it is a new record (see :meth:`start`)."""
        return False

    def _scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def _summary(self, summary: dict[str, Any]) -> None:
        pass

    def _files(self, paths: list[Path]) -> None:
        pass

    def _close(self, failed: bool) -> None:
        pass

    # --- helpers for the backends ----------------------------------------------
    def _folder(self, option: str | None, default: str) -> Path:
        """``option`` as a folder, or ``<run dir>/<default>`` when it is None."""
        folder = Path(option) if option else self.run_dir / default
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _relative_folder(self, path: Path) -> str | None:
        """``path``'s folder relative to the run directory (None: the top)."""
        try:
            parent = path.resolve().parent.relative_to(self.run_dir.resolve())
        except ValueError:
            return None
        return None if parent == Path(".") else parent.as_posix()


def _summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    return {f"summary/{k}": v for k, v in scalars(summary).items()}


def _json_block(value: Any) -> str:
    """``value`` as indented JSON in a Markdown code block (TensorBoard's text)."""
    return "```\n" + json.dumps(value, indent=2, default=str) + "\n```"


class TensorBoard(Tracker):
    """``logger=tensorboard``: event files (torch's ``SummaryWriter``).

    Scalars per round, the config and the summary as text, the plots as images.
    A resumed run writes to the same folder and purges what the earlier run logged
    from the checkpoint's first round on, then logs the checkpoint's rows again:
    TensorBoard shows each round once, as ``metrics.jsonl`` has it.

    Parameters
    ----------
    log_dir : str or None
        The event folder; None: ``<run dir>/tensorboard``.
    """

    name = "tensorboard"
    package = "tensorboard"

    def __init__(self, log_dir: str | None = None) -> None:
        super().__init__()
        self.log_dir = log_dir
        self._writer: Any = None

    def _open(self, config: dict[str, Any], run_id: str, resumed: bool) -> bool:
        from torch.utils.tensorboard import SummaryWriter

        folder = self._folder(self.log_dir, "tensorboard")
        # purge_step: events at steps >= 0 from earlier writers are hidden
        self._writer = SummaryWriter(str(folder), purge_step=0 if resumed else None)
        self._writer.add_text("config", _json_block(config), 0)
        self._writer.add_text(RUN_ID_TAG, run_id, 0)
        return True

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()  # a crash keeps every logged round

    def _summary(self, summary: dict[str, Any]) -> None:
        for key, value in _summary_scalars(summary).items():
            self._writer.add_scalar(key, value, self.step)
        self._writer.add_text("summary", _json_block(summary), self.step)

    def _files(self, paths: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            if path.suffix.lower() == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                tag = f"plots/{path.stem}"
                self._writer.add_image(tag, pixels, self.step, dataformats="HWC")

    def _close(self, failed: bool) -> None:
        self._writer.close()


class MLflow(Tracker):
    """``logger=mlflow``: an MLflow run (through ``MlflowClient``, no global state).

    The config as params (dotted keys) and as the artifact ``config.yaml``; each
    round's metrics at step = round; the summary's numbers as ``summary/<key>`` and
    ``summary.json``; the files as artifacts (plots under ``plots/``). The run is
    tagged ``fedlora.run_id``: a resumed run finds it in the store and continues it
    (params keep their first values, MLflow cannot change them; rounds the earlier
    run logged after its checkpoint keep those values beside the new ones at the
    same step). In a store without it (e.g. resumed into a new run directory) it
    starts a new MLflow run holding the checkpoint's rows too.

    Parameters
    ----------
    tracking_uri : str or None
        Where runs go (``http://host:5000``, ``sqlite:///path/mlflow.db``); None: a
        SQLite store in ``<run dir>/mlruns/mlflow.db`` with the artifacts in
        ``<run dir>/mlruns/artifacts/`` (MLflow 3 keeps its plain file store, e.g.
        ``./mlruns``, only with ``MLFLOW_ALLOW_FILE_STORE=true``).
    experiment_name : str
        The MLflow experiment (created if missing).
    run_name : str or None
        The run's name; None: the run directory's name.
    """

    name = "mlflow"
    package = "mlflow"
    PARAM_LENGTH = 6000  # MLflow's longest param value

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "fedlora",
        run_name: str | None = None,
    ) -> None:
        super().__init__()
        if not experiment_name:
            raise ConfigError(
                f"{SECTION}.experiment_name", experiment_name, "name the experiment"
            )
        self.tracking_uri = tracking_uri
        self.experiment_name = str(experiment_name)
        self.run_name = run_name
        self._client: Any = None
        self._run_id = ""

    def _open(self, config: dict[str, Any], run_id: str, resumed: bool) -> bool:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts = self.tracking_uri, None
        if uri is None:
            store = self._folder(None, "mlruns").resolve()
            uri = f"sqlite:///{store / 'mlflow.db'}"
            artifacts = (store / "artifacts").as_uri()
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(self.experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    self.experiment_name, artifact_location=artifacts
                )
            )
            found = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
                max_results=1,
            )
        except Exception as exc:  # the store cannot be opened: say which
            raise ConfigError(
                f"{SECTION}.tracking_uri",
                self.tracking_uri,
                f"MLflow cannot use {uri} ({type(exc).__name__}: {exc}); point it "
                "at a tracking server or database, or leave it null (a store in "
                "the run directory)",
            ) from exc
        self._client = client
        if found:
            self._run_id = found[0].info.run_id
            client.update_run(self._run_id, status="RUNNING")
            logged = found[0].data.params
        else:
            run = client.create_run(
                experiment_id,
                run_name=self.run_name or self.run_dir.name,
                tags={RUN_ID_TAG: run_id},
            )
            self._run_id, logged = run.info.run_id, {}
        params = [
            Param(key, str(value)[: self.PARAM_LENGTH])
            for key, value in flatten(config, ".").items()
            if key not in logged
        ]
        client.log_batch(self._run_id, params=params)
        client.log_dict(self._run_id, config, "config.yaml")
        return not found

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        self._metrics(values, step)

    def _summary(self, summary: dict[str, Any]) -> None:
        self._metrics(_summary_scalars(summary), self.step)
        self._client.log_dict(self._run_id, summary, "summary.json")

    def _files(self, paths: list[Path]) -> None:
        for path in paths:
            folder = self._relative_folder(path)
            self._client.log_artifact(self._run_id, str(path), folder)

    def _close(self, failed: bool) -> None:
        status = "FAILED" if failed else "FINISHED"
        self._client.set_terminated(self._run_id, status=status)


class WandB(Tracker):
    """``logger=wandb``: a Weights & Biases run, offline by default.

    The config as the run's config; each round's metrics at step = round; the
    summary's numbers as ``summary/<key>`` in the run's summary; the plots as
    images and the other files saved with the run. The W&B run id is fedlora's run
    id: a resumed run resumes the same W&B run (offline, it writes a second run
    folder with the same id under ``<dir>/wandb/``; ``wandb sync`` uploads both
    as one run). W&B takes no step below one it has: rounds an earlier run logged
    after its checkpoint keep their first values there.

    Parameters
    ----------
    project, entity : str or None
        Where the run goes (entity None: the account's default).
    mode : str
        ``offline`` (no network: the run stays in ``<dir>/wandb/``, for
        ``wandb sync`` later), ``online`` or ``disabled``.
    dir : str or None
        The folder W&B writes its ``wandb/`` folder in; None: the run directory.
    run_name, group : str or None
        The run's display name (None: the run directory's name) and group.
    tags : sequence of str
        The run's tags.
    """

    name = "wandb"
    package = "wandb"
    MODES = ("offline", "online", "disabled")

    def __init__(
        self,
        project: str = "fedlora",
        entity: str | None = None,
        mode: str = "offline",
        dir: str | None = None,
        run_name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(
                f"{SECTION}.mode",
                mode,
                f"must be one of {', '.join(self.MODES)} (offline: no network; "
                "wandb sync uploads the run later)",
            )
        self.project, self.entity, self.mode = project, entity, mode
        self.dir, self.run_name, self.group = dir, run_name, group
        self.tags = [str(t) for t in tags]
        self._run: Any = None

    def _open(self, config: dict[str, Any], run_id: str, resumed: bool) -> bool:
        import wandb

        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(self._folder(self.dir, "")),
            name=self.run_name or self.run_dir.name,
            group=self.group,
            tags=self.tags,
            id=run_id,
            resume="allow",
            config=config,
            # the run's console stays where it is (progress lines are metrics)
            settings=wandb.Settings(console="off"),
        )
        return False

    def _scalars(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def _summary(self, summary: dict[str, Any]) -> None:
        self._run.summary.update(_summary_scalars(summary))

    def _files(self, paths: list[Path]) -> None:
        import wandb

        images = {
            f"plots/{p.stem}": wandb.Image(str(p))
            for p in paths
            if p.suffix.lower() == ".png"
        }
        if images:
            self._run.log(images, step=self.step)
        for path in paths:
            if path.suffix.lower() != ".png":  # kept at its place in the run dir
                inside = path.resolve().is_relative_to(self.run_dir.resolve())
                base = self.run_dir if inside else path.parent
                self._run.save(str(path), base_path=str(base), policy="now")

    def _close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def from_settings(section: Mapping[str, Any] | None) -> Tracker:
    """The tracker of the ``logger`` settings section (None, as in settings written
    before the section existed: :class:`Tracker`, no tracking).

    Raises
    ------
    ConfigError
        Not a mapping, no ``_target_``, a target that is not a Tracker, an option
        the tracker does not take (naming ``logger.<key>``), a bad value, or the
        backend's package missing (naming ``logger=<name>`` and the install).
    """
    if section is None:
        return Tracker()
    return build_target(
        section,
        Tracker,
        SECTION,
        "fedlora.tracking.TensorBoard, or choose logger=none",
        Tracker,
    )
