"""`appliance merge`."""

from __future__ import annotations

import click

from appliance.cli.common import json_option, overwrite_option, print_json, registry
from appliance.merge import DEFAULT_WEIGHTS


@click.command()
@click.argument("adapter")
@click.option("--name", help="name of the merged model (default: BASE-ADAPTER)")
@click.option("--weights", type=click.Choice(["dequantized", "original"]), default=DEFAULT_WEIGHTS, show_default=True,
              help="merge into the NF4 weights the adapter was trained against (dequantized), or the base's own 16-bit weights")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True,
              help="what the merged weights are stored in (auto: bf16 on a GPU that computes it, fp16 on older GPUs, fp32 without a GPU)")
@overwrite_option("replace a model of the same name")
@json_option
def merge(adapter: str, name: str | None, weights: str, dtype: str, overwrite: bool, as_json: bool) -> None:
    """Merge ADAPTER into 16-bit weights and save a complete model, judged against the model you evaluated.

    \b
    The merge runs on the CPU, one shard of the base at a time (no GPU needed). The merged model
    is compared with the 4-bit base + adapter (what was trained and evaluated) on probe prompts
    and the adapter's validation answers; below the gate the merge fails and nothing is saved.
    Examples:
      appliance merge facts --name smollm2-facts
      appliance merge facts --weights original --dtype bfloat16
      appliance serve smollm2-facts
    """
    from appliance.store import check_name

    if name:
        check_name(name, "model name")
    registry().base_of(registry().adapter(adapter))  # a typo or a missing base fails here, before torch is imported
    from appliance import ui
    from appliance.merge import merge_adapter

    with ui.Spinner(f"merging {adapter}") as spinner:
        manifest = merge_adapter(registry(), adapter, name=name, overwrite=overwrite, weights=weights, dtype=dtype, progress=spinner.update)
    if as_json:
        print_json(manifest.model_dump(mode="json"))
        return
    _report(manifest)


def _report(manifest) -> None:
    """The merge's parity with the evaluated model, its notes, and the next step."""
    from appliance import ui

    p = manifest.parity
    e = p.evaluated
    ui.console.print(
        f"[green]merged[/] {manifest.name}: {p.weights} weights + adapter, stored in {p.dtype}\n"
        f"  against the model you evaluated (4-bit base + adapter, {p.compute_dtype}; {p.prompts} probe prompts, "
        f"{p.validation_examples} validation answers, {e.positions} positions):\n"
        f"  {ui.agreement_line(e, p.gate_min_top1, p.gate_max_mean_kl)}; max |Δlogit| {e.max_abs_logit_diff:.2e}",
        highlight=False,
    )
    for note in p.notes:
        ui.warn(note)
    if manifest.task == "classify":
        ui.console.print(f"a standard {manifest.architecture} folder: {registry().model_dir(manifest.name)}")
    else:
        ui.console.print(f"next: [bold]appliance serve {manifest.name}[/]")


commands = [merge]
