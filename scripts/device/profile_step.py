"""Our training step on a GPU, timed per variant and profiled: where does a step's time go?

python scripts/device/profile_step.py MODEL_DIR VARIANT [--profile] [--seq=2048]
  variant: base; noshared (lora.shared_inputs=false); budget256 (the loss's logits in 256 MiB chunks, as
  before 2026-11-29). MODEL_DIR: a --shape folder (appliance.bench.shapes.shape_folder), random tokens.
bench/results/gpu-profile-20261129-223100.txt is its output on an H200 (then 'budget64' was the variant).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import bitsandbytes  # noqa: F401  (the libraries load before the clock starts, as on the other sides)
import peft  # noqa: F401
import torch
import transformers  # noqa: F401

from appliance.bench import sides
from appliance.config import load_run_config
from appliance.registry import Registry
from appliance.store import Store
from appliance.train import TrainingRun

model_dir, variant = Path(sys.argv[1]), sys.argv[2]
SEQ = int(([a for a in sys.argv if a.startswith("--seq=")] or ["--seq=2048"])[0][6:])
cuda = torch.cuda.is_available()
sync = torch.cuda.synchronize if cuda else (lambda: None)
sets = ["lora.shared_inputs=false"] if variant == "noshared" else []
if variant == "budget256":
    import appliance.metrics.lm as lm

    lm.LOGITS_BUDGET_BYTES = 256 * 2**20
cfg = load_run_config("cpt", sets=sets, flags={
    "model": {"name": model_dir.name, "compute_dtype": "bfloat16", "gradient_checkpointing": True},
    "lora": {"rank": 16, "alpha": 16, "dropout": 0.0},
    "data": {"files": [{"path": "random"}], "seq_len": SEQ, "val": 0, "dedupe": False},
    "train": {"steps": 20, "batch_size": 1, "lr": 2e-4, "warmup": 0, "schedule": "constant", "seed": 0}})
with tempfile.TemporaryDirectory() as store:
    run = TrainingRun(cfg, Registry(Store(Path(store))), "bench")
    t = time.time()
    run.build(model_dir, sides._random_data(model_dir, SEQ, 1, 0), 0)
    load = time.time() - t
    run.model.train()
    times = []
    for i in range(12):
        sync(); s = time.perf_counter()
        run.train_step()
        sync(); times.append(time.perf_counter() - s)
    w = sorted(times[3:])
    print(json.dumps({"variant": variant, "load_s": round(load, 1), "step_s_median": round(w[len(w) // 2], 4),
                      "step_s_min": round(w[0], 4), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}))
    if "--profile" in sys.argv:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                run.train_step()
            sync()
        ka = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"GPU kernel time per step {gpu_us / 3 / 1e3:.1f} ms against the step's {w[len(w) // 2] * 1e3:.1f} ms wall")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
