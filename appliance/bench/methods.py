"""What each training method does on a real model: a short run on the demo data shipped for it, then
`appliance eval` on the held-out split, before (the base) against after (base + adapter).

`appliance bench methods` runs these and prints (and with --save writes) the figures the README's
methods table quotes; the tests run the same runs and assert the direction of each figure. Nothing
is kept: each run's adapter and run folder are removed once measured.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from appliance.registry import Evaluation, Registry


def methods_data() -> Path:
    return Path(str(resources.files("appliance") / "demo" / "methods"))


@dataclass(frozen=True)
class MethodRun:
    recipe: str
    data: str  # a file in appliance/demo/methods
    steps: int
    batch_size: int
    lr: float
    settings: dict[str, Any] = field(default_factory=dict)  # more of the run's config, by section
    watch: tuple[str, ...] = ()  # the training figures that show the method working
    flags: str = ""  # what the same run is on the command line, beyond the common flags


METHOD_RUNS = {
    "dpo": MethodRun("dpo", "prefs.jsonl", 12, 4, 2e-4, watch=("reward_margin", "reward_accuracy")),
    "simpo": MethodRun("simpo", "prefs.jsonl", 12, 4, 2e-4, watch=("reward_margin", "reward_accuracy")),
    "orpo": MethodRun("orpo", "prefs.jsonl", 12, 4, 2e-4, watch=("reward_margin", "reward_accuracy", "nll")),
    "kto": MethodRun("kto", "feedback.jsonl", 12, 8, 2e-4, watch=("kl", "reward_accuracy")),
    "grpo": MethodRun("grpo", "prompts.jsonl", 10, 4, 2e-4, settings={"grpo": {"reward_file": "brevity_rewards.py", "max_new_tokens": 24}},
                      watch=("reward", "completion_tokens"), flags="--reward brevity_rewards.py --set grpo.max_new_tokens=24"),
}


class MethodFigures(BaseModel):
    """One method's short run: the held-out evaluation and its training figures early and late."""

    model_config = ConfigDict(extra="forbid")

    method: str
    command: str
    steps: int
    train_s: float
    held_out: int
    before: dict[str, float]
    after: dict[str, float]
    first_steps: dict[str, float]  # mean of the first three steps' figures
    last_steps: dict[str, float]  # mean of the last three


def _mean_of(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: sum(r[k] for r in records) / len(records) for k in keys if all(k in r for r in records)}


def run_method(registry: Registry, method: str, model: str = "smollm2", progress: Callable[[str], None] = lambda _: None) -> MethodFigures:
    from appliance.config import load_run_config
    from appliance.evaluate import evaluate_adapter
    from appliance.serve import grpo_sampler
    from appliance.train import run_training

    run = METHOD_RUNS[method]
    data = methods_data()
    settings = {section: {k: str(data / v) if k == "reward_file" else v for k, v in values.items()} for section, values in run.settings.items()}
    cfg = load_run_config(run.recipe, flags={
        "model": {"name": model},
        "data": {"files": [{"path": str(data / run.data)}], "val": 4, "test": 8},
        # One micro-batch a step for every method (the grpo recipe accumulates 4), as the figures were measured.
        "train": {"steps": run.steps, "batch_size": run.batch_size, "grad_accum": 1, "lr": run.lr, "save_every": 100, "eval_every": 100},
        **settings,
    })
    name = f"bench-method-{method}"
    progress(f"{method}: {run.steps} steps on {run.data}")
    result = run_training(cfg, registry, name, overwrite=True, sampler_for=grpo_sampler)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    progress(f"{method}: evaluating before and after on the held-out split")
    report: Evaluation = evaluate_adapter(registry, name)
    figures = MethodFigures(
        method=method,
        command=f"appliance train --model {model} --data {run.data} --recipe {run.recipe} --steps {run.steps} "
                f"--batch-size {run.batch_size} --grad-accum 1 --lr {run.lr:g} --val 4 --test 8 {run.flags}".strip(),
        steps=len(steps), train_s=round(result.elapsed_s, 1), held_out=report.examples,
        before={k: v for k, v in report.before.items() if isinstance(v, (int, float))},
        after={k: v for k, v in report.after.items() if isinstance(v, (int, float))},
        first_steps=_mean_of(steps[:3], run.watch), last_steps=_mean_of(steps[-3:], run.watch),
    )
    registry.remove_adapter(name)
    shutil.rmtree(registry.run_dir(name), ignore_errors=True)
    return figures


def run_methods(registry: Registry, methods: list[str], model: str = "smollm2", progress: Callable[[str], None] = lambda _: None) -> list[MethodFigures]:
    started = time.time()
    out = [run_method(registry, m, model, progress) for m in methods]
    progress(f"{len(out)} methods in {time.time() - started:.0f} s")
    return out
