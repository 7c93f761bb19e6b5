"""llama.cpp's own converters and quantizer, run as they ship; their output kept in export.log."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.export.spec import LLAMA_CPP_VERSION, LORA_TYPE, TOOLS_ENV, Progress, Quant
from appliance.store import DISK_FULL_TEXT


def converter_dir() -> Path:
    """llama.cpp's converter scripts, as scripts/install.sh lays them out."""
    candidates = [Path(os.environ[TOOLS_ENV])] if os.environ.get(TOOLS_ENV) else [Path(sys.prefix) / "share" / "appliance" / "llama.cpp"]
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion").is_dir() and (folder / "gguf-py").is_dir():
            return folder
    raise ApplianceError(
        f"llama.cpp's GGUF converter is not installed (looked in {candidates[0]}).",
        "run `make install` (scripts/install.sh puts llama.cpp's converter there), "
        f"or point {TOOLS_ENV} at a folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/",
    )


def require_llama_cpp() -> Any:
    """The llama-cpp-python binding (llama.cpp's quantizer and runtime), or one message naming the fix."""
    try:
        import llama_cpp
    except (ImportError, OSError) as err:
        raise ApplianceError(
            f"llama-cpp-python is not installed or does not load ({str(err).splitlines()[0]}); the export needs llama.cpp "
            "to quantize and to check the result.",
            f"run `make install` (it builds llama-cpp-python=={LLAMA_CPP_VERSION} once and caches the wheel), "
            f"or `pip install llama-cpp-python=={LLAMA_CPP_VERSION}`",
        ) from None
    return llama_cpp


# gguf-py writes tensors with numpy's tofile, whose error on a full disk names no errno
# ("OSError: 3145728 requested and 2344448 written"); a short write to a local file is a full disk.
SHORT_WRITE = re.compile(r"OSError: \d+ requested and \d+ written")


def _disk_full(target: Path) -> OSError:
    # A plain OSError, not the message: every step runs inside the export's atomic_dir, which
    # removes the temporary folder and names the export's own folder, not a work file in it.
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))


def _run_converter(args: list[str], log: Path, what: str, tools: Path, target: Path) -> None:
    """One of llama.cpp's Python tools in a subprocess of this interpreter, its output in `log`; a full disk is an OSError."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"), str(tools)]), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    with open(log, "ab") as f:
        f.write(("$ python " + " ".join(args) + "\n").encode())
        f.flush()
        code = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tools).returncode
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        if DISK_FULL_TEXT.search("\n".join(tail)) or SHORT_WRITE.search("\n".join(tail)):
            raise _disk_full(target)
        unsupported = next((line for line in tail if "not supported" in line), None)
        raise ApplianceError(
            f"llama.cpp's {what} failed (exit {code})" + (f": {unsupported.strip()}" if unsupported else "") + "; nothing was kept.",
            "llama.cpp cannot hold this model; export a LLaMA-family model" if unsupported else "the converter's last lines are above",
            details=tail[-6:],
        )


def convert_model(tools: Path, model_dir: Path, out: Path, outtype: str, log: Path, progress: Progress) -> None:
    progress(f"llama.cpp converter: {model_dir.name} → {outtype}")
    args = [str(tools / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    _run_converter(args, log, "converter (convert_hf_to_gguf.py)", tools, out)


def set_end_of_turn(tools: Path, src: Path, dst: Path, eot_id: int, log: Path, progress: Progress) -> None:
    """A copy of `src` whose metadata names the end-of-turn id (gguf-py's gguf_new_metadata)."""
    progress("writing the end-of-turn id into the GGUF")
    script = tools / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    args = [str(script), str(src), str(dst), "--special-token-by-id", "eot", str(eot_id), "--force"]
    _run_converter(args, log, "metadata writer (gguf_new_metadata.py)", tools, dst)
    src.unlink()


def quantize(llama_cpp: Any, src: Path, dst: Path, quant: Quant, log: Path, progress: Progress) -> None:
    """llama.cpp's own quantizer, in this process."""
    progress(f"llama.cpp quantizer: → {quant.name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, quant.ftype)
    params.nthread = threads()
    with _llama_log_to(llama_cpp, log):  # each tensor's type, and where a k-quant falls back to another type
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        from appliance.store import free_bytes

        if free_bytes(dst.parent) < src.stat().st_size:
            raise _disk_full(dst)
        raise ApplianceError(f"llama.cpp's quantizer failed to write {quant.name} (code {code}); nothing was kept.",
                             "try another --quant (q8_0 is written by the converter itself)")
    src.unlink()


def convert_lora(tools: Path, adapter_dir: Path, base_dir: Path, out: Path, log: Path, progress: Progress) -> None:
    """The adapter as a GGUF LoRA (llama.cpp scales it by alpha / r, as peft does without rsLoRA)."""
    progress(f"llama.cpp LoRA converter: {adapter_dir.name}")
    args = [str(tools / "convert_lora_to_gguf.py"), "--base", str(base_dir), "--outtype", LORA_TYPE, "--outfile", str(out), str(adapter_dir)]
    _run_converter(args, log, "LoRA converter (convert_lora_to_gguf.py)", tools, out)


@contextlib.contextmanager
def _llama_log_to(llama_cpp: Any, log: Path):
    """llama.cpp's log appended to `log` while the block runs.

    llama-cpp-python routes llama.cpp's log through a Python callback that prints to sys.stderr,
    and only at or above the level its last `Llama(verbose=...)` set; so neither redirecting file
    descriptors nor the default callback gets the quantizer's report reliably. Our own callback
    gets every line; the binding's callback is put back afterwards."""
    import ctypes

    from llama_cpp import _logger

    with open(log, "ab") as f:

        @llama_cpp.llama_log_callback
        def write(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            f.write(text)

        llama_cpp.llama_log_set(write, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def threads() -> int:
    import torch

    return max(1, torch.get_num_threads())
