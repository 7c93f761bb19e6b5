"""`appliance doctor`: what this machine has against what the whole path needs, each finding named."""

from __future__ import annotations

import sys

import click

from appliance.cli.common import json_option, print_json, registry


@click.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check this machine for the whole path, each finding by name with its fix: the NVIDIA driver
    against PyTorch's CUDA, a C compiler and Python's headers (vLLM compiles kernels on a GPU),
    the compute type, vLLM and whether its PyTorch sees the GPU, GPU memory held by others
    (the appliance service among them), the service's caches, the store. Exits 1 when one fails.

    \b
    Examples:
      appliance doctor
      appliance doctor --json
    """
    from appliance import ui
    from appliance.doctor import machine_findings

    findings = machine_findings(registry().store)
    if as_json:
        print_json([f.__dict__ for f in findings])
    else:
        for finding in findings:
            mark = "[green]ok[/]  " if finding.ok else "[red]FAIL[/]"
            ui.console.print(f"{mark} [bold]{finding.name}[/]: {finding.detail}", highlight=False)
            if not finding.ok and finding.fix:
                ui.console.print(f"      fix: {finding.fix}", highlight=False)
    sys.exit(0 if all(f.ok for f in findings) else 1)


commands = [doctor]
