"""The export itself: a model's GGUF, or an adapter's GGUF LoRA beside its base's, built under a temporary name and judged."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.export.check import adapter_of_merged, judge, probes_for
from appliance.export.convert import convert_lora, convert_model, converter_dir, quantize, require_llama_cpp, set_end_of_turn
from appliance.export.ollama import default_system_prompt, modelfile, ollama_command, run_ollama, stop_tokens, template_family
from appliance.export.sources import check_out_dir, default_export_name, export_dir, ollama_name, read_export, resolve_source
from appliance.export.spec import LOG, LORA_TYPE, MODELFILE, ExportMismatch, ExportSpec, Progress, Quant, quant_of
from appliance.registry import AdapterManifest, ExportManifest, ModelManifest, Registry
from appliance.store import MANIFEST, TMP_PREFIX, atomic_dir, atomic_write, check_name, disk_full_error, ensure_free_space, is_disk_full


def _bytes_needed(parameters: int, quant: Quant) -> int:
    # The converter's file plus the metadata writer's copy of it; quantized types start from f16.
    first = 2.0 if not quant.converter else quant.bytes_per_weight
    return int(parameters * (2 * first + (0 if quant.converter else quant.bytes_per_weight)))


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


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
    adapter, notes = adapter_of_merged(registry, model)
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
            ollama_create=ollama_command(model.name.lower(), folder), llama_cpp=_llama_cpp_version(), parity=judged.parity,
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
            ollama_create=ollama_command(adapter.name.lower(), folder), llama_cpp=_llama_cpp_version(), parity=judged.parity,
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
        result.ollama_create = ollama_command(ollama or source.name.lower(), out)
    if ollama:
        progress(f"ollama create {ollama}")
        run_ollama(ollama, (out or folder) / MODELFILE)
        result.ollama_ran = True
        result.ollama_create = ollama_command(ollama, out or folder)
    return result
