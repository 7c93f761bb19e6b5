"""Export a model or an adapter as GGUF for llama.cpp, Ollama and LM Studio, judged in llama.cpp itself.

Everything that writes GGUF is llama.cpp's own code, never ours: its converters
(`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, their `conversion` package and `gguf-py`,
taken by scripts/install.sh from the llama-cpp-python source distribution into
<venv>/share/appliance/llama.cpp) run in a subprocess of this interpreter; the types the
converter does not write (k-quants, q4_0) come from llama.cpp's quantizer through
llama-cpp-python (`llama_model_quantize`), starting from an f16 GGUF. The end-of-turn id is set
in the GGUF with gguf-py's own `gguf_new_metadata` script, so llama.cpp and LM Studio stop at
the end of a turn without being told.

NAME is a model in the store (an imported base or a merged model: one GGUF file) or an adapter (a
GGUF LoRA for llama.cpp's `--lora` and Ollama's `ADAPTER`, beside its base's GGUF, which is
exported first when there is no export of it at that type yet). Each export is a folder under
<store>/exports/ with the GGUF file(s), an Ollama Modelfile and a manifest written last; the
folder is built under a temporary name and renamed when complete, so a failure (a full disk, a
parity below the gate, Ctrl-C) leaves nothing.

The export is judged like the merge: loaded back in llama.cpp (every position's logits) and
compared with the model it came from, computed by transformers in fp32 on the CPU (for an adapter:
its 16-bit base + the adapter, which is what llama.cpp's base + LoRA computes), on probe prompts
and the adapter's validation answers: top-1 agreement at clear positions and mean KL, gated per
GGUF type (GATES, measured on SmolLM2 by `appliance bench export`). The GGUF's tokenizer must split
the probe texts as the HF tokenizer does, its chat template and BOS/EOS/end-of-turn ids must be
the model's, and a greedy answer to every validation prompt must stop at an end-of-turn token.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ApplianceError
from appliance.registry import AdapterManifest, ExportManifest, ExportParity, GreedyCheck, ModelManifest, Registry
from appliance.store import (
    DISK_FULL_TEXT,
    MANIFEST,
    TMP_PREFIX,
    atomic_dir,
    atomic_write,
    check_name,
    disk_full_error,
    ensure_free_space,
    is_disk_full,
    read_json,
)

LLAMA_CPP_VERSION = "0.3.36"  # scripts/install.sh installs this one; its converters are the ones we run
TOOLS_ENV = "APPLIANCE_LLAMA_CPP_DIR"  # where the converters are, when not in <venv>/share/appliance/llama.cpp
EXPORTS = "exports"  # the store's folder of exports
MODELFILE = "Modelfile"
LOG = "export.log"  # what llama.cpp's converters and quantizer said, kept beside the GGUF
LORA_TYPE = "f16"  # what an adapter's LoRA tensors are written in: tiny, and exact enough for B·A
MAX_NEW_TOKENS = 160  # the greedy stop check's limit per answer
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Gate:
    """What an export must reach against the model it came from (README, "Export")."""

    min_top1: float  # top-1 agreement at clear positions
    max_mean_kl: float  # nats per position


@dataclass(frozen=True)
class Quant:
    name: str
    ftype: str  # llama_cpp.LLAMA_FTYPE_*: the type most weights get
    converter: bool  # written by the converter itself; else by llama.cpp's quantizer from an f16 GGUF
    bytes_per_weight: float  # about, for the free-space check
    gate: Gate


# Each gate sits below what `appliance bench export smollm2-facts` measured (README, "Export";
# top-1 at 427 clear positions / mean KL, against the merged model in fp32): f16 100 % / 2e-5,
# bf16 100 % / 9e-4, q8_0 100 % / 0.021-0.029 (two training runs), q6_k 99.8 % / 0.055,
# q5_k_m 93.7 % / 0.30, q5_k_s 90.6 % / 0.42, q4_k_m 96.0 % / 0.32, q4_k_s 92.5 % / 0.84,
# q4_0 73.8 % / 1.69. The KL gates leave 2.5x for another training run and another CPU's
# kernels, the top-1 gates about 5 points (427 positions). A 135M model is the hardest case for
# the small types: its 576-wide rows do not fit the 256-wide k-quant blocks, so llama.cpp's
# quantizer falls back to 32-wide types (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0) for most
# tensors; larger models lose far less, and their exports clear these gates by a wide margin.
QUANTS = {
    q.name: q
    for q in (
        Quant("f16", "LLAMA_FTYPE_MOSTLY_F16", True, 2.0, Gate(0.99, 0.002)),
        Quant("bf16", "LLAMA_FTYPE_MOSTLY_BF16", True, 2.0, Gate(0.98, 0.01)),
        Quant("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", True, 1.07, Gate(0.98, 0.08)),
        Quant("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K", False, 0.82, Gate(0.95, 0.15)),
        Quant("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M", False, 0.72, Gate(0.88, 0.75)),
        Quant("q5_k_s", "LLAMA_FTYPE_MOSTLY_Q5_K_S", False, 0.69, Gate(0.85, 1.0)),
        Quant("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M", False, 0.61, Gate(0.90, 0.8)),
        Quant("q4_k_s", "LLAMA_FTYPE_MOSTLY_Q4_K_S", False, 0.58, Gate(0.87, 2.0)),
        Quant("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", False, 0.57, Gate(0.68, 4.0)),
    )
}
DEFAULT_QUANT = "q8_0"


class ExportSpec(BaseModel):
    """What `appliance export` was asked for."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a model in the store (imported or merged) or an adapter; `model:NAME` / `adapter:NAME` when both exist")
    format: Literal["gguf"] = "gguf"
    quant: str = Field(DEFAULT_QUANT, description=f"GGUF type of the weights: {', '.join(QUANTS)}")
    out: Path | None = Field(None, description="also copy the export's files into this folder")
    ollama: str | None = Field(None, description="run `ollama create` under this name when done")
    overwrite: bool = Field(False, description="replace an export of the same name, and files of the same names in --out")
    export_name: str | None = Field(None, description="the export's name in the store (default: NAME-QUANT, adapters NAME-lora-QUANT)")


class ExportMismatch(ApplianceError):
    """The export failed its gate against the model it came from; carries the figures."""

    def __init__(self, parity: ExportParity, message: str, fix: str):
        super().__init__(message, fix)
        self.parity = parity
        self.files: dict[str, int] = {}  # what had been written before it was thrown away (for `bench export`)
        self.timings: dict[str, float] = {}


# -- where things are ---------------------------------------------------------------------------


def exports_dir(registry: Registry) -> Path:
    return registry.store.root / EXPORTS


def export_dir(registry: Registry, name: str) -> Path:
    """The folder of export `name`, refusing names and links that leave the store."""
    check_name(name, "export name")
    base = exports_dir(registry)
    base.mkdir(parents=True, exist_ok=True)
    path = base / name
    if path.is_symlink() or not path.resolve().is_relative_to(base.resolve()):
        raise ApplianceError(f"export {name!r} points outside the store ({path.resolve()}).", f"remove the link {path}")
    return path


def list_exports(registry: Registry) -> list[ExportManifest]:
    base = exports_dir(registry)
    if not base.is_dir():
        return []
    names = sorted(p.name for p in base.iterdir() if not p.name.startswith(TMP_PREFIX) and (p / MANIFEST).is_file())
    return [read_export(registry, n) for n in names]


def read_export(registry: Registry, name: str) -> ExportManifest:
    from pydantic import ValidationError

    path = export_dir(registry, name) / MANIFEST
    if not path.is_file():
        raise ApplianceError(f"Unknown export {name!r}.", "see `appliance exports`")
    try:
        return ExportManifest.model_validate(read_json(path))
    except (ValidationError, ValueError) as err:
        raise ApplianceError(f"The manifest of export {name!r} is damaged: {str(err).splitlines()[0]}",
                             f"export it again with --overwrite, or remove {path.parent}") from None


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


def quant_of(name: str) -> Quant:
    quant = QUANTS.get(name.lower())
    if quant is None:
        close = difflib.get_close_matches(name.lower(), list(QUANTS), n=2)
        raise ApplianceError(
            f"Unknown GGUF type {name!r}.",
            ("did you mean " + " or ".join(close) + "? " if close else "") + f"choose one of {', '.join(QUANTS)}",
        )
    return quant


# -- what can be exported -----------------------------------------------------------------------


@dataclass
class Source:
    kind: Literal["model", "adapter"]
    model: ModelManifest  # the model, or the adapter's base
    adapter: AdapterManifest | None = None

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter else self.model.name


def resolve_source(registry: Registry, name: str) -> Source:
    """NAME as a model or an adapter of the store, refused when llama.cpp cannot hold it."""
    kind, _, bare = name.partition(":") if name.startswith(("model:", "adapter:")) else ("", "", name)
    check_name(bare, "name")
    models, adapters = registry.store.names("models"), registry.store.names("adapters")
    if not kind:
        if bare in models and bare in adapters:
            raise ApplianceError(f"{bare!r} is both a model and an adapter.", f"say which: model:{bare} or adapter:{bare}")
        kind = "model" if bare in models else "adapter" if bare in adapters else ""
    if not kind:
        close = difflib.get_close_matches(bare, models + adapters, n=3)
        raise ApplianceError(
            f"No model or adapter named {bare!r} in the store.",
            ("did you mean " + ", ".join(close) + "? " if close else "") + "see `appliance models list` and `appliance adapters list`",
        )
    if kind == "model":
        source = Source("model", registry.model(bare))
    else:
        adapter = registry.adapter(bare)
        source = Source("adapter", registry.base_of(adapter), adapter)
    _check_exportable(registry, source)
    return source


def _check_exportable(registry: Registry, source: Source) -> None:
    model = source.model
    if (source.adapter and source.adapter.task == "classify") or model.task == "classify":
        what = f"adapter {source.adapter.name!r}" if source.adapter else f"model {model.name!r}"
        raise ApplianceError(
            f"The {what} is a classifier; llama.cpp, Ollama and LM Studio run language models that generate text.",
            "serve the classifier with vLLM (appliance serve), or export a chat model or adapter",
        )
    if model.architecture not in LLAMA_ARCHITECTURES:
        raise ApplianceError(
            f"{model.name} is a {model.architecture}; this export writes {', '.join(LLAMA_ARCHITECTURES)} models.",
            "export a LLaMA-family causal language model",
        )
    folder = registry.model_dir(model.name)
    for config_file in ("config.json", "tokenizer_config.json"):
        path = folder / config_file
        # llama.cpp's converter loads tokenizers with trust_remote_code=True: refuse anything that names code.
        if path.is_file() and "auto_map" in read_json(path):
            raise ApplianceError(
                f"{model.name}'s {config_file} names custom Python code (auto_map), which llama.cpp's converter would run.",
                "export a model that transformers supports without custom code",
            )
    if source.adapter:
        config = read_json(registry.adapter_dir(source.adapter.name) / "adapter_config.json")
        unsupported = [k for k in ("use_dora", "use_rslora", "modules_to_save", "alpha_pattern", "rank_pattern", "lora_bias", "use_qalora")
                       if config.get(k)]
        if config.get("peft_type", "LORA") != "LORA" or unsupported:
            raise ApplianceError(
                f"Adapter {source.adapter.name!r} uses {', '.join(unsupported) or config.get('peft_type')}, which a llama.cpp LoRA cannot hold.",
                f"merge it (appliance merge {source.adapter.name}) and export the merged model",
            )


def default_export_name(source: Source, quant: Quant) -> str:
    return f"{source.adapter.name}-lora-{quant.name}" if source.adapter else f"{source.model.name}-{quant.name}"


def ollama_name(text: str) -> str:
    """A name Ollama accepts (lowercase letters, digits, '.', '_', '-', an optional :tag)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._-]+)?", text):
        raise ApplianceError(f"{text!r} is not a name Ollama accepts.", "use letters, digits, '.', '_' and '-', optionally :tag")
    return text.lower()


def check_out_dir(out: Path) -> Path:
    """--out must be a folder we can write into: made if missing, probed with a real file."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ApplianceError(f"--out {out} is a file, not a folder.", "pass a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{TMP_PREFIX}probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ApplianceError(f"Cannot write into --out {out}: {err.strerror or err}.", "choose a folder you can write to") from None
    return out.resolve()


# -- chat templates, for Ollama -------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateFamily:
    name: str
    marker: str  # text only this family's chat template holds
    go_template: str  # Ollama's TEMPLATE (Go text/template) rendering the same conversation
    system_block: str  # regex: the system prompt in a rendered conversation


# Ollama passes SYSTEM as the first message; these render a conversation exactly as the HF
# template does, the generation prompt included after a last user turn.
FAMILIES = (
    TemplateFamily(
        "chatml",
        "<|im_start|>",
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        '{{ if and (ne .Role "assistant") $last }}<|im_start|>assistant\n'
        "{{ end }}\n"
        "{{- end }}",
        r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    ),
    TemplateFamily(
        "llama3",
        "<|start_header_id|>",
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        '{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>\n\n'
        "{{ end }}\n"
        "{{- end }}",
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
    TemplateFamily(
        "mistral",
        "[INST]",
        "{{- range $i, $_ := .Messages }}\n"
        '{{- if eq .Role "user" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n'
        "{{ end }}{{ .Content }}[/INST]\n"
        '{{- else if eq .Role "assistant" }} {{ .Content }}</s>\n'
        "{{- end }}\n"
        "{{- end }}",
        r"\A\Z.",  # Mistral's templates have no default system prompt
    ),
)


def template_family(tokenizer: Any) -> TemplateFamily | None:
    template = getattr(tokenizer, "chat_template", None) or ""
    return next((f for f in FAMILIES if f.marker in template), None)


def default_system_prompt(tokenizer: Any, family: TemplateFamily | None) -> str | None:
    """The system prompt the template inserts when a conversation has none (SmolLM2 has one)."""
    from appliance.data import TemplateMismatch, render

    if family is None:
        return None
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except (TemplateMismatch, ApplianceError):
        return None
    found = re.search(family.system_block, text, re.S)
    return found.group(1) if found else None


def stop_tokens(tokenizer: Any, model: ModelManifest) -> list[str]:
    """Every token that ends a turn: the end-of-turn token and the model's eos ids (generation_config)."""
    tokens = [model.end_of_turn] if model.end_of_turn else []
    for token_id in model.eos_token_ids:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token and token not in tokens:
            tokens.append(token)
    return tokens


def modelfile(gguf: str, lora: str | None, family: TemplateFamily | None, system: str | None, stops: list[str]) -> str:
    """An Ollama Modelfile beside the GGUF file(s), with paths relative to it."""
    lines = [f"# Written by `appliance export`; make the Ollama model with: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf}"]
    if lora:
        lines.append(f"ADAPTER ./{lora}")
    if family is not None:
        lines.append(f'TEMPLATE """{family.go_template}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not one of " + ", ".join(f.name for f in FAMILIES) + "; Ollama reads the GGUF's")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    return "\n".join(lines) + "\n"


# -- running llama.cpp's converters and quantizer -------------------------------------------------------


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
    params.nthread = _threads()
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


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


# -- judging an export ------------------------------------------------------------------------------


@dataclass
class Probes:
    sequences: list[list[int]]  # teacher-forced: probe prompts, then validation conversations
    validation_examples: int
    prompts: list[list[int]]  # answered greedily: the validation prompts, else the probe prompts
    prompts_from: Literal["validation", "probes"]
    notes: list[str] = field(default_factory=list)


def _probe_prompt_ids(tokenizer: Any) -> list[list[int]]:
    from appliance.data import has_chat_template, render
    from appliance.merge import PROBE_PROMPTS

    chat = has_chat_template(tokenizer)
    texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) if chat else p for p in PROBE_PROMPTS]
    return [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]


def validation_prompts(adapter: AdapterManifest, tokenizer: Any) -> list[list[int]]:
    """The adapter's held-out conversations cut before the first trained answer."""
    from appliance.config import RunConfig
    from appliance.data import IGNORE_INDEX, prepare
    from appliance.merge import VALIDATION_EXAMPLES

    if adapter.task not in ("sft", "dpo"):
        return []
    try:
        prepared = prepare(RunConfig.model_validate(adapter.config).data, adapter.task, tokenizer)
    except ApplianceError:
        return []
    prompts = []
    for encoded in (prepared.val or prepared.test)[:VALIDATION_EXAMPLES]:
        item = encoded.item.chosen if hasattr(encoded.item, "chosen") else encoded.item
        first = next((i for i, label in enumerate(item.labels) if label != IGNORE_INDEX), 0)
        if first:
            prompts.append(list(item.input_ids[:first]))
    return prompts


def probes_for(registry: Registry, adapter: AdapterManifest | None, tokenizer: Any) -> Probes:
    from appliance.merge import PROBE_PROMPTS, probe_sequences

    if adapter is None:
        prompts = _probe_prompt_ids(tokenizer)
        return Probes(prompts, 0, prompts, "probes")
    sequences, validation, notes = probe_sequences(registry, adapter, tokenizer)
    prompts = validation_prompts(adapter, tokenizer) if validation else []
    if prompts:
        return Probes(sequences, validation, prompts, "validation", notes)
    return Probes(sequences, validation, sequences[: len(PROBE_PROMPTS)], "probes", notes)


def _adapter_of_merged(registry: Registry, model: ModelManifest) -> tuple[AdapterManifest | None, list[str]]:
    """A merged model's adapter, whose validation answers the export is compared on, when it is still in the store."""
    if model.kind != "merged" or not model.adapter:
        return None, []
    try:
        return registry.adapter(model.adapter), []
    except ApplianceError:
        return None, [f"validation answers not compared: adapter {model.adapter!r} is no longer in the store"]


def hf_greedy(model: Any, prompt: list[int], stop_ids: set[int]) -> list[int]:
    """The reference's greedy answer, ending with its stop token when it stopped."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        past, ids = None, torch.tensor([prompt])
        for _ in range(MAX_NEW_TOKENS):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids = torch.tensor([[token]])
    return out


def llama_logits(llm: Any, ids: list[int]) -> Any:
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_greedy(llama_cpp: Any, llm: Any, prompt: list[int]) -> tuple[list[int], bool]:
    """llama.cpp's greedy answer: (tokens, stopped at an end-of-generation token)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return out, True
        if len(out) >= MAX_NEW_TOKENS:
            break
    return out, False


def open_gguf(gguf: Path, lora: Path | None, n_ctx: int) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=512, logits_all=True,
        n_threads=_threads(), n_threads_batch=_threads(), seed=0, verbose=False,
    )


def check_metadata(llm: Any, tokenizer: Any, eot_id: int | None) -> tuple[dict[str, Any], list[str]]:
    """The GGUF's chat template and special ids against the model's own; (what it holds, problems)."""
    meta = llm.metadata

    def as_id(key: str) -> int | None:
        return int(meta[key]) if key in meta else None

    held = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token_id": as_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": as_id("tokenizer.ggml.eos_token_id"),
        "eot_token_id": as_id("tokenizer.ggml.eot_token_id"),
    }
    problems = []
    if (tokenizer.chat_template or None) != held["chat_template"]:
        problems.append("the chat template in the GGUF differs from the model's")
    for key, expected in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id), ("eot_token_id", eot_id)):
        if expected is not None and held[key] != expected:
            problems.append(f"{key} is {held[key]} in the GGUF, {expected} in the model")
    return held, problems


@dataclass
class Judged:
    parity: ExportParity
    metadata: dict[str, Any]


def judge(
    gguf: Path,
    lora: Path | None,
    load_reference: Callable[[], Any],
    reference: str,
    tokenizer: Any,
    probes: Probes,
    quant: Quant,
    eot_id: int | None,
    progress: Progress,
) -> Judged:
    """The export in llama.cpp against the reference (transformers, fp32, CPU); raises ExportMismatch below the gate."""
    import gc

    import llama_cpp

    from appliance.merge import PROBE_PROMPTS, agreement, logits_of

    progress(f"the reference: {reference}")
    model = load_reference()
    expected = logits_of(model, probes.sequences, "cpu")
    stop_ids = {i for i in (eot_id, tokenizer.eos_token_id) if i is not None}
    reference_answers = [hf_greedy(model, p, stop_ids) for p in probes.prompts]
    del model
    gc.collect()

    progress(f"the export in llama.cpp {llama_cpp.__version__}: {len(probes.sequences)} sequences, {len(probes.prompts)} greedy answers")
    longest = max(len(s) for s in [*probes.sequences, *probes.prompts])
    llm = open_gguf(gguf, lora, n_ctx=longest + MAX_NEW_TOKENS + 8)
    try:
        metadata, problems = check_metadata(llm, tokenizer, eot_id)
        got = [llama_logits(llm, s) for s in probes.sequences]
        texts = [tokenizer.decode(s) for s in probes.sequences]
        matches = sum(
            llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts
        )
        generations = []
        for prompt, ref in zip(probes.prompts, reference_answers):
            answer, stopped = llama_greedy(llama_cpp, llm, prompt)
            generations.append(GreedyCheck(
                prompt=_question(tokenizer, prompt),
                answer=tokenizer.decode(answer, skip_special_tokens=True).strip(),
                stopped=stopped,
                stop_token=tokenizer.convert_ids_to_tokens(answer[-1]) if stopped else None,
                reference_stopped=bool(ref) and ref[-1] in stop_ids,
                same_as_reference=answer == ref,
            ))
    finally:
        llm.close()
    parity = ExportParity(
        reference=reference,
        quant=quant.name,
        prompts=len(PROBE_PROMPTS),
        validation_examples=probes.validation_examples,
        agreement=agreement(expected, got),
        tokenization_matches=matches,
        tokenization_checked=len(texts),
        generations=generations,
        generations_from=probes.prompts_from,
        gate_min_top1=quant.gate.min_top1,
        gate_max_mean_kl=quant.gate.max_mean_kl,
        notes=list(probes.notes),
    )
    endless = sum(not g.reference_stopped for g in generations)
    if endless and probes.prompts_from == "validation":
        parity.notes.append(f"the original model itself does not stop within {MAX_NEW_TOKENS} tokens on {endless} of {len(generations)} "
                            "validation prompts: train longer, or check that the answers in the data end their turn")
    failures = problems + gate_failures(parity)
    if failures:
        raise ExportMismatch(
            parity,
            f"The {quant.name} export does not match {reference}: " + "; ".join(failures) + "; nothing was kept.",
            "try a larger type (--quant q8_0 or f16)" if not problems else "report this: llama.cpp's converter changed the tokenizer metadata",
        )
    return Judged(parity, metadata)


def gate_failures(parity: ExportParity) -> list[str]:
    a, failures = parity.agreement, []
    if a.top1_agreement < parity.gate_min_top1:
        failures.append(f"top-1 agreement {a.top1_agreement:.2%} at {a.clear_positions} clear positions (gate {parity.gate_min_top1:.0%})")
    if a.mean_kl > parity.gate_max_mean_kl:
        failures.append(f"mean KL {a.mean_kl:.3g} (gate {parity.gate_max_mean_kl:g})")
    if parity.tokenization_matches < parity.tokenization_checked:
        failures.append(f"llama.cpp tokenizes {parity.tokenization_checked - parity.tokenization_matches} of {parity.tokenization_checked} probe texts differently")
    # The export must stop wherever the model it came from stops (a wrong eos or template is the
    # usual cause of an exported model that never stops); where the model itself runs on, the
    # fault is the training's, and judge() says so in a note.
    runaway = [g for g in parity.generations if not g.stopped and g.reference_stopped]
    if runaway:
        failures.append(f"{len(runaway)} of {len(parity.generations)} greedy answers did not stop at an end-of-turn token within "
                        f"{MAX_NEW_TOKENS} tokens where the original stops")
    return failures


def _question(tokenizer: Any, prompt: list[int]) -> str:
    lines = tokenizer.decode(prompt, skip_special_tokens=True).strip().splitlines()
    # ChatML and Llama 3 prompts end with the assistant's header line; the question is the line before.
    return (lines[-2] if len(lines) >= 2 else lines[-1] if lines else "")[:120]


# -- the export ---------------------------------------------------------------------------------------


def _bytes_needed(parameters: int, quant: Quant) -> int:
    # The converter's file plus the metadata writer's copy of it; quantized types start from f16.
    first = 2.0 if not quant.converter else quant.bytes_per_weight
    return int(parameters * (2 * first + (0 if quant.converter else quant.bytes_per_weight)))


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _ollama_command(name: str, folder: Path) -> str:
    return f"ollama create {name} -f {folder / MODELFILE}"


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def export_model(registry: Registry, model: ModelManifest, quant: Quant, name: str, tools: Path, progress: Progress) -> ExportManifest:
    """One GGUF file of a model in the store, with its Modelfile, judged against the model in fp32."""
    import llama_cpp

    from appliance.hf import load_for_inference, load_tokenizer, quiet_libraries

    quiet_libraries()
    model_dir = registry.model_dir(model.name)
    folder = export_dir(registry, name)
    ensure_free_space(folder.parent, _bytes_needed(model.parameters, quant), f"the {quant.name} export of {model.name}")
    tokenizer = load_tokenizer(model_dir)
    eot_id = tokenizer.convert_tokens_to_ids(model.end_of_turn) if model.end_of_turn else None
    adapter, notes = _adapter_of_merged(registry, model)
    probes = probes_for(registry, adapter, tokenizer)
    probes.notes[:0] = notes
    family = template_family(tokenizer)
    stops = stop_tokens(tokenizer, model)
    started = time.time()
    timings: dict[str, float] = {}
    with atomic_dir(folder, overwrite=True) as tmp:
        work = tmp / ".work"
        work.mkdir()
        gguf = tmp / f"{name}.gguf"
        first = work / ("converted.gguf" if quant.converter else "converted-f16.gguf")
        log = tmp / LOG
        convert_model(tools, model_dir, first, quant.name if quant.converter else "f16", log, progress)
        timings["convert_s"] = round(time.time() - started, 1)
        with_eot = work / "with-eot.gguf"
        if eot_id is not None:
            set_end_of_turn(tools, first, with_eot, eot_id, log, progress)
        else:
            first.rename(with_eot)
        if quant.converter:
            with_eot.rename(gguf)
        else:
            mark = time.time()
            quantize(llama_cpp, with_eot, gguf, quant, log, progress)
            timings["quantize_s"] = round(time.time() - mark, 1)
        timings["write_s"] = round(time.time() - started, 1)
        mark = time.time()
        try:
            judged = judge(
                gguf, None,
                lambda: load_for_inference(model_dir, load_in_4bit=False, device="cpu", dtype="float32"),
                f"{model.name} in fp32 (transformers)", tokenizer, probes, quant, eot_id, progress,
            )
        except ExportMismatch as err:
            err.files = _files(tmp)
            err.timings = {**timings, "parity_s": round(time.time() - mark, 1), "total_s": round(time.time() - started, 1)}
            raise
        timings["parity_s"] = round(time.time() - mark, 1)
        shutil.rmtree(work)
        system = default_system_prompt(tokenizer, family)
        atomic_write(tmp / MODELFILE, modelfile(gguf.name, None, family, system, stops))
        timings["total_s"] = round(time.time() - started, 1)
        manifest = ExportManifest(
            name=name, kind="model", source=model.name, source_fingerprint=model.fingerprint, quant=quant.name, gguf=gguf.name,
            base=model.base, files=_files(tmp), chat_template=bool(judged.metadata["chat_template"]),
            template_family=family.name if family else None, bos_token_id=judged.metadata["bos_token_id"],
            eos_token_id=judged.metadata["eos_token_id"], eot_token_id=judged.metadata["eot_token_id"], stop_tokens=stops,
            ollama_create=_ollama_command(model.name.lower(), folder), llama_cpp=_llama_cpp_version(), parity=judged.parity,
            timings=timings,
        )
        registry.write_manifest(tmp, manifest)
    return manifest


def base_export_for(registry: Registry, base: ModelManifest, quant: Quant, tools: Path, progress: Progress) -> tuple[ExportManifest, bool]:
    """The export of an adapter's base at `quant`: an existing one of the same weights, else a new one. (manifest, made now)"""
    name = f"{base.name}-{quant.name}"
    folder = export_dir(registry, name)
    if (folder / MANIFEST).is_file():
        existing = read_export(registry, name)
        if existing.kind == "model" and existing.source_fingerprint == base.fingerprint and existing.quant == quant.name:
            return existing, False
        raise ApplianceError(
            f"The export {name!r} is not of {base.name}'s current weights at {quant.name}.",
            f"export the base again: appliance export {base.name} --quant {quant.name} --overwrite",
        )
    progress(f"exporting the base {base.name} first")
    return export_model(registry, base, quant, name, tools, progress), True


def export_adapter(registry: Registry, adapter: AdapterManifest, base: ModelManifest, quant: Quant, name: str, tools: Path,
                   progress: Progress) -> ExportManifest:
    """A GGUF LoRA beside its base's GGUF (hard-linked from the base's export), judged against the
    16-bit base + adapter in fp32, which is what llama.cpp computes with base + LoRA."""
    from appliance.hf import load_for_inference, load_tokenizer, quiet_libraries

    quiet_libraries()
    started = time.time()
    base_export, made = base_export_for(registry, base, quant, tools, progress)
    base_dir, adapter_dir = registry.model_dir(base.name), registry.adapter_dir(adapter.name)
    folder = export_dir(registry, name)
    ensure_free_space(folder.parent, (adapter_dir / "adapter_model.safetensors").stat().st_size, f"the LoRA of {adapter.name}")
    tokenizer = load_tokenizer(base_dir)
    eot_id = tokenizer.convert_tokens_to_ids(base.end_of_turn) if base.end_of_turn else None
    probes = probes_for(registry, adapter, tokenizer)
    family = template_family(tokenizer)
    stops = stop_tokens(tokenizer, base)
    timings = {"base_export_s": round(time.time() - started, 1)} if made else {}
    mark = time.time()
    with atomic_dir(folder, overwrite=True) as tmp:
        lora = tmp / f"{adapter.name}-lora-{LORA_TYPE}.gguf"
        convert_lora(tools, adapter_dir, base_dir, lora, tmp / LOG, progress)
        gguf = tmp / base_export.gguf
        source = export_dir(registry, base_export.name) / base_export.gguf
        try:
            os.link(source, gguf)  # the same bytes, no extra disk: the folder is complete on its own
        except OSError:
            shutil.copy2(source, gguf)
        timings["write_s"] = round(time.time() - mark, 1)
        mark = time.time()
        try:
            judged = judge(
                gguf, lora,
                lambda: load_for_inference(base_dir, adapter_dir, load_in_4bit=False, device="cpu", dtype="float32", task=adapter.task),
                f"{base.name} + {adapter.name} in fp32 (transformers + peft)", tokenizer, probes, quant, eot_id, progress,
            )
        except ExportMismatch as err:
            err.files = _files(tmp)
            err.timings = {**timings, "parity_s": round(time.time() - mark, 1), "total_s": round(time.time() - started, 1)}
            raise
        timings["parity_s"] = round(time.time() - mark, 1)
        system = default_system_prompt(tokenizer, family)
        atomic_write(tmp / MODELFILE, modelfile(gguf.name, lora.name, family, system, stops))
        timings["total_s"] = round(time.time() - started, 1)
        manifest = ExportManifest(
            name=name, kind="adapter", source=adapter.name, source_fingerprint=base.fingerprint, quant=quant.name, gguf=gguf.name,
            lora=lora.name, base=base.name, base_export=base_export.name, files=_files(tmp),
            chat_template=bool(judged.metadata["chat_template"]), template_family=family.name if family else None,
            bos_token_id=judged.metadata["bos_token_id"], eos_token_id=judged.metadata["eos_token_id"],
            eot_token_id=judged.metadata["eot_token_id"], stop_tokens=stops,
            ollama_create=_ollama_command(adapter.name.lower(), folder), llama_cpp=_llama_cpp_version(), parity=judged.parity,
            timings=timings,
        )
        registry.write_manifest(tmp, manifest)
    return manifest


@dataclass
class ExportResult:
    manifest: ExportManifest
    folder: Path
    copied_to: Path | None = None
    ollama_create: str = ""  # the command for where the files are (--out when given)
    ollama_ran: bool = False
    base_export: ExportManifest | None = None


def copy_export(folder: Path, out: Path, overwrite: bool) -> None:
    """The export's files into --out, each under a temporary name first: a full disk leaves none half-written."""
    import uuid

    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    clashes = [p.name for p in files if (out / p.name).exists()]
    if clashes and not overwrite:
        raise ApplianceError(f"{out} already holds {', '.join(clashes)}.", "pass --overwrite, or choose another --out")
    done: list[Path] = []
    try:
        for path in files:
            tmp = out / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
            done.append(tmp)
            shutil.copyfile(path, tmp)
        for path, tmp in zip(files, done):
            os.replace(tmp, out / path.name)
    except OSError as err:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(out / files[len(done) - 1].name, err) from None
        raise ApplianceError(f"Cannot copy the export into {out}: {err.strerror or err}; nothing was copied.", "choose another --out") from None


def run_ollama(name: str, modelfile_path: Path) -> None:
    result = subprocess.run(["ollama", "create", name, "-f", str(modelfile_path)], cwd=modelfile_path.parent, capture_output=True, text=True)
    if result.returncode != 0:
        raise ApplianceError(
            f"`ollama create {name}` failed (exit {result.returncode}); the export itself is complete.",
            "check that the Ollama server runs (`ollama serve`), then run the command again",
            details=(result.stderr or result.stdout).strip().splitlines()[-4:],
        )


def export(registry: Registry, spec: ExportSpec, progress: Progress = lambda _: None) -> ExportResult:
    """`appliance export`: every check that needs no weights first, then the export, the copy and Ollama."""
    quant = quant_of(spec.quant)
    source = resolve_source(registry, spec.name)
    name = check_name(spec.export_name or default_export_name(source, quant), "export name")
    folder = export_dir(registry, name)
    if (folder / MANIFEST).is_file() and not spec.overwrite:
        raise ApplianceError(f"An export named {name!r} is already in the store ({folder}).", "pass --overwrite to replace it")
    out = check_out_dir(spec.out) if spec.out else None
    if out is not None and not spec.overwrite:
        clashes = [n for n in (MODELFILE, MANIFEST) if (out / n).exists()]
        if clashes:
            raise ApplianceError(f"{out} already holds {', '.join(clashes)} of another export.", "pass --overwrite, or choose another --out")
    ollama = ollama_name(spec.ollama) if spec.ollama else None
    if ollama and shutil.which("ollama") is None:
        raise ApplianceError(
            "--ollama was given, but `ollama` is not on PATH.",
            "install Ollama (https://ollama.com/download), or export without --ollama and run the printed `ollama create` later",
        )
    require_llama_cpp()
    tools = converter_dir()

    base_export = None
    if source.adapter:
        existed = (export_dir(registry, f"{source.model.name}-{quant.name}") / MANIFEST).is_file()
        manifest = export_adapter(registry, source.adapter, source.model, quant, name, tools, progress)
        if not existed:
            base_export = read_export(registry, manifest.base_export)
    else:
        manifest = export_model(registry, source.model, quant, name, tools, progress)
    result = ExportResult(manifest, folder, ollama_create=manifest.ollama_create)
    result.base_export = base_export
    if out is not None:
        progress(f"copying into {out}")
        copy_export(folder, out, spec.overwrite)
        result.copied_to = out
        result.ollama_create = _ollama_command(ollama or source.name.lower(), out)
    if ollama:
        progress(f"ollama create {ollama}")
        run_ollama(ollama, (out or folder) / MODELFILE)
        result.ollama_ran = True
        result.ollama_create = _ollama_command(ollama, out or folder)
    return result
