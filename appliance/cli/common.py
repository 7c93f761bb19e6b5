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
