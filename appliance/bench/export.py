"""`appliance bench export`: one model or adapter exported at several GGUF types, each judged in
llama.cpp against the original; size, time and agreement per type, the gate ignored so that every
type gets its figures (the gates in appliance.export.QUANTS come from these). Nothing is kept."""

from __future__ import annotations

import shutil
from typing import Callable

from pydantic import BaseModel, ConfigDict

from appliance.export import MANIFEST, ExportMismatch, ExportSpec, export, export_dir, quant_of, resolve_source
from appliance.registry import ExportParity, Registry

DEFAULT_QUANTS = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


class ExportBenchRow(BaseModel):
    """One GGUF type: what the export measured, whether or not it passed its gate."""

    model_config = ConfigDict(extra="forbid")

    quant: str
    passed: bool
    failure: str | None  # the gate's message when it did not pass
    gguf_bytes: int  # every GGUF file of the export (an adapter's: its base's and the LoRA)
    files: dict[str, int]
    seconds: dict[str, float]
    parity: ExportParity


def compare_exports(registry: Registry, name: str, quants: tuple[str, ...] = DEFAULT_QUANTS,
                    progress: Callable[[str], None] = lambda _: None) -> list[ExportBenchRow]:
    source = resolve_source(registry, name)
    quants = tuple(quant_of(q).name for q in quants)  # a mistyped type fails before the first export, not after it
    rows = []
    for quant in quants:
        export_name = f"bench-export-{source.name}-{quant}"
        base_name = f"{source.model.name}-{quant}"
        base_existed = (export_dir(registry, base_name) / MANIFEST).is_file()
        progress(f"{name} → {quant}")
        try:
            manifest = export(registry, ExportSpec(name=name, quant=quant, overwrite=True, export_name=export_name), progress=progress).manifest
            parity, files, timings, failure = manifest.parity, manifest.files, manifest.timings, None
        except ExportMismatch as err:  # below the gate: still this type's figures
            parity, files, timings, failure = err.parity, err.files, err.timings, err.message
        finally:
            shutil.rmtree(export_dir(registry, export_name), ignore_errors=True)
            if source.adapter and not base_existed:  # a base export made for this run goes too
                shutil.rmtree(export_dir(registry, base_name), ignore_errors=True)
        rows.append(ExportBenchRow(
            quant=quant, passed=failure is None, failure=failure,
            gguf_bytes=sum(size for n, size in files.items() if n.endswith(".gguf")), files=files, seconds=timings, parity=parity,
        ))
    return rows
