"""`appliance train`."""

from __future__ import annotations

import contextlib
import os
import sys
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
    "fsdp": "train.fsdp",
    "save_every": "train.save_every",
    "eval_every": "train.eval_every",
    "layers": "lora.layers",
    "test": "data.test",
    "mix": "data.mix.strategy",
    "temperature": "data.mix.temperature",
    "val_file": "data.val_file",
    "report_to": "train.report_to",
    "reward": "grpo.reward_file",
}


def flag_overrides(**flags) -> dict:
    """Flags given on the command line, as a nested dict over the recipe (unset flags are absent)."""
    from appliance.config import nest
    from appliance.errors import ApplianceError

    given = {k for k, v in flags.items() if v not in (None, ())}
    for pair, fix in (
        ({"steps", "epochs"}, "give the run's length one way: --steps N or --epochs N"),
        ({"val_file", "val"}, "--val-file is the validation set: drop --val, or drop --val-file to hold out from the training data"),
    ):
        if pair <= given:
            raise ApplianceError(f"{' and '.join('--' + k.replace('_', '-') for k in sorted(pair))} were both given; one would be ignored.", fix)
    if "temperature" in given and flags.get("mix") != "temperature":
        raise ApplianceError("--temperature is the exponent of --mix temperature, and this run mixes otherwise.", "add --mix temperature, or drop --temperature")
    # A repeatable flag given no times arrives as (): unset, like a flag that is None.
    changes = {FLAG_SETTINGS[k]: list(v) if isinstance(v, tuple) else v for k, v in flags.items() if v not in (None, ()) and k in FLAG_SETTINGS}
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
            raise ApplianceError(f"The data file {path} does not exist.", "check the path (FILE or FILE:WEIGHT)")
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
@click.option("--reward", type=click.Path(exists=True, dir_okay=False, resolve_path=True, path_type=Path),
              help="--recipe grpo: a Python file of reward functions f(prompt, completion[, answer]) -> float")
@click.option("--gpu", help='plan for this GPU profile ("RTX 3060", ...) instead of the one detected')
@click.option("--fit", is_flag=True, help="when the plan does not fit the GPU, apply the cheapest change that does")
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint of this run")
@click.option(
    "--report-to",
    type=click.Choice(["tensorboard", "mlflow", "wandb"]),
    multiple=True,
    help="also send every figure and the config to TensorBoard, MLflow or W&B (repeat for several; "
    "kept in the run folder unless MLFLOW_TRACKING_URI or a W&B login says otherwise)",
)
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="data-parallel processes on this machine, one per GPU (started with PyTorch's torchrun launcher)")
@click.option("--fsdp", is_flag=True, default=None,
              help="with --nproc-per-node: shard the frozen 4-bit base across the processes (FSDP2), for a base too large for one card")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="machines in the run (each runs this command)")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="this machine's place among them, from 0")
@click.option("--master-addr", default="127.0.0.1", show_default=True, help="the address of node 0, the same on every machine")
@click.option("--master-port", type=click.IntRange(1, 65535), help="the port on node 0 (default: a free one; give one for several machines)")
@overwrite_option("replace an adapter or run of the same name (the old adapter stays until the new one is complete)")
@json_option
def train(name, recipe, config_file, sets, gpu, fit, resume, overwrite, as_json, nproc_per_node, nnodes, node_rank, master_addr, master_port,
          **flags) -> None:
    """Fine-tune a LoRA adapter on a 4-bit base (QLoRA) with a live dashboard.

    \b
    Examples:
      appliance train --model smollm2 --data facts.jsonl --name facts --steps 30
      appliance train --model smollm2 --data facts.jsonl --name facts --set lora.dropout=0.1 --resume
      appliance train --model smollm2 --data facts.jsonl --name facts --report-to tensorboard --report-to mlflow
      appliance train --model smollm2 --data facts.jsonl --name facts --nproc-per-node 2
      appliance train --model llama-3.1-70b --data facts.jsonl --name facts --nproc-per-node 4 --fsdp
    With --nproc-per-node N the same run trains data-parallel on N processes (each its own GPU,
    or CPU processes over gloo); --batch-size is per process, so a step sees N times as many examples.
    --fsdp also shards the frozen base between them: each holds 1/N of it.
    The run is planned first (`appliance plan`): one that will not fit the GPU is refused
    with the plan's advice, or with --fit changed as little as fits.
    Ctrl-C saves a checkpoint and exits 130; the same command with --resume continues.
    """

    from appliance import ui

    cfg = checked_config(name, recipe, config_file, sets, flags)
    from appliance.train import Launch, launch_ranks

    ranks = Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port)
    with ui.json_output() if as_json else contextlib.nullcontext():
        # A rank runs this command without the launch flags; WORLD_SIZE tells it how many there are.
        cfg = fit_to_gpu(cfg, gpu, fit, data_parallel=int(os.environ.get("WORLD_SIZE", nproc_per_node * nnodes)))
        if ranks.needed:  # this process starts the ranks; each runs this command as one of them
            launch_ranks(ranks, sys.argv[1:], registry().store.root / "logs" / f"train-{name}")
            return
        result = train_with_dashboard(cfg, name, resume=resume, overwrite=overwrite)
        ui.training_done(result, cfg.model.name)
    if as_json:
        print_json(registry().adapter(result.adapter).model_dump(mode="json"))


def checked_config(name: str, recipe: str | None, config_file, sets, flags: dict):
    """The run's typed configuration, with names, files, the model and the trackers checked first:
    a typo fails at once, not after the seconds torch takes to import."""
    from appliance.config import load_run_config
    from appliance.store import check_name

    check_name(name, "adapter name")
    cfg = load_run_config(recipe_and_files(flags["data"], recipe), config_file, sets, flag_overrides(**flags))
    registry().model(cfg.model.name or "")
    if cfg.train.report_to:
        from appliance.track import check_installed

        check_installed(cfg.train.report_to)
    return cfg


def train_with_dashboard(cfg, name: str, *, resume: bool, overwrite: bool):
    """`run_training` behind the live dashboard; the trackers consume the same events, and their
    warnings show in the dashboard as notes."""
    from appliance import ui
    from appliance.serve import grpo_sampler
    from appliance.track import fan_out, reporting
    from appliance.train import Note, run_training

    ui.console.print(f"[dim]recipe {cfg.recipe} · task {cfg.task} · resolved config saved in the run folder[/]")
    with ui.Dashboard() as dashboard, leaving_quietly_when_a_peer_dies():
        with reporting(cfg.train.report_to, registry().run_dir(name), cfg, lambda text: dashboard(Note(text, "warning"))) as trackers:
            return run_training(cfg, registry(), name, resume=resume, overwrite=overwrite, events=fan_out(dashboard, *trackers),
                                sampler_for=grpo_sampler)


@contextlib.contextmanager
def leaving_quietly_when_a_peer_dies():
    """Under torchrun, a rank whose peer died fails in its next collective: the launcher reports
    the rank that died, so this one leaves with one line instead of a traceback."""
    from appliance.train import distributed

    try:
        yield
    except RuntimeError as err:
        ranks = distributed.from_environment()
        if not distributed.lost_a_peer(ranks, err):
            raise
        from rich.markup import escape

        from appliance import ui

        ui.warn(f"rank {ranks.rank}: lost contact with another rank ({escape(str(err).splitlines()[0][:160])})")
        sys.exit(1)


def refuse_short_host_memory(needed_gib: float, free_gib: float | None = None) -> None:
    """--fsdp quantizes the whole base in host memory before sharding it: refuse before the load
    rather than let the kernel's OOM killer choose a process."""
    import psutil

    from appliance.errors import ApplianceError

    free_gib = psutil.virtual_memory().available / 2**30 if free_gib is None else free_gib
    if needed_gib > free_gib:
        raise ApplianceError(
            f"--fsdp loads the whole 4-bit base in this machine's memory before sharding it ({needed_gib:.1f} GiB, "
            f"one rank at a time), and {free_gib:.1f} GiB are free.",
            "free memory (close other programs, add swap), or drop --fsdp if the 4-bit base fits one card (appliance plan --gpus N)",
        )


def fit_to_gpu(cfg, gpu: str | None, fit: bool, data_parallel: int = 1):
    """Plan the run; refuse one that does not fit, or with `fit` apply the cheapest change that does."""
    from appliance import ui
    from appliance.errors import ApplianceError
    from appliance.plan import plan_run

    # Under torchrun each rank plans again (its own check), but the launcher has already said it.
    said_by_launcher = "RANK" in os.environ
    result = plan_run(cfg, registry(), gpu, steps=cfg.train.steps or 1, data_parallel=data_parallel)
    if result is None:
        if not said_by_launcher:
            ui.console.print("[dim]plan: no GPU here, memory not planned (--gpu NAME plans for a card)[/]")
        return cfg
    e = result.estimate
    refuse_short_host_memory(e.host_load_gib)
    if e.fits:
        if not said_by_launcher:
            ui.console.print(f"[dim]plan: {e.total_gib:.1f} of {e.gpu_gib:g} GiB on the {e.gpu}[/]")
        return cfg
    advice = [f"  {r.description}: {r.total_gib:.1f} GiB{' (fits)' if r.fits else ''}" for r in result.recommendations]
    held = None if e.device == "cpu" else held_memory_note(e.held_gib)  # on a CPU, others' memory is the OS's business
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
    if not said_by_launcher:
        ui.warn(f"--fit: {choice.description}; planned {choice.total_gib:.1f} of {e.gpu_gib:g} GiB on the {e.gpu}")
    return cfg.with_changes(choice.config_changes())


commands = [train]
