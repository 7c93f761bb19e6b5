"""`appliance plan`: will a fine-tune fit this GPU, how long will it take, what to change."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import held_memory_note, json_option, print_json, registry

DEFAULT_STEPS = 1000  # for the time estimate when the recipe counts epochs


@click.command()
@click.option("--model", required=True, help="a model in the store, or a profile in profiles/models (llama-3.1-8b, ...)")
@click.option("--gpu", help='a profile in profiles/gpus ("RTX 3060", 4090, H100, ...); default: the GPU detected')
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
@json_option
def plan(model, gpu, recipe, config_file, sets, seq_len, batch_size, rank, steps, sixteen_bit, loop, as_json) -> None:
    """Memory by part, fits or not, the longest sequence and batch that fit, time, and advice.

    Nothing is loaded: a store model is planned from its config.json, any other from its
    profile, so a model can be planned before it is downloaded.

    \b
    Examples:
      appliance plan --model llama-3.1-8b --gpu "RTX 3060"
      appliance plan --model smollm2 --gpu 4090 --seq-len 4096 --batch-size 8 --json
    """
    from appliance.cli.train import flag_overrides
    from appliance.config import load_run_config
    from appliance.plan import find_gpu, find_model, make_plan, require_gpu, settings_from_config

    flags = flag_overrides(seq_len=seq_len, batch_size=batch_size, rank=rank, steps=steps)
    if sixteen_bit:
        flags.setdefault("model", {})["load_in_4bit"] = False
    cfg = load_run_config(recipe, config_file, sets, flags)
    shape = find_model(model, registry())
    target = find_gpu(gpu) if gpu else require_gpu()
    settings = settings_from_config(cfg)
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
    )
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("part", footer="total")
    table.add_column("GiB", justify="right", footer=f"{e.total_gib:.2f}")
    table.add_column("what", footer=f"peak at the {e.peak_moment}; PyTorch allocates {e.allocated_gib:.2f} GiB of it")
    for name, part in e.parts.items():
        table.add_row(name.replace("_", " "), f"{part.gib:.2f}", part.what)
    ui.console.print(table)
    verdict = "[green]fits[/]" if e.fits else "[red]does not fit[/]"
    ui.console.print(f"{verdict}: {e.total_gib:.2f} of the {e.gpu_gib:g} GiB the driver leaves usable ({e.nominal_gib:g} GiB on the box)")
    note = held_memory_note(e.held_gib)
    if note:
        ui.warn(note)
    longest = f"{result.max_seq_len} tokens" if result.max_seq_len else "none (not even 128 tokens)"
    ui.console.print(f"longest sequence that fits at batch {s.batch_size}: {longest}; largest batch at seq {s.seq_len}: {result.max_batch_size}")
    if result.time:
        t = result.time
        ui.console.print(
            f"time: {t.steps} steps × {t.step_s:.2f} s ≈ {ui.duration(t.run_s)} ({t.tokens_per_s:,.0f} tok/s at "
            f"{t.calibration.efficiency:.1%} of the GPU's bf16 peak, from: {'; '.join(t.calibration.basis)})"
        )
    else:
        ui.console.print("[dim]time: no estimate (no measurement to calibrate against, or the GPU's TFLOP/s are unknown)[/]")
    if result.recommendations:
        advice = Table(title="to make it fit, in order of cost to quality (each change alone)", title_justify="left")
        for column in ("change", "total GiB", "fits"):
            advice.add_column(column)
        for r in result.recommendations:
            advice.add_row(r.description, f"{r.total_gib:.2f}", "[green]yes[/]" if r.fits else "no")
        ui.console.print(advice)


commands = [plan]
