"""The figures the memory model is built from, each with where it comes from."""

from __future__ import annotations

from typing import Literal

GIB = 2**30
Loop = Literal["appliance", "peer"]
Optimizer = Literal["paged_adamw_8bit", "adamw_8bit", "adamw"]

# bitsandbytes NF4 stores 4 bits per weight plus one fp32 absmax per block of 64 (0.5 bit per
# weight); double quantization stores those absmax values in 8 bits, with one fp32 constant per
# 256 of them: 8/64 + 32/(64·256) ≈ 0.127 bit per weight.
ABSMAX_BITS = 32 / 64
DOUBLE_QUANT_BITS = 8 / 64 + 32 / (64 * 256)
# AdamW keeps two states per trainable parameter: fp32, or 8-bit with one fp32 absmax per 256.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2 + 2 * 4 / 256, "paged_adamw_8bit": 2 + 2 * 4 / 256}
# Mirrors appliance.metrics.lm.LOGITS_BUDGET_BYTES (that module imports torch; a test keeps them equal).
LOGITS_BUDGET_BYTES = 64 * 2**20
# Inside PyTorch's allocator yet no tensor: the workspaces of cuBLAS (and cuBLASLt), one per thread
# that runs matrix products (the step's and autograd's backward thread). Measured on an H200:
# torch.cuda.max_memory_allocated() 1.508 GiB against 1.445 GiB of live tensors in the same step
# (bench/results/memory-gpu-20261129-224229.json), the same 0.06 GiB that the doctor's tiny run and
# the H100 peer figures were short of. PyTorch's default workspace is 32 MiB on Hopper and about
# 8 MiB before it, so on consumer cards this errs by a few MiB on the safe side.
CUBLAS_WORKSPACE_GIB = 0.0625
# Outside PyTorch's allocator: the CUDA context, cuBLAS handles, the kernels of torch and bitsandbytes.
CUDA_CONTEXT_GIB = 0.5
# What the driver keeps of a consumer card's memory (RTX 3060: 12 → 11.75 GiB usable, RTX 3090:
# 24 → 23.70, RTX 4090: 24 → 23.64; profiles/gpus): an unlisted card (--gpu-memory) is planned with this off.
DRIVER_KEEPS_GIB = 0.36
# A run "fits" only with this share of the usable memory to spare: on measured GPU runs the
# estimate was within 1 % for 4-bit weights but 8 % under for 16-bit ones (bench/results,
# tests/test_plan.py), and a run that fits by a few MiB fails on the first longer batch.
FIT_MARGIN = 0.05
# A run on CPU: the process's resident memory once torch, transformers, peft, bitsandbytes and
# the training loop are imported (measured: 0.60 GiB, torch 2.13 CPU, 2026-11-29).
CPU_PROCESS_GIB = 0.6
# The caching allocator reserves more than it hands out (block rounding, fragmentation).
ALLOCATOR_SLACK = 0.10
SEQ_STEP = 128  # max_seq_len is a multiple of this (or the whole context)
MIN_RANK = 8  # the smallest rank the advice goes down to; vLLM serves 8, 16, 32, 64, ...
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
LINEAR_MODULES = [*ATTENTION_MODULES, *MLP_MODULES]
MLP_TILE_TOKENS = 2048  # the tile the advice suggests: big enough to keep a GPU's matmuls efficient
# Linear layers that read the same input tensor (LoRA keeps that one tensor in a fp32 stream, or with shared inputs).
MODULE_INPUT = {
    "q_proj": "attention input",
    "k_proj": "attention input",
    "v_proj": "attention input",
    "o_proj": "attention output",
    "gate_proj": "mlp input",
    "up_proj": "mlp input",
    "down_proj": "mlp product",
}


