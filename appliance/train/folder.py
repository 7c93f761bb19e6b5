"""Where a run writes: its resolved config (config.yaml), how it was started (run.json),
one line per step (metrics.jsonl) and its checkpoints (checkpoints/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from appliance.config import RunConfig
from appliance.errors import ApplianceError
from appliance.store import atomic_write, disk_full_error, is_disk_full, read_json
from appliance.train.checkpoint import checkpoint_dirs

# Settings a resumed run may change: how often it saves and reports, where it runs, and its trackers.
RESUME_MAY_CHANGE = {("train", "save_every"), ("train", "eval_every"), ("train", "keep_checkpoints"), ("train", "device"), ("train", "report_to")}


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: tuple = ()) -> list[tuple]:
    out = []
    for key in sorted(set(a) | set(b)):
        path = prefix + (key,)
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, path)
        elif va != vb and path not in RESUME_MAY_CHANGE:
            out.append(path)
    return out


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.metrics = path / "metrics.jsonl"
        self.config = path / "config.yaml"
        self.started = path / "run.json"

    def check_start(self, name: str, adapter_exists: bool, *, resume: bool, overwrite: bool) -> bool:
        """Refuse a start that would replace or mix someone's work; True when the run replaces the adapter."""
        if adapter_exists and not overwrite and resume and self.started_with_overwrite():
            overwrite = True  # the run was started to replace this adapter: its resume does too
        if adapter_exists and not overwrite:
            raise ApplianceError(f"An adapter named {name!r} already exists.", "choose another --name, or pass --overwrite to replace it")
        has_checkpoints = bool(checkpoint_dirs(self.checkpoints))
        if resume and not has_checkpoints:
            raise ApplianceError(f"There is no checkpoint of a run named {name!r} to resume.", "drop --resume to start the run")
        if has_checkpoints and not resume and not overwrite:
            raise ApplianceError(f"A run named {name!r} has checkpoints in {self.checkpoints}.", "pass --resume to continue it, or --overwrite to start again")
        return overwrite

    def start(self, cfg: RunConfig, *, resume: bool, overwrite: bool) -> None:
        """A fresh run (what was there removed with `overwrite`), or a resumed one with its settings."""
        if resume:
            self.check_resume_config(cfg)
        elif overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config, cfg.to_yaml())
        if not resume:
            atomic_write(self.started, json.dumps({"overwrite": overwrite}))

    def started_with_overwrite(self) -> bool:
        """Whether the run was started to replace an adapter of its name: its resume carries that on."""
        try:
            return bool(read_json(self.started).get("overwrite"))
        except (OSError, ValueError, AttributeError):
            return False

    def check_resume_config(self, cfg: RunConfig) -> None:
        if not self.config.is_file():
            return
        import yaml

        diffs = config_differences(yaml.safe_load(self.config.read_text()), cfg.model_dump(mode="json"))
        if diffs:
            names = ", ".join(".".join(map(str, d)) for d in diffs)
            raise ApplianceError(
                f"--resume with settings that differ from the run's ({names}).",
                f"resume with the same settings (saved in {self.config}), or start a new run with another --name",
            )

    def log(self, record: dict[str, Any]) -> None:
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.metrics, err) from None
            raise

    def truncate_metrics(self, step: int) -> list[dict[str, Any]]:
        """Drop the lines after `step` (a resume replays them); the lines kept."""
        if not self.metrics.is_file():
            return []
        kept = [line for line in self.metrics.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.metrics, "".join(line + "\n" for line in kept))
        return [json.loads(line) for line in kept]
