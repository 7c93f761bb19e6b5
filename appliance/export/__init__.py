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

from appliance.export.build import ExportResult, export
from appliance.export.ollama import FAMILIES, default_system_prompt, modelfile, template_family
from appliance.export.sources import Source, export_dir, exports_dir, list_exports, read_export, resolve_source
from appliance.export.spec import DEFAULT_QUANT, LLAMA_CPP_VERSION, QUANTS, ExportMismatch, ExportSpec, Gate, Quant, quant_of
from appliance.store import MANIFEST

__all__ = [
    "DEFAULT_QUANT", "FAMILIES", "LLAMA_CPP_VERSION", "MANIFEST", "QUANTS", "ExportMismatch", "ExportResult", "ExportSpec", "Gate",
    "Quant", "Source", "default_system_prompt", "export", "export_dir", "exports_dir", "list_exports", "modelfile", "quant_of",
    "read_export", "resolve_source", "template_family",
]
