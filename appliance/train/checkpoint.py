"""Checkpoints: every piece of resumable state, written atomically, verified on load.

A checkpoint is a folder `step-00000012/` holding
    adapter.safetensors    the adapter (and head) weights, by parameter name
    optimizer.safetensors  the optimizer's tensors; optimizer.json its structure
    state.json             step, micro-batch counter, RNG states, early-stopping state
    manifest.json          sha256 of each file above, written last
No pickle anywhere: a checkpoint from the internet cannot run code.
The folder is built under a temporary name and renamed, so a crash or a full
disk leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from appliance.registry import sha256_file
from appliance.store import MANIFEST, atomic_dir, atomic_write_json, read_json

PREFIX = "step-"
FILES = ("adapter.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")


# -- nested state ⇄ (tensors, json) -------------------------------------------


def flatten(obj: Any, tensors: dict[str, Any], prefix: str = "t") -> Any:
    """Replace tensors inside nested dicts/lists by references; collect them in `tensors`."""
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors, f"{prefix}.k{i}"), flatten(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unflatten(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, Any], state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -- saving and loading ------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed (the data order's position)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    path: Path
    step: int
    metric: float | None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (with manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save(
    root: Path,
    state: TrainState,
    adapter: dict[str, Any],
    optimizer_state: dict[str, Any],
    metric: float | None,
    *,
    before_write: Callable[[int], None] | None = None,
    rank_rngs: list[tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> Path:
    """Write a checkpoint; `rank_rngs` holds every rank's RNG states (rank 0's are its own)."""
    from safetensors.torch import save_file

    opt_tensors: dict[str, Any] = {}
    opt_structure = flatten(optimizer_state, opt_tensors)
    rng_tensors, rng_json = rng_state()
    rng_json = {**rng_json, "ranks": {}}
    for rank, (tensors, py) in enumerate(rank_rngs or []):
        if rank:
            rng_tensors.update({f"rank{rank}.{k}": v for k, v in tensors.items()})
            rng_json["ranks"][str(rank)] = py
    adapter_cpu = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
    if before_write is not None:
        size = sum(t.numel() * t.element_size() for t in [*adapter_cpu.values(), *opt_tensors.values()])
        before_write(size)
    final = root / f"{PREFIX}{state.step:08d}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(adapter_cpu, str(tmp / "adapter.safetensors"))
        save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_structure))
        (tmp / "state.json").write_text(json.dumps({"train": state.__dict__, "rng": rng_json, "metric": metric}, default=float))
        atomic_write_json(tmp / MANIFEST, {"step": state.step, "metric": metric, "sha256": {f: sha256_file(tmp / f) for f in FILES}})
    return final


def verify(path: Path) -> str | None:
    """None when every file matches its checksum, else what is wrong."""
    try:
        manifest = read_json(path / MANIFEST)
        for name in FILES:
            if sha256_file(path / name) != manifest["sha256"][name]:
                return f"{name} does not match its checksum"
    except (OSError, KeyError, ValueError) as err:
        return f"unreadable ({err})"
    return None


def load(path: Path, rank: int = 0) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """(train state, adapter tensors, optimizer state) of a verified checkpoint; restores the RNG
    states of `rank` (rank 0's where the run had fewer ranks)."""
    from safetensors.torch import load_file

    state_json = read_json(path / "state.json")
    state = TrainState(**state_json["train"])
    adapter = load_file(str(path / "adapter.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer_state = unflatten(json.loads((path / "optimizer.json").read_text()), tensors)
    ranks = state_json["rng"].get("ranks", {})
    if rank and str(rank) in ranks:
        prefix = f"rank{rank}."
        set_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, {"python": ranks[str(rank)]["python"]})
    else:
        set_rng_state(tensors, state_json["rng"])
    return state, adapter, optimizer_state


def metric_of(path: Path) -> float | None:
    try:
        return read_json(path / MANIFEST).get("metric")
    except (OSError, ValueError):
        return None


def prune(root: Path, keep: int, protect: Path | None) -> None:
    """Keep the newest `keep` checkpoints and the protected (best) one."""
    dirs = checkpoint_dirs(root)
    for old in dirs[:-keep] if keep else dirs:
        if protect is None or old.resolve() != protect.resolve():
            shutil.rmtree(old, ignore_errors=True)


def newest_verified(root: Path, on_damaged: Callable[[Path, str], None]) -> Path | None:
    """The newest checkpoint whose files match their checksums; each damaged one on the way is reported."""
    for path in reversed(checkpoint_dirs(root)):
        problem = verify(path)
        if problem is None:
            return path
        on_damaged(path, problem)
    return None


def copy_into(params: dict[str, Any], weights: dict[str, Any]) -> None:
    """Put saved adapter weights back into the live parameters, in place (the optimizer holds them)."""
    import torch

    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.device, param.dtype))


def adapter_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter.safetensors"))
