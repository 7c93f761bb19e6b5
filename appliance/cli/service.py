"""`appliance service ...`: vLLM as a hardened systemd service."""

from __future__ import annotations

import sys
import time

import click

from appliance.cli.common import json_option, overwrite_option, print_json, registry
from appliance.cli.serve import serve_options, spec_from_options


@click.group()
def service() -> None:
    """The endpoint as a systemd service: install, status, logs, restart, stop, uninstall, key."""


@service.command()
@click.argument("model", required=False)
@serve_options
@click.option("--system", is_flag=True, help="a system unit (needs root) instead of a user unit")
@click.option("--run-as", default=None, help="with --system: the user the server runs as (default: $SUDO_USER)")
@overwrite_option("replace an installed service")
@click.option("--dry-run", is_flag=True, help="print the unit and env file (key redacted); touch nothing")
@click.option("--no-wait", is_flag=True, help="return once started, without waiting for /health")
@click.option("--ray-head", is_flag=True, help="also run this machine as the head of a Ray cluster; vLLM spreads over its machines")
@click.option("--ray-port", type=click.IntRange(1024, 65535), default=6379, show_default=True, help="with --ray-head: the port workers join")
def install(model, system, run_as, overwrite, dry_run, no_wait, ray_head, ray_port, **options) -> None:
    """Install MODEL (with --adapter A ...) as a service that starts at boot.

    LoRA stays enabled (rank limit from the adapters, at least 16) so that
    `appliance adapters load NAME` switches domains without a restart. The API
    key is generated into an env file readable only by you.

    Across machines (vLLM's Ray backend, `pip install '.[cluster]'` on each): on the head,
    MODEL --ray-head with the parallel sizes; on each other machine, --ray-address HEAD:PORT
    without MODEL installs a Ray worker that joins it. The model's folder must be at the same
    path on every machine.

    \b
    Examples:
      appliance service install smollm2 --adapter legal --adapter recipes --dry-run
      appliance service install smollm2-facts
      sudo appliance service install smollm2 --system --run-as alice
      appliance service install llama-70b --ray-head --tensor-parallel-size 2 --pipeline-parallel-size 2
      appliance service install --ray-address 10.0.0.1:6379            # on the second machine
    """
    from appliance import ui
    from appliance.serve import install_service

    plan = _install_plan(model, "system" if system else "user", run_as, ray_head, ray_port, options)
    if dry_run:
        click.echo(plan.preview())
        ui.err_console.print("[dim]dry run: nothing was written[/]")
        return
    record = install_service(plan, registry().store, force=overwrite)
    _say_installed(plan, record, ray_port)
    if record is not None and not no_wait:
        _wait_until_ready(plan.spec)


def _install_plan(model: str | None, scope: str, run_as: str | None, ray_head: bool, ray_port: int, options: dict):
    """The service for MODEL, the Ray head for it (--ray-head), or a Ray worker joining --ray-address (no MODEL)."""
    from appliance.errors import ApplianceError
    from appliance.hardware import gpu_present
    from appliance.serve import plan_install, plan_ray_worker

    store, address = registry().store, options["ray_address"]
    if model is None and not (address and not ray_head):
        raise ApplianceError("Which model should the service serve?", "appliance service install MODEL (or, on a Ray worker machine, --ray-address HEAD:PORT alone)")
    if ray_head and address:
        raise ApplianceError("--ray-head starts a cluster here; --ray-address joins another.", "pass one of them")
    if model is None:
        return plan_ray_worker(options["python"] or sys.executable, store, address=address, on_gpu=gpu_present(), scope=scope, run_as=run_as)
    options["ray_address"] = f"127.0.0.1:{ray_port}" if ray_head else address
    spec = spec_from_options(model, **{**options, "runtime_adapters": True})
    return plan_install(spec, store, scope=scope, run_as=run_as, ray_head_port=ray_port if ray_head else None)


def _say_installed(plan, record: dict | None, ray_port: int) -> None:
    from appliance import ui
    from appliance.serve import ray_unit_path

    if plan.ray:
        joins = f"this machine joins the Ray cluster at {plan.ray_address}" if record is None else \
            f"the Ray head; on each other machine: appliance service install --ray-address THIS_HOST:{ray_port}"
        ui.console.print(f"[green]installed[/] {ray_unit_path(plan.paths)}: {joins}")
    if record is not None:
        ui.console.print(f"[green]installed[/] {record['unit']} (env {record['env_file']}, mode 0600)")


def _wait_until_ready(spec) -> None:
    from appliance import ui
    from appliance.errors import ApplianceError
    from appliance.serve import wait_healthy as wait

    with ui.Spinner("waiting for vLLM to answer /health") as spinner:
        started = time.time()
        ok = wait(spec.url, timeout=1200, interval=1.0)
        spinner.update(f"{time.time() - started:.0f} s")
    if not ok:
        raise ApplianceError(f"The service did not answer {spec.url}/health.", "see `appliance service logs`")
    ui.console.print(f"[green]ready[/] at {spec.url}/v1 · served: {', '.join(spec.served_names)} · key: `appliance service key`")


@service.command()
@json_option
def status(as_json: bool) -> None:
    """Unit state, PID, uptime, endpoint, served models and adapters, memory.

    \b
    Example:
      appliance service status --json
    """
    from appliance import ui
    from appliance.serve import Endpoint, installed_endpoint, served_labels, service_status

    info = service_status(registry().store)
    url, key = installed_endpoint()
    served = served_labels(Endpoint(url, key))
    if as_json:
        print_json({**info, "served": served})
    else:
        ui.console.print(ui.service_table(info, url, served))


@service.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("-n", "--lines", default=100, show_default=True, help="how many lines")
def logs(follow: bool, lines: int) -> None:
    """The service's log, from the journal.

    \b
    Example:
      appliance service logs -f -n 50
    """
    from appliance.serve import service_journal as journal

    raise SystemExit(journal(registry().store, lines, follow))


def _control(action: str):
    @service.command(name=action, help=f"{action.capitalize()} the service.\n\n\b\nExample:\n  appliance service {action}")
    def command() -> None:
        from appliance import ui
        from appliance.serve import control_service as control

        control(registry().store, action)
        ui.console.print(f"[green]{action}[/] done")

    return command


for _action in ("start", "stop", "restart"):
    _control(_action)


@service.command()
def uninstall() -> None:
    """Stop and remove the unit and its env file (models and adapters stay).

    \b
    Example:
      appliance service uninstall
    """
    from appliance import ui
    from appliance.serve import uninstall_service

    record = uninstall_service(registry().store)
    ui.console.print(f"[green]removed[/] {record['unit']} and {record['env_file']}; models and adapters are kept")


@service.command()
def key() -> None:
    """Print the service's API key (the only command that shows it whole).

    \b
    Example:
      export APPLIANCE_API_KEY=$(appliance service key)
    """
    from appliance.errors import ApplianceError
    from appliance.serve import installed_endpoint

    _, api_key = installed_endpoint()
    if not api_key:
        raise ApplianceError("No API key found (no service installed, or its env file is unreadable).", "appliance service install MODEL")
    click.echo(api_key)


commands = [service]
