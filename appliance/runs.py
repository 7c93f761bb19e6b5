"""Training runs as the store keeps them: list, show, compare and plot them.

A run folder (appliance/train/folder.py) holds config.yaml (the resolved config), run.json
(written when the run started) and metrics.jsonl: one line per optimizer step (step, epoch,
loss, lr, grad_norm, tokens_per_s, memory_gib, elapsed_s, ...) and one per evaluation
(step, val_loss, val_ppl, ...). Everything here is read from those files, so it works for a
run that is still going, one that was stopped, and one whose adapter was removed.
"""

from __future__ import annotations

import datetime as dt
import difflib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.registry import Registry, resumable
from appliance.store import MANIFEST, TMP_PREFIX, atomic_write, read_json

# A curve: its label (a run's name) → (steps, values).
Series = dict[str, tuple[list[int], list[float]]]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} → {"train.lr": 1e-4}: the inverse of config.nest, for tables and trackers."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or metric.endswith("ppl")


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    started: str
    updated: str
    status: str  # done (its adapter is saved) | resumable (has checkpoints) | incomplete
    damaged_lines: int = 0  # lines of metrics.jsonl that are not JSON (a kill mid-write leaves one)
    adapter_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "loss" in r]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "loss" not in r and any(k.startswith("val_") for k in r)]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one figure, from the lines that have it."""
        rows = [r for r in self.records if isinstance(r.get(key), (int, float)) and "step" in r]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]

    @property
    def val_metrics(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.evals for k in r if k.startswith("val_")))

    def figures(self) -> dict[str, Any]:
        """The run in numbers: where it ended, and the best of each validation figure (with its step)."""
        steps = self.steps
        out: dict[str, Any] = {"steps": steps[-1]["step"] if steps else 0}
        if steps:
            last = steps[-1]
            out["train_loss"] = last["loss"]
            out["lr"] = last.get("lr")
            speeds = [r["tokens_per_s"] for r in steps if isinstance(r.get("tokens_per_s"), (int, float))]
            if speeds:
                out["tokens_per_s"] = round(sum(speeds) / len(speeds), 1)
            memory = [r["memory_gib"] for r in steps if isinstance(r.get("memory_gib"), (int, float))]
            if memory:
                out["peak_memory_gib"] = max(memory)
            if isinstance(last.get("elapsed_s"), (int, float)):
                out["elapsed_s"] = last["elapsed_s"]
        for metric in self.val_metrics:
            points = list(zip(*self.series(metric)))
            if not points:
                continue
            out[f"final_{metric}"] = points[-1][1]
            best = (min if lower_is_better(metric) else max)(points, key=lambda p: p[1])
            out[f"best_{metric}"] = best[1]
            out[f"best_{metric}_step"] = best[0]
        return out

    def summary(self) -> dict[str, Any]:
        """What `runs list` and `runs show --json` give: the run, its settings in brief, its figures."""
        train = self.config.get("train", {})
        return {
            "name": self.name,
            "status": self.status,
            "model": self.config.get("model", {}).get("name"),
            "recipe": self.config.get("recipe"),
            "task": self.config.get("task"),
            "planned_steps": train.get("steps"),
            "epochs": train.get("epochs") if train.get("steps") is None else None,
            "started": self.started,
            "updated": self.updated,
            "path": str(self.path),
            **self.figures(),
        }


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    if not path.is_file():
        return [], 0
    records, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged += 1
    return records, damaged


def _is_run(path: Path) -> bool:
    return (
        path.is_dir()
        and not path.is_symlink()
        and not path.name.startswith(TMP_PREFIX)
        and any((path / f).is_file() for f in ("config.yaml", "run.json", "metrics.jsonl"))
    )


def read_run(registry: Registry, path: Path) -> Run:
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    except yaml.YAMLError:
        config = {}
    records, damaged = _read_records(path / "metrics.jsonl")
    stamps = [p.stat().st_mtime for p in (path / "run.json", path / "config.yaml") if p.is_file()]
    started = min(stamps) if stamps else path.stat().st_mtime
    updated = (path / "metrics.jsonl").stat().st_mtime if (path / "metrics.jsonl").is_file() else started
    steps = [r["step"] for r in records if "loss" in r]
    adapter_metrics: dict[str, Any] = {}
    manifest = registry.store.kind_dir("adapters") / path.name / MANIFEST
    try:
        adapter = read_json(manifest) if manifest.is_file() else {}
        adapter_metrics = adapter.get("metrics", {}) if isinstance(adapter, dict) else {}
    except (OSError, ValueError):
        adapter_metrics = {}
    if adapter_metrics and steps and adapter_metrics.get("steps") == steps[-1]:
        status = "done"
    elif resumable(path):
        status = "resumable"
    else:
        status = "incomplete"
    return Run(
        path.name,
        path,
        config if isinstance(config, dict) else {},
        records,
        _iso(started),
        _iso(updated),
        status,
        damaged,
        adapter_metrics if status == "done" else {},
    )


def run_names(registry: Registry) -> list[str]:
    """The names of the run folders in the store, sorted (for shell completion: no file is read)."""
    return sorted(p.name for p in registry.store.kind_dir("runs").iterdir() if _is_run(p))


def list_runs(registry: Registry) -> list[Run]:
    """Every run folder in the store, oldest first."""
    runs = [read_run(registry, p) for p in registry.store.kind_dir("runs").iterdir() if _is_run(p)]
    return sorted(runs, key=lambda r: (r.started, r.name))


def load_run(registry: Registry, name: str) -> Run:
    path = registry.run_dir(name)
    if not _is_run(path):
        known = [p.name for p in registry.store.kind_dir("runs").iterdir() if _is_run(p)]
        close = difflib.get_close_matches(name, known, n=3)
        raise ApplianceError(
            f"Unknown run {name!r}.",
            (f"did you mean {', '.join(close)}? " if close else "")
            + ("see `appliance runs list`" if known else "start one with `appliance train ... --name NAME`"),
        )
    return read_run(registry, path)


def load_runs(registry: Registry, names: list[str] | tuple[str, ...]) -> list[Run]:
    return [load_run(registry, n) for n in dict.fromkeys(names)]


# -- compare ---------------------------------------------------------------------------


@dataclass
class Comparison:
    names: list[str]
    figures: dict[str, list[Any]]  # figure → its value in each run (None where a run lacks it)
    differences: dict[str, list[Any]]  # config key → its value in each run, only keys that differ


# Settings that say where figures went, not how they came about: no part of a difference.
NOT_COMPARED = {"train.report_to"}


def compare(runs: list[Run]) -> Comparison:
    per_run = [r.figures() for r in runs]
    keys = list(dict.fromkeys(k for f in per_run for k in f))
    configs = [{k: v for k, v in flatten(r.config).items() if k not in NOT_COMPARED} for r in runs]
    settings = sorted(set().union(*configs)) if configs else []
    differences = {k: [c.get(k) for c in configs] for k in settings if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1}
    return Comparison([r.name for r in runs], {k: [f.get(k) for f in per_run] for k in keys}, differences)


# -- curves ------------------------------------------------------------------------------


def curves(runs: list[Run], val_metric: str = "val_loss") -> list[tuple[str, Series]]:
    """The three panels `runs plot` draws (train loss, validation, learning rate), each run a curve."""
    panels = [("train loss", "loss"), (f"validation ({val_metric})", val_metric), ("learning rate", "lr")]
    out = []
    for title, key in panels:
        series = {r.name: r.series(key) for r in runs}
        out.append((title, {name: s for name, s in series.items() if s[0]}))
    return out


def check_val_metric(runs: list[Run], val_metric: str) -> None:
    """A --val-metric none of the runs has is a typo; say which ones they have."""
    have = list(dict.fromkeys(m for r in runs for m in r.val_metrics))
    if have and val_metric not in have:
        raise ApplianceError(f"No run here has the validation figure {val_metric!r}.", f"use one of: {', '.join(have)}")


PLOT_FORMATS = (".png", ".svg", ".pdf")


def write_plot(panels: list[tuple[str, Series]], out: Path, names: list[str]) -> Path:
    """The panels side by side in one image (matplotlib, no display needed), written atomically."""
    if out.is_dir():
        raise ApplianceError(f"--out {out} is a folder.", f"give a file name, e.g. --out {out / 'curves.png'}")
    if out.suffix.lower() not in PLOT_FORMATS:
        raise ApplianceError(f"--out {out} is not an image file name.", f"end it in {', '.join(PLOT_FORMATS)}, e.g. --out curves.png")
    from matplotlib.figure import Figure  # drawn without pyplot: no display, no global state (Agg)
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one color per run in every panel
    for ax, (title, series) in zip(fig.subplots(1, len(panels)), panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 on the axis
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, color=colors.get(name), marker="o" if len(xs) < 30 else None, markersize=3)
        if series:
            ax.grid(alpha=0.3)
            if len(names) > 1 or title.startswith("validation"):
                ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no figures logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    buffer = io.BytesIO()
    fig.savefig(buffer, format=out.suffix.lower().lstrip("."), dpi=110)
    try:
        return atomic_write(out, buffer.getvalue())
    except OSError as err:
        raise ApplianceError(f"Cannot write --out {out}: {err.strerror or err}.", "choose a folder you can write to") from None


def default_plot_path(runs: list[Run]) -> Path:
    """curves.png in the run's folder; for several runs, in the first one's, named after the others."""
    if len(runs) == 1:
        return runs[0].path / "curves.png"
    return runs[0].path / f"curves-vs-{'-'.join(r.name for r in runs[1:])[:200]}.png"
