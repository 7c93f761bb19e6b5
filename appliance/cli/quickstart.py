"""`appliance quickstart`: the embedded demo (what `make demo` runs)."""

from __future__ import annotations

import click

from appliance.cli.common import registry


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
    from appliance import ui
    from appliance.quickstart import run_quickstart

    ui.console.print("[bold]appliance quickstart[/]: SmolLM2-135M-Instruct learns four made-up facts.\n")
    result = run_quickstart(registry(), steps=steps, port=port, progress=lambda text: ui.console.print(f"[cyan]›[/] {text}", highlight=False))
    ui.quickstart_report(result)
    if save:
        ui.console.print(f"saved: {result.save()}")
    ui.quickstart_next_steps()

commands = [quickstart]
