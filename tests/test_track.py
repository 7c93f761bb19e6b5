"""`appliance train --report-to`: TensorBoard, MLflow and W&B get every figure the dashboard shows.

Real training of the tiny LLaMA through the real CLI; what each tracker wrote is read back with
that library's own reader: TensorBoard's EventAccumulator, MLflow's client on the local store,
and W&B's `wandb leet inspect` on the offline run. The figures are checked against the run's own
metrics.jsonl, so a tracker that drops, renames or shifts a figure fails here.
"""

import json
import math
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from conftest import DEMO, REPO, run_cli

# What the dashboard shows of a step and of an evaluation, under the trackers' names.
STEP_FIGURES = {f"train/{k}" for k in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gib", "epoch", "elapsed_s", "eta_s")}
EVAL_FIGURES = {"val/loss", "val/ppl"}


def train_args(name, *extra, steps=4):
    return [
        "train", "--model", "tiny", "--data", str(DEMO / "facts.jsonl"), "--name", name, "--steps", str(steps),
        "--batch-size", "4", "--val", "2", "--eval-every", "2", "--save-every", "2", *extra,
    ]


@pytest.fixture
def no_tracker_setup(tmp_path, monkeypatch):
    """No MLflow server and no W&B account: the defaults a user gets (a private HOME keeps ~/.netrc out)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    return home


def logged(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """metrics.jsonl: the step lines and the evaluation lines, by step."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in lines if "loss" in r}, {r["step"]: r for r in lines if "val_loss" in r}


def tensorboard_scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events, {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(run_folder: Path) -> list[dict]:
    """The records of an offline W&B run, through W&B's own transaction-log reader."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", str(run_folder), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wandb_history(records: list[dict]) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in records:
        if r["type"] == "history":
            rows.setdefault(int(r["history"]["step"]["num"]), {}).update(r["history"]["item"])
    return rows


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


def test_each_tracker_gets_every_dashboard_figure_and_the_config(tiny, appliance_home, no_tracker_setup):
    result = run_cli(*train_args("tracked", "--report-to", "tensorboard", "--report-to", "mlflow", "--report-to", "wandb"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout.lower() and "Traceback" not in result.stderr
    run_dir = appliance_home / "runs" / "tracked"
    steps, evals = logged(run_dir)
    assert sorted(steps) == [1, 2, 3, 4] and sorted(evals) == [2, 4]

    # TensorBoard: event files in the run folder, one point per step, the config and the hparams.
    from tensorboard.plugins.hparams import plugin_data_pb2

    events, scalars = tensorboard_scalars(run_dir)
    assert STEP_FIGURES | EVAL_FIGURES <= set(scalars)
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    assert all(close(scalars["train/loss"][s], steps[s]["loss"]) for s in steps)
    assert all(close(scalars["train/lr"][s], steps[s]["lr"], rel=1e-4) for s in steps)
    assert {s: round(v, 4) for s, v in scalars["val/loss"].items()} == {s: round(e["val_loss"], 4) for s, e in evals.items()}
    start = plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lora.rank"].number_value == 16
    assert start.session_start_info.hparams["train.steps"].number_value == 4
    assert "config/text_summary" in events.Tags()["tensors"]

    # MLflow: a local store in the run folder, read with MLflow's own client.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("appliance")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "16" and run.data.params["train.steps"] == "4" and run.data.params["model.name"] == "tiny"
    assert STEP_FIGURES | EVAL_FIGURES <= set(run.data.metrics)
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(loss) == [1, 2, 3, 4] and all(close(loss[s], steps[s]["loss"]) for s in steps)
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert sorted(val) == [2, 4] and all(close(val[s], evals[s]["val_loss"]) for s in evals)

    # W&B: offline (no account here), files in the run folder, read with W&B's own reader.
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(offline)
    (started,) = [r["run"] for r in records if r["type"] == "run"]
    assert started["display_name"] == "tracked" and started["project"] == "appliance"
    config = started["config"]["update"]
    assert config["lora.rank"] == 16 and config["train.steps"] == 4
    history = wandb_history(records)
    assert {1, 2, 3, 4} <= set(history)
    assert STEP_FIGURES <= set(history[1]) and (STEP_FIGURES | EVAL_FIGURES) <= set(history[2])
    assert all(close(history[s]["train/loss"], steps[s]["loss"]) for s in steps)
    assert all(close(history[s]["val/loss"], evals[s]["val_loss"]) for s in evals)
    (finished,) = [r["exit"] for r in records if r["type"] == "exit"]
    assert finished["exit_code"] == 0


def test_a_stopped_run_resumes_into_the_same_tracker_runs(tiny, appliance_home, no_tracker_setup):
    """SIGTERM after a few steps, then --resume: one MLflow run and one W&B run id with every step
    once, and the first attempt recorded as killed."""
    import time

    args = train_args("cut", "--report-to", "mlflow", "--report-to", "wandb", "--report-to", "tensorboard", steps=40)
    run_dir = appliance_home / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "appliance", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(logged(run_dir)[0], default=0) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143, out
    stopped_at = max(logged(run_dir)[0])
    assert stopped_at < 40

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps, _ = logged(run_dir)
    assert sorted(steps) == list(range(1, 41))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("appliance").experiment_id])
    assert run.info.status == "FINISHED"
    loss = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(loss) == list(range(1, 41)), "every step once, in the one run"

    _, scalars = tensorboard_scalars(run_dir)
    assert sorted(scalars["train/loss"]) == list(range(1, 41))

    first, second = sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    first_records, second_records = wandb_records(first), wandb_records(second)
    ids = {r["run"]["run_id"] for r in first_records + second_records if r["type"] == "run"}
    assert len(ids) == 1, ids
    assert [r["exit"]["exit_code"] for r in first_records if r["type"] == "exit"] == [130]  # killed
    assert [r["exit"]["exit_code"] for r in second_records if r["type"] == "exit"] == [0]
    assert set(wandb_history(first_records)) | set(wandb_history(second_records)) >= set(range(1, 41))


def test_an_unreachable_mlflow_server_costs_one_warning_not_the_run(tiny, appliance_home, no_tracker_setup, monkeypatch):
    # A port with nothing listening: connections are refused at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        result = run_cli(*train_args("offline", "--report-to", "mlflow", "--report-to", "tensorboard"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    warnings = [line for line in out.splitlines() if "MLflow" in line]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{port} does not answer (Connection refused)" in warnings[0] and "training goes on" in warnings[0]
    assert "Traceback" not in out
    assert (appliance_home / "adapters" / "offline" / "adapter_model.safetensors").is_file()
    _, scalars = tensorboard_scalars(appliance_home / "runs" / "offline")  # the other tracker is not held back
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]


def _fail_text(result) -> str:
    import re

    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.bad_input
def test_an_unknown_tracker_is_refused_with_the_known_ones(tmp_path):
    result = CliRunner().invoke(main, train_args("a", "--report-to", "comet"), catch_exceptions=False)
    text = _fail_text(result)
    assert result.exit_code == 2, text
    assert "'comet' is not one of 'tensorboard', 'mlflow', 'wandb'" in text and "Fix:" in text
    assert "Traceback" not in text


def test_report_to_takes_a_list_one_name_or_names_with_commas():
    from appliance.config import load_run_config

    def trackers(setting):
        return load_run_config("sft-qlora", None, [f"train.report_to={setting}"], {}).train.report_to

    assert trackers("[tensorboard, wandb]") == ["tensorboard", "wandb"]
    assert trackers("mlflow") == ["mlflow"] and trackers("mlflow,wandb") == ["mlflow", "wandb"]
    assert load_run_config("sft-qlora").train.report_to == []  # none unless asked for


@pytest.mark.bad_input
def test_an_unknown_tracker_in_the_config_is_refused(tiny, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  report_to: [tensorbord]\n")
    result = CliRunner().invoke(main, [*train_args("a"), "--config", str(config)], catch_exceptions=False)
    text = _fail_text(result)
    assert result.exit_code == 2, text
    assert "report_to" in text and "tensorbord" in text and "Traceback" not in text
    assert not (tiny.store.root / "runs" / "a").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny")])
def test_a_tracker_whose_library_is_missing_is_refused_before_training(tiny, appliance_home, tracker, package):
    """The library made unimportable the way Python itself provides (a None entry in sys.modules),
    in a real CLI process: refused with the pip command, before any model is loaded."""
    launcher = f"import sys; sys.modules[{tracker!r}] = None; from appliance.cli import main; main(prog_name='appliance')"
    result = subprocess.run(
        [sys.executable, "-c", launcher, *train_args("a", "--report-to", tracker)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    text = " ".join((result.stdout + result.stderr).replace("│", " ").split())
    assert result.returncode == 2, text
    assert f"--report-to {tracker} needs {package}" in text and f"pip install {package}" in text, text
    assert "Traceback" not in text
    assert not (appliance_home / "runs" / "a").exists()
