"""`appliance data check`."""

from __future__ import annotations

import sys

import click

from appliance.cli.common import json_option, print_json, registry
from appliance.cli.train import data_options


@click.group()
def data() -> None:
    """Training data: check formats, lengths, duplicates and leakage."""


@data.command("check")
@click.argument("files", nargs=-1, required=True)
@click.option("--model", "model_name", help="measure token lengths with this model's tokenizer and chat template")
@data_options
@click.option("--seed", type=int, default=None, help="split seed")
@click.option("--recipe", default=None, help="recipe whose task decides the expected format (default: by the file)")
@json_option
def check(files, model_name, seed, recipe, as_json, **data_flags) -> None:
    """Check data FILES (each FILE or FILE:WEIGHT): format, counts, token lengths, duplicates,
    leakage across train/validation/test, over-long examples, the mixture, and every problem
    with its line number. Exits 1 when a file has problems.

    \b
    Examples:
      appliance data check chat.jsonl --model smollm2
      appliance data check legal.jsonl:2 recipes.jsonl --mix temperature --replay general.jsonl:0.2
    """
    from appliance import ui
    from appliance.cli.train import flag_overrides, recipe_and_files
    from appliance.config import load_run_config
    from appliance.data.dataset import prepare

    recipe = recipe_and_files(files, recipe)
    flags = flag_overrides(data=files, **data_flags)
    if seed is not None:
        flags["data"]["seed"] = seed
    cfg = load_run_config(recipe, flags=flags)
    tokenizer = None
    if model_name:
        from appliance.hf import load_tokenizer, quiet_libraries

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
                "mixture": None if prepared.mixture is None else {"strategy": report.strategy, "probabilities": dict(zip(prepared.mixture.names, prepared.mixture.probs))},
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

    table = Table(title=f"data for {cfg.task}")
    table.add_column("file", overflow="fold", min_width=12)
    for header in ("role", "format", "lines", "dups", "train", "val", "test", "sampled", "problems"):
        table.add_column(header, no_wrap=True)
    for s in report.sources:
        table.add_row(
            s.path,
            s.role,
            s.format,
            str(s.lines),
            str(s.duplicates),
            str(s.splits.get("train", 0)),
            str(s.splits.get("val", 0)),
            str(s.splits.get("test", 0)),
            "-" if s.probability is None else f"{s.probability:.1%}",
            f"[red]{len(s.problems)}[/]" if s.problems else "0",
        )
    ui.console.print(table)
    if prepared.mixture is not None:
        weights = ", ".join(f"{s.path}: {s.weight:g}" for s in report.sources if s.weight is not None)
        ui.console.print(
            f"mixture: {report.strategy}"
            + (f" (T={cfg.data.mix.temperature:g})" if report.strategy == "temperature" else "")
            + (f", replay {cfg.data.replay.fraction:.0%}" if cfg.data.replay else "")
            + (f", weights {weights}" if weights else "")
            + " — 'sampled' is each file's share of the training draws"
        )
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
