"""Training: one loop for every recipe (sft, cpt, dpo, classify) over 4-bit or 16-bit bases.

`run_training` is the step; `TrainingRun` its public setup steps (for benchmarks). They load on
first use, so importing this package (the CLI does, for --help) does not import torch.
"""

_PUBLIC = {
    "run_training": "loop", "TrainingRun": "loop", "TrainResult": "loop",
    "Launch": "launch", "launch_ranks": "launch",
    "Event": "events", "EventSink": "events", "RunStarted": "events", "PhaseChanged": "events", "StepDone": "events",
    "EvalDone": "events", "CheckpointSaved": "events", "Note": "events",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        # launch_ranks: the module `launch` shadows a function of that name on the package.
        return getattr(importlib.import_module(f"appliance.train.{_PUBLIC[name]}"), {"launch_ranks": "launch"}.get(name, name))
    raise AttributeError(f"module 'appliance.train' has no attribute {name!r}")
