"""Counting live tensor storages: a TorchDispatchMode sees every tensor an operator returns,
counts each new storage once, and stops counting it when it is freed (PyTorch keeps one Python
object per storage for as long as the storage lives, so a weak reference to it dies with the
memory). What a GPU's max_memory_allocated() reports, on any device."""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MOMENTS = ("forward", "loss", "backward", "optimizer")
# Parts alive from before the step (found by the garbage collector) and what they are.
STATIC_PARTS = ("linear_weights", "kept_weights", "lora_weights", "optimizer_states", "other_tensors")


class Storage:
    """One counted storage: its size, where it came from, and when it lived (event numbers)."""

    __slots__ = ("nbytes", "part", "moment", "op", "shape", "dtype", "born", "died")

    def __init__(self, nbytes: int, part: str, moment: str, op: str, shape: tuple[int, ...], dtype: str, born: int):
        self.nbytes, self.part, self.moment, self.op, self.shape, self.dtype = nbytes, part, moment, op, shape, dtype
        self.born, self.died = born, None

    def alive_at(self, event: int) -> bool:
        return self.born <= event and (self.died is None or self.died > event)


class LiveStorages(TorchDispatchMode):
    """Counts the bytes of live tensor storages on one device, and the peak of each moment.

    Every allocation and every free is an event; a peak is remembered by its event number,
    and what was alive then is read back from the storages' lifetimes at the end.
    """

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.live: dict[int, Storage] = {}  # id(storage object) → its record
        self.refs: dict[int, weakref.ref] = {}
        self.history: list[Storage] = []
        self.now = 0
        self.event = 0
        self.moment = "before"
        self.peaks: dict[str, tuple[int, int]] = {}  # moment → (bytes, event)

    # -- the storages

    def add(self, tensor: torch.Tensor, part: str, op: str) -> None:
        if tensor.device.type != self.device:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        key, nbytes = id(storage), storage.nbytes()
        known = self.live.get(key)
        if known is not None:
            if nbytes > known.nbytes:  # a storage resized in place: counted at its new size
                self.now += nbytes - known.nbytes
                known.nbytes = nbytes
                self._note_peak()
            return
        if nbytes == 0:
            return
        self.event += 1
        record = Storage(nbytes, part, self.moment, op, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""), self.event)
        self.live[key] = record
        self.history.append(record)
        self.refs[key] = weakref.ref(storage, self._freed_callback(key, record))
        self.now += nbytes
        self._note_peak()

    def _freed_callback(self, key: int, record: Storage) -> Callable[[Any], None]:
        def freed(_ref: Any) -> None:
            if self.live.get(key) is record:
                del self.live[key]
                del self.refs[key]
                self.event += 1
                record.died = self.event
                self.now -= record.nbytes

        return freed

    def _note_peak(self) -> None:
        if self.moment in MOMENTS and self.now > self.peaks.get(self.moment, (0, 0))[0]:
            self.peaks[self.moment] = (self.now, self.event)

    def record_of(self, tensor: torch.Tensor) -> Storage | None:
        return self.live.get(id(tensor.untyped_storage()))

    def alive_at(self, event: int) -> list[Storage]:
        return [s for s in self.history if s.alive_at(event)]

    # -- every operator's outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() != -1:  # the autograd engine is running
            if self.moment in ("forward", "loss"):
                self.moment = "backward"
        elif self.moment == "backward":  # back from backward: gradient clipping until the optimizer
            self.moment = "after_backward"
        op = str(getattr(func, "__name__", func))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf, "step", op)
        return out


def _tensors_of(obj: Any) -> list[torch.Tensor]:
    """The tensors an object holds directly (a bitsandbytes QuantState and its nested state2)."""
    found = []
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif type(value).__name__ == "QuantState":
            found += _tensors_of(value)
    return found


def _count_static(counter: LiveStorages, model: Any, optimizer: Any) -> None:
    """Every tensor alive before the step, by part: the model's, the optimizer's, then the rest."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            counter.add(param, "lora_weights", "parameter")
        elif hasattr(param, "quant_state"):  # bitsandbytes Params4bit: packed 4-bit weights
            counter.add(param, "linear_weights", "parameter")
            for tensor in _tensors_of(param.quant_state):
                counter.add(tensor, "linear_weights", "quant_state")
        else:
            counter.add(param, "kept_weights", "parameter")
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                counter.add(value, "optimizer_states", "optimizer")
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        found = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in found:
        counter.add(tensor, "other_tensors", "found by gc")


# -- the step that is measured ---------------------------------------------------------------


