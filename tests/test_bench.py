"""`appliance bench train`: our step and the peer loop side by side, and saved results the planner reads.

Figures are printed, never asserted against a time: timing goals live in the benchmark.
"""

from __future__ import annotations

import json

import pytest

from appliance.plan import load_measurements, save_result
from appliance.train.bench import TrainBench, find_peer_loop, measurements
from conftest import DEMO, run_cli


@pytest.mark.skipif(find_peer_loop() is None, reason="../shared/bench/peer_qlora_loop.py is not on this machine")
def test_bench_train_runs_both_loops_on_the_same_data(tiny):
    proc = run_cli("bench", "train", "--model", "tiny", "--data", str(DEMO / "facts.jsonl"), "--steps", "4", "--batch-size", "4", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    print(json.dumps({k: result[k] for k in ("appliance", "peer", "ratio")}, indent=1))
    ours, peer = result["appliance"], result["peer"]
    for loop in (ours, peer):
        assert loop["useful_tok_per_s"] > 0 and loop["step_s_median"] > 0 and loop["peak_rss_gib"] > 0
        assert len(loop["losses"]) == 4
    assert result["ratio"]["useful_tok_per_s"] == pytest.approx(ours["useful_tok_per_s"] / peer["useful_tok_per_s"], abs=0.01)
    assert result["ratio"]["peak_memory"] == pytest.approx(ours["peak_rss_gib"] / peer["peak_rss_gib"], abs=0.01)
    assert ours["gradient_checkpointing"] is False  # CPU, activations far below a quarter of the RAM


def test_bench_train_bad_inputs():
    both = run_cli("bench", "train", "--model", "smollm2", "--shape", "llama-3.2-1b")
    assert both.returncode == 2 and "Traceback" not in both.stderr
    missing = run_cli("bench", "train", "--model", "ghost")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "ghost" in missing.stderr


def test_saved_gpu_runs_become_planner_measurements(tmp_path):
    """The file `--save` writes on a GPU is one the planner's measurement test reads."""
    bench = TrainBench(
        settings={"model": "smollm2", "data": "random tokens", "seq_len": 2048, "steps": 10, "batch_size": 1, "rank": 16},
        appliance={
            "useful_tok_per_s": 9000,
            "peak_gib": 1.5,
            "planner_settings": {"task": "cpt", "seq_len": 2048, "batch_size": 1, "rank": 16, "mlp_tile_tokens": 512, "offload_activations": True},
        },
        peer={"useful_tok_per_s": 6000, "peak_gib": 2.5},
    )
    env = {"date": "2026-11-23T00:00:00+00:00", "machine": {"cpu": "x", "cores": 16, "platform": "linux"}, "gpu": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2"}}
    records = measurements(bench, env)
    assert [r["loop"] for r in records] == ["appliance", "peer"]
    path = save_result("train", bench.as_dict(), env, records, folder=tmp_path)
    loaded = load_measurements(tmp_path)
    assert [(m.model, m.gpu, m.peak_gib) for m in loaded] == [("smollm2-135m", "H100 SXM", 1.5), ("smollm2-135m", "H100 SXM", 2.5)]
    ours, peer = loaded
    assert ours.settings.mlp_tile_tokens == 512 and ours.settings.offload_activations  # estimated as it ran
    assert peer.settings.mlp_tile_tokens is None and peer.settings.gradient_checkpointing
    assert json.loads(path.read_text())["train"]["ratio"] == {}

    cpu_env = {**env, "gpu": None}
    assert measurements(bench, cpu_env) == []  # the planner models GPU memory only
    unknown = measurements(bench, {**env, "gpu": "Some Future GPU"})
    assert unknown == [] and "not recorded" in bench.notes[-1]


def test_the_worker_on_random_tokens_reports_the_settings_it_ran_with(tiny, tmp_path):
    """The --shape path (random tokens, no data) and --set levers, on the tiny model; on a GPU
    the same settings become the measurement the planner is checked against."""
    out = tmp_path / "worker.json"
    sets = ["--set", "model.mlp_tile_tokens=64", "--set", "model.offload_activations=true", "--set", "model.gradient_checkpointing=true"]
    args = ["--model-dir", str(tiny.model_dir("tiny")), "--seq-len", "256", "--steps", "4", "--batch-size", "1", "--out", str(out), *sets]
    proc = run_cli(*args, module="appliance.train.bench", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["useful_tok_per_s"] > 0 and len(result["losses"]) == 4
    planned = result["planner_settings"]
    assert planned["task"] == "cpt" and planned["seq_len"] == 256 and planned["batch_size"] == 1
    assert planned["mlp_tile_tokens"] == 64 and planned["offload_activations"] and planned["gradient_checkpointing"]
