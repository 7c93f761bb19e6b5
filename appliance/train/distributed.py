"""Data-parallel training under torchrun: which rank this process is, and what ranks share.

`appliance train --nproc-per-node N` starts N copies of the same run through PyTorch's own
launcher (torch.distributed.run, what `torchrun` is). Every rank holds the whole 4-bit base
and its own copy of the adapter; each takes its share of every global micro-batch, and after
backward the adapter's gradients are summed across ranks (one all-reduce per optimizer step,
what DistributedDataParallel does, done once per step rather than hooked into backward so
that gradual unfreezing and gradient checkpointing need nothing special). The loss of each
rank is divided by the tokens of the whole global batch, so the summed gradient is the one a
single process would get from the same global batch. Rank 0 alone draws the dashboard and
writes metrics, checkpoints and the adapter.

With `--fsdp` the base's decoder layers are also sharded between the ranks (PyTorch's FSDP2,
`fully_shard` on each layer): each rank keeps 1/N of every layer's frozen weights, 4-bit ones
included, and a layer's weights are gathered for its forward and backward only (bitsandbytes puts a
gathered 4-bit weight's quantization state back from its module). Embeddings and the output head
stay whole on every rank. The adapter is left out of the sharding: it stays whole on every rank and
its gradients are summed as above, so the optimizer, checkpoints, exact resume and the saved adapter
are the data-parallel ones. So that a base too large for one card can train, a rank never holds the
whole of it on its GPU: it loads and quantizes the base in host memory (bitsandbytes' CPU path)
and shards it layer by layer (FSDP moves a layer to the GPU, keeps this rank's share and frees the
rest), then moves what stays whole (`place`). The ranks of one machine do this in turn
(`in_turn`), so the host holds one whole 4-bit base at a time.

On a GPU the ranks talk over NCCL, on a CPU over gloo (how the tests run it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from appliance.errors import ApplianceError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, indices: list[int]) -> list[int]:
        """This rank's part of a global micro-batch: every world-th example, none twice."""
        return indices[self.rank :: self.world]


def from_environment() -> Ranks:
    """The ranks torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; one process without them."""
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    world = int(os.environ["WORLD_SIZE"])
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world)))


# A collective that waits longer than this is taken for a hang. Loading in turn (`in_turn`) keeps
# the last rank of a machine waiting while the others load and quantize a whole base on the CPU:
# minutes each for a 70B model, more than NCCL's default ten.
PATIENT_TIMEOUT_MIN = 120


def start(ranks: Ranks, device: str, patient: bool = False) -> None:
    """Join the process group (NCCL between GPUs, gloo on CPUs); each rank on its own GPU.
    `patient`: collectives wait PATIENT_TIMEOUT_MIN before they fail (ranks that load in turn)."""
    if not ranks.distributed:
        return
    import torch
    import torch.distributed as dist

    if device == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ApplianceError(
                f"Rank {ranks.rank} needs GPU {ranks.local_rank}, but this machine shows {torch.cuda.device_count()}.",
                "give --nproc-per-node at most the number of GPUs (`nvidia-smi -L`)",
            )
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=PATIENT_TIMEOUT_MIN) if patient else None)


def stop(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def total(ranks: Ranks, values: list[float]) -> list[float]:
    """The sum of each value over all ranks."""
    if not ranks.distributed:
        return values
    import torch
    import torch.distributed as dist

    summed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(summed)
    return summed.tolist()


def sum_gradients(ranks: Ranks, params: list[Any]) -> None:
    """Sum each parameter's gradient over the ranks, in one flat all-reduce (a rank whose share
    of the batch was empty contributes zeros)."""
    if not ranks.distributed or not params:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(p.dtype)
        offset += n


def shard_base(model: Any) -> tuple[float, float]:
    """Shard the frozen weights of the decoder layers between the ranks, the adapter left whole;
    returns (MiB of the layers' frozen weights this rank holds, MiB of them in all).

    Only the layers: they hold nearly all of a large base, and the loss reads the embeddings and
    the output head directly (appliance.metrics.lm), outside any module's forward that would gather them."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    layers = _decoder_layers(model)
    trainable = {p for p in model.parameters() if p.requires_grad}

    def frozen_bytes(local: bool) -> int:
        params = [p for layer in layers for p in layer.parameters() if not p.requires_grad]
        return sum((p.to_local() if local and isinstance(p, DTensor) else p).numel() * p.element_size() for p in params)

    whole = frozen_bytes(local=False)
    for layer in layers:
        fully_shard(layer, ignored_params=trainable & set(layer.parameters()))
    return frozen_bytes(local=True) / 2**20, whole / 2**20


def load_sharded(ranks: Ranks, load: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """The model `load()` builds in host memory, its layers sharded and this rank's share on `device`,
    built by one rank of this machine at a time; with shard_base's (MiB held, MiB in all)."""

    def build():
        model = load()
        held, whole = shard_base(model)
        place(model, device)
        return model, held, whole

    return in_turn(ranks, build)


def in_turn(ranks: Ranks, build: Callable[[], T]) -> T:
    """`build()` on each rank of this machine one after the other (all machines at once): what each
    holds in host memory while it builds is freed before the next starts."""
    built = None
    for turn in range(ranks.local_world):
        if turn == ranks.local_rank:
            built = build()
        barrier(ranks)
    return built


def place(model: Any, device: str) -> None:
    """Move a model sharded in host memory to `device`: each rank's share of the layers, the
    adapter and what stays whole. bitsandbytes keeps a 4-bit weight's quantization state (block
    scales, code book) beside the weight, on its module; FSDP's move does not see it."""
    model.to(device)
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            state.to(device)


def _decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a transformers model (model.model.layers under peft's wrappers)."""
    import torch

    lists = [m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ApplianceError("--fsdp found no decoder layers to shard in this model.", "train it without --fsdp")
    return list(lists[0])


def gather(ranks: Ranks, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (small Python objects: RNG states)."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def lost_a_peer(ranks: Ranks, err: BaseException) -> bool:
    """Whether `err` is this rank's collective failing because another rank died: the launcher
    reports the rank that died; this one only has to leave without a traceback."""
    if not ranks.distributed:
        return False
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and ("gloo" in text or "NCCL" in text or "peer" in text))


def _collective_device() -> str:
    import torch
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
