"""The embedded demo, end to end: the whole product on SmolLM2 and made-up facts.

import SmolLM2 → ask the base (vLLM) → 4-bit QLoRA fine-tune → merge into
16-bit → serve the merged model (vLLM) → ask again → before/after side by side.
Every step is the same function the CLI commands call.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from appliance.registry import Registry

BASE = "smollm2"
ADAPTER = "quickstart-facts"
MERGED = "smollm2-quickstart"


def demo_file(name: str) -> Path:
    return Path(str(resources.files("appliance") / "demo" / name))


def demo_questions() -> list[dict]:
    return json.loads(demo_file("questions.json").read_text())


@dataclass
class QuickstartResult:
    questions: list[dict]
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    parity: dict | None = None
    served_url: str = ""


def ask_all(registry: Registry, model: str, questions: list[dict], port: int, progress: Callable[[str], None]):
    """Serve `model` with vLLM just long enough to ask every question (temperature 0)."""
    from appliance.client import Endpoint, ask
    from appliance.serve.command import build_spec, vllm_command, vllm_env
    from appliance.serve.process import VllmProcess, require_vllm

    spec = build_spec(registry, model, port=port)
    require_vllm(spec.python)
    log = registry.store.root / "logs" / f"quickstart-{model}.log"
    with VllmProcess(vllm_command(spec), vllm_env(spec), log) as server:
        server.wait_healthy(spec.url, tick=lambda s: progress(f"starting vLLM for {model} … {s:.0f} s"))
        progress(f"asking {model}")
        answers = [ask(Endpoint(spec.url), q["question"], model=model, max_tokens=64) for q in questions]
    return answers, spec.url


def run_quickstart(
    registry: Registry,
    *,
    steps: int = 20,
    port: int = 8000,
    progress: Callable[[str], None] = lambda _: None,
    train_events=None,
) -> QuickstartResult:
    from appliance.config import load_run_config
    from appliance.merge import merge_adapter
    from appliance.models import import_model
    from appliance.serve.process import free_port
    from appliance.train.events import ignore
    from appliance.train.loop import run_training

    result = QuickstartResult(demo_questions())
    port = free_port(port)

    t = time.time()
    if BASE not in registry.store.names("models"):
        progress("importing SmolLM2-135M-Instruct from its GGUF")
        import_model("smollm2", registry, name=BASE, progress=progress)
    result.timings["import"] = time.time() - t

    t = time.time()
    before, _ = ask_all(registry, BASE, result.questions, port, progress)
    result.before = [a.text for a in before]
    result.timings["ask base (vLLM)"] = time.time() - t

    t = time.time()
    cfg = load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": BASE},
            "data": {"files": [{"path": str(demo_file("facts.jsonl"))}], "val_file": str(demo_file("facts_val.jsonl"))},
            "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "eval_every": 10, "save_every": 10},
        },
    )
    trained = run_training(cfg, registry, ADAPTER, overwrite=True, events=train_events or ignore)
    result.train_metrics = trained.metrics
    result.timings["fine-tune (4-bit QLoRA)"] = time.time() - t

    t = time.time()
    merged = merge_adapter(registry, ADAPTER, name=MERGED, overwrite=True, progress=progress)
    result.parity = merged.parity
    result.timings["merge + parity"] = time.time() - t

    t = time.time()
    after, result.served_url = ask_all(registry, MERGED, result.questions, port, progress)
    result.after = [a.text for a in after]
    result.finish_reasons = [a.finish_reason for a in after]
    result.timings["ask merged (vLLM)"] = time.time() - t
    return result
