"""`appliance runs ...`: training runs from their folders: list, show, compare, plot."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import json_option, print_json, registry


def _run_names(ctx, param, incomplete: str):
    """Shell completion of run names (the run folders in the store)."""
    from click.shell_completion import CompletionItem

    from appliance.runs import run_names

    try:
        return [CompletionItem(name) for name in run_names(registry()) if name.startswith(incomplete)]
    except Exception:  # noqa: BLE001 -- completion must never print a traceback into the user's shell
        return []


def _print_chart(text: str) -> None:
    """A plotext chart as it was drawn: its colors kept, never re-wrapped or re-highlighted."""
    from rich.text import Text

    from appliance import ui

    ui.console.print(Text.from_ansi(text, no_wrap=True), soft_wrap=True, highlight=False)


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "-" if value is None else str(value)


@click.group()
def runs() -> None:
    """Training runs (one per adapter name): list, show, compare and plot their curves."""


@runs.command("list")
@json_option
def list_(as_json) -> None:
    """Every run in the store with its status and where it ended.

    \b
    Example:
      appliance runs list
    """
    from appliance import ui
    from appliance.runs import list_runs

    found = list_runs(registry())
    if as_json:
        print_json([r.summary() for r in found])
    elif not found:
        ui.console.print("No runs yet. Start one: [bold]appliance train --model M --data F --name N[/]")
    else:
        ui.console.print(_runs_table(found))


def _runs_table(found: list):
    from rich.table import Table

    table = Table("name", "status", "model", "recipe", "steps", "train loss", "best val loss", "started")
    for r in found:
        f = r.figures()
        best = f.get("best_val_loss")
        table.add_row(
            r.name, r.status, str(r.config.get("model", {}).get("name") or "-"), str(r.config.get("recipe") or "-"), str(f["steps"]),
            _number(f.get("train_loss")), f"{_number(best)} @ {f['best_val_loss_step']}" if best is not None else "-", r.started[:19],
        )
    return table


@runs.command()
@click.argument("name", shell_complete=_run_names)
@json_option
def show(name, as_json) -> None:
    """One run: status, settings in brief, final and best figures, and its loss curve.

    \b
    Example:
      appliance runs show facts
    """
    from appliance import ui
    from appliance.runs import load_run

    run = load_run(registry(), name)
    summary = run.summary()
    if as_json:
        print_json({**summary, "config": run.config, "damaged_lines": run.damaged_lines})
        return
    rows = _run_rows(run, summary)
    ui.console.print(ui.key_value_table(rows))
    steps, losses = run.series("loss")
    if len(steps) >= 2:
        series = {"train": (steps, losses), "validation": run.series("val_loss")}
        _print_chart(ui.curve_chart("loss", series, width=min(ui.console.width, 80), height=14, color=ui.console.is_terminal))


def _run_rows(run, summary: dict) -> dict:
    """`runs show`'s table: status, settings in brief, final and best figures."""
    train = run.config.get("train", {})
    rows = {
        "name": run.name,
        "status": run.status + {"resumable": " (continue it: appliance train ... --resume)", "done": f" (adapter {run.name})"}.get(run.status, ""),
        "model / recipe": f"{summary['model']} / {summary['recipe']} ({summary['task']})",
        "length": f"{train.get('steps')} steps" if train.get("steps") else f"{train.get('epochs')} epochs",
        "lr / batch": f"{train.get('lr')} / {train.get('batch_size')} × {train.get('grad_accum')}",
        "lora": ", ".join(f"{k}={v}" for k, v in run.config.get("lora", {}).items() if k in ("rank", "alpha", "dropout")),
        "started / updated": f"{run.started} / {run.updated}",
        "folder": run.path,
    }
    rows.update({k: _number(v) for k, v in run.figures().items()})
    if run.damaged_lines:
        rows["damaged lines"] = f"{run.damaged_lines} line(s) of metrics.jsonl are not JSON and were skipped"
    return rows


@runs.command()
@click.argument("names", nargs=-1, required=True, shell_complete=_run_names)
@json_option
def compare(names, as_json) -> None:
    """Runs side by side: final and best figures, and the settings in which they differ.

    \b
    Example:
      appliance runs compare facts facts-r8
    """
    from appliance.runs import compare as compare_runs
    from appliance.runs import load_runs

    result = compare_runs(load_runs(registry(), names))
    if as_json:
        print_json({"runs": result.names, "figures": result.figures, "differences": result.differences})
    else:
        _show_comparison(result)


def _show_comparison(result) -> None:
    """Final and best figures side by side, then the settings that differ (for two runs or more)."""
    from rich.table import Table

    from appliance import ui

    figures = Table("figure", *result.names, title="figures", title_justify="left")
    for key, values in result.figures.items():
        figures.add_row(key, *(_number(v) for v in values))
    ui.console.print(figures)
    if len(result.names) < 2:
        return
    if not result.differences:
        ui.console.print("[dim]same settings[/]")
        return
    settings = Table("setting", *result.names, title="settings that differ", title_justify="left")
    for key, values in result.differences.items():
        settings.add_row(key, *("-" if v is None else str(v) for v in values))
    ui.console.print(settings)


@runs.command()
@click.argument("names", nargs=-1, required=True, shell_complete=_run_names)
@click.option("--out", type=click.Path(path_type=Path), help="image file (.png, .svg, .pdf; default: curves.png in the first run's folder)")
@click.option("--val-metric", default="val_loss", show_default=True, help="validation figure of the middle panel (val_accuracy, val_ppl, ...)")
@click.option("--no-terminal", is_flag=True, help="write the image only, without drawing the charts in the terminal")
def plot(names, out, val_metric, no_terminal) -> None:
    """Loss, validation and learning-rate curves of one or more runs: an image and terminal charts.

    \b
    Examples:
      appliance runs plot facts
      appliance runs plot facts facts-r8 --out curves.png
    """
    from appliance import ui
    from appliance.runs import check_val_metric, curves, default_plot_path, load_runs, write_plot

    found = load_runs(registry(), names)
    check_val_metric(found, val_metric)
    panels = curves(found, val_metric)
    order = [r.name for r in found]
    path = write_plot(panels, out or default_plot_path(found), order)
    if not no_terminal:
        width = min(ui.console.width, 100)
        for title, series in panels:
            if series:
                _print_chart(ui.curve_chart(title, series, width=width, height=12, color=ui.console.is_terminal, order=order))
    ui.console.print(f"[green]plot written[/] {path}")


commands = [runs]
