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
    from appliance.errors import ApplianceError
    from appliance.serve import check_port, require_vllm
    from appliance.serve.process import require_ray
    from appliance.serve.service import Paths, install as install_service, install_ray, new_api_key, ray_unit_path, redact, render, render_ray

    scope = "system" if system else "user"
    store = registry().store
    paths = Paths.for_scope(scope)
    python = options["python"] or sys.executable
    if model is None:
        if not options["ray_address"] or ray_head:
            raise ApplianceError("Which model should the service serve?", "appliance service install MODEL (or, on a Ray worker machine, --ray-address HEAD:PORT alone)")
        # A Ray worker: it serves nothing itself; the head's vLLM places its GPU workers here.
        rendered = render_ray(python, store, paths, address=options["ray_address"], on_gpu=_gpu_here(), run_as=run_as)
        if dry_run:
            click.echo(f"# --- {ray_unit_path(paths)}\n{rendered.unit}")
            ui.err_console.print("[dim]dry run: nothing was written[/]")
            return
        require_ray(python)
        unit = install_ray(rendered, store, paths)
        ui.console.print(f"[green]installed[/] {unit}: this machine joins the Ray cluster at {options['ray_address']}")
        return
    if ray_head:
        if options["ray_address"]:
            raise ApplianceError("--ray-head starts a cluster here; --ray-address joins another.", "pass one of them")
        options["ray_address"] = f"127.0.0.1:{ray_port}"
    options["runtime_adapters"] = True
    spec = spec_from_options(model, **options)
    if scope == "user" and spec.port < 1024:
        raise ApplianceError(f"Port {spec.port} is privileged: a user unit cannot bind it.", "use a port from 1024 up, or install a system unit (--system)")
    check_port(spec.host, spec.port)  # a unit on a taken port would restart until its start limit, serving nothing
    ray_rendered = render_ray(python, store, paths, head_port=ray_port, on_gpu=spec.on_gpu, run_as=run_as) if ray_head else None
    if dry_run:
        key = new_api_key()
        # Exact file contents, unwrapped, so they can be read and diffed.
        if ray_rendered:
            click.echo(f"# --- {ray_unit_path(paths)}\n{ray_rendered.unit}")
        rendered = render(spec, store, paths, key, run_as, ray_head)
        click.echo(f"# --- {paths.unit}\n{rendered.unit}")
        click.echo(f"# --- {paths.env} (mode 0600)\n{rendered.env.replace(key, redact(key))}")
        ui.err_console.print("[dim]dry run: nothing was written[/]")
        return
    require_vllm(spec.python)
    if spec.ray_address:
        require_ray(spec.python)
    record = install_service(spec, store, scope=scope, force=overwrite, run_as=run_as, ray_head=ray_rendered)
    if ray_rendered:
        ui.console.print(f"[green]installed[/] {ray_unit_path(paths)}: the Ray head; on each other machine: "
                         f"appliance service install --ray-address THIS_HOST:{ray_port}")
    ui.console.print(f"[green]installed[/] {record['unit']} (env {record['env_file']}, mode 0600)")
    if no_wait:
        return
    from appliance.serve.health import wait

    with ui.Spinner("waiting for vLLM to answer /health") as spinner:
        started = time.time()
        ok = wait(spec.url, timeout=1200, interval=1.0)
        spinner.update(f"{time.time() - started:.0f} s")
    if not ok:
        raise ApplianceError(f"The service did not answer {spec.url}/health.", "see `appliance service logs`")
    ui.console.print(f"[green]ready[/] at {spec.url}/v1 · served: {', '.join(spec.served_names)} · key: `appliance service key`")


def _gpu_here() -> bool:
    from appliance.hardware import gpu_present

    return gpu_present()


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
