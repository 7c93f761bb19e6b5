"""The artefacts users keep: models (imported bases, merged) and adapters.

The file system is the registry: each artefact is a folder in the store with a
manifest.json written last (inside an atomic folder write). This module reads
and writes those manifests and is the only place that knows their shape.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.errors import ApplianceError
from appliance.store import MANIFEST, Store, atomic_write_json, read_json


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


class Manifest(BaseModel):
    # Manifests outlive code versions: unknown keys from a newer version are kept, not refused.
    model_config = ConfigDict(extra="allow")

    name: str
    created: str = Field(default_factory=now_iso)


class Agreement(BaseModel):
    """How closely a model's logits follow a reference's, position by position."""

    model_config = ConfigDict(extra="forbid")

    positions: int
    clear_positions: int = Field(description="positions where the reference's top-1 leads its runner-up by at least `margin` logits")
    margin: float
    top1_agreement: float = Field(description="share of the clear positions where both pick the same top-1")
    top1_agreement_all: float = Field(description="the same over every position, near-ties included")
    mean_kl: float = Field(description="KL(reference || model) per position, nats")
    max_abs_logit_diff: float


class MergeParity(BaseModel):
    """A merged model judged against the model the user trained and evaluated (appliance.merge)."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["dequantized", "original"] = Field(description="the base weights the adapter was merged into")
    dtype: str = Field(description="what the merged weights are stored in")
    compute_dtype: str = Field(description="what both models computed in for the comparison")
    reference: str = "4-bit base + adapter"
    prompts: int
    validation_examples: int
    evaluated: Agreement
    adapter_effect_kl: float = Field(description="KL(evaluated || the same 4-bit base without the adapter): what the adapter changed")
    saved_max_rel_diff: float = Field(description="adapted tensors read back from disk against what was computed")
    gate_min_top1: float
    gate_max_mean_kl: float
    gate_max_relative_kl: float
    notes: list[str] = Field(default_factory=list)

    @property
    def relative_kl(self) -> float:
        """What the merge lost, as a share of what the adapter changed."""
        return max(self.evaluated.mean_kl, 0.0) / max(self.adapter_effect_kl, 1e-12)


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    reference: str
    before: str
    after: str


class Forgetting(BaseModel):
    """Perplexity on general text shipped with the package, base against adapter."""

    model_config = ConfigDict(extra="forbid")

    base_ppl: float
    adapter_ppl: float
    change_pct: float


class Evaluation(BaseModel):
    """`appliance eval`: task metrics before (base, another model, or the majority class) and after."""

    model_config = ConfigDict(extra="forbid")

    adapter: str
    against: str
    task: str
    split: str = Field(description="the held-out split evaluated on (test, val), or 'data' for --data")
    examples: int
    before: dict[str, float] = Field(default_factory=dict)
    after: dict[str, float] = Field(default_factory=dict)
    forgetting: Forgetting | None = None
    samples: list[Sample] = Field(default_factory=list)


class ModelManifest(Manifest):
    kind: Literal["base", "merged"] = "base"
    source: str
    fingerprint: str
    architecture: str
    model_type: str
    task: Literal["causal-lm", "classify"] = "causal-lm"
    parameters: int
    dtype: str
    context_length: int | None = None
    chat_template: bool = False
    end_of_turn: str | None = None
    eos_token_ids: list[int] = Field(default_factory=list)
    # merged models only
    adapter: str | None = None
    base: str | None = None
    base_fingerprint: str | None = None
    parity: MergeParity | None = None

    @field_validator("parity", mode="before")
    @classmethod
    def _earlier_parity(cls, value: Any) -> Any:
        # Merges made before the parity named the evaluated model recorded other figures: not comparable.
        return None if isinstance(value, dict) and "evaluated" not in value else value


class GreedyCheck(BaseModel):
    """One prompt answered greedily by the export in llama.cpp, and whether it stopped by itself."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the question (the last user turn), shortened")
    answer: str = Field(description="llama.cpp's greedy answer")
    stopped: bool = Field(description="the answer ended with an end-of-generation token within the token limit")
    stop_token: str | None = None
    reference_stopped: bool = Field(description="the reference (transformers, fp32) stopped on the same prompt")
    same_as_reference: bool = Field(description="the same tokens as the reference's greedy answer")


class ExportParity(BaseModel):
    """A GGUF export loaded back in llama.cpp and compared with the model it came from (appliance.export)."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="what the export is compared with, computed by transformers in fp32 on the CPU")
    quant: str
    prompts: int
    validation_examples: int
    agreement: Agreement
    tokenization_matches: int = Field(description="probe texts llama.cpp's tokenizer splits exactly as the HF tokenizer does")
    tokenization_checked: int
    generations: list[GreedyCheck] = Field(default_factory=list)
    generations_from: Literal["validation", "probes"] = Field(description="whose prompts the greedy stop check answered")
    gate_min_top1: float
    gate_max_mean_kl: float
    notes: list[str] = Field(default_factory=list)

    @property
    def stopped(self) -> int:
        return sum(g.stopped for g in self.generations)


class ExportManifest(Manifest):
    """A GGUF export: a model (one GGUF file) or an adapter (a GGUF LoRA beside its base's GGUF), with an Ollama Modelfile."""

    kind: Literal["model", "adapter"]
    source: str = Field(description="the model or adapter exported")
    source_fingerprint: str = Field(description="the model's fingerprint; for an adapter, its base's")
    format: Literal["gguf"] = "gguf"
    quant: str = Field(description="the GGUF type of the weights (for an adapter: of its base)")
    gguf: str = Field(description="the model's GGUF file in this folder (for an adapter: its base's)")
    lora: str | None = Field(None, description="adapters: the GGUF LoRA file (llama.cpp --lora, Ollama ADAPTER)")
    base: str | None = None
    base_export: str | None = Field(None, description="adapters: the export its base's GGUF comes from")
    files: dict[str, int] = Field(default_factory=dict, description="file name -> bytes")
    chat_template: bool = False
    template_family: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    stop_tokens: list[str] = Field(default_factory=list)
    ollama_create: str = Field(description="the command that makes an Ollama model of this folder")
    llama_cpp: str = Field(description="the llama-cpp-python version that converted, quantized and judged it")
    parity: ExportParity
    timings: dict[str, float] = Field(default_factory=dict)


class DataFileRecord(BaseModel):
    path: str
    sha256: str
    format: str
    examples: int
    role: str = "train"


class AdapterManifest(Manifest):
    base: str
    base_fingerprint: str
    task: str
    recipe: str
    rank: int
    alpha: float
    target_modules: list[str]
    data: list[DataFileRecord] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    evaluation: Evaluation | None = None
    run: str | None = None
    labels: list[str] | None = None  # classifiers: class names, index = class id


# -- hashing ---------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_model(model_dir: Path) -> str:
    """Hash of the config (architecture and shapes) and every weight file: same bytes, same fingerprint."""
    config = read_json(model_dir / "config.json")
    for volatile in ("transformers_version", "_name_or_path", "_model_name_or_path"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(model_dir.glob("*.safetensors")):
        h.update(weights.name.encode())
        h.update(sha256_file(weights).encode())
    return h.hexdigest()[:16]


def safetensors_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers, without loading any weights."""
    total = 0
    for weights in model_dir.glob("*.safetensors"):
        with open(weights, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for dim in info["shape"]:
                n *= dim
            total += n
    return total


# -- the registry ------------------------------------------------------------


def resumable(run_dir: Path) -> bool:
    """Whether a run folder has a checkpoint (a step-N folder, appliance.train.checkpoint's) to resume from."""
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(c.name.startswith("step-") for c in checkpoints.iterdir())


class Registry:
    def __init__(self, store: Store | None = None):
        self.store = store or Store()

    # models
    def model_dir(self, name: str) -> Path:
        return self.store.path("models", name)

    def twin_4bit_dir(self, model: ModelManifest, quant_type: str = "nf4", double_quant: bool = True) -> Path:
        """Where a base's 4-bit twin lives (appliance.models.write_twin_4bit): by fingerprint and 4-bit settings."""
        return self.store.root / "cache" / "4bit-twins" / f"{_twin_prefix(model)}{quant_type}{'-dq' if double_quant else ''}"

    def holds_weights_of(self, model: ModelManifest, folder: Path) -> bool:
        """Whether a server loading `folder` serves `model`: its own folder, or one of its 4-bit twins."""
        folder = folder.resolve()
        twins = self.twin_4bit_dir(model).parent.resolve()
        return folder == self.model_dir(model.name).resolve() or (
            folder.parent == twins and folder.name.startswith(_twin_prefix(model)))

    def model(self, name: str) -> ModelManifest:
        return self._read("models", name, ModelManifest, "appliance models list", "appliance models import SOURCE --name NAME")

    def models(self) -> list[ModelManifest]:
        return [self.model(n) for n in self.store.names("models")]

    # adapters
    def adapter_dir(self, name: str) -> Path:
        return self.store.path("adapters", name)

    def adapter(self, name: str) -> AdapterManifest:
        return self._read("adapters", name, AdapterManifest, "appliance adapters list", "appliance train ... --name NAME")

    def adapters(self) -> list[AdapterManifest]:
        return [self.adapter(n) for n in self.store.names("adapters")]

    def base_of(self, adapter: AdapterManifest) -> ModelManifest:
        """The adapter's base, which must be in the store with the fingerprint it was trained on."""
        try:
            base = self.model(adapter.base)
        except ApplianceError:
            raise ApplianceError(
                f"The base model {adapter.base!r} of adapter {adapter.name!r} is not in the store.",
                f"import it again under the same name (appliance models import SOURCE --name {adapter.base})",
            ) from None
        if base.fingerprint != adapter.base_fingerprint:
            raise ApplianceError(
                f"Adapter {adapter.name!r} was trained on a base with fingerprint {adapter.base_fingerprint}, "
                f"but {base.name!r} now has fingerprint {base.fingerprint}.",
                "use the base it was trained on, or train the adapter again on this one",
            )
        return base

    def remove_model(self, name: str) -> Path:
        self.model(name)
        dependents = [a.name for a in self.adapters() if a.base == name]
        if dependents:
            raise ApplianceError(
                f"Model {name!r} is the base of adapter(s) {', '.join(dependents)}, which would be left without it.",
                f"remove those first (appliance adapters rm {dependents[0]}), or keep the model",
            )
        path = self.model_dir(name)
        shutil.rmtree(path)
        return path

    def remove_adapter(self, name: str) -> Path:
        self.adapter(name)
        path = self.adapter_dir(name)
        shutil.rmtree(path)
        return path

    def run_dir(self, name: str) -> Path:
        return self.store.path("runs", name)

    @staticmethod
    def write_manifest(folder: Path, manifest: Manifest) -> Path:
        return atomic_write_json(folder / MANIFEST, manifest.model_dump(mode="json"))

    def _read(self, kind: str, name: str, cls: type[Manifest], list_cmd: str, make_cmd: str):
        folder = self.store.path(kind, name)
        path = folder / MANIFEST
        if not path.is_file():
            known = self.store.names(kind)
            close = difflib.get_close_matches(name, known, n=3)
            what = kind.rstrip("s")
            hint = f"did you mean {', '.join(close)}? " if close else ""
            if folder.is_dir():
                raise ApplianceError(
                    f"The {what} {name!r} is incomplete (no manifest: an import or save was interrupted).",
                    f"remove {folder} and create it again ({make_cmd})",
                )
            if kind == "adapters" and resumable(self.run_dir(name)):
                raise ApplianceError(
                    f"The adapter {name!r} is not saved yet: its run stopped before the end.",
                    f"finish it with `appliance train ... --name {name} --resume` (the command it was started with)",
                )
            raise ApplianceError(
                f"Unknown {what} {name!r}.",
                f"{hint}see `{list_cmd}`" + ("" if known else f"; create one with `{make_cmd}`"),
            )
        try:
            return cls.model_validate(read_json(path))
        except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApplianceError(
                f"The manifest of {what_of(kind)} {name!r} is damaged: {str(err).splitlines()[0]}",
                f"remove {folder} and create it again ({make_cmd})",
            ) from None


def what_of(kind: str) -> str:
    return kind.rstrip("s")


def _twin_prefix(model: ModelManifest) -> str:
    """A base's 4-bit twins are named by its name and fingerprint, then their 4-bit settings."""
    return f"{model.name}-{model.fingerprint[:12]}-"
