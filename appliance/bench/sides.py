"""One side of `appliance bench train`, run as its own process:

    python -m appliance.bench.sides --side appliance|trl --model-dir D [--data F] --objective ... --out result.json

Each side reports the same figures (SideResult), measured the same way: the wall time of each
step (forward, backward, optimizer) after the warm-up steps, the non-padding tokens read and the
tokens that carry loss, and the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

Side = Literal["appliance", "trl", "plain"]
Objective = Literal["assistant", "all", "default"]
WARMUP_STEPS = 3  # excluded from the figures, on every side
LEARNING_RATE = 2e-4  # the plain loop's, fixed in its code


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



# -- our side --------------------------------------------------------------------------------


def _random_data(model_dir: Path, seq_len: int, batch_size: int, seed: int):
    """Random tokens of a real shape (--shape): loss on every token."""
    import torch

    from appliance.data import DataReport, PreparedData
    from appliance.data import Encoded
    from appliance.data import TokenizedExample

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
    # The libraries load before the clock starts, as on the other sides (TRL's and the plain loop's
    # imports are outside their load time): bitsandbytes, peft and transformers' model classes took
    # 13 of the 15 s our side's load once reported on an H200.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM  # noqa: F401

    from appliance.config import load_run_config
    from appliance.data import prepare
    from appliance.plan import settings_from_config
    from appliance.registry import Registry
    from appliance.store import Store
    from appliance.train import TrainingRun
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


def main(argv: list[str] | None = None) -> int:
    """A worker: `python -m appliance.bench.sides --side appliance|trl --model-dir D [--data F] ... --out result.json`."""
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
        from appliance.bench.trl_side import run_trl

        result = run_trl(args.model_dir, args.data, objective=args.objective, gradient_checkpointing=checkpointing, lr=LEARNING_RATE, **shared)
    else:
        objective = "assistant" if args.objective == "default" else args.objective
        result = run_appliance(args.model_dir, args.data, objective=objective, gradient_checkpointing=checkpointing, sets=args.sets, **shared)
    args.out.write_text(result.model_dump_json())
    print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
