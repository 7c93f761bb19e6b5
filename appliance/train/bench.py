"""The training benchmark: the appliance's training step against the peer loop.

`bench_train` runs, in one run, two subprocesses on the same model, data and
settings: the peer loop every tutorial writes (../shared/bench/peer_qlora_loop.py,
run from where it lies, never copied) and our own training step (this module
run as a worker, timing `TrainingRun.train_step`, the code `appliance train`
runs). Each reports useful tokens/s (padding excluded), the median step time
and the peak memory of its own process (GPU allocated, or RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from appliance.errors import ApplianceError

PEER_ENV = "APPLIANCE_PEER_LOOP"
WARMUP_STEPS = 3  # excluded from the figures, as the peer loop does


def find_peer_loop() -> Path | None:
    candidates = [os.environ.get(PEER_ENV)] if os.environ.get(PEER_ENV) else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "bench" / "peer_qlora_loop.py", Path.cwd().parent / "shared" / "bench" / "peer_qlora_loop.py"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def shape_folder(shape: str, cache: Path) -> Path:
    """A random-weight model of a real shape (no download), saved once; the peer loop reads the same folder."""
    from appliance.plan import find_model

    path = cache / shape
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

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
    )
    from appliance.store import atomic_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_dir(path, overwrite=True) as tmp:  # a run stopped while saving leaves no half folder to reuse
        model.save_pretrained(tmp, max_shard_size="5GB")
    return path


# -- the worker: our training step, timed ---------------------------------------------------


def run_worker(
    model_dir: Path, data: Path | None, seq_len: int, steps: int, batch_size: int, rank: int, seed: int, sets: list[str] = ()
) -> dict[str, Any]:
    import torch

    from appliance.config import load_run_config
    from appliance.data.dataset import DataReport, PreparedData
    from appliance.data.encoders import Encoded
    from appliance.data.template import TokenizedExample
    from appliance.hardware import detect
    from appliance.plan import settings_from_config
    from appliance.registry import Registry
    from appliance.train.loop import TrainingRun
    from appliance.train.model import load_tokenizer, resolve_device

    task = "sft" if data else "cpt"
    cfg = load_run_config(
        "sft-qlora" if data else "cpt",
        sets=list(sets),
        flags={
            "model": {"name": model_dir.name, "compute_dtype": "bfloat16"},  # the peer loop computes in bf16
            "lora": {"rank": rank, "alpha": rank, "dropout": 0.0},
            "data": {"files": [{"path": str(data)}] if data else [{"path": "random"}], "seq_len": seq_len, "val": 0, "dedupe": False},
            "train": {"steps": steps, "batch_size": batch_size, "lr": 2e-4, "warmup": 0, "schedule": "constant", "seed": seed},
        },
    )

    class BenchRun(TrainingRun):
        """The real training run, on a folder outside the store and without checkpoints."""

        def check_names(self) -> None:
            pass

        def resolve_model(self) -> None:
            self.model_dir = model_dir
            self.hw = detect()
            self.device = resolve_device("auto", self.hw)
            self.dtype = torch.bfloat16

        def prepare_run_dir(self) -> None:
            pass

        def load_data(self) -> PreparedData:
            if data is not None:
                from appliance.data.dataset import prepare

                self.tokenizer = load_tokenizer(model_dir)
                return prepare(cfg.data, task, self.tokenizer)
            self.tokenizer = None
            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            g = torch.Generator().manual_seed(seed)
            items = []
            for i in range(batch_size * 4):
                ids = torch.randint(0, vocab - 1, (seq_len,), generator=g).tolist()
                items.append(Encoded(0, i, TokenizedExample(ids, ids)))
            return PreparedData(task, items, [], [], DataReport(sources=[]))

        def pad_id(self) -> int:
            return self.tokenizer.pad_token_id if self.tokenizer is not None else 0

    run = BenchRun(cfg, Registry(), "bench")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # before loading, as the peer loop does
    load_start = time.time()
    run.setup()
    load_s = time.time() - load_start
    run.model.train()
    times, useful, losses = [], [], []
    for _ in range(steps):
        start = time.time()
        figures = run.train_step()
        if run.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
        useful.append(figures["useful_tokens"])
        losses.append(round(figures["loss"], 4))
    warm = slice(min(WARMUP_STEPS, steps - 1), None)
    w_t, w_u = times[warm], useful[warm]
    result = {
        "mode": "appliance",
        "device": run.device,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "load_s": round(load_s, 1),
        "step_s_median": round(sorted(w_t)[len(w_t) // 2], 3),
        "useful_tok_per_s": round(sum(w_u) / sum(w_t)),
        "losses": losses,
        "gradient_checkpointing": run.gradient_checkpointing,
        "optimizer": run.optimizer_name,
        # What the planner's estimate of this run needs, --set overrides included.
        "planner_settings": settings_from_config(cfg).model_copy(
            update={"gradient_checkpointing": run.gradient_checkpointing, "optimizer": run.optimizer_name}
        ).model_dump(),
    }
    if run.device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        import resource

        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


# -- the comparison ---------------------------------------------------------------------------


@dataclass
class TrainBench:
    settings: dict[str, Any]
    appliance: dict[str, Any]
    peer: dict[str, Any] | None
    ratio: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "appliance": self.appliance, "peer": self.peer, "ratio": self.ratio, "notes": self.notes}


def peak_gib(result: dict[str, Any]) -> float:
    return result.get("peak_gib", result.get("peak_rss_gib", 0.0))


def _run_json(cmd: list[str], what: str, out: Path, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise ApplianceError(f"The {what} failed (exit {proc.returncode}).", "see the lines above", details=tail)
    data = json.loads(out.read_text())
    return data[0] if isinstance(data, list) else data


def bench_train(
    registry,
    *,
    model: str | None = None,
    shape: str | None = None,
    data: Path | None = None,
    seq_len: int = 512,
    steps: int = 10,
    batch_size: int = 8,
    rank: int = 16,
    seed: int = 0,
    sets: list[str] = (),
    progress: Callable[[str], None] = lambda _: None,
) -> TrainBench:
    if shape:
        from appliance.hardware import detect

        if detect().device != "cuda":
            raise ApplianceError(
                f"--shape {shape} benchmarks a full-size model on a GPU; this machine has none.",
                "on CPU, benchmark a model in the store: appliance bench train --model smollm2",
            )
        model_dir = shape_folder(shape, registry.store.root / "bench-cache")
        data = None
    else:
        model = model or "smollm2"
        registry.model(model)
        model_dir = registry.model_dir(model)
        data = data or Path(__file__).resolve().parents[1] / "demo" / "facts.jsonl"
    settings = {
        "model": shape or model,
        "data": str(data) if data else "random tokens",
        "seq_len": seq_len,
        "steps": steps,
        "batch_size": batch_size,
        "rank": rank,
        "lora": "all-linear, alpha = rank, dropout 0",
        "quantization": "nf4 + double quant, bf16 compute",
        "appliance_overrides": list(sets),
    }
    result = TrainBench(settings, {}, None)
    with tempfile.TemporaryDirectory() as tmp:
        peer = find_peer_loop()
        if peer is None:
            result.notes.append(f"peer loop not found (looked at ../shared/bench/peer_qlora_loop.py and ${PEER_ENV}); appliance only")
        else:
            progress(f"running the peer loop ({peer})")
            out = Path(tmp) / "peer.json"
            cmd = [sys.executable, str(peer), "--model", str(model_dir), "--seq-len", str(seq_len), "--steps", str(steps),
                   "--batch-size", str(batch_size), "--rank", str(rank), "--modes", "qlora", "--seed", str(seed), "--out", str(out)]
            if data:
                cmd += ["--data", str(data)]
            result.peer = _run_json(cmd, "peer loop", out, timeout=7200)
            result.settings["peer_loop"] = str(peer)
        progress("running the appliance's training step")
        out = Path(tmp) / "appliance.json"
        cmd = [sys.executable, "-m", "appliance.train.bench", "--model-dir", str(model_dir), "--seq-len", str(seq_len), "--steps", str(steps),
               "--batch-size", str(batch_size), "--rank", str(rank), "--seed", str(seed), "--out", str(out)]
        for item in sets:
            cmd += ["--set", item]
        if data:
            cmd += ["--data", str(data)]
        result.appliance = _run_json(cmd, "appliance worker", out, timeout=7200)
    if result.peer:
        result.ratio = {
            "useful_tok_per_s": round(result.appliance["useful_tok_per_s"] / max(result.peer["useful_tok_per_s"], 1), 2),
            "peak_memory": round(peak_gib(result.appliance) / max(peak_gib(result.peer), 1e-9), 2),
            "step_s_median": round(result.appliance["step_s_median"] / max(result.peer["step_s_median"], 1e-9), 2),
        }
    return result


def measurements(bench: TrainBench, env: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU runs of a train bench as planner measurements (bench/results/README.md); none on CPU.

    A run is recorded only when its GPU and model have profiles, since the planner
    is checked against them by name.
    """
    from appliance.plan import find_gpu, find_model

    if not env["gpu"]:
        return []
    try:
        gpu = find_gpu(env["gpu"]).name
        model = find_model(str(bench.settings["model"])).name
    except ApplianceError as err:
        bench.notes.append(f"not recorded as a planner measurement: {err.message}")
        return []
    s = bench.settings
    out = []
    for loop, result in (("appliance", bench.appliance), ("peer", bench.peer)):
        if not result or "peak_gib" not in result:
            continue
        out.append(
            {
                "date": env["date"][:10],
                "machine": f"{env['machine']['cpu']}, {env['gpu']}",
                "gpu": gpu,
                "versions": env["versions"],
                "model": model,
                "loop": loop,
                "settings": result.get("planner_settings")
                or {
                    "seq_len": s["seq_len"],
                    "batch_size": s["batch_size"],
                    "rank": s["rank"],
                    "load_in_4bit": True,
                    "gradient_checkpointing": True,  # the peer loop always checkpoints
                    "optimizer": "paged_adamw_8bit",
                },
                "peak_gib": result["peak_gib"],
                "tokens_per_s": result["useful_tok_per_s"],
                "notes": f"appliance bench train ({'random tokens' if s['data'] == 'random tokens' else 'data ' + Path(s['data']).name})"
                + (f"; ours with {', '.join(s['appliance_overrides'])}" if loop == "appliance" and s.get("appliance_overrides") else ""),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """The worker: `python -m appliance.train.bench --model-dir D [--data F] ... --out result.json`."""
    parser = argparse.ArgumentParser(description="time the appliance's training step (a worker of `appliance bench train`)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a run-config override (KEY=VALUE)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from appliance.train.model import quiet_libraries

    quiet_libraries()
    result = run_worker(args.model_dir, args.data, args.seq_len, args.steps, args.batch_size, args.rank, args.seed, args.sets)
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
