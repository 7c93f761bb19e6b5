"""What an export can be asked for: the GGUF types with their gates, the request, its failure."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ApplianceError
from appliance.registry import ExportParity

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


def quant_of(name: str) -> Quant:
    quant = QUANTS.get(name.lower())
    if quant is None:
        close = difflib.get_close_matches(name.lower(), list(QUANTS), n=2)
        raise ApplianceError(
            f"Unknown GGUF type {name!r}.",
            ("did you mean " + " or ".join(close) + "? " if close else "") + f"choose one of {', '.join(QUANTS)}",
        )
    return quant
