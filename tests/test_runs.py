"""`appliance runs list|show|compare|plot` over real runs of the tiny LLaMA, and the live dashboard's loss curve.

The figures the commands print are checked against the runs' own metrics.jsonl; the image is
read back and must hold every run's curve (its color) in every panel.
"""

import io
import json
import re
import shutil

import pytest
from click.testing import CliRunner
from rich.console import Console

from appliance.cli import main
from appliance.config import load_run_config
from appliance.train.loop import run_training
from conftest import DEMO

BRAILLE = re.compile("[\u2801-\u28ff]")  # plotext draws its curves in braille dots


def tiny_config(**train):
    return load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": "tiny"},
            "data": {"files": [{"path": str(DEMO / "facts.jsonl")}], "val": 2},
            "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "save_every": 3, "eval_every": 2, **train},
        },
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cli(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False, terminal_width=100)
    return result


@pytest.fixture
def two_runs(tiny):
    """Two finished runs that differ only in the learning rate."""
    fast = run_training(tiny_config(lr=1e-3), tiny, "fast")
    slow = run_training(tiny_config(lr=1e-4), tiny, "slow")
    return tiny, fast, slow


def test_list_show_and_compare_report_what_the_runs_logged(two_runs):
    registry, fast, slow = two_runs
    listed = cli("runs", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.output)}
    assert set(rows) == {"fast", "slow"}
    assert all(r["status"] == "done" and r["steps"] == 6 and r["model"] == "tiny" for r in rows.values())

    lines = records(fast.run_dir)
    val = [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]
    best_step, best = min(val, key=lambda p: p[1])
    shown = cli("runs", "show", "fast", "--json")
    assert shown.exit_code == 0, shown.output
    figures = json.loads(shown.output)
    assert figures["train_loss"] == [r for r in lines if "loss" in r][-1]["loss"]
    assert figures["best_val_loss"] == best and figures["best_val_loss_step"] == best_step
    assert figures["final_val_loss"] == val[-1][1] and figures["config"]["train"]["lr"] == 1e-3

    text = cli("runs", "show", "fast")
    assert text.exit_code == 0 and "done (adapter fast)" in text.output
    assert BRAILLE.search(text.output), "the loss curve is drawn"

    compared = cli("runs", "compare", "fast", "slow", "--json")
    assert compared.exit_code == 0, compared.output
    result = json.loads(compared.output)
    assert result["runs"] == ["fast", "slow"]
    assert result["differences"] == {"train.lr": [1e-3, 1e-4]}  # the one setting that differs
    assert result["figures"]["train_loss"] == [fast.metrics["train_loss"], slow.metrics["train_loss"]]
    table = cli("runs", "compare", "fast", "slow")
    assert "settings that differ" in table.output and "train.lr" in table.output


def _color_share(pixels, rgb) -> float:
    import numpy as np

    target = np.array([int(rgb[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels[..., :3] - target).max(axis=-1) < 0.03).mean())


def test_plot_draws_every_run_in_every_panel_as_an_image_and_in_the_terminal(two_runs, tmp_path):
    import matplotlib.image
    from matplotlib import colors

    registry, fast, slow = two_runs
    out = tmp_path / "curves.png"
    result = cli("runs", "plot", "fast", "slow", "--out", str(out))
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > 2 * height  # three panels side by side
    first, second = colors.to_hex("C0"), colors.to_hex("C1")  # the runs' colors, in order
    for panel in range(3):  # train loss, validation, learning rate: both runs' curves in each
        part = image[:, panel * width // 3 : (panel + 1) * width // 3]
        assert _color_share(part, first) > 0.001 and _color_share(part, second) > 0.001, panel

    # The same three charts in the terminal, each with both runs in its legend.
    charts = [c for c in ("train loss", "validation (val_loss)", "learning rate") if c in result.output]
    assert len(charts) == 3 and BRAILLE.search(result.output)
    assert result.output.count("fast") >= 3 and result.output.count("slow") >= 3

    # Without --out: the image lands in the run's folder.
    alone = cli("runs", "plot", "slow", "--no-terminal")
    assert alone.exit_code == 0 and (slow.run_dir / "curves.png").is_file()
    assert not BRAILLE.search(alone.output)


def test_a_stopped_run_with_a_torn_last_line_still_lists_and_plots(tiny, tmp_path):
    result = run_training(tiny_config(), tiny, "torn")
    shutil.rmtree(result.adapter_dir)  # as if it was stopped before the adapter was saved: its checkpoints remain
    with (result.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 2.')  # a kill in the middle of a line
    shown = cli("runs", "show", "torn", "--json")
    assert shown.exit_code == 0, shown.output
    figures = json.loads(shown.output)
    assert figures["status"] == "resumable" and figures["damaged_lines"] == 1 and figures["steps"] == 6
    assert cli("runs", "plot", "torn", "--out", str(tmp_path / "t.png")).exit_code == 0


def test_the_live_dashboard_draws_the_loss_curve_while_training(tiny):
    """On a terminal, the panel the dashboard shows after each step holds the loss curve (train,
    then validation too); on a terminal too narrow for a chart, the sparkline stays."""
    from appliance import ui
    from appliance.track import fan_out
    from appliance.train.events import StepDone

    screen = io.StringIO()
    frames: dict[int, str] = {}
    with ui.Dashboard(Console(file=screen, width=100, force_terminal=True), live=True) as dashboard:

        def look(event):  # what is on screen after the dashboard took this step
            if isinstance(event, StepDone):
                shot = Console(file=io.StringIO(), width=100, color_system=None)
                shot.print(dashboard.live.renderable)
                frames[event.step] = shot.file.getvalue()

        run_training(tiny_config(), tiny, "live", events=fan_out(dashboard, look))
    assert sorted(frames) == [1, 2, 3, 4, 5, 6]
    assert not BRAILLE.search(frames[1])  # one point is no curve yet
    assert all(BRAILLE.search(frames[s]) and "loss" in frames[s] for s in (2, 3, 4, 5, 6))
    legend = re.compile("[\u2801-\u28ff] validation")  # the validation curve's entry in the chart's legend
    assert not legend.search(frames[2]) and legend.search(frames[4])  # the first evaluation came after step 2
    assert BRAILLE.search(screen.getvalue())

    narrow = io.StringIO()
    with ui.Dashboard(Console(file=narrow, width=40, force_terminal=True), live=True) as dashboard:
        run_training(tiny_config(steps=2), tiny, "narrow", events=dashboard)
        final = dashboard.live.renderable
    shot = Console(file=io.StringIO(), width=40, color_system=None)
    shot.print(final)
    assert re.search("train loss +[0-9.]+ +[▁▂▃▄▅▆▇█]+", shot.file.getvalue())


# -- bad inputs ----------------------------------------------------------------------------


def _panel(result) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


@pytest.fixture
def one_run(tiny):
    run_training(tiny_config(steps=2), tiny, "facts")
    return tiny


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, expected",
    [
        (["runs", "show", "fact"], "Unknown run 'fact'. Fix: did you mean facts?"),
        (["runs", "compare", "facts", "nope"], "Unknown run 'nope'"),
        (["runs", "plot", "facts", "--out", "curves.txt"], "is not an image file name"),
        (["runs", "plot", "facts", "--out", "."], "is a folder"),
        (["runs", "plot", "facts", "--val-metric", "val_acc"], "No run here has the validation figure 'val_acc'. Fix: use one of: val_loss, val_ppl"),
    ],
    ids=["unknown run", "unknown run among several", "not an image name", "a folder for --out", "unknown validation figure"],
)
def test_runs_bad_input(one_run, args, expected):
    result = cli(*args)
    text = _panel(result)
    assert result.exit_code == 2, text
    assert expected in text and "Traceback" not in text


@pytest.mark.bad_input
def test_runs_with_an_empty_store_says_how_to_start(store):
    result = cli("runs", "list")
    assert result.exit_code == 0 and "No runs yet" in result.output
    missing = cli("runs", "show", "x")
    assert missing.exit_code == 2 and "start one with `appliance train" in _panel(missing)
