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
stay whole on every rank. The adapter is left out of the
sharding: it stays whole on every rank and its gradients are summed as above, so the optimizer,
checkpoints, exact resume and the saved adapter are the data-parallel ones.

On a GPU the ranks talk over NCCL, on a CPU over gloo (how the tests run it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

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
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def start(ranks: Ranks, device: str) -> None:
    """Join the process group (NCCL between GPUs, gloo on CPUs); each rank on its own GPU."""
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
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


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
