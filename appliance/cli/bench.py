"""`appliance bench train|serve`: our training step against TRL and the plain loop, and the endpoint under load."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from appliance.cli.client import endpoint_options
from appliance.cli.common import json_option, print_json, registry
from appliance.bench.train import PLAIN_LOOP_ENV, ROWS

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
@click.option("--steps", type=int, default=10, show_default=True, help="steps per side; the first 3 are warm-up and not counted")
@click.option("--batch-size", type=int, help="examples per step (default: 8 with data, 1 for a shape)")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank, all linear layers")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="change our side only, to weigh a lever: --set train.packing=false, --set lora.shared_inputs=false")
@click.option("--row", "rows", multiple=True, type=click.Choice([r.key for r in ROWS]),
              help="run only these rows (repeat; default: every row that applies)")
@click.option("--plain-loop", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help=f"the plain loop's script (default: ${PLAIN_LOOP_ENV}, else ../shared/bench/peer_qlora_loop.py)")
@click.option("--rounds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="run every side this many times, interleaved, and report medians (a shared machine's speed drifts)")
@click.option("--save", is_flag=True, help="write the result (and GPU measurements for the planner) into bench/results/")
@json_option
def bench_train(model, shape, data, seq_len, steps, batch_size, rank, sets, rows, plain_loop, rounds, save, as_json) -> None:
    """Our training step against TRL's SFTTrainer and the plain loop, like for like.

    \b
    Same model, data, batch size, sequence length, LoRA, 4-bit settings, learning rate and steps
    on every side, each in its own process. Rows:
      answers      loss on the answers only, gradient checkpointing on (appliance, TRL)
      every-token  loss on every token, gradient checkpointing on (appliance, TRL, plain loop)
      defaults     each side as its users run it
    Prints useful tokens/s (padding excluded), trained tokens/s, median step time, peak memory
    (GPU allocated, or process RSS on CPU) and the ratios appliance / other side.
    Examples:
      appliance bench train                                  # SmolLM2 on the demo data
      appliance bench train --shape llama-3.1-8b --seq-len 2048 --save
      appliance bench train --set train.packing=false        # what packing is worth
    """
    from appliance.bench.train import bench_train as run_bench
    from appliance.bench.train import choose_subject, find_plain_loop, measurements

    subject = choose_subject(registry(), model=model, shape=shape, data=data, seq_len=seq_len, batch_size=batch_size, steps=steps)
    result = run_bench(**subject.model_dump(), steps=steps, rank=rank, sets=list(sets), plain_loop=plain_loop or find_plain_loop(),
                       rows=tuple(rows), rounds=rounds, progress=_progress(as_json))
    _finish("train", result.model_dump(mode="json"), save=save, as_json=as_json, show=lambda saved: show_train(result, saved),
            measure=lambda env: measurements(result, env))


def _finish(kind: str, payload: dict, *, save: bool, as_json: bool, show: Callable[[str | None], None],
            measure: Callable[[dict], list[dict]] = lambda env: [], written: dict | None = None) -> None:
    """Every benchmark's end: with --save, write bench/results/<kind>-… (`written`, else the payload, and the
    planner's measurements), then print the payload as JSON or through `show`, which gets the saved file's path."""
    if save:
        from appliance.hardware import describe
        from appliance.results import save_result

        env = describe()
        payload["saved"] = str(save_result(kind, payload if written is None else written, env, measure(env)))
    if as_json:
        print_json(payload)
    else:
        show(payload.get("saved"))


def show_train(result, saved: str | None) -> None:
    from rich.table import Table

    from appliance import ui
    from appliance.bench.train import SIDE_NAMES

    s = result.settings
    ui.console.print(
        f"[bold]{s.model}[/] · {s.data} · seq ≤ {s.seq_len} × batch {s.batch_size} · r{s.rank} · {s.quantization} · "
        f"lr {s.learning_rate:g} · {s.steps} steps (3 warm-up)" + (f" · median of {s.rounds} rounds" if s.rounds > 1 else ""),
        highlight=False,
    )
    for row in result.rows:
        sides = list(row.results)
        headline = " [bold](headline)[/]" if row.spec.key == result.headline else ""
        table = Table(title=f"{row.spec.key}: {row.spec.title}{headline}", title_justify="left")
        table.add_column("")
        for side in sides:
            table.add_column(SIDE_NAMES[side], justify="right")
        first = row.results[sides[0]]
        memory = "peak GPU allocated, GiB" if first.memory == "GPU allocated" else "peak process RSS, GiB"
        fmt = lambda v: "—" if v is None else f"{v:g}"  # noqa: E731
        table.add_row("useful tokens/s", *(fmt(row.results[x].useful_tok_per_s) for x in sides))
        if s.rounds > 1:
            table.add_row("  each round", *(" ".join(f"{v:g}" for v in row.results[x].round_tok_per_s) for x in sides))
        table.add_row("trained tokens/s", *(fmt(row.results[x].trained_tok_per_s) for x in sides))
        table.add_row("step time median, s", *(fmt(row.results[x].step_s_median) for x in sides))
        table.add_row(memory, *(fmt(row.results[x].peak_gib) for x in sides))
        table.add_row("loss on", *(row.results[x].objective for x in sides))
        table.add_row("gradient checkpointing", *("on" if row.results[x].gradient_checkpointing else "off" for x in sides))
        table.add_row("batches", *(row.results[x].batching for x in sides))
        table.add_row("optimizer", *(row.results[x].optimizer for x in sides))
        ui.console.print(table)
        for ratio in row.ratios:
            ui.console.print(
                f"  appliance / {SIDE_NAMES[ratio.against]}: [bold]{ratio.useful_tok_per_s:.2f}×[/] useful tokens/s "
                f"at {ratio.peak_memory:.2f}× peak memory",
                highlight=False,
            )
    ui.console.print("[dim]What differs beyond each row's settings:[/]")
    for line in result.differences:
        ui.console.print(f"[dim]  · {line}[/]", highlight=False)
    for note in result.notes:
        ui.warn(note)
    if saved:
        ui.console.print(f"saved: {saved}")


@bench.command("merge")
@click.argument("adapter")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="merged dtypes to compare (repeat; default: float32 and bfloat16)")
@click.option("--save", is_flag=True, help="write the result into bench/results/ (the README's merge figures)")
@json_option
def bench_merge(adapter, dtypes, save, as_json) -> None:
    """Merge ADAPTER into the dequantized NF4 weights and into the original 16-bit weights, in each
    dtype, and compare each with the model you evaluated (4-bit base + adapter); nothing is kept.

    \b
    What decides `appliance merge`'s default weights. Example:
      appliance bench merge facts --save
    """
    registry().adapter(adapter)  # a typo fails here, before torch is imported
    from appliance.merge import compare_merges

    rows = compare_merges(registry(), adapter, dtypes=tuple(dtypes) or ("float32", "bfloat16"), progress=_progress(as_json))
    _finish("merge", {"adapter": adapter, "rows": rows}, save=save, as_json=as_json, show=lambda saved: show_merge(adapter, rows, saved))


def show_merge(adapter: str, rows: list[dict], saved: str | None) -> None:
    from rich.table import Table

    from appliance import ui

    table = Table("weights", "dtype", "top-1 at clear positions", "top-1, all", "mean KL", "of the adapter's effect", "gate",
                  title=f"merging {adapter}, against the evaluated 4-bit model")
    for row in rows:
        p = row["parity"]
        e = p["evaluated"]
        relative = max(e["mean_kl"], 0.0) / max(p["adapter_effect_kl"], 1e-12)
        table.add_row(row["weights"], row["dtype"], f"{e['top1_agreement']:.2%}", f"{e['top1_agreement_all']:.2%}", f"{e['mean_kl']:.2e}",
                      f"{relative:.2%}", "[green]pass[/]" if row["passed"] else "[red]fail[/]")
    ui.console.print(table)
    if saved:
        ui.console.print(f"saved: {saved}")


@bench.command("methods")
@click.option("--model", default="smollm2", show_default=True, help="base model in the store")
@click.option("--method", "methods", multiple=True, type=click.Choice(["dpo", "simpo", "orpo", "kto", "grpo"]), help="one method (repeat; default: all)")
@click.option("--save", is_flag=True, help="write the figures under bench/results/")
@json_option
def bench_methods(model, methods, save, as_json) -> None:
    """A short run of each training method on its demo data, then the held-out evaluation, before and after.

    \b
    What the README's methods table quotes. Example:
      appliance bench methods --method simpo --method grpo --save
    """
    registry().model(model)  # a typo fails here, before torch is imported
    from appliance.bench.methods import METHOD_RUNS, run_methods

    figures = run_methods(registry(), list(methods) or list(METHOD_RUNS), model, progress=_progress(as_json))
    _finish("methods", {"model": model, "methods": [f.model_dump() for f in figures]}, save=save, as_json=as_json,
            show=lambda saved: show_methods(figures, model, saved))


def show_methods(figures: list, model: str, saved: str | None) -> None:
    from appliance import ui

    ui.console.print(ui.methods_table(figures, model))
    if saved:
        ui.console.print(f"saved: {saved}")


@bench.command("export")
@click.argument("name")
@click.option("--quant", "quants", multiple=True, help="GGUF types to compare (repeat; default: f16, q8_0, q6_k, q5_k_m, q4_k_m)")
@click.option("--save", is_flag=True, help="write the result into bench/results/ (the README's export figures)")
@json_option
def bench_export(name, quants, save, as_json) -> None:
    """Export NAME (a model or adapter) at several GGUF types and judge each in llama.cpp against
    the original: file size, time, top-1 agreement, mean KL, greedy answers; nothing is kept.

    \b
    What the export's gates are measured from. Example:
      appliance bench export smollm2-facts --quant f16 --quant q8_0 --quant q4_k_m --save
    """
    from appliance.bench.export import DEFAULT_QUANTS, compare_exports

    rows = compare_exports(registry(), name, tuple(quants) or DEFAULT_QUANTS, progress=_progress(as_json))
    _finish("export", {"name": name, "rows": [row.model_dump(mode="json") for row in rows]}, save=save, as_json=as_json,
            show=lambda saved: show_export(name, rows, saved))


def show_export(name: str, rows: list, saved: str | None) -> None:
    from rich.table import Table

    from appliance import ui

    table = Table("type", "GGUF MiB", "seconds", "top-1 at clear positions", "top-1, all", "mean KL", "answers stopped", "same answers", "gate",
                  title=f"exporting {name}, against the original in fp32")
    for row in rows:
        a, answers = row.parity.agreement, row.parity.generations
        table.add_row(row.quant, f"{row.gguf_bytes / 2**20:.1f}", f"{row.seconds.get('total_s', 0):g}", f"{a.top1_agreement:.2%}", f"{a.top1_agreement_all:.2%}",
                      f"{a.mean_kl:.2e}", f"{row.parity.stopped}/{len(answers)}", f"{sum(g.same_as_reference for g in answers)}/{len(answers)}",
                      "[green]pass[/]" if row.passed else "[red]fail[/]")
    ui.console.print(table)
    if saved:
        ui.console.print(f"saved: {saved}")


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
    from appliance.serve import find_endpoint

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
    _finish("serve", result, save=save, as_json=as_json, show=lambda saved: show_serve(result))


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


@bench.command("memory")
@click.option("--shape", help="random weights of a profile's shape (profiles/models: llama-3.2-1b, smollm2-135m, ...)")
@click.option("--model", help="a model in the store instead")
@click.option("--seq-len", type=click.IntRange(16), default=512, show_default=True, help="the width of each row, in tokens")
@click.option("--rows", type=click.IntRange(1), default=1, show_default=True, help="rows in the micro-batch")
@click.option("--packed", is_flag=True, help="rows after the first hold two examples each: transformers builds the packed-sequence mask")
@click.option("--rank", type=click.IntRange(1), default=16, show_default=True, help="LoRA rank, all linear layers")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="a lever of the run: --set lora.shared_inputs=false, --set model.mlp_tile_tokens=512")
@click.option("--save", is_flag=True, help="write the measurement into bench/results/ (memory-<cpu|gpu>-<time>.json)")
@json_option
def bench_memory(shape, model, seq_len, rows, packed, rank, sets, save, as_json) -> None:
    """Live tensor memory of one real training step, by part and moment, against the planner.

    \b
    Sets up the real run (4-bit base, LoRA, gradient checkpointing, bf16 compute), takes one
    step, then counts every tensor storage alive during the next: at the loss, in backward and
    at the optimizer step. On a CPU this stands in for torch.cuda.max_memory_allocated().
    Examples:
      appliance bench memory --shape llama-3.2-1b --seq-len 512 --rows 2 --packed --save
      appliance bench memory --shape smollm2-135m --seq-len 2048 --set model.mlp_tile_tokens=512
    """
    from appliance.errors import ApplianceError
    from appliance.bench.memory import StepCase, measurements, run_memory_bench

    if bool(shape) == bool(model):
        raise ApplianceError("Name what to measure: --shape or --model.", "pass one of them, e.g. --shape llama-3.2-1b")
    reg = registry()
    result = run_memory_bench(
        StepCase(seq_len=seq_len, rows=rows, packed=packed, rank=rank, sets=tuple(sets)),
        shape=shape,
        model_dir=reg.model_dir(reg.model(model).name) if model else None,
        name=model,
        cache=reg.store.root / "bench-cache" / "memory",
        progress=_progress(as_json),
    )
    measured = {k: v for k, v in result.items() if k not in ("planner", "planner_misses")}  # tests re-plan it with the planner of their day
    _finish("memory", result, save=save, as_json=as_json, show=lambda saved: show_memory(result),
            measure=lambda env: measurements(result, env), written=measured)


def show_memory(result: dict) -> None:
    from rich.table import Table

    from appliance import ui

    case = result["case"]
    title = (f"{result['model']} · {case['rows']} × {case['seq_len']} tokens{' packed' if case['packed'] else ''} · r{case['rank']} · "
             f"{' '.join(case['sets']) or 'default levers'} · {result['device']} · peak at the {result['peak_moment']}")
    table = Table(title=title, title_justify="left")
    for column in ("moment", "part", "planned GiB", "measured GiB", "error"):
        table.add_column(column, justify="left" if column in ("moment", "part") else "right")
    for moment, parts in result["planner"].items():
        for i, (part, check) in enumerate(parts.items()):
            error = "—" if check["error"] is None else f"{check['error']:+.1%}"
            table.add_row(moment if i == 0 else "", part.replace("_", " "), f"{check['planned_gib']:.3f}", f"{check['measured_gib']:.3f}", error,
                          end_section=part == "total")
    ui.console.print(table)
    for miss in result["planner_misses"]:
        ui.warn(f"planner off by more than 15 %: {miss}")
    for note in result["notes"]:
        ui.console.print(f"[dim]{note}[/]")
    ui.console.print(f"[dim]setup {result['setup_s']:g} s, measured step {result['step_s']:g} s[/]")
    if result.get("saved"):
        ui.console.print(f"saved: {result['saved']}")


commands = [bench]
