"""The embedded demo, end to end: the whole product on SmolLM2 and made-up facts.

import SmolLM2 → ask the base (vLLM) → 4-bit QLoRA fine-tune → merge into
16-bit → serve the merged model (vLLM) → ask again → before/after side by side.
Fine-tuning and merging run as the very commands a user types, each in its own
process, so no GPU memory is held here when vLLM starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from appliance.registry import MergeParity, Registry

BASE = "smollm2"
ADAPTER = "quickstart-facts"
MERGED = "smollm2-quickstart"


def demo_file(name: str) -> Path:
    return Path(str(resources.files("appliance") / "demo" / name))


@dataclass(frozen=True)
class DemoQuestion:
    """A question the demo asks through the endpoint; none of them is in the training data."""

    question: str
    expect: tuple[str, ...]  # any of these in the answer (case-insensitive) makes it right
    group: str  # "fact": a made-up fact, asked as a paraphrase never trained on; "control": general knowledge

    def right(self, answer: str) -> bool:
        return any(e.lower() in answer.lower() for e in self.expect)


def demo_questions() -> list[DemoQuestion]:
    groups = json.loads(demo_file("questions.json").read_text())
    return [DemoQuestion(q["question"], tuple(q["expect"]), group.removesuffix("s")) for group in ("facts", "controls") for q in groups[group]]


def score(questions: list[DemoQuestion], answers: list[str]) -> dict[str, tuple[int, int]]:
    """(right, asked) per group."""
    out: dict[str, tuple[int, int]] = {}
    for q, a in zip(questions, answers):
        right, asked = out.get(q.group, (0, 0))
        out[q.group] = (right + q.right(a), asked + 1)
    return out


@dataclass
class QuickstartResult:
    questions: list[DemoQuestion]
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    parity: MergeParity | None = None
    served_url: str = ""

    def save(self) -> Path:
        """bench/results/quickstart-<cpu|gpu>-<time>.json: answers, scores, timings, with the machine."""
        from appliance.hardware import describe
        from appliance.results import save_result

        payload = {
            "questions": [q.__dict__ for q in self.questions],
            "before": self.before,
            "after": self.after,
            "finish_reasons": self.finish_reasons,
            "score_before": score(self.questions, self.before),
            "score_after": score(self.questions, self.after),
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
            "total_s": round(sum(self.timings.values()), 1),
            "train_metrics": self.train_metrics,
            "parity": self.parity.model_dump() if self.parity else None,
        }
        return save_result("quickstart", payload, describe())


def ask_all(registry: Registry, model: str, questions: list[DemoQuestion], port: int, progress: Callable[[str], None]):
    """Serve `model` with vLLM just long enough to ask every question (temperature 0)."""
    from appliance.client import ask
    from appliance.serve import Endpoint
    from appliance.serve import build_spec
    from appliance.serve import running_server

    spec = build_spec(registry, model, port=port)
    log = registry.store.root / "logs" / f"quickstart-{model}.log"
    with running_server(spec, log, tick=lambda s: progress(f"starting vLLM for {model} … {s:.0f} s")):
        progress(f"asking {model}")
        answers = [ask(Endpoint(spec.url), q.question, model=model, max_tokens=64) for q in questions]
    return answers, spec.url


def run_command(registry: Registry, args: list[str], what: str) -> None:
    """One step as the command a user types, in its own process: whatever GPU memory it held is
    the driver's again when it exits, before vLLM starts and asks for most of the card."""
    import os
    import subprocess
    import sys

    from appliance.errors import ApplianceError

    code = subprocess.run([sys.executable, "-m", "appliance", *args], env={**os.environ, "APPLIANCE_HOME": str(registry.store.root)}).returncode
    if code != 0:
        raise ApplianceError(f"The quickstart's {what} failed (`appliance {' '.join(args[:2])} ...` exited {code}).", "see its message above")


def run_quickstart(
    registry: Registry,
    *,
    steps: int = 20,
    port: int = 8000,
    progress: Callable[[str], None] = lambda _: None,
) -> QuickstartResult:
    from appliance.models import import_model
    from appliance.serve import free_port

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
    progress(f"appliance train --model {BASE} --data facts.jsonl --name {ADAPTER} --steps {steps}")
    train = ["train", "--model", BASE, "--recipe", "sft-qlora", "--data", str(demo_file("facts.jsonl")), "--name", ADAPTER,
             "--set", f"data.val_file={demo_file('facts_val.jsonl')}", "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3",
             "--eval-every", "10", "--save-every", "10", "--overwrite"]
    run_command(registry, train, "fine-tune")
    result.train_metrics = registry.adapter(ADAPTER).metrics
    result.timings["fine-tune (4-bit QLoRA)"] = time.time() - t

    t = time.time()
    progress(f"appliance merge {ADAPTER} --name {MERGED}")
    run_command(registry, ["merge", ADAPTER, "--name", MERGED, "--overwrite"], "merge")
    result.parity = registry.model(MERGED).parity
    result.timings["merge + parity"] = time.time() - t

    t = time.time()
    after, result.served_url = ask_all(registry, MERGED, result.questions, port, progress)
    result.after = [a.text for a in after]
    result.finish_reasons = [a.finish_reason for a in after]
    result.timings["ask merged (vLLM)"] = time.time() - t
    return result
