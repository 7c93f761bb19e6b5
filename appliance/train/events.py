"""What the training loop reports. Plain data: the loop knows nothing of rich; `ui` renders these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class RunStarted:
    run_name: str
    model: str
    device: str
    dtype: str
    total_steps: int
    start_step: int
    train_examples: int
    val_examples: int
    trainable_params: int
    total_params: int
    optimizer: str
    resumed_from: str | None = None
    ranks: int = 1  # data-parallel processes (torchrun); each takes batch_size examples per micro-batch
    batch_size: int = 1
    grad_accum: int = 1


@dataclass
class PhaseChanged:
    step: int
    description: str
    trainable_params: int


@dataclass
class StepDone:
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    memory_gib: float
    epoch: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalDone:
    step: int
    metrics: dict[str, float]
    improved: bool


@dataclass
class CheckpointSaved:
    step: int
    path: str
    reason: str


@dataclass
class Note:
    text: str
    level: str = "info"  # info | warning


Event = RunStarted | PhaseChanged | StepDone | EvalDone | CheckpointSaved | Note
EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    pass
