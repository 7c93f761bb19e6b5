"""Peak GPU memory of a training step, part by part, at the moments that can be the peak.

Memory is modelled part by part for two training loops:
- `appliance`, ours (appliance/train): frozen weights stay 16-bit (linear layers 4-bit),
  and the loss never holds full logits: it computes them 64 MiB at a time, only at
  labelled positions (appliance/metrics/lm.py).
- `peer`, the loop every tutorial writes (transformers + peft + bitsandbytes):
  `prepare_model_for_kbit_training` casts every weight that is not 4-bit (embeddings,
  norms, head) to fp32, which makes the residual stream and the logits fp32 too, and
  transformers' loss holds the full logits, their log-softmax and two gradients of that
  size at once.
A step's peak is the largest of three moments: the loss (logits at their widest), the
backward pass through one block (its activations recomputed, gradients in flight) and the
optimizer step (every gradient). The peak is compared with the memory the driver leaves
usable on the card, which is less than the box says (profiles/gpus `usable_gib`).

Checked against measurements: the peer loop's GPU peaks in bench/results
(tests/test_plan.py), and our loop part by part and moment by moment against the live
tensor bytes of real CPU steps (`appliance bench memory`, bench/results/memory-*.json,
tests/test_memory.py).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import BaseModel, Field, computed_field

from appliance.config import sequences_per_example
from appliance.plan.constants import (
    ABSMAX_BITS,
    ALLOCATOR_SLACK,
    ATTENTION_MODULES,
    CPU_PROCESS_GIB,
    CUBLAS_WORKSPACE_GIB,
    CUDA_CONTEXT_GIB,
    DOUBLE_QUANT_BITS,
    FIT_MARGIN,
    GIB,
    LINEAR_MODULES,
    LOGITS_BUDGET_BYTES,
    MLP_MODULES,
    MODULE_INPUT,
    OPTIMIZER_STATE_BYTES,
    SEQ_STEP,
    Loop,
)
from appliance.plan.profiles import GpuProfile, ModelShape
from appliance.plan.settings import TrainSettings, check_settings, lora_targets


def _stream_bytes(settings: TrainSettings, loop: Loop) -> int:
    """Bytes per element of the residual stream and the activations around it.

    The peer loop's fp32 embeddings make the stream fp32, and bitsandbytes returns each
    4-bit layer's output in its input's dtype, so every activation stays fp32 there.
    """
    return 4 if loop == "peer" and settings.load_in_4bit else 2


def _rows(settings: TrainSettings) -> int:
    """Sequences per micro-batch: a DPO example is a chosen and a rejected answer, a KTO one its answer and a mismatched one,
    a GRPO prompt its sampled answers."""
    return settings.batch_size * sequences_per_example(settings.task, settings.group_size)


def lora_parameters(shape: ModelShape, settings: TrainSettings) -> int:
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(settings.rank * sum(shapes[m]) for m in lora_targets(settings))


def _linear_parameters(shape: ModelShape) -> int:
    return shape.num_hidden_layers * sum(i * o for i, o in shape.linear_shapes().values())


def _kept_parameters(shape: ModelShape) -> int:
    """Weights that are never quantized: embeddings, the head when untied, the RMSNorms."""
    matrices = 1 if shape.tie_word_embeddings else 2
    return matrices * shape.vocab_size * shape.hidden_size + (2 * shape.num_hidden_layers + 1) * shape.hidden_size


def _lora_kept_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop, modules: list[str]) -> float:
    """Bytes per token LoRA keeps for backward on those of `modules` it adapts."""
    targets = [m for m in lora_targets(settings) if m in modules]
    shapes = shape.linear_shapes()
    a = _stream_bytes(settings, loop)
    if a == 4 or (loop == "appliance" and settings.lora_shared_inputs):
        # Each LoRA matmul keeps the layer's own input tensor, shared by the layers that read it
        # (a fp32 stream needs no cast; appliance.train.lora keeps a 16-bit input uncast).
        kept = a * sum({MODULE_INPUT[m]: shapes[m][0] for m in targets}.values())
    else:
        # bf16 stream: peft casts the input to the adapter's fp32 once per adapted layer, and keeps each copy.
        kept = 4 * sum(shapes[m][0] for m in targets)
    return kept + 4 * settings.rank * len(targets)  # lora_A outputs, for lora_B's weight gradient


def mlp_activation_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop) -> float:
    """Bytes per token one MLP keeps for backward: gate, up and silu(gate) (the SwiGLU
    product's inputs), and LoRA's."""
    return 3 * _stream_bytes(settings, loop) * shape.intermediate_size + _lora_kept_bytes(shape, settings, loop, MLP_MODULES)


def layer_activation_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop) -> float:
    """Bytes per token one decoder layer keeps for its backward pass (with LoRA on its targets).

    Frozen base matmuls keep nothing (no weight gradient), so what stays is the elementwise
    work around them and LoRA's inputs.
    """
    a, h = _stream_bytes(settings, loop), shape.hidden_size
    kept = 2 * 4 * h  # each RMSNorm keeps its input upcast to fp32
    # SDPA keeps q after RoPE, k and v, its output and an fp32 log-sum-exp per head. transformers
    # repeats k and v to every head when SDPA gets a mask; without one our bf16 SDPA reads them
    # grouped (enable_gqa).
    kv = shape.kv_width if loop == "appliance" and not packed_mask(settings) else shape.attention_width
    kept += a * (shape.attention_width + 2 * kv) + 4 * shape.num_attention_heads
    # Its output is o_proj's input: LoRA with shared inputs keeps that very storage (flash and
    # memory-efficient kernels write it token-major, so no copy is made; measured).
    if not (loop == "appliance" and settings.lora_shared_inputs and "o_proj" in lora_targets(settings)):
        kept += a * shape.attention_width
    kept += _lora_kept_bytes(shape, settings, loop, ATTENTION_MODULES)
    return kept + mlp_activation_bytes(shape, settings, loop)


def _dequantized_bytes(shape: ModelShape, settings: TrainSettings, modules: list[str]) -> float:
    """bitsandbytes dequantizes a 4-bit layer's weight to bf16 for each matmul: the widest of `modules`."""
    if not settings.load_in_4bit:
        return 0.0
    return 2 * max(i * o for m, (i, o) in shape.linear_shapes().items() if m in modules)


def _mlp_backward(shape: ModelShape, settings: TrainSettings, loop: Loop, tokens: int) -> float:
    """Bytes of the MLP's gradients in flight over `tokens`, the widest part of a layer's backward.

    Ours (measured, bench/results/memory-*): down_proj's input gradient comes from two branches
    the autograd engine runs one after the other: LoRA's (an fp32 gradient and its cast to the
    stream's dtype), then the base layer's (its gradient beside LoRA's, and the weight
    dequantized for the matmul), by which time LoRA's backward has freed the input it kept.
    The peer's: the fp32 gradient of LoRA's input copy and two of the stream's, with a
    dequantized weight.
    """
    a, i = _stream_bytes(settings, loop), shape.intermediate_size
    if loop == "peer":
        return tokens * (4 + 2 * a) * i + _dequantized_bytes(shape, settings, LINEAR_MODULES)
    dequantized = _dequantized_bytes(shape, settings, MLP_MODULES)
    if "down_proj" not in lora_targets(settings):
        return tokens * a * i + dequantized
    lora_branch = tokens * (4 + a) * i
    kept_input = (a if settings.lora_shared_inputs else 4) * i  # what LoRA kept of down_proj's input, per token
    base_branch = tokens * (2 * a * i - kept_input) + dequantized
    return max(lora_branch, base_branch)


def _attention_backward(shape: ModelShape, settings: TrainSettings, loop: Loop, tokens: int) -> float:
    """Bytes of attention's gradients in flight: q, k and v (k and v repeated to every head) and
    the fp32 gradient of LoRA's input copy, with a dequantized weight. Narrower than the MLP's,
    so it sets the peak only once the MLP is tiled."""
    per_token = 3 * _stream_bytes(settings, loop) * shape.attention_width + 4 * shape.hidden_size
    return tokens * per_token + _dequantized_bytes(shape, settings, ATTENTION_MODULES)


def _residual_backward_bytes(shape: ModelShape, settings: TrainSettings, loop: Loop) -> float:
    return (_stream_bytes(settings, loop) + 4) * shape.hidden_size


def packed_mask(settings: TrainSettings) -> bool:
    """Whether transformers materialises the (rows, 1, W, W) mask: rows packed with several examples
    or padded (appliance.data.batches.collate_lm restarts position ids there), which happens as soon
    as a micro-batch's examples differ in length. One example per row, all full, needs none."""
    if settings.packed is not None:
        return settings.packed
    return _rows(settings) > 1 and settings.task != "cpt"


def _tiled(settings: TrainSettings) -> bool:
    """Whether the MLP runs in more than one tile (a shorter micro-batch is one tile: untiled)."""
    return settings.mlp_tile_tokens is not None and settings.mlp_tile_tokens < _rows(settings) * settings.seq_len


def chunk_rows(vocab_size: int) -> int:
    """Positions whose logits the appliance's loss holds at once (appliance.metrics.lm.chunk_rows)."""
    return max(64, LOGITS_BUDGET_BYTES // (4 * vocab_size))


class Part(BaseModel):
    gib: float
    what: str
    allocated: bool = Field(True, description="handed out by PyTorch's allocator (what torch.cuda.max_memory_allocated() counts)")


class Estimate(BaseModel):
    """Peak GPU memory of one training step, by part."""

    model: str
    gpu: str
    loop: Loop
    settings: TrainSettings
    parts: dict[str, Part]
    peak_moment: Literal["loss", "backward", "optimizer"] = Field(description="when the peak happens: at the loss, in a block's backward, or at the optimizer step")
    moments: dict[str, dict[str, float]] = Field(
        description="what PyTorch allocates at each moment (loss, backward, optimizer), GiB by part; the peak moment's are `parts`"
    )
    device: Literal["cuda", "cpu"] = "cuda"
    gpu_gib: float = Field(description="the memory the plan compares with: what the driver reports usable, less what others hold")
    nominal_gib: float = Field(description="the memory on the box")
    held_gib: float = Field(0.0, description="held by other processes when planned (the detected GPU)")

    @computed_field
    @property
    def total_gib(self) -> float:
        return sum(p.gib for p in self.parts.values())

    @computed_field
    @property
    def allocated_gib(self) -> float:
        """What torch.cuda.max_memory_allocated() reports: the total without the context, the slack and paged states."""
        return sum(p.gib for p in self.parts.values() if p.allocated)

    @computed_field
    @property
    def margin_gib(self) -> float:
        """What must stay free for a plan to count as fitting (FIT_MARGIN of the usable memory)."""
        return FIT_MARGIN * self.gpu_gib

    host_load_gib: float = Field(
        0.0, description="host memory a rank holds while it loads under FSDP: the whole 4-bit base, quantized in host "
        "memory before it is sharded (the ranks of a machine load in turn)"
    )

    @computed_field
    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_gib - self.margin_gib


def estimate(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, loop: Loop = "appliance") -> Estimate:
    """Peak memory of a training step of `shape` with `settings` on `gpu`.

    Three moments are modelled, each with what is alive then: the loss (the model's forward
    done, the logits at their widest), the backward of the top block (one block recomputed, its
    gradients in flight) and the optimizer step (every gradient). The peak is the largest.
    """
    check_settings(shape, settings)
    s, a = settings, _stream_bytes(settings, loop)
    h, layers = shape.hidden_size, shape.num_hidden_layers
    tokens = _rows(s) * s.seq_len
    static: dict[str, Part] = {}

    linear = _linear_parameters(shape)
    if s.load_in_4bit:
        bits = 4 + (DOUBLE_QUANT_BITS if s.double_quant else ABSMAX_BITS)
        quant = "double-quantized constants" if s.double_quant else "fp32 constants"
        static["linear_weights"] = Part(gib=linear * bits / 8 / GIB, what=f"linear layers in 4-bit NF4 + {quant}")
    else:
        static["linear_weights"] = Part(gib=2 * linear / GIB, what="linear layers in 16-bit")
    whole_linear = static["linear_weights"].gib
    if s.fsdp and s.data_parallel > 1:
        # Each GPU keeps 1/N of every layer; a layer's weights are gathered whole for its forward and
        # backward, and FSDP prefetches the next one's meanwhile: two layers whole at a time.
        per_layer = whole_linear / layers
        static["linear_weights"] = Part(
            gib=whole_linear / s.data_parallel + 2 * per_layer,
            what=f"{static['linear_weights'].what}, sharded between {s.data_parallel} GPUs (FSDP), two layers gathered whole",
        )
    kept_dtype = "fp32 (prepare_model_for_kbit_training casts them)" if a == 4 else "bf16"
    head = "" if shape.tie_word_embeddings else ", head"
    static["kept_weights"] = Part(gib=a * _kept_parameters(shape) / GIB, what=f"embeddings{head}, norms in {kept_dtype}")

    adapters = lora_parameters(shape, s)
    targets = lora_targets(s)
    static["lora_weights"] = Part(
        gib=4 * adapters / GIB, what=f"LoRA r{s.rank} on {len(targets)} linear layers in each of {layers} blocks, fp32 ({adapters / 1e6:.1f} M parameters)"
    )
    if s.data_parallel > 1:
        static["allreduce_buffer"] = Part(
            gib=4 * adapters / GIB, what=f"torchrun over {s.data_parallel} GPUs: the adapter's gradients flattened for one all-reduce a step"
        )
    states = OPTIMIZER_STATE_BYTES[s.optimizer] * adapters / GIB
    if s.optimizer == "paged_adamw_8bit":
        # bitsandbytes allocates paged states in CUDA unified memory, outside PyTorch's allocator
        # (max_memory_allocated never counts them). They sit in GPU memory while it has room: the
        # driver moves pages to CPU memory only under pressure, and not at all under WSL2. So they
        # count against the card, not in what PyTorch reports.
        static["optimizer_states"] = Part(
            gib=states, allocated=False, what="paged 8-bit AdamW: in GPU memory while it fits, outside PyTorch's allocator"
        )
    else:
        kind = "8-bit" if s.optimizer == "adamw_8bit" else "fp32"
        static["optimizer_states"] = Part(gib=states, what=f"AdamW, two {kind} states per LoRA parameter")

    # Gradients are set to None after each optimizer step: with one micro-batch per step none
    # exist at the loss, and backward creates them block by block from the top.
    grads = 4 * adapters
    accumulating = s.grad_accum > 1
    grads_what = "their gradients, fp32"

    mask, mask_in_backward = 0.0, 0.0
    if packed_mask(s):
        # transformers' SDPA path builds one (rows, 1, W, W) bool mask per forward (kept to the end
        # of backward); each attention call turns it into an additive mask in the compute dtype,
        # which SDPA keeps for its backward: one more, in the recomputed block (measured).
        mask, mask_in_backward = _rows(s) * s.seq_len**2, a * _rows(s) * s.seq_len**2
    mask_what = f"the packed-sequence mask transformers builds, {_rows(s)} × {s.seq_len}² bool"

    # What a block keeps for all its tokens, and what its backward holds beyond that.
    block = tokens * layer_activation_bytes(shape, s, loop)
    transient = tokens * _residual_backward_bytes(shape, s, loop)
    if _tiled(s):
        # The tiled MLP keeps only its input; one tile at a time is recomputed and backpropagated.
        block += tokens * (a * h - mlp_activation_bytes(shape, s, loop))
        mlp_tile = s.mlp_tile_tokens * mlp_activation_bytes(shape, s, loop) + _mlp_backward(shape, s, loop, s.mlp_tile_tokens)
        transient += max(mlp_tile, _attention_backward(shape, s, loop, tokens))
        mlp_what = f", MLPs {s.mlp_tile_tokens} tokens at a time"
    else:
        transient += _mlp_backward(shape, s, loop, tokens)
        mlp_what = ""
    if s.gradient_checkpointing:
        stored, stored_what = tokens * a * h * layers, f"each block's input, kept for the recompute ({layers} × {tokens} tokens × {h})"
        in_backward, backward_what = block + transient, f"one block recomputed in backward{mlp_what}"
        if s.offload_activations:
            stored, stored_what = 0.0, f"block inputs offloaded to CPU memory ({tokens * a * h * layers / GIB:.2f} GiB there)"
            in_backward += tokens * a * h  # the recomputed block's input, brought back
            backward_what += " from its input brought back"
    else:
        stored, stored_what = layers * block, f"all {layers} blocks' activations{mlp_what}"
        in_backward, backward_what = transient, "none recomputed"

    loss, held_logits, loss_what = _loss_bytes(shape, s, loop, tokens, a)
    # The backward's widest moment: at the top block (every stored input, one block's gradients),
    # or, when a block's gradients outweigh its stored input, at the bottom one (every gradient).
    top = stored + grads / layers
    bottom = stored / layers + grads
    at_top = accumulating or top >= bottom
    backward_grads = grads if accumulating or not at_top else grads / layers
    backward_stored = stored if at_top else stored / layers

    def moment_parts(moment: str) -> dict[str, Part]:
        parts = dict(static)
        if moment == "loss":
            parts["lora_gradients"] = Part(gib=grads / GIB if accumulating else 0.0, what=grads_what + (
                ", from the micro-batches before" if accumulating else ": none yet (set to None after each step)"))
            parts["packed_mask"] = Part(gib=mask / GIB, what=mask_what)
            parts["activations"] = Part(gib=stored / GIB, what=stored_what)
            parts["logits_and_loss"] = Part(gib=loss / GIB, what=loss_what)
        elif moment == "backward":
            where = "" if accumulating else (": the top block's" if at_top else ": all, at the bottom block")
            parts["lora_gradients"] = Part(gib=backward_grads / GIB, what=grads_what + where)
            parts["packed_mask"] = Part(gib=(mask + mask_in_backward) / GIB, what=mask_what + ", and its additive copy in the recomputed block")
            parts["activations"] = Part(gib=(backward_stored + in_backward) / GIB, what=f"{stored_what}; {backward_what}, gradients in flight")
            freed = f"{loss_what}: {loss / GIB:.2f} GiB at the loss, freed before"
            parts["logits_and_loss"] = Part(gib=held_logits / GIB, what="the logits, still held by the model's output" if held_logits else freed)
        else:
            parts["lora_gradients"] = Part(gib=grads / GIB, what=grads_what + ": all of them")
            parts["packed_mask"] = Part(gib=0.0, what="freed with the step's activations")
            # With checkpointing, transformers makes the embeddings' output require a gradient (the
            # recomputed blocks need an input that does); the graph keeps it and its gradient to the
            # step's end (measured).
            leaf = 2 * tokens * a * h if s.gradient_checkpointing else 0.0
            parts["activations"] = Part(gib=leaf / GIB, what="the embeddings' output and its gradient" if leaf else "freed after backward")
            parts["logits_and_loss"] = Part(gib=0.0, what="freed after backward")
        if not packed_mask(s):
            del parts["packed_mask"]
        return parts

    moments = {m: moment_parts(m) for m in ("loss", "backward", "optimizer")}
    allocated = {m: sum(p.gib for p in parts.values() if p.allocated) for m, parts in moments.items()}
    moment = max(allocated, key=allocated.get)
    parts = dict(moments[moment])
    if gpu.device == "cuda":
        parts["cuda_context"] = Part(gib=CUDA_CONTEXT_GIB, allocated=False, what="CUDA context and kernels, outside PyTorch's allocator")
        parts["cublas_workspace"] = Part(gib=CUBLAS_WORKSPACE_GIB, what="cuBLAS workspaces (the step's thread and backward's)")
    else:
        parts["process"] = Part(gib=CPU_PROCESS_GIB, allocated=False, what="the process: Python, torch, transformers, peft, bitsandbytes")
    parts["allocator_slack"] = Part(
        gib=ALLOCATOR_SLACK * allocated[moment], allocated=False, what=f"allocator slack: reserved, unused blocks ({ALLOCATOR_SLACK:.0%})"
    )
    return Estimate(
        model=shape.name,
        gpu=gpu.name,
        loop=loop,
        settings=s,
        parts=parts,
        peak_moment=moment,
        moments={m: {name: p.gib for name, p in ps.items() if p.allocated} for m, ps in moments.items()},
        device=gpu.device,
        gpu_gib=gpu.usable,
        nominal_gib=gpu.vram_gib,
        held_gib=gpu.held_gib,
        # bitsandbytes quantizes one 16-bit weight at a time: the widest, an MLP projection, is the transient.
        host_load_gib=(whole_linear + static["kept_weights"].gib + static["lora_weights"].gib + 2 * h * shape.intermediate_size / GIB)
        if s.fsdp and s.data_parallel > 1 else 0.0,
    )


def _loss_bytes(shape: ModelShape, s: TrainSettings, loop: Loop, tokens: int, a: int) -> tuple[float, float, str]:
    """(bytes at the loss, logits bytes still held during backward, what they are)."""
    h, vocab = shape.hidden_size, shape.vocab_size
    if s.task == "classify":
        return 0.0, 0.0, "a classification head: a few logits per example"
    if loop == "peer":
        # The output keeps the logits (in the head's dtype); cross-entropy's backward holds the
        # fp32 log-softmax, its gradient and the logits' gradient at once. Plus the final norm's tensors.
        loss = tokens * vocab * (a + 3 * 4) + tokens * (4 + a) * h
        return loss, tokens * vocab * a, f"full logits, {tokens} × {vocab}: the logits, their log-softmax and two gradients"
    rows = min(tokens, chunk_rows(vocab))
    # fp32 logits of a chunk, their shifted copy and the softmax. The loop of
    # appliance.metrics.lm keeps the softmax of one chunk until the next chunk's replaces it,
    # so from the second chunk on, the previous chunk's is alive beside the three (measured).
    second = min(rows, tokens - rows)
    chunks = 4 * vocab * max(3 * rows, rows + 3 * second)
    # The final hidden states, the norm's fp32 input, the labelled rows and their gradient.
    loss = chunks + 10 * tokens * h
    return loss, 0.0, f"logits of {rows} positions at a time, never the full {tokens} × {vocab}"


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in 1..high with fits(n), 0 if none (memory only grows with n)."""
    if fits(high):
        return high
    low = 0  # fits(low) or low == 0; not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _with(settings: TrainSettings, **changes: Any) -> TrainSettings:
    return TrainSettings.model_validate({**settings.model_dump(), **changes})


def max_seq_len(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, loop: Loop = "appliance") -> int:
    """The longest sequence that fits: the whole context, else a multiple of SEQ_STEP (0: none)."""
    context = shape.max_position_embeddings
    if estimate(shape, gpu, _with(settings, seq_len=context), loop).fits:
        return context
    steps = _largest(lambda n: estimate(shape, gpu, _with(settings, seq_len=n * SEQ_STEP), loop).fits, context // SEQ_STEP)
    return steps * SEQ_STEP


def max_batch_size(shape: ModelShape, gpu: GpuProfile, settings: TrainSettings, loop: Loop = "appliance", limit: int = 1024) -> int:
    """The largest micro-batch that fits at the settings' sequence length (0: not even one)."""
    return _largest(lambda b: estimate(shape, gpu, _with(settings, batch_size=b), loop).fits, limit)


