"""`appliance data check`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli.common import json_option, print_json, registry


@click.group()
def data() -> None:
    """Training data: check formats, lengths, duplicates and leakage."""


def task_for_format(fmt: str) -> str:
    from appliance.data.formats import TASK_FORMATS

    return next((task for task, formats in TASK_FORMATS.items() if fmt in formats), "sft")


@data.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_name", help="measure token lengths with this model's tokenizer and chat template")
@click.option("--seq-len", type=int, default=None, help="longest example in tokens (default: the recipe's)")
@click.option("--val", type=float, default=None, help="validation split: fraction (< 1) or count")
@click.option("--test", type=float, default=None, help="test split: fraction (< 1) or count")
@click.option("--seed", type=int, default=None, help="split seed")
@click.option("--recipe", default=None, help="recipe whose task decides the expected format (default: by the file)")
@json_option
def check(files, model_name, seq_len, val, test, seed, recipe, as_json) -> None:
    """Check data FILES: format, counts, token lengths, duplicates, leakage, over-long examples,
    and every problem with its line number. Exits 1 when a file has problems.

    \b
    Example:
      appliance data check chat.jsonl --model smollm2
    """
    from appliance import ui
    from appliance.config import load_run_config
    from appliance.data.dataset import prepare
    from appliance.data.load import load_file

    task = None
    if recipe is None:
        recipe = {"sft": "sft-qlora"}.get(task := task_for_format(load_file(files[0]).format), task)
    flags: dict = {"data": {"files": [{"path": str(f)} for f in files]}}
    for key, value in (("seq_len", seq_len), ("val", val), ("test", test), ("seed", seed)):
        if value is not None:
            flags["data"][key] = value
    cfg = load_run_config(recipe, flags=flags)
    tokenizer = None
    if model_name:
        from appliance.train.model import load_tokenizer, quiet_libraries

        quiet_libraries()
        reg = registry()
        reg.model(model_name)
        tokenizer = load_tokenizer(reg.model_dir(model_name))
    prepared = prepare(cfg.data, cfg.task, tokenizer, model_name=model_name or "", strict=False)
    report = prepared.report
    problems = sum(len(s.problems) for s in report.sources) + len(report.problems)

    if as_json:
        print_json(
            {
                "task": cfg.task,
                "sources": [
                    {**s.__dict__, "problems": [{"line": p.line, "message": p.message} for p in s.problems]} for s in report.sources
                ],
                "splits": {n: len(prepared.split(n)) for n in ("train", "val", "test")},
                "lengths": report.lengths,
                "trained_tokens": report.trained_tokens,
                "overlong": report.overlong,
                "leaks": [{"prompt": leak.prompt, "splits": list(leak.splits)} for leak in report.leaks],
                "problems": problems,
            }
        )
        sys.exit(1 if problems else 0)

    from rich.table import Table

    table = Table("file", "format", "examples", "duplicates", "train", "val", "test", "problems", title=f"data for {cfg.task}")
    for s in report.sources:
        table.add_row(
            s.path,
            s.format,
            str(s.lines),
            str(s.duplicates),
            str(s.splits.get("train", 0)),
            str(s.splits.get("val", 0)),
            str(s.splits.get("test", 0)),
            f"[red]{len(s.problems)}[/]" if s.problems else "0",
        )
    ui.console.print(table)
    if report.lengths:
        lengths = Table("split", "examples", "tokens p50", "p95", "max", "tokens with loss", title=f"token lengths ({model_name})")
        for name, figures in report.lengths.items():
            lengths.add_row(
                name,
                str(len(prepared.split(name))),
                str(figures["p50"]),
                str(figures["p95"]),
                str(figures["max"]),
                str(report.trained_tokens.get(name, 0)),
            )
        ui.console.print(lengths)
        if report.overlong:
            ui.warn(
                f"{report.overlong} example(s) are longer than seq_len={cfg.data.seq_len} "
                f"(policy: {cfg.data.overlong}; change with --seq-len or --set data.overlong=truncate)"
            )
    else:
        ui.console.print("[dim]token lengths: pass --model NAME to measure them with that model's tokenizer[/]")
    if report.leaks:
        ui.warn(f"{len(report.leaks)} prompt(s) appear in more than one split (leakage):")
        for leak in report.leaks[:10]:
            ui.console.print(f"  {' & '.join(leak.splits)}: {leak.prompt[:100]!r}", highlight=False)
    else:
        ui.console.print("[green]no leakage[/]: no prompt appears in two splits")
    for s in report.sources:
        for p in s.problems:
            ui.console.print(f"[red]{s.path}[/] {p}", highlight=False)
    for p in report.problems:
        ui.console.print(f"[red]{p}[/]", highlight=False)
    if problems:
        ui.err_console.print(f"[red]{problems} problem(s) found.[/] Fix them, then check again.")
        sys.exit(1)
    ui.console.print("[green]ok[/]")
