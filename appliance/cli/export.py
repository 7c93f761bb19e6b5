"""`appliance export` and `appliance exports`."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import json_option, overwrite_option, print_json, registry
from appliance.export import DEFAULT_QUANT, QUANTS


@click.command("export")
@click.argument("name")
@click.option("--format", "format_", type=click.Choice(["gguf"]), default="gguf", show_default=True,
              help="file format: GGUF, for llama.cpp, Ollama and LM Studio")
@click.option("--quant", type=click.Choice(list(QUANTS), case_sensitive=False), default=DEFAULT_QUANT, show_default=True,
              help="GGUF type of the weights (for an adapter: of its base); f16/bf16/q8_0 by the converter, the rest by llama.cpp's quantizer")
@click.option("--out", type=click.Path(path_type=Path, file_okay=True), help="also copy the files (GGUF, Modelfile, manifest) into this folder")
@click.option("--ollama", "ollama", metavar="NAME", help="run `ollama create NAME` on the Modelfile when done (ollama must be on PATH)")
@overwrite_option("replace an export of the same name, and same-named files in --out")
@json_option
def export(name: str, format_: str, quant: str, out: Path | None, ollama: str | None, overwrite: bool, as_json: bool) -> None:
    """Write NAME (a model or an adapter in the store) as GGUF, checked in llama.cpp against the original.

    \b
    A model becomes one GGUF file; an adapter a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER) beside
    its base's GGUF, exported first when needed. The GGUF carries the chat template and the
    BOS/EOS/end-of-turn ids; an Ollama Modelfile is written beside it. The export is loaded in
    llama.cpp and compared with the model in fp32 on probe prompts and validation answers (top-1
    agreement, mean KL, greedy answers that must stop); below the gate nothing is kept.
    Examples:
      appliance export smollm2-facts                      # q8_0, in the store
      appliance export smollm2-facts --quant q4_k_m --out ./gguf --ollama smollm2-facts
      appliance export facts --quant f16                  # the adapter as a GGUF LoRA + its base
      appliance exports
    """
    from appliance import ui
    from appliance.export import ExportSpec
    from appliance.export import export as run_export

    spec = ExportSpec(name=name, format=format_, quant=quant.lower(), out=out, ollama=ollama, overwrite=overwrite)
    with ui.Spinner(f"exporting {name} as {spec.quant} GGUF") as spinner:
        result = run_export(registry(), spec, progress=spinner.update)
    if as_json:
        print_json({**result.manifest.model_dump(mode="json"), "path": str(result.folder),
                    "copied_to": str(result.copied_to) if result.copied_to else None, "ollama_create": result.ollama_create,
                    "ollama_ran": result.ollama_ran})
        return
    show_export(result)


def show_export(result) -> None:
    from appliance import ui

    if result.base_export is not None:
        b = result.base_export
        ui.console.print(f"[green]exported the base[/] {b.name} first ({_mib(b.files[b.gguf])}, {b.timings.get('total_s', 0):g} s)", highlight=False)
    m = result.manifest
    p = m.parity
    a = p.agreement
    where = result.copied_to or result.folder
    files = ", ".join(f"{n} ({_mib(size)})" for n, size in m.files.items() if n.endswith(".gguf"))
    stopped = f"{p.stopped} of {len(p.generations)} greedy answers to the {p.generations_from} prompts stopped at an end-of-turn token"
    ui.console.print(
        f"[green]exported[/] {m.source} as {m.quant} GGUF in {m.timings.get('total_s', 0):g} s: {files}\n"
        f"  against {p.reference} ({p.prompts} probe prompts, {p.validation_examples} validation answers, {a.positions} positions):\n"
        f"  {ui.agreement_line(a, p.gate_min_top1, p.gate_max_mean_kl)}\n"
        f"  {stopped}; {sum(g.same_as_reference for g in p.generations)} the same as the reference's; "
        f"tokenizer {p.tokenization_matches}/{p.tokenization_checked} texts identical",
        highlight=False,
    )
    for note in p.notes:
        ui.warn(note)
    ui.console.print(f"files: {where}")
    if result.ollama_ran:
        ui.console.print(f"[green]Ollama model made[/]: {result.ollama_create}")
    else:
        ui.console.print(f"Ollama:    [bold]{result.ollama_create}[/]")
    model = where / m.gguf
    lora = f" --lora {where / m.lora}" if m.lora else ""
    ui.console.print(f"llama.cpp: [bold]llama-server -m {model}{lora}[/]", highlight=False)
    if not m.lora:
        ui.console.print(f"LM Studio: [bold]lms import {model}[/]", highlight=False)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@click.command("exports")
@json_option
def exports(as_json: bool) -> None:
    """GGUF exports in the store, with their type, size and agreement with the original.

    \b
    Examples:
      appliance exports
      appliance exports --json
    """
    from appliance import ui
    from appliance.export import list_exports

    found = list_exports(registry())
    if as_json:
        print_json([m.model_dump(mode="json") for m in found])
        return
    if not found:
        ui.console.print("No exports yet. Make one: [bold]appliance export MODEL --quant q8_0[/]")
        return
    ui.console.print(exports_table(found))


def exports_table(found):
    from rich.table import Table

    table = Table("export", "of", "kind", "type", "GGUF size", "top-1", "mean KL", "seconds", title="GGUF exports", title_justify="left")
    for m in found:
        size = sum(size for n, size in m.files.items() if n.endswith(".gguf") and (m.lora is None or n == m.lora))
        a = m.parity.agreement
        table.add_row(m.name, m.source, m.kind, m.quant, _mib(size), f"{a.top1_agreement:.2%}", f"{a.mean_kl:.2e}", f"{m.timings.get('total_s', 0):g}")
    return table


commands = [export, exports]
