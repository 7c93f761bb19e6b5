"""Where exports live in the store, and what can be exported (a model or an adapter of a llama.cpp architecture)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.errors import ApplianceError
from appliance.export.spec import EXPORTS, LLAMA_ARCHITECTURES, Quant
from appliance.registry import AdapterManifest, ExportManifest, ModelManifest, Registry
from appliance.store import MANIFEST, TMP_PREFIX, check_name, read_json


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
