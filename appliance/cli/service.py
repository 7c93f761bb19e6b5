"""`appliance service ...`: vLLM as a hardened systemd service."""

from __future__ import annotations

import time

import click

from appliance.cli.common import json_option, overwrite_option, print_json, registry
from appliance.cli.serve import serve_options, spec_from_options


@click.group()
def service() -> None:
    """The endpoint as a systemd service: install, status, logs, restart, stop, uninstall, key."""


@service.command()
@click.argument("model")
@serve_options
@click.option("--system", is_flag=True, help="a system unit (needs root) instead of a user unit")
@click.option("--run-as", default=None, help="with --system: the user the server runs as (default: $SUDO_USER)")
@overwrite_option("replace an installed service")
@click.option("--dry-run", is_flag=True, help="print the unit and env file (key redacted); touch nothing")
@click.option("--no-wait", is_flag=True, help="return once started, without waiting for /health")
def install(model, system, run_as, overwrite, dry_run, no_wait, **options) -> None:
    """Install MODEL (with --adapter A ...) as a service that starts at boot.

    LoRA stays enabled (rank limit from the adapters, at least 16) so that
    `appliance adapters load NAME` switches domains without a restart. The API
    key is generated into an env file readable only by you.

    \b
    Examples:
      appliance service install smollm2 --adapter legal --adapter recipes --dry-run
      appliance service install smollm2-facts
      sudo appliance service install smollm2 --system --run-as alice
    """
    from appliance import ui
    from appliance.serve import check_port, require_vllm
    from appliance.serve.service import Paths, install as install_service, new_api_key, redact, render

    options["runtime_adapters"] = True
    spec = spec_from_options(model, **options)
    scope = "system" if system else "user"
    store = registry().store
    if scope == "user" and spec.port < 1024:
        from appliance.errors import ApplianceError

        raise ApplianceError(f"Port {spec.port} is privileged: a user unit cannot bind it.", "use a port from 1024 up, or install a system unit (--system)")
    check_port(spec.host, spec.port)  # a unit on a taken port would restart until its start limit, serving nothing
    if dry_run:
        key = new_api_key()
        rendered = render(spec, store, Paths.for_scope(scope), key, run_as)
        paths = Paths.for_scope(scope)
        # Exact file contents, unwrapped, so they can be read and diffed.
        click.echo(f"# --- {paths.unit}\n{rendered.unit}")
        click.echo(f"# --- {paths.env} (mode 0600)\n{rendered.env.replace(key, redact(key))}")
        ui.err_console.print("[dim]dry run: nothing was written[/]")
        return
    require_vllm(spec.python)
    record = install_service(spec, store, scope=scope, force=overwrite, run_as=run_as)
    ui.console.print(f"[green]installed[/] {record['unit']} (env {record['env_file']}, mode 0600)")
    if no_wait:
        return
    from appliance.serve.health import wait

    with ui.Spinner("waiting for vLLM to answer /health") as spinner:
        started = time.time()
        ok = wait(spec.url, timeout=1200, interval=1.0)
        spinner.update(f"{time.time() - started:.0f} s")
    if not ok:
        from appliance.errors import ApplianceError

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
    from appliance.serve import Endpoint, served_models
    from appliance.errors import ApplianceError
    from appliance.serve.service import installed_endpoint, status as service_status

    info = service_status(registry().store)
    url, key = installed_endpoint()
    try:
        served = [m["id"] + (f" (adapter of {m['parent']})" if m.get("parent") else "") for m in served_models(Endpoint(url, key))]
    except ApplianceError:
        served = []
    state = info["systemd"]
    if as_json:
        print_json({**info, "served": served})
        return
    memory = state.get("MemoryCurrent", "")
    rows = {
        "unit": f"{info['record']['unit_name']} ({info['record']['scope']})",
        "state": f"{state.get('ActiveState')} / {state.get('SubState')}",
        "pid": state.get("MainPID"),
        "since": state.get("ActiveEnterTimestamp") or "-",
        "restarts": state.get("NRestarts", "0"),
        "memory": f"{int(memory) / 2**30:.2f} GiB" if memory.isdigit() else "-",
        "endpoint": f"{url}/v1",
        "served": ", ".join(served) or "(not answering)",
    }
    ui.console.print(ui.key_value_table(rows, title="appliance service"))


@service.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
@click.option("-n", "--lines", default=100, show_default=True, help="how many lines")
def logs(follow: bool, lines: int) -> None:
    """The service's log, from the journal.

    \b
    Example:
      appliance service logs -f -n 50
    """
    from appliance.serve.service import journal

    raise SystemExit(journal(registry().store, lines, follow))


def _control(action: str):
    @service.command(name=action, help=f"{action.capitalize()} the service.\n\n\b\nExample:\n  appliance service {action}")
    def command() -> None:
        from appliance import ui
        from appliance.serve.service import control

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
    from appliance.serve.service import uninstall as uninstall_service

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
    from appliance.serve.service import installed_endpoint

    _, api_key = installed_endpoint()
    if not api_key:
        raise ApplianceError("No API key found (no service installed, or its env file is unreadable).", "appliance service install MODEL")
    click.echo(api_key)


commands = [service]
