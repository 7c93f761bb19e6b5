"""`appliance train`."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.common import held_memory_note, json_option, overwrite_option, print_json, registry

def parse_data_arg(text: str) -> dict:
    """FILE or FILE:WEIGHT (weights steer --mix proportional and temperature; concat and equal refuse them)."""
    from appliance.errors import ApplianceError

    path, sep, weight = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            raise ApplianceError(f"--data {text!r}: the weight after ':' is not a number.", "write FILE or FILE:WEIGHT, e.g. legal.jsonl:2") from None
    return {"path": text}


def parse_replay_arg(text: str) -> dict:
    """FILE:FRACTION, the share of every micro-batch drawn from general data."""
    from appliance.errors import ApplianceError

    path, sep, fraction = text.rpartition(":")
    try:
        value = float(fraction)
    except ValueError:
        value = None
    if not sep or not path or value is None:
        raise ApplianceError(f"--replay {text!r} is not FILE:FRACTION.", "write it like --replay general.jsonl:0.2")
    return {"path": path, "fraction": value}


# Each flag and the setting it is (config's dotted path).
FLAG_SETTINGS = {
    "model": "model.name",
    "steps": "train.steps",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "rank": "lora.rank",
    "seq_len": "data.seq_len",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "val": "data.val",
    "seed": "train.seed",
    "save_every": "train.save_every",
    "eval_every": "train.eval_every",
    "layers": "lora.layers",
    "test": "data.test",
    "mix": "data.mix.strategy",
    "temperature": "data.mix.temperature",
    "val_file": "data.val_file",
}


def flag_overrides(**flags) -> dict:
    """Flags given on the command line, as a nested dict over the recipe (unset flags are absent)."""
    from appliance.config import nest

    changes = {FLAG_SETTINGS[k]: v for k, v in flags.items() if v is not None and k in FLAG_SETTINGS}
    if flags.get("data"):
        changes["data.files"] = [parse_data_arg(d) for d in flags["data"]]
    if flags.get("replay"):
        changes["data.replay"] = parse_replay_arg(flags["replay"])
    return nest(changes, "flag")


def recipe_and_files(data: tuple[str, ...], recipe: str | None) -> str:
    """Check the data files exist (before anything heavy is imported) and settle the recipe:
    the one asked for, else the one the first file's format calls for."""
    from appliance.data import recipe_for
    from appliance.errors import ApplianceError

    for text in data:
        path = Path(parse_data_arg(text)["path"])
        if not path.exists():
            raise ApplianceError(f"--data {path} does not exist.", "check the path (FILE or FILE:WEIGHT)")
    return recipe or recipe_for(Path(parse_data_arg(data[0])["path"]))


def data_options(fn):
    """Options shared by `train` and `data check` to describe the data and its mixture."""
    for option in reversed(
        [
            click.option("--val", type=float, help="validation split: fraction (< 1) or count"),
            click.option("--val-file", type=click.Path(path_type=Path, dir_okay=False), help="a separate validation file (replaces --val)"),
            click.option("--test", type=float, help="test split, never seen in training: fraction (< 1) or count"),
            click.option("--mix", type=click.Choice(["concat", "equal", "proportional", "temperature"]), help="how several --data files are sampled"),
            click.option("--temperature", type=float, help="T of --mix temperature: probability ∝ size^(1/T)"),
            click.option("--replay", help="general data against forgetting, FILE:FRACTION of every batch"),
            click.option("--seq-len", type=int, help="longest example in tokens"),
        ]
    ):
        fn = option(fn)
    return fn


@click.command()
@click.option("--model", required=True, help="base model name in the store (`appliance models list`)")
@click.option("--data", multiple=True, required=True, help="training data FILE or FILE:WEIGHT (repeat for several)")
@click.option("--name", required=True, help="name of the adapter to create")
@click.option("--recipe", default=None, help="recipe in profiles/recipes (default: sft-qlora, or by the data's format)")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="YAML overriding the recipe")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override one field, e.g. --set train.lr=1e-4")
@click.option("--steps", type=int, help="optimizer steps (instead of epochs)")
@click.option("--epochs", type=float, help="passes over the training split")
@click.option("--lr", type=float, help="peak learning rate")
@click.option("--rank", type=int, help="LoRA rank")
@data_options
@click.option("--batch-size", type=int, help="examples per micro-batch")
@click.option("--grad-accum", type=int, help="micro-batches per optimizer step")
@click.option("--seed", type=int, help="seed of init, dropout and data order")
@click.option("--save-every", type=int, help="checkpoint every N steps")
@click.option("--eval-every", type=int, help="validation every N steps")
@click.option("--layers", help="train adapters only on these layers: top:8, 0-11, 3,5,7")
@click.option("--gpu", help='plan for this GPU profile ("RTX 3060", ...) instead of the one detected')
@click.option("--fit", is_flag=True, help="when the plan does not fit the GPU, apply the cheapest change that does")
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint of this run")
@overwrite_option("replace an adapter or run of the same name (the old adapter stays until the new one is complete)")
@json_option
def train(name, recipe, config_file, sets, gpu, fit, resume, overwrite, as_json, **flags) -> None:
    """Fine-tune a LoRA adapter on a 4-bit base (QLoRA) with a live dashboard.

    \b
    Examples:
      appliance train --model smollm2 --data facts.jsonl --name facts --steps 30
      appliance train --model smollm2 --data facts.jsonl --name facts --set lora.dropout=0.1 --resume
    The run is planned first (`appliance plan`): one that will not fit the GPU is refused
    with the plan's advice, or with --fit changed as little as fits.
    Ctrl-C saves a checkpoint and exits 130; the same command with --resume continues.
    """
    import contextlib

    from appliance import ui
    from appliance.config import load_run_config
    from appliance.store import check_name

    # Names and files first: a typo fails at once, not after the seconds torch takes to import.
    check_name(name, "adapter name")
    cfg = load_run_config(recipe_and_files(flags["data"], recipe), config_file, sets, flag_overrides(**flags))
    registry().model(cfg.model.name or "")
    cfg = fit_to_gpu(cfg, gpu, fit)
    with ui.json_output() if as_json else contextlib.nullcontext():
        from appliance.train import run_training

        ui.console.print(f"[dim]recipe {cfg.recipe} · task {cfg.task} · resolved config saved in the run folder[/]")
        with ui.Dashboard() as dashboard:
            result = run_training(cfg, registry(), name, resume=resume, overwrite=overwrite, events=dashboard)
        figures = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items())
        ui.console.print(f"[green]adapter saved[/] {result.adapter} → {result.adapter_dir}\n  {figures}  ({ui.duration(result.elapsed_s)})")
        ui.console.print(f"next: [bold]appliance merge {result.adapter}[/]  or  [bold]appliance serve {cfg.model.name} --adapter {result.adapter}[/]")
    if as_json:
        print_json(registry().adapter(result.adapter).model_dump(mode="json"))


def fit_to_gpu(cfg, gpu: str | None, fit: bool):
    """Plan the run; refuse one that does not fit, or with `fit` apply the cheapest change that does."""
    from appliance import ui
    from appliance.errors import ApplianceError
    from appliance.plan import plan_run

    result = plan_run(cfg, registry(), gpu, steps=cfg.train.steps or 1)
    if result is None:
        ui.console.print("[dim]plan: no GPU here, memory not planned (--gpu NAME plans for a card)[/]")
        return cfg
    e = result.estimate
    if e.fits:
        ui.console.print(f"[dim]plan: {e.total_gib:.1f} of {e.gpu_gib:g} GiB on the {e.gpu}[/]")
        return cfg
    advice = [f"  {r.description}: {r.total_gib:.1f} GiB{' (fits)' if r.fits else ''}" for r in result.recommendations]
    held = held_memory_note(e.held_gib)
    if held:
        advice.insert(0, f"  {held}")
    choice = result.cheapest_fit
    if not fit or choice is None:
        raise ApplianceError(
            f"This run needs about {e.total_gib:.1f} GiB on the {e.gpu}, which has {e.gpu_gib:g} GiB. What would lower it:",
            "rerun with --fit to apply the cheapest change that fits, or make one of these changes yourself"
            if choice
            else "no single change fits: combine them, or plan a smaller model (appliance plan)",
            details=advice,
        )
    ui.warn(f"--fit: {choice.description}; planned {choice.total_gib:.1f} of {e.gpu_gib:g} GiB on the {e.gpu}")
    return cfg.with_changes(choice.config_changes())


commands = [train]
