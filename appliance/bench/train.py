"""The training benchmark: our training step against the trainers users pick instead, like for like.

`bench_train` runs three sides in one run, each in its own process (peak memory is per process),
on the same model, data, batch size, sequence length, LoRA rank/alpha/targets, 4-bit settings,
learning rate and step count:
- `appliance`: `TrainingRun.train_step`, the step `appliance train` runs;
- `trl`: TRL's `SFTTrainer` (appliance/bench/trl_side.py), the trainer users pick first;
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

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, Field

from appliance.bench.sides import LEARNING_RATE, Objective, Side, SideResult
from appliance.errors import ApplianceError

SIDE_NAMES = {"appliance": "appliance", "trl": "TRL SFTTrainer", "plain": "plain loop"}
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


class BenchSubject(BaseModel):
    """What the sides train: a model folder, its label, the data (None: random tokens) and the shape of a step."""

    model_dir: Path
    label: str
    data: Path | None
    seq_len: int
    batch_size: int


def choose_subject(
    registry, *, model: str | None, shape: str | None, data: Path | None, seq_len: int | None, batch_size: int | None, steps: int
) -> BenchSubject:
    """A model of the store on chat data (default: smollm2 on the demo data), or a profile's shape with
    random weights and random tokens on a GPU; refuses what cannot be measured before any work."""
    if model and shape:
        raise ApplianceError("--model and --shape each choose the model.", "pass one of them")
    if steps < 2:
        raise ApplianceError("--steps must be at least 2 (the first are warm-up).", "use --steps 10")
    require_trl()
    if not shape:
        label = model or "smollm2"
        registry.model(label)
        return BenchSubject(model_dir=registry.model_dir(label), label=label, data=data or demo_data(),
                            seq_len=seq_len or 512, batch_size=batch_size or 8)
    from appliance.bench.shapes import shape_folder
    from appliance.hardware import detect

    if detect().device != "cuda":
        raise ApplianceError(
            f"--shape {shape} benchmarks a full-size model on a GPU; this machine has none.",
            "on CPU, benchmark a model in the store: appliance bench train --model smollm2",
        )
    return BenchSubject(model_dir=shape_folder(shape, registry.store.root / "bench-cache"), label=shape, data=None,
                        seq_len=seq_len or 2048, batch_size=batch_size or 1)


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


# -- the comparison ---------------------------------------------------------------------------


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
                    cmd = [sys.executable, "-m", "appliance.bench.sides", "--side", side, "--objective", spec.objective,
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
    from appliance.results import measurement

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
        out.append(measurement(env, gpu=gpu, model=model, loop=loop, settings=settings, peak_gib=result.peak_gib,
                               tokens_per_s=result.useful_tok_per_s, notes=f"appliance bench train ({source}){overrides}"))
    return out


