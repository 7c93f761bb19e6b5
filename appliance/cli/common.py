"""Small helpers shared by commands."""

from __future__ import annotations

import json
from typing import Any

import click

from appliance.registry import Registry


def registry() -> Registry:
    return Registry()


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")


def overwrite_option(help: str):
    """One flag for 'go ahead and replace / remove': --overwrite, with --force and --yes (-y) as its aliases."""
    return click.option("--overwrite", "--force", "--yes", "-y", "overwrite", is_flag=True, help=help + " (aliases: --force, --yes, -y)")


def held_memory_note(held_gib: float) -> str | None:
    """When other processes hold GPU memory a plan needs: how much, and the appliance's own server if it is one."""
    if held_gib < 0.25:
        return None
    from appliance.serve import installed_service as installed, running_servers

    store = registry().store
    holders = []
    if installed(store):
        holders.append("the appliance service (`appliance service stop` frees it)")
    holders += [f"`appliance serve` at {r['url']} (pid {r['pid']}; Ctrl-C there frees it)" for r in running_servers(store)]
    who = "; ".join(holders) or "see `nvidia-smi` for which processes"
    return f"{held_gib:.1f} GiB of the GPU are held by other processes: {who}"
