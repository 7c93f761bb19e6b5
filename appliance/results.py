"""Figures are files: benchmark results under bench/results/ (or, installed, inside the package),
each with the date, the machine and the library versions it was measured with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"  # where `--save` writes
WHEEL_RESULTS = Path(__file__).resolve().parent / "bench_results"  # the same files, packed into the wheel


def results_dir() -> Path | None:
    """Saved measurements: inside the installed wheel, else the repository's bench/results."""
    for candidate in (WHEEL_RESULTS, REPO_RESULTS):
        if candidate.is_dir():
            return candidate
    return None



def save_result(kind: str, payload: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]] = (), folder: Path | None = None) -> Path:
    """bench/results/<kind>-<gpu|cpu>-<time>.json: the machine (hardware.describe()), a benchmark's output,
    and the measurements `load_measurements` will read from it."""
    import datetime as dt

    from appliance.store import atomic_write_json

    folder = folder or REPO_RESULTS
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = "gpu" if env["gpu"] else "cpu"
    return atomic_write_json(folder / f"{kind}-{device}-{stamp}.json", {**env, kind: payload, "measurements": list(records)})


def measurement(env: dict[str, Any], *, gpu: str, model: str, loop: str, settings: dict[str, Any], peak_gib: float, notes: str,
                tokens_per_s: float | None = None) -> dict[str, Any]:
    """One measured GPU run as the planner reads it (bench/results/README.md, plan.Measurement), dated and
    placed by `env` (hardware.describe())."""
    record = {"date": env["date"][:10], "machine": f"{env['machine']['cpu']}, {env['gpu']}", "gpu": gpu, "versions": env["versions"],
              "model": model, "loop": loop, "settings": settings, "peak_gib": peak_gib}
    if tokens_per_s is not None:
        record["tokens_per_s"] = tokens_per_s
    return {**record, "notes": notes}

