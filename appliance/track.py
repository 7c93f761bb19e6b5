"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed by the training events.

Each tracker is an EventSink (appliance/train/events.py) that sits beside the dashboard. It
opens when the run starts (after the run folder is laid out, so --overwrite cannot delete
what it writes), logs every StepDone and EvalDone under the same names in all three
(train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/memory_gib, val/loss, ...),
records the run's resolved config as params (hparams in TensorBoard), and closes with the
run's outcome. Where each one writes:

    tensorboard  RUN/tensorboard/ (event files)
    mlflow       $MLFLOW_TRACKING_URI, else a local store RUN/mlflow.db (SQLite, MLflow's
                 local backend; the file store is in maintenance mode), artifacts RUN/mlflow-artifacts/
    wandb        offline into RUN/wandb/ unless the user has configured W&B
                 (WANDB_API_KEY, WANDB_MODE, or a key saved by `wandb login`)

Their libraries are imported when a run starts, never by `appliance --help`. A tracker that
fails (a server that does not answer, a full disk) warns once and stops; the training goes
on, because hours of training are worth more than a chart. Under torchrun only rank 0 emits
events, so only rank 0 reports. A resumed run continues the same tracker runs (their ids are
kept in RUN/trackers.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from appliance.config import RunConfig
from appliance.errors import ApplianceError, TrainingInterrupted
from appliance.runs import flatten
from appliance.store import atomic_write_json, read_json
from appliance.train import EvalDone, Event, EventSink, PhaseChanged, RunStarted, StepDone

Warn = Callable[[str], None]


def tracking_modules(name: str) -> dict[str, str]:
    """The modules a tracker imports, each with the PyPI package that brings it."""
    if name == "tensorboard":
        return {"tensorboard": "tensorboard"}
    if name == "wandb":
        return {"wandb": "wandb"}
    modules = {"mlflow": "mlflow-skinny"}
    if not _mlflow_remote():  # the local store is SQLite, through SQLAlchemy and alembic
        modules |= {"sqlalchemy": "sqlalchemy", "alembic": "alembic"}
    return modules


def check_installed(names: list[str]) -> None:
    """Refuse, before anything heavy, a --report-to whose library is not installed."""
    missing = {}
    for name in names:
        for module, package in tracking_modules(name).items():
            if importlib.util.find_spec(module) is None:
                missing.setdefault(name, []).append(package)
    if missing:
        which = " and ".join(f"--report-to {name}" for name in missing)
        packages = [p for ps in missing.values() for p in ps]
        raise ApplianceError(
            f"{which} needs {', '.join(packages)}, which {'is' if len(packages) == 1 else 'are'} not installed here.",
            f"pip install {' '.join(packages)}  (into the environment appliance runs from), or drop {which}",
        )


# -- what is reported ----------------------------------------------------------------


def step_metrics(event: StepDone) -> dict[str, float]:
    """A training step's figures, as the dashboard shows them, under train/."""
    figures = {
        "loss": event.loss,
        "lr": event.lr,
        "grad_norm": event.grad_norm,
        "tokens_per_s": event.tokens_per_s,
        "memory_gib": event.memory_gib,
        "epoch": event.epoch,
        "elapsed_s": event.elapsed_s,
        "eta_s": event.eta_s,
        **event.extra,
    }
    return {f"train/{k}": float(v) for k, v in figures.items() if isinstance(v, (int, float))}


def eval_metrics(event: EvalDone) -> dict[str, float]:
    """Validation figures under val/ (val_loss → val/loss)."""
    return {f"val/{k.removeprefix('val_')}": float(v) for k, v in event.metrics.items() if isinstance(v, (int, float))}


def run_params(cfg: RunConfig, started: RunStarted) -> dict[str, Any]:
    """The resolved config (dotted keys) and what the run found (device, parameters, examples)."""
    about = {f"run.{k}": v for k, v in dataclasses.asdict(started).items() if k not in ("run_name", "start_step", "resumed_from")}
    return {**flatten(cfg.model_dump(mode="json")), **about}


def scalar(value: Any) -> bool | int | float | str:
    """A param value every tracker takes: numbers and text as they are, the rest as JSON."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


# -- the trackers ----------------------------------------------------------------------


class Tracker:
    """One tracker as an event sink and a context manager. Subclasses implement open/log/close."""

    name = ""
    title = ""

    def __init__(self, run_dir: Path, cfg: RunConfig, warn: Warn):
        self.run_dir, self.cfg, self.warn = run_dir, cfg, warn
        self.opened = False
        self.failed = False
        self.last: dict[str, float] = {}  # the newest value of each metric: TensorBoard's hparams take them at the end

    # the interface
    def open(self, started: RunStarted) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:  # finished | failed | killed
        raise NotImplementedError

    # the event sink
    def __call__(self, event: Event) -> None:
        if self.failed:
            return
        try:
            if isinstance(event, RunStarted):
                self.open(event)
                self.opened = True
                return
            if not self.opened:
                return
            if isinstance(event, StepDone):
                metrics, step = step_metrics(event), event.step
            elif isinstance(event, EvalDone):
                metrics, step = eval_metrics(event), event.step
            elif isinstance(event, PhaseChanged):
                metrics, step = {"train/trainable_params": float(event.trainable_params)}, event.step
            else:
                return
            self.last.update(metrics)
            self.log(step, metrics)
        except Exception as err:  # noqa: BLE001 -- a tracker must never stop the training
            self.give_up(err)

    def give_up(self, err: Exception) -> None:
        self.failed = True
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        self.warn(f"{self.title}: {text[:300]}; training goes on without {self.title}")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if self.opened and not self.failed:
            if exc_type is None:
                status = "finished"
            elif issubclass(exc_type, (TrainingInterrupted, KeyboardInterrupt)):
                status = "killed"
            else:
                status = "failed"
            try:
                self.close(status)
            except Exception as err:  # noqa: BLE001
                self.give_up(err)
        return False

    # ids kept in the run folder, so that a resumed run continues the same tracker run
    def saved_id(self, started: RunStarted) -> str | None:
        path = self.run_dir / "trackers.json"
        if not started.start_step or not path.is_file():
            return None
        try:
            return read_json(path).get(self.name)
        except (OSError, ValueError, AttributeError):
            return None

    def save_id(self, value: str) -> None:
        path = self.run_dir / "trackers.json"
        try:
            ids = read_json(path) if path.is_file() else {}
        except (OSError, ValueError):
            ids = {}
        atomic_write_json(path, {**ids, self.name: value})


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/: scalars, the config as text, and hparams with the final figures."""

    name, title = "tensorboard", "TensorBoard"

    def open(self, started: RunStarted) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resume replays the steps after its checkpoint: purge_step makes TensorBoard drop the
        # first attempt's events from that step on.
        purge = started.start_step + 1 if started.start_step else None
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge, flush_secs=10)
        self.params = {k: scalar(v) for k, v in run_params(self.cfg, started).items()}
        self.writer.add_text("config", "```yaml\n" + self.cfg.to_yaml() + "```", started.start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The hparams plugin shows the newest value of each metric tag next to the run's settings.
        for summary in hparams(self.params, dict(self.last)):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


def _mlflow_remote() -> bool:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return bool(uri) and not uri.startswith(("sqlite:", "file:", "/", "."))


@contextlib.contextmanager
def _http_policy(retries: int) -> Iterator[None]:
    """MLflow retries an unreachable server for minutes (7 retries, growing back-off) while the
    training waits: the first contact gets no retry, later calls a couple. The user's own
    MLFLOW_HTTP_REQUEST_* settings win."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    kept = {k: os.environ.get(k) for k in names}
    os.environ.update({k: v for k, v in names.items() if kept[k] is None})
    try:
        yield
    finally:
        for key, value in kept.items():
            if value is None:
                os.environ.pop(key, None)


_TRANSPORT_REASONS = (
    (re.compile(r"\[Errno -?\d+\] ([^\"')(]+)"), None),
    (re.compile(r"timed? ?out", re.IGNORECASE), "timed out"),
    (re.compile(r"Name or service not known|nodename nor servname|Temporary failure in name resolution"), "unknown host"),
)


def _unreachable(text: str) -> str | None:
    """Why a request never reached the server ("Connection refused", "timed out"), from the
    requests/urllib3 text MLflow wraps; None when the server answered (with an error)."""
    for pattern, reason in _TRANSPORT_REASONS:
        found = pattern.search(text)
        if found:
            return reason or found.group(1).strip()
    return None


class MlflowTracker(Tracker):
    """A run in an MLflow experiment ($MLFLOW_EXPERIMENT_NAME, else "appliance"), metrics by step."""

    name, title = "mlflow", "MLflow"

    def open(self, started: RunStarted) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for logger in ("mlflow", "alembic"):  # creating the local store logs each migration
            logging.getLogger(logger).setLevel(logging.WARNING)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = f"sqlite:///{self.run_dir / 'mlflow.db'}" if local else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "appliance"
        experiment = self._first_contact(experiment_name)
        with _http_policy(retries=2):
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = (self.run_dir / "mlflow-artifacts").as_uri() if local else None
                experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
            self._start_run(experiment_id, started)

    def _first_contact(self, experiment_name: str) -> Any:
        """The experiment (None if new); a server that does not answer fails here, at once, in words."""
        try:
            with _http_policy(retries=0):
                return self.client.get_experiment_by_name(experiment_name)
        except Exception as err:  # noqa: BLE001 -- MLflow wraps whatever the transport raised
            text = str(err).strip()
            reason = _unreachable(text)
            if reason:
                raise RuntimeError(f"the tracking server at {self.uri} does not answer ({reason}); check MLFLOW_TRACKING_URI") from None
            first = text.splitlines()[0][:200] if text else type(err).__name__
            raise RuntimeError(f"the tracking server at {self.uri} refused the request ({first})") from None

    def _start_run(self, experiment_id: str, started: RunStarted) -> None:
        """A new MLflow run with the params, or (on --resume) the run this one continues."""
        from mlflow.entities import Param

        self.run_id = self.saved_id(started)
        known: dict[str, str] = {}
        if self.run_id:
            known = self.client.get_run(self.run_id).data.params
        else:
            tags = {"appliance.run_dir": str(self.run_dir), "appliance.model": started.model}
            self.run_id = self.client.create_run(experiment_id, run_name=started.run_name, tags=tags).info.run_id
            self.save_id(self.run_id)
        # MLflow refuses to change a logged param: a resume (which may change, say, save_every) adds only new ones.
        params = [Param(k, str(scalar(v))[:6000]) for k, v in run_params(self.cfg, started).items() if k not in known]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params at a time
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with _http_policy(retries=2):
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        with _http_policy(retries=2):
            self.client.set_terminated(self.run_id, status.upper())


def _wandb_configured() -> bool:
    """The user set W&B up (a key or a mode in the environment, or `wandb login`'s key in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    import netrc
    import urllib.parse

    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Tracker):
    """A W&B run ($WANDB_PROJECT, else "appliance"): offline files in RUN/wandb/ unless W&B is configured."""

    name, title = "wandb", "Weights & Biases"

    def open(self, started: RunStarted) -> None:
        import wandb

        saved = self.saved_id(started)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "appliance",
            name=started.run_name,
            dir=str(self.run_dir),
            config=run_params(self.cfg, started),
            mode=None if _wandb_configured() else "offline",
            id=saved,
            resume="allow" if saved else None,
            # console="off": W&B's capture of stdout would fight the live dashboard for the terminal.
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.save_id(self.run.id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 130}[status])


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, MlflowTracker, WandbTracker)}


@contextlib.contextmanager
def reporting(names: list[str], run_dir: Path, cfg: RunConfig, warn: Warn) -> Iterator[list[Tracker]]:
    """The trackers named (each once), entered together; on leaving, each closes with the run's outcome."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(TRACKERS[name](run_dir, cfg, warn)) for name in dict.fromkeys(names)]


def fan_out(*sinks: EventSink) -> EventSink:
    """One sink that hands each event to every sink in turn (the dashboard first)."""

    def emit(event: Event) -> None:
        for sink in sinks:
            sink(event)

    return emit
