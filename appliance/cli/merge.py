"""`appliance merge`."""

from __future__ import annotations

import click

from appliance.cli.common import registry


@click.command()
@click.argument("adapter")
@click.option("--name", help="name of the merged model (default: BASE-ADAPTER)")
@click.option("--overwrite", is_flag=True, help="replace a model of the same name")
def merge(adapter: str, name: str | None, overwrite: bool) -> None:
    """Merge ADAPTER into its base's 16-bit weights and save a complete model.

    The base is reloaded in bf16 on a GPU (fp32 on CPU), never 4-bit. A parity
    check compares the saved model's logits with base + adapter on probe prompts
    and fails unless top-1 agreement is 100 %.

    \b
    Example:
      appliance merge facts --name smollm2-facts
      appliance serve smollm2-facts
    """
    from appliance import ui
    from appliance.merge import merge_adapter
    from appliance.store import check_name

    if name:
        check_name(name, "model name")
    with ui.Spinner(f"merging {adapter}") as spinner:
        manifest = merge_adapter(registry(), adapter, name=name, overwrite=overwrite, progress=spinner.update)
    parity = manifest.parity or {}
    ui.console.print(
        f"[green]merged[/] {manifest.name}  ({parity.get('dtype')}; parity over {parity.get('positions')} positions: "
        f"top-1 agreement {parity.get('top1_agreement', 0):.0%}, max |Δlogit| {parity.get('max_abs_logit_diff', 0):.2e})"
    )
    if manifest.task == "classify":
        ui.console.print(f"a standard {manifest.architecture} folder: {registry().model_dir(manifest.name)}")
    else:
        ui.console.print(f"next: [bold]appliance serve {manifest.name}[/]")


commands = [merge]
