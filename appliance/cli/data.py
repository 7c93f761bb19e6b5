"""`appliance data check` and `appliance data augment`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli.client import endpoint_options
from appliance.cli.common import json_option, overwrite_option, print_json, registry
from appliance.cli.train import data_options


@click.group()
def data() -> None:
    """Training data: check formats, lengths, duplicates and leakage; augment it with paraphrases."""


@data.command("augment")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--paraphrases", type=click.IntRange(1, 20), default=2, show_default=True, help="rewordings written per example")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="where to write (default: FILE's name + .paraphrased.jsonl)")
@click.option("--temperature", default=0.8, show_default=True, help="sampling temperature of the rewordings")
@overwrite_option("replace --out if it exists")
@endpoint_options
@json_option
def augment(file, paraphrases, out, temperature, overwrite, model, adapter, url, api_key, as_json) -> None:
    """Write FILE's examples, each followed by N paraphrases of its prompt, reworded by the served model
    (`appliance serve` or the service; --model names another served one).

    Each paraphrase is marked with the example it came from (meta.paraphrase_of), so the split keeps
    them on one side and the leakage check treats them as one. Check the result before training.

    \b
    Example:
      appliance data augment questions.jsonl --paraphrases 3 && appliance data check questions.paraphrased.jsonl
    """
    from appliance import ui
    from appliance.client import ask
    from appliance.data import PARAPHRASE_INSTRUCTION, paraphrase_file
    from appliance.errors import ApplianceError
    from appliance.serve import find_endpoint

    out = out or file.with_name(file.name.split(".")[0] + ".paraphrased.jsonl")
    if out.exists() and not overwrite:
        raise ApplianceError(f"{out} exists.", "pass --overwrite to replace it, or --out another file")
    endpoint = find_endpoint(url, api_key)

    def rewrite(text: str) -> str:
        return ask(endpoint, PARAPHRASE_INSTRUCTION.format(text=text), model=adapter or model, temperature=temperature, max_tokens=256).text

    report = paraphrase_file(file, out, paraphrases, rewrite, progress=lambda text: ui.err_console.print(f"[dim]{text}[/]", end="\r"))
    if as_json:
        print_json(report.__dict__)
        return
    ui.console.print(f"[green]wrote[/] {report.out}: {report.examples} examples + {report.paraphrases} paraphrases "
                     f"({report.unchanged} rewordings empty or identical, skipped) in {ui.duration(report.seconds)}")
    ui.console.print(f"next: [bold]appliance data check {report.out}[/]")


@data.command("check")
@click.argument("files", nargs=-1, required=True)
@click.option("--model", "model_name", help="measure token lengths with this model's tokenizer and chat template")
@data_options
@click.option("--seed", type=int, default=None, help="split seed")
@click.option("--recipe", default=None, help="recipe whose task decides the expected format (default: by the file)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="a data setting, e.g. --set data.columns.prompt=question")
@json_option
def check(files, model_name, seed, recipe, sets, as_json, **data_flags) -> None:
    """Check data FILES (each FILE or FILE:WEIGHT): format, counts, token lengths, duplicates,
    leakage across train/validation/test, over-long examples, the mixture, and every problem
    with its line number. Exits 1 when a file has problems.

    \b
    Examples:
      appliance data check chat.jsonl --model smollm2
      appliance data check legal.jsonl:2 recipes.jsonl --mix temperature --replay general.jsonl:0.2
      appliance data check qa.parquet --set data.columns.prompt=question --set data.columns.completion=answer
    """
    from appliance.cli.train import flag_overrides, recipe_and_files
    from appliance.config import load_run_config
    from appliance.data import prepare

    flags = flag_overrides(data=files, **data_flags)
    if seed is not None:  # the split's seed, not the training run's
        flags["data"]["seed"] = seed
    cfg = load_run_config(recipe_and_files(files, recipe), sets=sets, flags=flags)
    tokenizer = _tokenizer(model_name) if model_name else None
    prepared = prepare(cfg.data, cfg.task, tokenizer, model_name=model_name or "", strict=False)
    summary = prepared.summary()
    if as_json:
        print_json(summary)
    else:
        show(prepared, cfg, model_name)
    sys.exit(1 if summary["problems"] else 0)


def _tokenizer(model_name: str):
    from appliance.hf import load_tokenizer, quiet_libraries

    quiet_libraries()
    reg = registry()
    reg.model(model_name)
    return load_tokenizer(reg.model_dir(model_name))


def show(prepared, cfg, model_name: str | None) -> None:
    from rich.table import Table

    from appliance import ui

    report = prepared.report
    table = Table(title=f"data for {cfg.task}")
    table.add_column("file", overflow="fold", min_width=12)
    for header in ("role", "format", "lines", "dups", "train", "val", "test", "sampled", "problems"):
        table.add_column(header, no_wrap=True)
    for s in report.sources:
        splits = [str(s.splits.get(name, 0)) for name in ("train", "val", "test")]
        sampled = "-" if s.probability is None else f"{s.probability:.1%}"
        table.add_row(s.path, s.role, s.format, str(s.lines), str(s.duplicates), *splits, sampled, f"[red]{len(s.problems)}[/]" if s.problems else "0")
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
            lengths.add_row(name, str(len(prepared.split(name))), *(str(figures[k]) for k in ("p50", "p95", "max")), str(report.trained_tokens.get(name, 0)))
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
            ui.console.print(f"  {' & '.join(leak.splits)}: {leak.shown[:100]!r}", highlight=False)
    else:
        ui.console.print("[green]no leakage[/]: no prompt appears in two splits")
    for s in report.sources:
        for p in s.problems:
            ui.console.print(f"[red]{s.path}[/]{' ' if p.line else ': '}{p}", highlight=False)
    for p in report.problems:
        ui.console.print(f"[red]{p}[/]", highlight=False)
    count = sum(len(s.problems) for s in report.sources) + len(report.problems)
    if count:
        ui.err_console.print(f"[red]{count} problem(s) found.[/] Fix them, then check again.")
    else:
        ui.console.print("[green]ok[/]")
