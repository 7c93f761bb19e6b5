"""`appliance doctor`: what this machine has against what the whole path needs, each finding named."""

from __future__ import annotations

import sys

import click

from appliance.cli.common import json_option, print_json, registry


@click.command()
@click.option("--quick", is_flag=True, help="only the checks of the machine: skip the miniature train, merge and serve")
@click.option("--no-vllm", is_flag=True, help="run the miniature path without its vLLM request")
@click.option("--python", "python", default=None, help="interpreter that has vLLM, as for `appliance serve` (default: this one)")
@click.option("--save", is_flag=True, help="write the findings and figures to bench/results/doctor-*.json")
@json_option
def doctor(quick: bool, no_vllm: bool, python: str | None, save: bool, as_json: bool) -> None:
    """Check this machine for the whole path, each finding by name with its fix: the NVIDIA driver
    against PyTorch's CUDA, a C compiler and Python's headers (vLLM compiles kernels on a GPU),
    the compute type, vLLM and whether its PyTorch sees the GPU, GPU memory held by others
    (the appliance service among them), the service's caches, the store. Then the path in
    miniature, timed, in a throwaway store: 5 QLoRA steps on a tiny random LLaMA (bitsandbytes,
    peft; on a GPU its peak memory against the planner's), the merge with its parity check, and
    one request through vLLM. Exits 1 when one fails.

    \b
    Examples:
      appliance doctor
      appliance doctor --save        # a GPU owner's run becomes a measurement in bench/results/
      appliance doctor --quick --json
    """
    from appliance import ui
    from appliance.doctor import machine_findings

    python = python or sys.executable
    findings = machine_findings(registry().store, python)
    figures: dict = {}
    show = (lambda f: None) if as_json else _show
    for finding in findings:
        show(finding)
    if not quick:
        from appliance.doctor_run import run_path

        with ui.Spinner("the path in miniature") as spinner:
            path = run_path(python, progress=spinner.update, with_vllm=not no_vllm)
        for finding in path.findings:
            show(finding)
        findings += path.findings
        figures = path.figures
    ok = all(f.ok for f in findings)
    result = {"ok": ok, "findings": [f.__dict__ for f in findings], "figures": figures}
    if save:
        from appliance.hardware import describe
        from appliance.results import save_result

        result["saved"] = str(save_result("doctor", result, describe()))
    if as_json:
        print_json(result)
    else:
        on = "this GPU" if any(f.name == "cuda-usable" and "compute capability" in f.detail for f in findings) else "this CPU (no NVIDIA GPU)"
        verdict = "[green]the whole path works[/]" if ok else "[red]something failed[/]: each FAIL above names its fix"
        ui.console.print(f"{verdict} on {on}" + (f" · saved {result['saved']}" if save else ""))
    sys.exit(0 if ok else 1)


def _show(finding) -> None:
    from appliance import ui

    mark = "[green]ok[/]  " if finding.ok else "[red]FAIL[/]"
    ui.console.print(f"{mark} [bold]{finding.name}[/]: {finding.detail}", highlight=False)
    if not finding.ok and finding.fix:
        ui.console.print(f"      fix: {finding.fix}", highlight=False)


commands = [doctor]
