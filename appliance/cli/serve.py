"""`appliance serve`: vLLM in the foreground."""

from __future__ import annotations

import sys

import click

from appliance.cli.common import registry


def serve_options(fn):
    """Options shared by `serve` and `service install` (one ServeSpec builds both)."""
    for option in reversed(
        [
            click.option("--adapter", "adapters", multiple=True, help="serve this adapter under its own name (repeat)"),
            click.option("--host", default="127.0.0.1", show_default=True, help="address to bind"),
            click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port of the endpoint"),
            click.option("--allow-remote", is_flag=True, help="allow binding to an address other than loopback"),
            click.option("--python", "python", default=None, help="interpreter that has vLLM (default: this one)"),
            click.option("--max-model-len", type=click.IntRange(16), help="context served (default: the model's, capped at 1024 on CPU, 8192 on GPU)"),
            click.option("--max-lora-rank", type=click.IntRange(1), help="largest adapter rank the server accepts (default: from the adapters, ≥ 16)"),
            click.option("--max-loras", type=click.IntRange(1), help="adapters active in one batch (default: the number given)"),
            click.option("--runtime-adapters", is_flag=True, help="enable LoRA even without --adapter, for `appliance adapters load` later"),
            click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 0.99),
                         help="share of the GPU vLLM takes (default: 0.90, or 95 % of the memory free now if less)"),
            click.option("--quantization", type=click.Choice(["auto", "none", "fp8", "bitsandbytes"]), default="auto", show_default=True,
                         help="vLLM's in-flight quantization; auto: only when the 16-bit weights do not fit the GPU"),
            click.option("--tensor-parallel-size", type=click.IntRange(1), default=1, show_default=True,
                         help="split each layer over this many GPUs (vLLM's tensor parallelism)"),
            click.option("--pipeline-parallel-size", type=click.IntRange(1), default=1, show_default=True,
                         help="split the layers into this many stages, a GPU group each (vLLM's pipeline parallelism)"),
            click.option("--ray-address", metavar="HOST:PORT", default=None,
                         help="spread over the machines of this Ray cluster (pip install '.[cluster]'; see appliance service install --ray-head)"),
        ]
    ):
        fn = option(fn)
    return fn


def spec_from_options(
    model, adapters, host, port, allow_remote, python, max_model_len, max_lora_rank, max_loras, runtime_adapters, gpu_memory_utilization, quantization,
    tensor_parallel_size=1, pipeline_parallel_size=1, ray_address=None,
):
    from appliance import ui
    from appliance.errors import ApplianceError
    from appliance.serve import LOCAL_HOSTS, build_spec

    if host not in LOCAL_HOSTS:
        if not allow_remote:
            raise ApplianceError(
                f"Binding to {host} exposes the server beyond this machine.",
                "keep the default 127.0.0.1, or pass --allow-remote (and use an API key)",
            )
        ui.warn(f"binding to {host}: anyone who can reach this machine can reach the server")
    return build_spec(
        registry(),
        model,
        adapters,
        host=host,
        port=port,
        python=python or sys.executable,
        max_model_len=max_model_len,
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        runtime_adapters=runtime_adapters,
        gpu_memory_utilization=gpu_memory_utilization,
        quantization=quantization,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        ray_address=ray_address,
    )


@click.command()
@click.argument("model")
@serve_options
@click.option(
    "--api-key",
    envvar="APPLIANCE_API_KEY",
    help="require this key on every route but /health (default: $APPLIANCE_API_KEY, else the installed service's, else a new one, printed)",
)
@click.option("--no-api-key", is_flag=True, help="serve without a key (127.0.0.1 only): any local process can use the server")
def serve(model, api_key, no_api_key, **options) -> None:
    """Serve MODEL (merged, or a base with --adapter) with vLLM on an OpenAI-compatible endpoint.

    Runs in the foreground until Ctrl-C. Adapters are served under their own names next to the base.
    Every route but /health needs the API key; `appliance ask`, `chat` and `adapters` find it
    while the server runs.

    \b
    Examples:
      appliance serve smollm2-facts
      appliance serve smollm2 --adapter facts --adapter recipes --port 8001
    """
    from appliance import ui
    from appliance.serve import installed_endpoint, log_tail, serve_foreground, server_key, shell_line, vllm_command

    spec = spec_from_options(model, **options)
    key = server_key(spec.host, lora=spec.lora_enabled, given=api_key, opt_out=no_api_key, service_key=installed_endpoint()[1])
    log = registry().store.root / "logs" / f"serve-{spec.port}.log"
    ui.console.print(f"[dim]{shell_line(vllm_command(spec))}[/]", highlight=False)

    with ui.Spinner(f"starting vLLM ({'GPU' if spec.on_gpu else 'CPU'}) for {', '.join(spec.served_names)}") as spinner:
        code = serve_foreground(
            spec, log, registry().store, api_key=key.key, on_ready=lambda server: (spinner.stop(), ui.server_ready(spec, server, log, key)),
            tick=lambda s: spinner.update(f"starting vLLM … {s:.0f} s (log: {log})"),
        )
    if code is None:
        ui.console.print("[green]stopped[/]")
    elif code:
        ui.fail(f"vLLM exited with code {code}.", f"see {log}", log_tail(log))
        sys.exit(1)


commands = [serve]
