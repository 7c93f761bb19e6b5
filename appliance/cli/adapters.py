"""`appliance adapters ...`: the adapter registry, and domains swapped in the running server."""

from __future__ import annotations

import click

from appliance.cli.common import json_option, overwrite_option, print_json, registry


@click.group()
def adapters() -> None:
    """Adapters (one per domain): list, show, remove; load into / unload from the running server."""


def _loaded(url, api_key) -> set[str] | None:
    from appliance.serve import find_endpoint, served_models
    from appliance.errors import ApplianceError

    try:
        return {m["id"] for m in served_models(find_endpoint(url, api_key)) if m.get("parent")}
    except ApplianceError:
        return None


@adapters.command("list")
@click.option("--url", default=None, help="server whose loaded adapters to mark (default: as `appliance ask` finds it)")
@click.option("--api-key", default=None, help="API key (default: $APPLIANCE_API_KEY, the running server's, or the service's)")
@json_option
def list_(url, api_key, as_json) -> None:
    """Adapters in the store; `loaded` marks those in the running server.

    \b
    Example:
      appliance adapters list --json
    """
    from rich.table import Table

    from appliance import ui

    found = registry().adapters()
    loaded = _loaded(url, api_key)
    if as_json:
        print_json([{**a.model_dump(mode="json"), "loaded": a.name in (loaded or set())} for a in found])
        return
    if not found:
        ui.console.print("No adapters yet. Train one: [bold]appliance train --model M --data F --name N[/]")
        return
    table = Table("name", "base", "task", "rank", "val loss", "created", "loaded")
    for a in found:
        val = a.metrics.get("val_loss")
        mark = "-" if loaded is None else ("[green]●[/]" if a.name in loaded else "")
        table.add_row(a.name, a.base, a.task, str(a.rank), f"{val:.4f}" if isinstance(val, float) else "-", a.created[:19], mark)
    ui.console.print(table)
    if loaded is None:
        ui.console.print("[dim]no server answering: `loaded` unknown[/]")


@adapters.command()
@click.argument("name")
@json_option
def show(name, as_json) -> None:
    """Everything recorded about adapter NAME: base fingerprint, rank, data, metrics, config.

    \b
    Example:
      appliance adapters show facts
    """
    from appliance import ui

    reg = registry()
    a = reg.adapter(name)
    if as_json:
        print_json({**a.model_dump(mode="json"), "path": str(reg.adapter_dir(name))})
        return
    rows = {
        "name": a.name,
        "base": f"{a.base} (fingerprint {a.base_fingerprint})",
        "task / recipe": f"{a.task} / {a.recipe}",
        "rank / alpha": f"{a.rank} / {a.alpha:g}",
        "target modules": ", ".join(a.target_modules),
        "data": "; ".join(f"{d.path} ({d.format}, {d.examples} examples, sha256 {d.sha256[:12]})" for d in a.data),
        "metrics": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.metrics.items()),
        "created": a.created,
        "path": reg.adapter_dir(name),
    }
    ui.console.print(ui.key_value_table(rows))


@adapters.command()
@click.argument("name")
@overwrite_option("do not ask first")
def rm(name, overwrite) -> None:
    """Remove adapter NAME from the store.

    \b
    Example:
      appliance adapters rm facts --yes
    """
    from appliance import ui

    reg = registry()
    reg.adapter(name)
    if not overwrite and not click.confirm(f"Remove adapter {name}?"):
        return
    path = reg.remove_adapter(name)
    ui.console.print(f"[green]removed[/] {path}")


@adapters.command()
@click.argument("name")
@click.option("--url", default=None, help="server URL (default: $APPLIANCE_URL, the service's, or http://127.0.0.1:8000)")
@click.option("--api-key", default=None, help="API key (default: $APPLIANCE_API_KEY or the service's)")
def load(name, url, api_key) -> None:
    """Load adapter NAME into the running server, without a restart.

    \b
    Example:
      appliance adapters load recipes && appliance ask "How do I make Hilde's soup?" --adapter recipes
    """
    from appliance import ui
    from appliance.serve import find_endpoint
    from appliance.serve import load_adapter, rank_limit_for

    endpoint = find_endpoint(url, api_key)
    reg = registry()
    seconds = load_adapter(endpoint, reg, name, max_lora_rank=rank_limit_for(reg.store, endpoint.url))
    ui.console.print(f"[green]loaded[/] {name} in {seconds:.2f} s — ask it with: appliance ask \"...\" --adapter {name}")


@adapters.command()
@click.argument("name")
@click.option("--url", default=None, help="server URL (default: $APPLIANCE_URL, the service's, a running `appliance serve`, or http://127.0.0.1:8000)")
@click.option("--api-key", default=None, help="API key (default: $APPLIANCE_API_KEY, the running server's, or the service's)")
def unload(name, url, api_key) -> None:
    """Remove adapter NAME from the running server, without a restart.

    \b
    Example:
      appliance adapters unload recipes
    """
    from appliance import ui
    from appliance.serve import find_endpoint
    from appliance.serve import unload_adapter

    seconds = unload_adapter(find_endpoint(url, api_key), registry(), name)
    ui.console.print(f"[green]unloaded[/] {name} in {seconds:.2f} s")


commands = [adapters]
