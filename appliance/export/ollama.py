"""What Ollama needs beside the GGUF: the chat template in its syntax, stop words, the Modelfile, `ollama create`."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.export.spec import MODELFILE
from appliance.registry import ModelManifest


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


def ollama_command(name: str, folder: Path) -> str:
    return f"ollama create {name} -f {folder / MODELFILE}"


def run_ollama(name: str, modelfile_path: Path) -> None:
    result = subprocess.run(["ollama", "create", name, "-f", str(modelfile_path)], cwd=modelfile_path.parent, capture_output=True, text=True)
    if result.returncode != 0:
        raise ApplianceError(
            f"`ollama create {name}` failed (exit {result.returncode}); the export itself is complete.",
            "check that the Ollama server runs (`ollama serve`), then run the command again",
            details=(result.stderr or result.stdout).strip().splitlines()[-4:],
        )
