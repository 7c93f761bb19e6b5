"""`appliance eval`: before versus after on held-out data, and the forgetting check."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import json_option, print_json, registry


@click.command("eval")
@click.argument("name")
@click.option("--data", type=click.Path(path_type=Path), help="held-out data (default: the adapter's test split, else validation)")
@click.option("--against", help="model for the 'before' column (default: the adapter's base)")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="at most this many examples")
@json_option
def evaluate(name, data, against, limit, as_json) -> None:
    """Evaluate adapter NAME against its base: task metrics before and after, and forgetting.

    \b
    sft: perplexity, exact match, token F1, ROUGE-L · cpt: perplexity · dpo: preference margin
    classify: accuracy, macro F1, ROC AUC. Results are stored in the adapter's manifest.
    Example:
      appliance eval facts --data held_out.jsonl
    """
    reg = registry()
    reg.adapter(name)  # a typo fails here, before torch is imported
    from appliance import ui
    from appliance.evaluate import evaluate_adapter, save_evaluation

    with ui.Spinner(f"evaluating {name}") as spinner:
        report = evaluate_adapter(reg, name, data=data, against=against, limit=limit, progress=spinner.update)
    save_evaluation(reg, report)
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        _show(report, name)


def _show(report, name: str) -> None:
    """Each metric before and after, the forgetting check, and three answers side by side."""
    from rich.table import Table

    from appliance import ui

    table = Table("metric", f"before ({report.against})", f"after ({name})", title=f"{report.task} · {report.examples} {report.split} examples")
    for metric in dict.fromkeys([*report.before, *report.after]):
        b, a = report.before.get(metric), report.after.get(metric)
        table.add_row(metric, "-" if b is None else f"{b:.4f}", "-" if a is None else f"{a:.4f}")
    ui.console.print(table)
    if report.forgetting:
        f = report.forgetting
        ui.console.print(
            f"forgetting check (general text): perplexity {f.base_ppl:.2f} → {f.adapter_ppl:.2f} ({f.change_pct:+.1f} %)"
        )
    for sample in report.samples[:3]:
        ui.console.print(f"[dim]{sample.prompt}[/]\n  before: {sample.before}\n  after:  {sample.after}", highlight=False)


commands = [evaluate]
