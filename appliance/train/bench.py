"""The training benchmark: our training step against the trainers users pick instead, like for like.

`bench_train` runs three sides in one run, each in its own process (peak memory is per process),
on the same model, data, batch size, sequence length, LoRA rank/alpha/targets, 4-bit settings,
learning rate and step count:
- `appliance`: `TrainingRun.train_step`, the step `appliance train` runs;
- `trl`: TRL's `SFTTrainer` (appliance/train/trl_peer.py), the trainer users pick first;
- `plain`: the plain transformers + peft + bitsandbytes loop every tutorial writes
  (../shared/bench/peer_qlora_loop.py, run from where it lies, never copied).

Rows (each side reports the same figures: useful tokens/s, non-padding tokens read; trained
tokens/s, tokens that carry loss; median step time; peak memory):
- like-for-like, loss on the answers: the objective chat fine-tuning uses (ours by default, TRL's
  `completion_only_loss`), gradient checkpointing on for both; the plain loop cannot train on the
  answers only, so it is not in this row;
- like-for-like, loss on every token: the plain loop's objective (ours with `data.train_on_prompt`),
  gradient checkpointing on for all three (the plain loop always checkpoints);
- each side's defaults, as its users run it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, Field

from appliance.errors import ApplianceError

Side = Literal["appliance", "trl", "plain"]
Objective = Literal["assistant", "all", "default"]
SIDE_NAMES = {"appliance": "appliance", "trl": "TRL SFTTrainer", "plain": "plain loop"}
WARMUP_STEPS = 3  # excluded from the figures, on every side
LEARNING_RATE = 2e-4  # the plain loop's, fixed in its code
PLAIN_LOOP_ENV = "APPLIANCE_PEER_LOOP"


def find_plain_loop() -> Path | None:
    """The plain loop's script: $APPLIANCE_PEER_LOOP, else ../shared/bench/peer_qlora_loop.py beside this
    checkout or the working folder (the peers' shared benchmarks live outside the repository)."""
    if os.environ.get(PLAIN_LOOP_ENV):
        return Path(os.environ[PLAIN_LOOP_ENV])
    repo = Path(__file__).resolve().parents[2]
    candidates = [base.parent / "shared" / "bench" / "peer_qlora_loop.py" for base in (repo, Path.cwd())]
    return next((c for c in candidates if c.is_file()), None)


def require_trl() -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        raise ApplianceError(
            "TRL (the SFTTrainer this benchmark compares with) is not installed.",
            "pip install trl   (make install does it)",
        )


def demo_data() -> Path:
    """The demo's chat data (made-up facts), what `appliance bench train` runs on by default."""
    from importlib import resources

    return Path(str(resources.files("appliance") / "demo" / "facts.jsonl"))


def warm_slice(steps: int) -> slice:
    return slice(min(WARMUP_STEPS, steps - 1), None)


def peak_memory() -> dict:
    """This process's peak: GPU memory allocated by PyTorch, or the resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "memory": "GPU allocated"}
    import resource

    return {"peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "memory": "process RSS"}


class SideResult(BaseModel):
    """One side's run: what it ran and what it measured."""

    side: Side
    objective: Literal["assistant", "all"] = Field(description="which tokens carry loss: the answers, or every token")
    gradient_checkpointing: bool
    batching: str = Field(description="how a batch's examples become rows")
    optimizer: str
    device: str
    load_s: float
    steps: int
    step_s_median: float
    useful_tok_per_s: float = Field(description="non-padding tokens read per second, after warm-up")
    trained_tok_per_s: float | None = Field(None, description="tokens that carry loss per second")
    peak_gib: float
    memory: Literal["process RSS", "GPU allocated"]
    losses: list[float] = Field(default_factory=list)
    planner_settings: dict | None = Field(None, description="ours: the planner's settings for this run, levers included")
    round_tok_per_s: list[float] = Field(default_factory=list, description="useful tokens/s of each round (the figure above is their median)")


class Ratio(BaseModel):
    against: Side
    useful_tok_per_s: float = Field(description="ours ÷ theirs")
    peak_memory: float = Field(description="ours ÷ theirs")


class RowSpec(BaseModel):
    key: str
    title: str
    objective: Objective
    gradient_checkpointing: bool | None = Field(description="None: each side's own default")
    sides: tuple[Side, ...]


ROWS = (
    RowSpec(key="answers", title="like-for-like: loss on the answers, gradient checkpointing on", objective="assistant",
            gradient_checkpointing=True, sides=("appliance", "trl")),
    RowSpec(key="every-token", title="like-for-like: loss on every token, gradient checkpointing on", objective="all",
            gradient_checkpointing=True, sides=("appliance", "trl", "plain")),
    RowSpec(key="defaults", title="each side's defaults", objective="default", gradient_checkpointing=None,
            sides=("appliance", "trl", "plain")),
)
HEADLINE = "answers"


class RowResult(BaseModel):
    spec: RowSpec
    results: dict[str, SideResult]
    ratios: list[Ratio] = Field(default_factory=list)


class BenchSettings(BaseModel):
    model: str
    data: str
    seq_len: int
    steps: int
    batch_size: int
    rank: int
    lora: str = "all linear layers, alpha = rank, dropout 0"
    quantization: str = "NF4 + double quantization, bf16 compute"
    learning_rate: float = LEARNING_RATE
    appliance_overrides: list[str] = Field(default_factory=list, description="--set levers on our side only")
    rounds: int = Field(1, description="times each side ran, interleaved; figures are medians")
    plain_loop: str | None = None


class TrainBench(BaseModel):
    settings: BenchSettings
    rows: list[RowResult]
    headline: str = HEADLINE
    differences: list[str] = Field(default_factory=list, description="what differs between the sides, beyond the row's settings")
    notes: list[str] = Field(default_factory=list)

    def row(self, key: str) -> RowResult | None:
        return next((r for r in self.rows if r.spec.key == key), None)


DIFFERENCES = [
    "LoRA weights: fp32 on our side and the plain loop's (peft's default); TRL casts them to bf16 on a 4-bit base.",
    "Weights that stay unquantized (embeddings, norms, head): bf16 on our side and TRL's; the plain loop casts them to fp32 "
    "(prepare_model_for_kbit_training), which makes its activations fp32.",
    "bf16 arithmetic: TRL runs its step under bf16 autocast (bf16=True); ours and the plain loop compute in bf16 through "
    "bitsandbytes' compute dtype, without autocast.",
    "Loss on the answers: TRL's completion also trains the newline the template puts after the end-of-turn token; ours ends "
    "at the end-of-turn token (one token per answer).",
    "Batches: ours packs a batch's examples into rows as wide as its longest example; TRL's padding-free mode puts the whole "
    "batch in one row; padded sides pad each batch to its longest example.",
    "Order of examples: each side shuffles with its own generator; the plain loop drops an epoch's last partial batch.",
    "Optimizer: AdamW on CPU (paged 8-bit AdamW on a GPU); the plain loop uses torch's default weight decay 0.01 and no "
    "gradient clipping, ours and TRL's clip at 1.0 without weight decay.",
]


# -- our side --------------------------------------------------------------------------------


def _random_data(model_dir: Path, seq_len: int, batch_size: int, seed: int):
    """Random tokens of a real shape (--shape): loss on every token."""
    import torch

    from appliance.data.dataset import DataReport, PreparedData
    from appliance.data.encoders import Encoded
    from appliance.data.template import TokenizedExample

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(batch_size * 4):
        ids = torch.randint(0, vocab - 1, (seq_len,), generator=g).tolist()
        items.append(Encoded(0, i, TokenizedExample(ids, ids)))
    return PreparedData("cpt", items, [], [], DataReport(sources=[]))


def run_appliance(
    model_dir: Path,
    data: Path | None,
    *,
    objective: Objective,
    gradient_checkpointing: bool | None,
    seq_len: int,
    steps: int,
    batch_size: int,
    rank: int,
    seed: int,
    sets: list[str] = (),
) -> SideResult:
    import torch

    from appliance.config import load_run_config
    from appliance.data.dataset import prepare
    from appliance.plan import settings_from_config
    from appliance.registry import Registry
    from appliance.store import Store
    from appliance.train.loop import TrainingRun
    from appliance.hf import load_tokenizer

    model: dict = {"name": model_dir.name, "compute_dtype": "bfloat16"}  # every side computes in bf16
    if gradient_checkpointing is not None:
        model["gradient_checkpointing"] = gradient_checkpointing
    cfg = load_run_config(
        "sft-qlora" if data else "cpt",
        sets=list(sets),
        flags={
            "model": model,
            "lora": {"rank": rank, "alpha": rank, "dropout": 0.0},
            "data": {
                "files": [{"path": str(data)}] if data else [{"path": "random"}],
                "seq_len": seq_len,
                "val": 0,
                "dedupe": False,
                "train_on_prompt": bool(data) and objective == "all",
            },
            "train": {"steps": steps, "batch_size": batch_size, "lr": LEARNING_RATE, "warmup": 0, "schedule": "constant", "seed": seed},
        },
    )
    with tempfile.TemporaryDirectory() as store:
        # The run never writes: a benchmark times steps, it saves no checkpoint or adapter.
        run = TrainingRun(cfg, Registry(Store(Path(store))), "bench")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # before loading, as the other sides do
        started = time.time()
        if data is not None:
            tokenizer = load_tokenizer(model_dir)
            run.build(model_dir, prepare(cfg.data, cfg.task, tokenizer), tokenizer.pad_token_id)
        else:
            run.build(model_dir, _random_data(model_dir, seq_len, batch_size, seed), 0)
        load_s = time.time() - started
        run.model.train()
        times, useful, trained, losses = [], [], [], []
        for _ in range(steps):
            start = time.perf_counter()
            figures = run.train_step()
            if run.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            useful.append(figures["useful_tokens"])
            trained.append(figures["trained_tokens"])
            losses.append(round(figures["loss"], 4))
    warm = warm_slice(steps)
    w_t = times[warm]
    planned = settings_from_config(cfg).model_copy(update={"gradient_checkpointing": run.gradient_checkpointing, "optimizer": run.optimizer_name})
    return SideResult(
        side="appliance",
        objective="all" if (data is None or cfg.data.train_on_prompt) else "assistant",
        gradient_checkpointing=run.gradient_checkpointing,
        batching="packed rows" if cfg.train.packing else "padded to the longest",
        optimizer=run.optimizer_name,
        device=run.device,
        load_s=round(load_s, 1),
        steps=steps,
        step_s_median=round(sorted(w_t)[len(w_t) // 2], 3),
        useful_tok_per_s=round(sum(useful[warm]) / sum(w_t)),
        trained_tok_per_s=round(sum(trained[warm]) / sum(w_t)),
        losses=losses,
        planner_settings=planned.model_dump(),
        **peak_memory(),
    )


# -- the comparison ---------------------------------------------------------------------------


SHARD_BYTES = 2 * 2**30


def shape_folder(shape: str, cache: Path) -> Path:
    """A random-weight model of a real shape (no download), saved once; every side reads the same folder.

    Built without a GPU and without the whole model in memory: the shapes come from a model on
    the meta device, and each tensor is drawn on the CPU in bf16 and written shard by shard.
    """
    from appliance.plan import find_model

    path = cache / shape
    if (path / "config.json").is_file():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from appliance.store import atomic_dir

    s = find_model(shape)
    config = LlamaConfig(
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        vocab_size=s.vocab_size,
        tie_word_embeddings=s.tie_word_embeddings,
        max_position_embeddings=s.max_position_embeddings,
        rope_theta=500000.0,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if s.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(0)
    with atomic_dir(path, overwrite=True) as tmp:  # a run stopped while saving leaves no half folder to reuse
        shards: list[dict] = [{}]
        sizes = [0]
        for name, dims in shapes.items():
            n = math.prod(dims) * 2
            if sizes[-1] and sizes[-1] + n > SHARD_BYTES:
                shards.append({})
                sizes.append(0)
            shards[-1][name] = dims
            sizes[-1] += n
        weight_map = {}
        for i, shard in enumerate(shards):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {
                name: torch.ones(dims, dtype=torch.bfloat16) if "norm" in name else (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
                for name, dims in shard.items()
            }
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            weight_map.update({name: filename for name in shard})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
        config.save_pretrained(tmp)
    return path


def _run_json(cmd: list[str], what: str, out: Path, timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise ApplianceError(f"The {what} failed (exit {proc.returncode}).", "see the lines above", details=tail)
    data = json.loads(out.read_text())
    return data[0] if isinstance(data, list) else data


def _plain_result(raw: dict) -> SideResult:
    """The plain loop's own JSON as a side's result (it always checkpoints, pads, and trains every token)."""
    on_gpu = "peak_gib" in raw
    return SideResult(
        side="plain",
        objective="all",
        gradient_checkpointing=True,
        batching="padded to the longest",
        optimizer="paged_adamw_8bit" if on_gpu else "adamw",
        device=raw["device"],
        load_s=raw["load_s"],
        steps=len(raw["losses"]),
        step_s_median=raw["step_s_median"],
        useful_tok_per_s=raw["useful_tok_per_s"],
        losses=raw["losses"],
        peak_gib=raw["peak_gib"] if on_gpu else raw["peak_rss_gib"],
        memory="GPU allocated" if on_gpu else "process RSS",
    )


def _combined(runs: list[SideResult]) -> SideResult:
    """A side over its rounds: the median figures, the highest peak, each round's tokens/s."""
    import statistics

    median = lambda values: round(statistics.median(values), 3)  # noqa: E731
    trained = [r.trained_tok_per_s for r in runs if r.trained_tok_per_s is not None]
    return runs[0].model_copy(
        update={
            "useful_tok_per_s": median([r.useful_tok_per_s for r in runs]),
            "trained_tok_per_s": median(trained) if trained else None,
            "step_s_median": median([r.step_s_median for r in runs]),
            "load_s": median([r.load_s for r in runs]),
            "peak_gib": max(r.peak_gib for r in runs),
            "round_tok_per_s": [r.useful_tok_per_s for r in runs],
        }
    )


def _ratios(results: dict[str, SideResult]) -> list[Ratio]:
    ours = results.get("appliance")
    if ours is None:
        return []
    return [
        Ratio(
            against=side,
            useful_tok_per_s=round(ours.useful_tok_per_s / max(theirs.useful_tok_per_s, 1), 2),
            peak_memory=round(ours.peak_gib / max(theirs.peak_gib, 1e-9), 2),
        )
        for side, theirs in results.items()
        if side != "appliance"
    ]


def bench_train(
    model_dir: Path,
    *,
    label: str,
    data: Path | None,
    seq_len: int,
    steps: int,
    batch_size: int,
    rank: int,
    seed: int = 0,
    sets: list[str] = (),
    plain_loop: Path | None = None,
    rows: tuple[str, ...] = (),
    rounds: int = 1,
    progress: Callable[[str], None] = lambda _: None,
) -> TrainBench:
    """Every row's sides, each in its own process, `rounds` times interleaved (median figures);
    `rows` limits the rows (default: all that apply)."""
    settings = BenchSettings(
        model=label,
        data=str(data) if data else "random tokens",
        seq_len=seq_len,
        steps=steps,
        batch_size=batch_size,
        rank=rank,
        appliance_overrides=list(sets),
        plain_loop=str(plain_loop) if plain_loop else None,
        rounds=rounds,
    )
    # Random tokens have no answers to single out: only the every-token row applies.
    specs = [r for r in ROWS if (data is not None or r.objective == "all") and (not rows or r.key in rows)]
    bench = TrainBench(settings=settings, rows=[], headline=HEADLINE if data is not None else "every-token", differences=DIFFERENCES)
    if plain_loop is None:
        bench.notes.append("the plain loop was not found (../shared/bench/peer_qlora_loop.py, or --plain-loop PATH): not run")
    common = ["--model-dir", str(model_dir), "--seq-len", str(seq_len), "--steps", str(steps), "--batch-size", str(batch_size),
              "--rank", str(rank), "--seed", str(seed)] + (["--data", str(data)] if data else [])
    # A side that two rows share (the plain loop has one setting) runs once a round.
    commands: dict[tuple, tuple[list[str], str]] = {}
    placed: list[tuple[RowSpec, dict[str, tuple]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        for spec in specs:
            keys: dict[str, tuple] = {}
            for side in spec.sides:
                if side == "plain":
                    if plain_loop is None:
                        continue
                    key: tuple = ("plain",)
                    cmd = [sys.executable, str(plain_loop), "--model", str(model_dir), "--seq-len", str(seq_len), "--steps", str(steps),
                           "--batch-size", str(batch_size), "--rank", str(rank), "--modes", "qlora", "--seed", str(seed), "--out", str(out)]
                    cmd += ["--data", str(data)] if data else []
                else:
                    checkpointing = "default" if spec.gradient_checkpointing is None else ("on" if spec.gradient_checkpointing else "off")
                    key = (side, spec.objective, checkpointing)
                    cmd = [sys.executable, "-m", "appliance.train.bench", "--side", side, "--objective", spec.objective,
                           "--checkpointing", checkpointing, *common, "--out", str(out)]
                    cmd += [arg for item in sets for arg in ("--set", item)] if side == "appliance" else []
                commands.setdefault(key, (cmd, f"{spec.title}: {SIDE_NAMES[side]}"))
                keys[side] = key
            placed.append((spec, keys))
        runs: dict[tuple, list[SideResult]] = {key: [] for key in commands}
        # Rounds interleave the sides, so a slow spell of a shared machine falls on all of them alike.
        for round_ in range(rounds):
            for key, (cmd, what) in commands.items():
                progress(what + (f" (round {round_ + 1} of {rounds})" if rounds > 1 else ""))
                raw = _run_json(cmd, what.split(": ")[-1], out, timeout=7200)
                runs[key].append(_plain_result(raw) if key == ("plain",) else SideResult.model_validate(raw))
    for spec, keys in placed:
        results = {side: _combined(runs[key]) for side, key in keys.items()}
        bench.rows.append(RowResult(spec=spec, results=results, ratios=_ratios(results)))
    return bench


def measurements(bench: TrainBench, env: dict) -> list[dict]:
    """The GPU runs of a train bench as planner measurements (bench/results/README.md); none on CPU.

    Our side is recorded from the headline row, the plain loop as the planner's `peer`. A run
    is recorded only when its GPU and model have profiles, since the planner is checked against
    them by name.
    """
    from appliance.plan import find_gpu, find_model

    if not env["gpu"]:
        return []
    try:
        gpu = find_gpu(env["gpu"]).name
        model = find_model(bench.settings.model).name
    except ApplianceError as err:
        bench.notes.append(f"not recorded as a planner measurement: {err.message}")
        return []
    s = bench.settings
    row = bench.row(bench.headline) or (bench.rows[0] if bench.rows else None)
    plain = next((r.results["plain"] for r in bench.rows if "plain" in r.results), None)
    out = []
    for loop, result in (("appliance", row.results.get("appliance") if row else None), ("peer", plain)):
        if result is None or result.memory != "GPU allocated":
            continue
        settings = result.planner_settings or {
            "seq_len": s.seq_len,
            "batch_size": s.batch_size,
            "rank": s.rank,
            "load_in_4bit": True,
            "gradient_checkpointing": True,  # the plain loop always checkpoints
            "optimizer": "paged_adamw_8bit",
        }
        source = "random tokens" if s.data == "random tokens" else "data " + Path(s.data).name
        overrides = f"; ours with {', '.join(s.appliance_overrides)}" if loop == "appliance" and s.appliance_overrides else ""
        out.append(
            {
                "date": env["date"][:10],
                "machine": f"{env['machine']['cpu']}, {env['gpu']}",
                "gpu": gpu,
                "versions": env["versions"],
                "model": model,
                "loop": loop,
                "settings": settings,
                "peak_gib": result.peak_gib,
                "tokens_per_s": result.useful_tok_per_s,
                "notes": f"appliance bench train ({source}){overrides}",
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """A worker: `python -m appliance.train.bench --side appliance|trl --model-dir D [--data F] ... --out result.json`."""
    parser = argparse.ArgumentParser(description="time one side of `appliance bench train`")
    parser.add_argument("--side", choices=["appliance", "trl"], default="appliance")
    parser.add_argument("--objective", choices=["assistant", "all", "default"], default="default")
    parser.add_argument("--checkpointing", choices=["on", "off", "default"], default="default")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a run-config override (KEY=VALUE), our side only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from appliance.hf import quiet_libraries

    quiet_libraries()
    checkpointing = {"on": True, "off": False, "default": None}[args.checkpointing]
    shared = dict(seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size, rank=args.rank, seed=args.seed)
    if args.side == "trl":
        from appliance.train.trl_peer import run_trl

        result = run_trl(args.model_dir, args.data, objective=args.objective, gradient_checkpointing=checkpointing, lr=LEARNING_RATE, **shared)
    else:
        objective = "assistant" if args.objective == "default" else args.objective
        result = run_appliance(args.model_dir, args.data, objective=objective, gradient_checkpointing=checkpointing, sets=args.sets, **shared)
    args.out.write_text(result.model_dump_json())
    print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
