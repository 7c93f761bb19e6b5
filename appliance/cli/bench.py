"""`appliance bench train|serve`: our training step against the peer loop, and the endpoint under load."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.client import endpoint_options
from appliance.cli.common import json_option, print_json, registry

SHAPES = ["llama-3.2-1b", "llama-3.1-8b"]


@click.group()
def bench() -> None:
    """Benchmarks that print figures (timing goals live here, never in tests)."""


def _progress(as_json: bool):
    from rich.console import Console

    console = Console(stderr=True) if as_json else None

    def say(text: str) -> None:
        from appliance import ui

        (console or ui.console).print(f"[dim]{text} …[/]")

    return say


@bench.command("train")
@click.option("--model", help="a model in the store (default: smollm2, on the demo data)")
@click.option("--shape", type=click.Choice(SHAPES), help="random weights of a real shape, random tokens (no download)")
@click.option("--data", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="chat JSONL for --model (default: the demo data)")
@click.option("--seq-len", type=int, help="longest sequence (default: 512 with data, 2048 for a shape)")
@click.option("--steps", type=int, default=10, show_default=True, help="steps per loop; the first 3 are warm-up and not counted")
@click.option("--batch-size", type=int, help="examples per step (default: 8 with data, 1 for a shape)")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank, all linear layers")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="change our side only, to weigh a lever: --set train.packing=false, --set model.gradient_checkpointing=true")
@click.option("--save", is_flag=True, help="write the result (and GPU measurements for the planner) into bench/results/")
@json_option
def bench_train(model, shape, data, seq_len, steps, batch_size, rank, sets, save, as_json) -> None:
    """Our training step and the peer loop (../shared/bench/peer_qlora_loop.py), same model, data and settings.

    \b
    Prints, for each: useful tokens/s (padding excluded), median step time, peak memory
    (GPU allocated, or process RSS on CPU), and the ratios appliance / peer.
    Examples:
      appliance bench train                                  # SmolLM2 on the demo data
      appliance bench train --shape llama-3.1-8b --seq-len 2048 --save
      appliance bench train --set train.packing=false     # what packing is worth
    """
    from appliance.errors import ApplianceError
    from appliance.hardware import describe
    from appliance.plan import save_result
    from appliance.train.bench import bench_train as run_bench
    from appliance.train.bench import measurements

    if model and shape:
        raise ApplianceError("--model and --shape each choose the model.", "pass one of them")
    if steps < 2:
        raise ApplianceError("--steps must be at least 2 (the first are warm-up).", "use --steps 10")
    result = run_bench(
        registry(),
        model=model,
        shape=shape,
        data=data,
        seq_len=seq_len or (2048 if shape else 512),
        steps=steps,
        batch_size=batch_size or (1 if shape else 8),
        rank=rank,
        sets=list(sets),
        progress=_progress(as_json),
    )
    payload = result.as_dict()
    if save:
        env = describe()
        path = save_result("train", payload, env, measurements(result, env))
        payload["saved"] = str(path)
    if as_json:
        print_json(payload)
    else:
        show_train(payload)


def show_train(payload: dict) -> None:
    from rich.table import Table

    from appliance import ui
    from appliance.train.bench import peak_gib

    ours, peer, ratio = payload["appliance"], payload["peer"], payload["ratio"]
    s = payload["settings"]
    table = Table(title=f"{s['model']} · seq ≤ {s['seq_len']} × batch {s['batch_size']} · r{s['rank']} · {s['quantization']} · {ours['device']}")
    table.add_column("")
    table.add_column("appliance", justify="right")
    table.add_column("peer loop", justify="right")
    table.add_column("appliance / peer", justify="right")
    memory = "peak GPU allocated, GiB" if "peak_gib" in ours else "peak process RSS, GiB"
    rows = [
        ("useful tokens/s", ours["useful_tok_per_s"], peer and peer["useful_tok_per_s"], ratio.get("useful_tok_per_s")),
        ("step time median, s", ours["step_s_median"], peer and peer["step_s_median"], ratio.get("step_s_median")),
        (memory, peak_gib(ours), peer and peak_gib(peer), ratio.get("peak_memory")),
    ]
    for label, a, b, r in rows:
        table.add_row(label, f"{a:g}", "—" if b is None else f"{b:g}", "—" if r is None else f"{r:.2f}×")
    ui.console.print(table)
    checkpointing = ours.get("gradient_checkpointing")
    if checkpointing is not None:
        ui.console.print(f"[dim]appliance: gradient checkpointing {'on' if checkpointing else 'off'}, optimizer {ours.get('optimizer')}; "
                         "peer: gradient checkpointing on, padded batches, full logits[/]")
    for note in payload["notes"]:
        ui.warn(note)
    if payload.get("saved"):
        ui.console.print(f"saved: {payload['saved']}")


@bench.command("serve")
@endpoint_options
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True, help="requests in flight at once")
@click.option("--requests", type=click.IntRange(1, 100000), default=32, show_default=True, help="requests in all")
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=64, show_default=True, help="tokens per answer")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="time what a restart costs: a fresh server of the same model on a free port, beside this one")
@click.option("--save", is_flag=True, help="write the result into bench/results/")
@json_option
def bench_serve(model, adapter, url, api_key, concurrency, requests, max_tokens, restart, save, as_json) -> None:
    """Load the running endpoint: requests/s, output tokens/s, time to first token p50/p95.

    \b
    With --adapter, first swaps that adapter into the live server (timed to its first token),
    load-tests through it, and compares with the time a restarted server takes to answer.
    Examples:
      appliance bench serve --concurrency 8 --requests 64
      appliance bench serve --adapter facts
    """
    from appliance.client import bench_serve as run_bench
    from appliance.client import find_endpoint
    from appliance.hardware import describe
    from appliance.plan import save_result

    result = run_bench(
        find_endpoint(url, api_key),
        registry(),
        model=model,
        adapter=adapter,
        concurrency=concurrency,
        requests=requests,
        max_tokens=max_tokens,
        restart=restart,
        progress=_progress(as_json),
    )
    if save:
        result["saved"] = str(save_result("serve", result, describe()))
    if as_json:
        print_json(result)
    else:
        show_serve(result)


def show_serve(result: dict) -> None:
    from appliance import ui

    load = result["load"]
    fmt = lambda v, unit="s": "—" if v is None else f"{v:g} {unit}"  # noqa: E731
    rows = {
        "endpoint": result["url"],
        "model": load["model"],
        "requests": f"{load['requests']} ({load['concurrency']} at a time, {load['max_tokens']} tokens max), {load['errors']} errors",
        "requests/s": f"{load['requests_per_s']:g}",
        "output tokens/s": f"{load['output_tok_per_s']:g}",
        "time to first token p50 / p95": f"{fmt(load['ttft_p50_s'])} / {fmt(load['ttft_p95_s'])}",
        "latency p50 / p95": f"{fmt(load['latency_p50_s'])} / {fmt(load['latency_p95_s'])}",
    }
    if "swap" in result:
        swap = result["swap"]
        rows["adapter swap (load → first token)"] = f"{swap['to_first_token_s']:g} s (load call {swap['load_s']:g} s)"
    if result.get("restart"):
        rows["fresh server (launch → first token)"] = f"{result['restart']['to_first_token_s']:g} s (healthy after {result['restart']['healthy_s']:g} s)"
    if "swap_vs_restart" in result:
        rows["restart / swap"] = f"{result['swap_vs_restart']:g}×"
    ui.console.print(ui.key_value_table(rows, title="serving benchmark"))
    if load["first_error"]:
        ui.warn(f"first error: {load['first_error']}")
    for note in result.get("notes", []):
        ui.warn(note)
    if result.get("saved"):
        ui.console.print(f"saved: {result['saved']}")


commands = [bench]
