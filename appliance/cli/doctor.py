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
    from appliance.doctor import machine_findings

    python = python or sys.executable
    show = (lambda f: None) if as_json else _show
    findings = _shown(machine_findings(registry().store, python), show)  # before the path in miniature starts
    path = None if quick else _path_in_miniature(python, with_vllm=not no_vllm)
    findings += _shown(path.findings, show) if path else []
    result = {"ok": all(f.ok for f in findings), "findings": [f.__dict__ for f in findings], "figures": path.figures if path else {}}
    if save:
        result["saved"] = _save(result)
    if as_json:
        print_json(result)
    else:
        _verdict(findings, result)
    sys.exit(0 if result["ok"] else 1)


def _shown(findings: list, show) -> list:
    for finding in findings:
        show(finding)
    return list(findings)


def _save(result: dict) -> str:
    """bench/results/doctor-*.json; on a GPU the miniature run's peak memory is also a measurement the planner is tested against."""
    from appliance.doctor_run import measurements
    from appliance.hardware import describe
    from appliance.results import save_result

    env = describe()
    return str(save_result("doctor", result, env, measurements(result["figures"], env)))


def _path_in_miniature(python: str, with_vllm: bool):
    from appliance import ui
    from appliance.doctor_run import run_path

    with ui.Spinner("the path in miniature") as spinner:
        return run_path(python, progress=spinner.update, with_vllm=with_vllm)


def _verdict(findings: list, result: dict) -> None:
    from appliance import ui

    on = "this GPU" if any(f.name == "cuda-usable" and "compute capability" in f.detail for f in findings) else "this CPU (no NVIDIA GPU)"
    verdict = "[green]the whole path works[/]" if result["ok"] else "[red]something failed[/]: each FAIL above names its fix"
    ui.console.print(f"{verdict} on {on}" + (f" · saved {result['saved']}" if "saved" in result else ""))


def _show(finding) -> None:
    from appliance import ui

    mark = "[green]ok[/]  " if finding.ok else "[red]FAIL[/]"
    ui.console.print(f"{mark} [bold]{finding.name}[/]: {finding.detail}", highlight=False)
    if not finding.ok and finding.fix:
        ui.console.print(f"      fix: {finding.fix}", highlight=False)


commands = [doctor]
