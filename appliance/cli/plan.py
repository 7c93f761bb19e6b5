"""`appliance plan`: will a fine-tune fit this GPU, how long will it take, what to change."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import held_memory_note, json_option, print_json, registry

DEFAULT_STEPS = 1000  # for the time estimate when the recipe counts epochs


@click.command()
@click.option("--model", required=True, help="a model in the store, a profile in profiles/models (llama-3.1-8b, ...), or a Hugging Face folder or config.json")
@click.option("--gpu", help='a profile in profiles/gpus ("RTX 3060", 4090, H100, ...) or cpu; default: the GPU detected, else this machine\'s memory')
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), metavar="GIB",
              help="plan for a card without a profile by the memory on its box (T4: 16, A6000: 48); no time estimate")
@click.option("--recipe", default="sft-qlora", show_default=True, help="recipe in profiles/recipes the settings start from")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML overriding the recipe")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override one field, e.g. --set lora.target_modules=[q_proj,v_proj]")
@click.option("--seq-len", type=int, help="tokens per example (the recipe's when unset)")
@click.option("--batch-size", type=int, help="examples per micro-batch")
@click.option("--rank", type=int, help="LoRA rank")
@click.option("--steps", type=int, help=f"optimizer steps for the time estimate (default: the recipe's, else {DEFAULT_STEPS})")
@click.option("--16bit", "sixteen_bit", is_flag=True, help="plan LoRA over 16-bit weights instead of QLoRA")
@click.option("--loop", type=click.Choice(["appliance", "peer"]), default="appliance", show_default=True,
              help="peer: the plain transformers + peft + bitsandbytes loop, for comparison")
@click.option("--gpus", type=click.IntRange(1), default=1, show_default=True,
              help="train on this many such GPUs under torchrun (data-parallel: memory is per GPU, --batch-size per GPU)")
@click.option("--fsdp", is_flag=True, help="with --gpus N: the base's layers sharded between the GPUs (appliance train --fsdp)")
@json_option
def plan(model, gpu, gpu_memory, recipe, config_file, sets, seq_len, batch_size, rank, steps, sixteen_bit, loop, gpus, fsdp, as_json) -> None:
    """Memory by part, fits or not, the longest sequence and batch that fit, time, and advice.

    Nothing is loaded: a store model is planned from its config.json, any other from its
    profile (yours in the user profiles folder too), so a model can be planned before it is
    downloaded. "Fits" leaves 5 % of the card free; the time estimate names the measured runs
    it comes from and how they differ from this one.

    \b
    Examples:
      appliance plan --model llama-3.1-8b --gpu "RTX 3060"
      appliance plan --model smollm2 --gpu 4090 --seq-len 4096 --batch-size 8 --json
      appliance plan --model ./Llama-3.3-70B-Instruct/config.json --gpu-memory 48
      appliance plan --model smollm2 --gpu cpu
      appliance plan --model llama-3.1-8b --gpu 4090 --gpus 2
      appliance plan --model llama-3.1-70b --gpu 4090 --gpus 4 --fsdp

    With --gpus N the plan is for each of N GPUs training data-parallel (DDP, `appliance train
    --nproc-per-node N`): each holds the whole 4-bit base, so memory per GPU is one card's plus the
    all-reduce buffer, and a step takes N times the examples. With --fsdp as well each GPU holds
    1/N of the layers (and two whole while they compute), but loading still puts the whole 4-bit
    base on each GPU before it is sharded: that too must fit.
    """
    from appliance.cli.train import flag_overrides
    from appliance.config import load_run_config
    from appliance.errors import ApplianceError
    from appliance.plan import cpu_profile, detected_gpu, find_gpu, find_model, gpu_with_memory, make_plan, settings_from_config

    if gpu and gpu_memory:
        raise ApplianceError("--gpu and --gpu-memory both name the card.", "give one: --gpu for a listed card, --gpu-memory GIB for another")

    flags = flag_overrides(seq_len=seq_len, batch_size=batch_size, rank=rank, steps=steps, fsdp=fsdp or None)
    if sixteen_bit:
        flags.setdefault("model", {})["load_in_4bit"] = False
    cfg = load_run_config(recipe, config_file, sets, flags)
    shape = find_model(model, registry())
    target = gpu_with_memory(gpu_memory) if gpu_memory else find_gpu(gpu) if gpu else detected_gpu() or cpu_profile()
    if cfg.train.fsdp and gpus < 2:
        raise ApplianceError("--fsdp shards the base between GPUs, and the plan has one.", "add --gpus 2 (or more), or drop --fsdp")
    settings = settings_from_config(cfg, target.device).model_copy(update={"data_parallel": gpus})
    result = make_plan(shape, target, settings, cfg.train.steps or DEFAULT_STEPS, loop=loop)
    if as_json:
        print_json(result.to_json())
    else:
        show(result)


def show(result) -> None:
    from rich.table import Table

    from appliance import ui

    e, s = result.estimate, result.estimate.settings
    precision = f"QLoRA, 4-bit {s.quant_type.upper()}" if s.load_in_4bit else "LoRA, 16-bit weights"
    title = (
        f"{e.model} on {e.gpu} ({e.gpu_gib:g} GiB usable of {e.nominal_gib:g}) · {precision} · seq {s.seq_len} × batch {s.batch_size} · "
        f"r{s.rank} · checkpointing {'on' if s.gradient_checkpointing else 'off'} · {e.loop} loop"
        + (f" · per GPU of {s.data_parallel} (torchrun, {'FSDP' if s.fsdp else 'data-parallel'})" if s.data_parallel > 1 else "")
    )
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("part", footer="total")
    table.add_column("GiB", justify="right", footer=f"{e.total_gib:.2f}")
    table.add_column("what", footer=f"peak at the {e.peak_moment}; PyTorch allocates {e.allocated_gib:.2f} GiB of it")
    for name, part in e.parts.items():
        table.add_row(name.replace("_", " "), f"{part.gib:.2f}", part.what)
    ui.console.print(table)
    on_cpu = e.device == "cpu"
    where = "free in this machine's memory" if on_cpu else "the driver leaves usable"
    if e.fits:
        verdict = f"[green]fits[/]: {e.total_gib:.2f} of the {e.gpu_gib:g} GiB {where}, {e.gpu_gib - e.total_gib:.2f} GiB to spare"
    elif e.total_gib <= e.gpu_gib:
        verdict = (f"[red]too close to fit[/]: {e.total_gib:.2f} of the {e.gpu_gib:g} GiB {where} leaves less than the "
                   f"{e.margin_gib:.2f} GiB ({e.margin_gib / e.gpu_gib:.0%}) a plan keeps free for its own error and longer batches")
    else:
        verdict = f"[red]does not fit[/]: {e.total_gib:.2f} of the {e.gpu_gib:g} GiB {where}"
    ui.console.print(f"{verdict} ({e.nominal_gib:g} GiB {'in all' if on_cpu else 'on the box'})")
    if e.host_load_gib:
        ui.console.print(f"loading: each rank quantizes the whole base in host memory before it shards it "
                         f"({e.host_load_gib:.2f} GiB of RAM, the ranks of a machine one at a time)")
    weights = e.parts["linear_weights"].gib + e.parts["kept_weights"].gib
    if weights > e.gpu_gib:
        ui.warn(f"the model's weights alone take {weights:.2f} GiB, more than the {e.gpu_gib:g} GiB usable: no setting makes it fit; "
                "plan a card with more memory (--gpu, --gpu-memory) or a smaller model")
    note = None if on_cpu else held_memory_note(e.held_gib)
    if note:
        ui.warn(note)
    measured = result.measured_seq_len
    longest = f"{result.max_seq_len:,} tokens" if result.max_seq_len else "none (not even 128 tokens)"
    if result.max_seq_len > measured:
        longest += f" [yellow](extrapolated: no saved run measured memory beyond {measured:,} tokens)[/]"
    ui.console.print(f"longest sequence that fits at batch {s.batch_size}: {longest}; largest batch at seq {s.seq_len}: {result.max_batch_size}")
    if s.seq_len > measured:
        ui.warn(f"seq {s.seq_len:,} is beyond the {measured:,} tokens any saved run measured memory at: the estimate extrapolates")
    show_time(result.time, on_cpu)
    if result.recommendations:
        advice = Table(title="to make it fit, in order of cost to quality (each change alone)", title_justify="left")
        for column in ("change", "total GiB", "fits"):
            advice.add_column(column)
        for r in result.recommendations:
            advice.add_row(r.description, f"{r.total_gib:.2f}", "[green]yes[/]" if r.fits else "no")
        ui.console.print(advice)


def show_time(t, on_cpu: bool) -> None:
    from appliance import ui

    if t is None:
        why = "a CPU's speed is not modelled: `appliance bench train` measures this machine" if on_cpu else (
            "no measured run to calibrate against, or the card's TFLOP/s are unknown (add its profile with bf16_tflops)")
        ui.console.print(f"[dim]time: no estimate ({why})[/]")
        return
    low, high = t.tokens_per_s_range
    spread = f"; the other measured runs that qualify give {low:,.0f}-{high:,.0f}" if (low, high) != (t.tokens_per_s, t.tokens_per_s) else ""
    ui.console.print(
        f"time: {t.steps} steps × {t.step_s:.2f} s ≈ {ui.duration(t.run_s)} at ≈{t.tokens_per_s:,.0f} tok/s "
        f"({t.calibration.efficiency:.1%} of the card's bf16 peak{spread})"
    )
    for line in t.calibration.basis:
        ui.console.print(f"  [dim]measured:[/] {line}")
    for caveat in t.calibration.caveats:
        ui.console.print(f"  [yellow]differs:[/] {caveat}")


commands = [plan]
