"""`appliance quickstart`: the embedded demo (what `make demo` runs)."""

from __future__ import annotations

import click

from appliance.cli.common import registry


def shorten(text: str, limit: int = 140) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@click.command()
@click.option("--steps", default=20, show_default=True, help="fine-tuning steps")
@click.option("--port", default=8000, show_default=True, help="port for the demo's vLLM server (next free one if taken)")
def quickstart(steps: int, port: int) -> None:
    """The whole path on SmolLM2: import, ask the base, fine-tune in 4-bit on made-up
    facts, merge, serve with vLLM, ask again — before and after side by side."""
    from rich.table import Table

    from appliance import ui
    from appliance.quickstart import ADAPTER, MERGED, run_quickstart

    ui.console.print("[bold]appliance quickstart[/]: SmolLM2-135M-Instruct learns four made-up facts.\n")

    def step(text: str) -> None:
        ui.console.print(f"[cyan]›[/] {text}", highlight=False)

    with ui.Dashboard() as dashboard:
        result = run_quickstart(registry(), steps=steps, port=port, progress=step, train_events=dashboard)

    table = Table("question", "base (before)", f"{MERGED} via vLLM (after)", "", title="before / after", show_lines=True)
    for q, before, after in zip(result.questions, result.before, result.after):
        ok = q["expect"] in after
        table.add_row(q["question"], shorten(before), shorten(after), "[green]✓[/]" if ok else "[red]✗[/]")
    ui.console.print(table)
    timings = Table("step", "seconds", title="timings")
    for name, seconds in result.timings.items():
        timings.add_row(name, f"{seconds:.0f}")
    timings.add_row("[bold]total[/]", f"[bold]{sum(result.timings.values()):.0f}[/]")
    ui.console.print(timings)
    parity = result.parity or {}
    ui.console.print(
        f"train loss {result.train_metrics.get('train_loss', float('nan')):.3f} · "
        f"val loss {result.train_metrics.get('val_loss', float('nan')):.3f} · "
        f"merge parity: top-1 {parity.get('top1_agreement', 0):.0%}, max |Δlogit| {parity.get('max_abs_logit_diff', 0):.1e} · "
        f"finish reasons: {', '.join(sorted(set(map(str, result.finish_reasons))))}"
    )
    learned = sum(q["expect"] in a for q, a in zip(result.questions, result.after))
    ui.console.print(f"\n[bold]{learned}/{len(result.questions)}[/] answers right after fine-tuning.")
    ui.console.print(
        "\nTry it yourself:\n"
        f"  appliance serve {MERGED}                      # the merged model\n"
        f"  appliance serve smollm2 --adapter {ADAPTER}   # or the base with the adapter\n"
        '  appliance ask "What is the capital of Zorvania?"\n'
        "  appliance chat"
    )


commands = [quickstart]
