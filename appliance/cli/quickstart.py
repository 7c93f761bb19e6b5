"""`appliance quickstart`: the embedded demo (what `make demo` runs)."""

from __future__ import annotations

import click

from appliance.cli.common import registry


def shorten(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@click.command()
@click.option("--steps", default=20, show_default=True, help="fine-tuning steps")
@click.option("--port", default=8000, show_default=True, help="port for the demo's vLLM server (next free one if taken)")
@click.option("--save", is_flag=True, help="write the answers and timings into bench/results/ (the README's quickstart figures)")
def quickstart(steps: int, port: int, save: bool) -> None:
    """The whole path on SmolLM2: import, ask the base, fine-tune in 4-bit on made-up
    facts, merge, serve with vLLM, ask again — before and after side by side.

    The questions are paraphrases that appear nowhere in the training data, and the
    general-knowledge controls are not in it either: right answers show learning, not recall.

    \b
    Examples:
      appliance quickstart              # what `make demo` runs
      appliance quickstart --save       # and write its answers and timings into bench/results/
    """
    from rich.table import Table

    from appliance import ui
    from appliance.quickstart import ADAPTER, MERGED, run_quickstart, score

    ui.console.print("[bold]appliance quickstart[/]: SmolLM2-135M-Instruct learns four made-up facts.\n")

    def step(text: str) -> None:
        ui.console.print(f"[cyan]›[/] {text}", highlight=False)

    result = run_quickstart(registry(), steps=steps, port=port, progress=step)

    table = Table("", "question (never trained on)", "base (before)", f"{MERGED} via vLLM (after)", "", title="before / after", show_lines=True)
    for q, before, after in zip(result.questions, result.before, result.after):
        table.add_row(q.group, q.question, shorten(before), shorten(after), "[green]✓[/]" if q.right(after) else "[red]✗[/]")
    ui.console.print(table)
    timings = Table("step", "seconds", title="timings")
    for name, seconds in result.timings.items():
        timings.add_row(name, f"{seconds:.0f}")
    timings.add_row("[bold]total[/]", f"[bold]{sum(result.timings.values()):.0f}[/]")
    ui.console.print(timings)
    p = result.parity
    ui.console.print(
        f"train loss {result.train_metrics.get('train_loss', float('nan')):.3f} · "
        f"val loss {result.train_metrics.get('val_loss', float('nan')):.3f} · "
        f"merged model vs the evaluated 4-bit model: top-1 {p.evaluated.top1_agreement:.0%} at clear positions, "
        f"mean KL {p.evaluated.mean_kl:.1e} · finish reasons: {', '.join(sorted(set(map(str, result.finish_reasons))))}",
        highlight=False,
    )
    before, after = score(result.questions, result.before), score(result.questions, result.after)
    for group, title in (("fact", "taught facts (asked as new paraphrases)"), ("control", "general-knowledge controls")):
        (right, asked), (base_right, _) = after[group], before[group]
        ui.console.print(f"[bold]{right}/{asked}[/] {title} right after fine-tuning (base: {base_right}/{asked})")
    if save:
        ui.console.print(f"saved: {result.save()}")
    ui.console.print(
        "\nTry it yourself:\n"
        f"  appliance serve {MERGED}                      # the merged model\n"
        f"  appliance serve smollm2 --adapter {ADAPTER}   # or the base with the adapter\n"
        '  appliance ask "Which city is the capital of Zorvania?"\n'
        "  appliance chat"
    )


commands = [quickstart]
