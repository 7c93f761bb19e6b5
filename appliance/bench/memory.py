"""The live tensor memory of one real training step, part by part and moment by moment.

This is what the planner's model of our loop (appliance.plan.estimate) is measured
against. A GPU reports its peak with torch.cuda.max_memory_allocated(); a CPU has no such
counter (the process RSS mixes in the allocator's caches, the libraries and the Python
heap). Here a TorchDispatchMode sees every tensor an operator returns, counts each new
storage once, and stops counting it when it is freed: PyTorch keeps one Python object per
storage for as long as the storage lives, so a weak reference to it dies with the memory.
The tensors alive before the step (weights, adapters, optimizer states) are found by the
garbage collector and counted from the start. The sum over live storages is what a GPU's
caching allocator hands out for the same step, less its block rounding and the scratch
memory inside single kernels, which no operator returns (bitsandbytes' CPU dequantization,
attention's per-thread buffers).

What runs is the real step: `TrainingRun.build()` (bitsandbytes 4-bit layers, peft LoRA,
gradient checkpointing, the long-sequence levers) and `TrainingRun.train_step()` (packing
by `collate_lm`, the chunked loss, backward, clipping, the optimizer). Only the data step
is replaced: the micro-batch is random token ids of exact lengths, every token labelled
(as in continued pre-training), so the rows and their width are the ones the planner is
given. A first step runs unmeasured (AdamW creates its states there); the second is measured.

The step has four moments: the decoder's blocks (forward), the loss (from the final norm
until backward starts), backward (the autograd engine running, checkpointed blocks
recomputed) and the optimizer step (after backward: clipping, AdamW). The peak of each is
kept with what was alive then, attributed to the planner's parts; the planner models the
last three (appliance.plan.estimate, `moments`).
"""

from __future__ import annotations

import gc
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from appliance.bench.storages import MOMENTS, STATIC_PARTS, LiveStorages, Storage, _count_static
from appliance.errors import ApplianceError

GIB = 2**30
RUN_NAME = "memory-step"


@dataclass(frozen=True)
class StepCase:
    """What is measured: rows of `seq_len` tokens; packed rows hold two examples each."""

    seq_len: int
    rows: int = 1
    packed: bool = False
    rank: int = 16
    sets: tuple[str, ...] = ()  # --set overrides of the run (levers), applied last

    def lengths(self) -> list[int]:
        """Example lengths that collate_lm packs into exactly `rows` rows of `seq_len`.

        Packing (first fit, decreasing) makes rows as wide as the longest example, so the
        longest sits alone in the first row; each further row holds two halves. One such
        row is enough for transformers to treat the batch as packed and build the mask.
        """
        if not self.packed:
            return [self.seq_len] * self.rows
        if self.rows < 2 or self.seq_len % 2:
            raise ApplianceError(
                "A packed micro-batch needs at least 2 rows of an even width (the longest example fills the first row alone).",
                "use --rows 2 or more and an even --seq-len, or drop --packed",
            )
        return [self.seq_len] + [self.seq_len // 2] * (2 * (self.rows - 1))


def _run_config(model_name: str, case: StepCase, items: int):
    from appliance.config import load_run_config

    defaults = [
        "model.compute_dtype=bfloat16",  # the planner counts a bf16 stream, as on a GPU
        "model.gradient_checkpointing=true",  # what a GPU run uses (auto is on there)
        "lora.dropout=0",
        f"lora.alpha={case.rank}",
    ]
    return load_run_config(
        "cpt",
        sets=[*defaults, *case.sets],
        flags={
            "model": {"name": model_name},
            "lora": {"rank": case.rank},
            "data": {"files": [], "seq_len": case.seq_len, "val": 0, "test": 0, "dedupe": False},
            "train": {"steps": 2, "batch_size": items, "lr": 1e-4, "warmup": 0, "schedule": "constant", "seed": 0,
                      "eval_every": 0, "save_every": 0, "packing": True},
        },
    )


def _random_data(cfg, model_dir: Path, lengths: list[int]):
    """(data, pad id): random token ids of exact lengths, every token labelled (the data step's output)."""
    from appliance.data import DataReport, PreparedData
    from appliance.data import Encoded
    from appliance.data import TokenizedExample
    from appliance.hf import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    vocab = min(len(tokenizer), json.loads((model_dir / "config.json").read_text())["vocab_size"])
    g = torch.Generator().manual_seed(0)
    items = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        items.append(Encoded(0, i, TokenizedExample(ids, list(ids))))
    return PreparedData(cfg.task, items, [], [], DataReport(sources=[])), tokenizer.pad_token_id


def _hook_moments(run, counter: LiveStorages) -> list[Any]:
    """The decoder's blocks are the forward moment; from its final norm to backward, the loss
    (the planner counts the final norm's tensors with the loss's); then the optimizer step."""
    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    decoder = base.get_decoder()

    def forward_starts(*_: Any) -> None:
        if torch._C._current_graph_task_id() == -1:
            counter.moment = "forward"

    def loss_starts(*_: Any) -> None:
        if torch._C._current_graph_task_id() == -1:
            counter.moment = "loss"

    def optimizer_starts(*_: Any) -> None:
        counter.moment = "optimizer"
        for param in run.adapter_params.values():
            if param.grad is not None and (record := counter.record_of(param.grad)) is not None:
                record.part = "lora_gradients"

    return [
        decoder.register_forward_pre_hook(forward_starts),
        decoder.norm.register_forward_pre_hook(loss_starts),
        run.optimizer.register_step_pre_hook(optimizer_starts),
    ]


def _attribute(alive: list[Storage], width: int) -> dict[str, int]:
    """Bytes alive at a peak by the planner's parts."""
    parts = {name: 0 for name in (*STATIC_PARTS, "lora_gradients", "packed_mask", "activations", "logits_and_loss")}
    for s in alive:
        if s.part != "step":
            parts[s.part] += s.nbytes
        elif len(s.shape) == 4 and s.shape[-2:] == (width, width):  # (rows, 1, W, W): the packed-sequence mask
            parts["packed_mask"] += s.nbytes
        elif s.moment == "loss":
            parts["logits_and_loss"] += s.nbytes
        elif s.moment in ("after_backward", "optimizer"):  # gradient clipping's norms, AdamW's step
            parts["optimizer_states"] += s.nbytes
        else:
            parts["activations"] += s.nbytes
    return parts


LARGEST = 12  # groups of storages listed at each peak


def _largest(alive: list[Storage], limit: int | None = None) -> list[dict[str, Any]]:
    """The biggest groups of same-shaped storages alive at a peak: what a reader checks the parts by."""
    groups: dict[tuple, list[int]] = {}
    for s in alive:
        groups.setdefault((s.part, s.moment, s.op, s.shape, s.dtype), []).append(s.nbytes)
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[: limit or LARGEST]
    return [
        {"part": k[0], "allocated_in": k[1], "op": k[2], "shape": list(k[3]), "dtype": k[4], "count": len(v), "mib": round(sum(v) / 2**20, 2)}
        for k, v in rows
    ]


@dataclass
class StepMemory:
    """One measured step: the peak of each moment with its parts, and the settings the planner is given."""

    model: str
    case: StepCase
    device: str
    dtype: str
    settings: dict[str, Any]  # appliance.plan.TrainSettings of what ran
    moments: dict[str, dict[str, Any]]  # moment → {"gib", "parts": {part: gib}, "largest": [...]}
    peak_moment: str
    peak_gib: float
    cuda_peak_gib: float | None
    loss: float
    step_s: float
    setup_s: float
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "case": {"seq_len": self.case.seq_len, "rows": self.case.rows, "packed": self.case.packed, "rank": self.case.rank,
                     "sets": list(self.case.sets), "example_lengths": self.case.lengths()},
            "device": self.device,
            "dtype": self.dtype,
            "settings": self.settings,
            "peak_moment": self.peak_moment,
            "peak_gib": self.peak_gib,
            "cuda_peak_gib": self.cuda_peak_gib,
            "moments": self.moments,
            "loss": self.loss,
            "step_s": self.step_s,
            "setup_s": self.setup_s,
            "notes": self.notes,
        }


def measure_step(model_dir: Path, case: StepCase, *, name: str | None = None,
                 progress: Callable[[str], None] = lambda _: None) -> StepMemory:
    """Build the real run on the model in `model_dir`, take one step, measure the next."""
    from appliance.plan import settings_from_config
    from appliance.registry import Registry
    from appliance.store import Store
    from appliance.train import TrainingRun
    from appliance.hf import quiet_libraries

    name = name or model_dir.name
    lengths = case.lengths()
    cfg = _run_config(name, case, len(lengths))
    progress(f"loading {name} in 4-bit with LoRA r{case.rank}")
    started = time.time()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as scratch:  # the run writes nothing, but its folders need a store
        run = TrainingRun(cfg, Registry(Store(Path(scratch))), RUN_NAME)
        run.build(model_dir, *_random_data(cfg, model_dir, lengths))
    setup_s = time.time() - started
    batch = run.objective.collate([e.item for e in run.data.train])
    got = tuple(batch.tensors["input_ids"].shape)
    if got != (case.rows, case.seq_len):
        raise RuntimeError(f"the micro-batch packed into {got}, not {(case.rows, case.seq_len)}")
    run.model.train()
    progress("a first step (AdamW creates its states)")
    run.train_step()
    run.optimizer.zero_grad(set_to_none=True)
    gc.collect()

    counter = LiveStorages(run.device)
    _count_static(counter, run.model, run.optimizer)
    hooks = _hook_moments(run, counter)
    if run.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    progress("the measured step")
    started = time.time()
    try:
        with counter:
            figures = run.train_step()
    finally:
        for hook in hooks:
            hook.remove()
    step_s = time.time() - started
    cuda_peak = torch.cuda.max_memory_allocated() / GIB if run.device == "cuda" else None

    moments = {}
    for moment in MOMENTS:
        if moment not in counter.peaks:
            continue
        nbytes, event = counter.peaks[moment]
        alive = counter.alive_at(event)
        moments[moment] = {
            "gib": nbytes / GIB,
            "parts": {k: v / GIB for k, v in _attribute(alive, case.seq_len).items()},
            "largest": _largest(alive),
        }
    peak_moment = max(moments, key=lambda m: moments[m]["gib"])

    settings = settings_from_config(cfg).model_copy(
        update={
            "batch_size": case.rows,  # the planner's rows of seq_len (packing fits 2·rows − 1 examples into them)
            "gradient_checkpointing": run.gradient_checkpointing,
            "optimizer": run.optimizer_name,
            "offload_activations": cfg.model.offload_activations and run.device == "cuda",
            "packed": case.packed,
        }
    )
    notes = [
        "live tensor storages counted at every operator's output (TorchDispatchMode) and freed by weak reference; "
        "scratch memory inside single kernels is not counted",
        "the first step ran unmeasured (optimizer states created); the second is measured",
    ]
    if cfg.model.offload_activations and run.device != "cuda":
        notes.append("model.offload_activations is CUDA-only: on CPU the checkpointed inputs stay where they are (no-op)")
    if run.device == "cpu":
        notes.append(f"optimizer {run.optimizer_name}: paged 8-bit AdamW needs CUDA")
    del run, batch
    gc.collect()
    return StepMemory(
        model=name,
        case=case,
        device=run_device_name(),
        dtype="bfloat16",
        settings=settings.model_dump(mode="json"),
        moments=moments,
        peak_moment=peak_moment,
        peak_gib=moments[peak_moment]["gib"],
        cuda_peak_gib=cuda_peak,
        loss=round(float(figures["loss"]), 4),
        step_s=round(step_s, 1),
        setup_s=round(setup_s, 1),
        notes=notes,
    )


def run_device_name() -> str:
    from appliance.hardware import detect

    hw = detect()
    return f"cuda ({hw.name})" if hw.device == "cuda" else f"cpu ({platform.machine()}, bf16 {'native' if hw.bf16 else 'emulated'})"


# -- a model of a real shape with random weights -------------------------------------------------


# -- against the planner ---------------------------------------------------------------------

PART_TOLERANCE = 0.15  # the planner's tolerance, part by part and in total
SMALL_PART = 0.02  # parts under this share of a moment's total are held to it in absolute terms


@dataclass
class PartCheck:
    planned_gib: float
    measured_gib: float

    @property
    def error(self) -> float | None:
        """Relative error; None where less than a KiB was measured (a scalar or two: no ratio to speak of)."""
        return (self.planned_gib - self.measured_gib) / self.measured_gib if self.measured_gib * GIB >= 1024 else None

    def within(self, total_gib: float) -> bool:
        """Within PART_TOLERANCE, or, for a part under SMALL_PART of the total, within SMALL_PART of the total."""
        if max(self.planned_gib, self.measured_gib) < SMALL_PART * total_gib:
            return abs(self.planned_gib - self.measured_gib) <= SMALL_PART * total_gib
        return self.error is not None and abs(self.error) <= PART_TOLERANCE


def compare(result: dict[str, Any]) -> dict[str, dict[str, PartCheck]]:
    """A saved measurement (StepMemory.as_dict()) against today's planner: moment → part → check.

    The part "total" is the moment's whole; the measured "other_tensors" (buffers such as RoPE's
    frequencies) has no planned counterpart and counts in the total only.
    """
    from appliance.plan import GpuProfile, ModelShape, TrainSettings, estimate

    shape = ModelShape.model_validate(result["shape"])
    # The planner's allocated figures do not depend on the card; a CPU has none.
    host = GpuProfile(name="host", vram_gib=1024, bf16=True)
    planned = estimate(shape, host, TrainSettings.model_validate(result["settings"]), "appliance").moments
    checks: dict[str, dict[str, PartCheck]] = {}
    for moment, plan_parts in planned.items():
        measured = result["moments"].get(moment)
        if measured is None:
            continue
        names = [n for n in dict.fromkeys([*plan_parts, *measured["parts"]]) if n != "other_tensors"]
        checks[moment] = {n: PartCheck(plan_parts.get(n, 0.0), measured["parts"].get(n, 0.0)) for n in names}
        checks[moment]["total"] = PartCheck(sum(plan_parts.values()), measured["gib"])
    return checks


def misses(result: dict[str, Any]) -> list[str]:
    """Every part of every moment where the planner misses the measurement: empty when it holds."""
    out = []
    for moment, parts in compare(result).items():
        total = parts["total"].measured_gib
        for name, check in parts.items():
            if not check.within(total):
                error = f"{check.error:+.1%}" if check.error is not None else "measured 0"
                out.append(f"{moment} {name}: planned {check.planned_gib:.3f} GiB, measured {check.measured_gib:.3f} GiB ({error})")
    return out


def run_memory_bench(
    case: StepCase, *, shape: str | None = None, model_dir: Path | None = None, name: str | None = None,
    cache: Path, progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """One measured step of a profile's shape (random weights) or of a model folder, with the plan beside it."""
    from appliance.plan import find_model, shape_from_config

    if shape is not None:
        model_shape = find_model(shape)
        from appliance.bench.shapes import shape_folder

        model_dir, name = shape_folder(model_shape.name, cache, progress), model_shape.name
    elif model_dir is not None:
        name = name or model_dir.name
        model_shape = shape_from_config(name, json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    else:
        raise ValueError("measure a shape or a model folder")
    measured = measure_step(model_dir, case, name=name, progress=progress)
    result = {**measured.as_dict(), "shape": model_shape.model_dump(mode="json")}
    checks = compare(result)
    result["planner"] = {
        moment: {part: {"planned_gib": c.planned_gib, "measured_gib": c.measured_gib, "error": c.error} for part, c in parts.items()}
        for moment, parts in checks.items()
    }
    result["planner_misses"] = misses(result)
    return result


def measurements(result: dict[str, Any], env: dict[str, Any]) -> list[dict[str, Any]]:
    """On a GPU, the step's torch.cuda.max_memory_allocated() as a measurement the planner is tested
    against (bench/results/README.md); a CPU measurement has its own file format and none."""
    if result["cuda_peak_gib"] is None:
        return []
    from appliance.results import measurement

    return [measurement(env, gpu=env["gpu"], model=result["model"], loop="appliance", settings=result["settings"],
                        peak_gib=round(result["cuda_peak_gib"], 3),
                        notes=f"appliance bench memory: one measured step, {result['case']['rows']} × {result['case']['seq_len']} tokens, random weights")]
