"""`appliance bench train`: our step, TRL's SFTTrainer and the plain loop, like for like, and saved
results the planner reads.

Figures are printed, never asserted against a time: timing goals live in the benchmark. What is
asserted is what makes a row like-for-like: each side ran the row's objective and checkpointing
on the same data, and the ratios are what the figures say.
"""

from __future__ import annotations

import json

import pytest

from appliance.plan import load_measurements
from appliance.results import save_result
from appliance.bench.train import TrainBench, find_plain_loop, measurements
from conftest import DEMO, run_cli


def test_bench_train_runs_every_side_of_every_row_on_the_same_data(tiny):
    plain = find_plain_loop()
    args = ["bench", "train", "--model", "tiny", "--data", str(DEMO / "facts.jsonl"), "--steps", "4", "--batch-size", "4", "--json"]
    proc = run_cli(*args, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = TrainBench.model_validate(json.loads(proc.stdout))
    print(json.dumps([{"row": r.spec.key, **{s: x.useful_tok_per_s for s, x in r.results.items()}} for r in result.rows], indent=1))
    assert [r.spec.key for r in result.rows] == ["answers", "every-token", "defaults"] and result.headline == "answers"
    answers, every, defaults = result.rows
    assert set(answers.results) == {"appliance", "trl"}
    assert set(every.results) == set(defaults.results) == ({"appliance", "trl", "plain"} if plain else {"appliance", "trl"})
    for row in (answers, every):
        for side in row.results.values():
            assert side.objective == row.spec.objective and side.gradient_checkpointing
            assert side.useful_tok_per_s > 0 and side.step_s_median > 0 and side.peak_gib > 0 and side.memory == "process RSS"
        ours = row.results["appliance"]
        for ratio in row.ratios:
            theirs = row.results[ratio.against]
            assert ratio.useful_tok_per_s == pytest.approx(ours.useful_tok_per_s / theirs.useful_tok_per_s, abs=0.01)
            assert ratio.peak_memory == pytest.approx(ours.peak_gib / theirs.peak_gib, abs=0.01)
    # Loss on the answers trains fewer tokens than loss on every token, on both sides that can do both.
    for side in ("appliance", "trl"):
        a, e = answers.results[side], every.results[side]
        assert a.trained_tok_per_s / a.useful_tok_per_s < e.trained_tok_per_s / e.useful_tok_per_s
    # Defaults: ours trains on the answers with checkpointing off on CPU; TRL's pads, checkpoints and trains every token.
    assert defaults.results["appliance"].objective == "assistant" and not defaults.results["appliance"].gradient_checkpointing
    assert defaults.results["trl"].objective == "all" and defaults.results["trl"].batching.startswith("padded")
    assert len(result.differences) >= 5


def test_bench_train_bad_inputs():
    both = run_cli("bench", "train", "--model", "smollm2", "--shape", "llama-3.2-1b")
    assert both.returncode == 2 and "Traceback" not in both.stderr
    missing = run_cli("bench", "train", "--model", "ghost")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "ghost" in missing.stderr
    shape = run_cli("bench", "train", "--shape", "llama-3.2-1b")
    assert shape.returncode == 2 and "no" in shape.stderr and "GPU" in shape.stderr


def _side(side: str, peak: float, tok: float, **extra) -> dict:
    return {
        "side": side, "objective": "all", "gradient_checkpointing": True, "batching": "padded to the longest", "optimizer": "paged_adamw_8bit",
        "device": "cuda", "load_s": 1.0, "steps": 10, "step_s_median": 1.0, "useful_tok_per_s": tok, "peak_gib": peak,
        "memory": "GPU allocated", **extra,
    }


def test_saved_gpu_runs_become_planner_measurements(tmp_path):
    """The file `--save` writes on a GPU is one the planner's measurement test reads."""
    spec = {"key": "every-token", "title": "t", "objective": "all", "gradient_checkpointing": True, "sides": ["appliance", "trl", "plain"]}
    planned = {"task": "cpt", "seq_len": 2048, "batch_size": 1, "rank": 16, "mlp_tile_tokens": 512, "offload_activations": True}
    bench = TrainBench.model_validate(
        {
            "settings": {"model": "smollm2", "data": "random tokens", "seq_len": 2048, "steps": 10, "batch_size": 1, "rank": 16},
            "headline": "every-token",
            "rows": [
                {
                    "spec": spec,
                    "results": {
                        "appliance": _side("appliance", 1.5, 9000, planner_settings=planned),
                        "trl": _side("trl", 2.0, 7000),
                        "plain": _side("plain", 2.5, 6000),
                    },
                }
            ],
        }
    )
    env = {"date": "2026-11-23T00:00:00+00:00", "machine": {"cpu": "x", "cores": 16, "platform": "linux"}, "gpu": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2"}}
    records = measurements(bench, env)
    assert [r["loop"] for r in records] == ["appliance", "peer"]  # TRL has no memory model in the planner
    path = save_result("train", bench.model_dump(mode="json"), env, records, folder=tmp_path)
    loaded = load_measurements(tmp_path)
    assert [(m.model, m.gpu, m.peak_gib) for m in loaded] == [("smollm2-135m", "H100 SXM", 1.5), ("smollm2-135m", "H100 SXM", 2.5)]
    ours, peer = loaded
    assert ours.settings.mlp_tile_tokens == 512 and ours.settings.offload_activations  # estimated as it ran
    assert peer.settings.mlp_tile_tokens is None and peer.settings.gradient_checkpointing
    assert TrainBench.model_validate(json.loads(path.read_text())["train"]).rows[0].results["trl"].peak_gib == 2.0

    assert measurements(bench, {**env, "gpu": None}) == []  # the planner models GPU memory only
    unknown = measurements(bench, {**env, "gpu": "Some Future GPU"})
    assert unknown == [] and "not recorded" in bench.notes[-1]


def test_the_worker_on_random_tokens_reports_the_settings_it_ran_with(tiny, tmp_path):
    """The --shape path (random tokens, no data) and --set levers, on the tiny model; on a GPU
    the same settings become the measurement the planner is checked against."""
    out = tmp_path / "worker.json"
    sets = ["--set", "model.mlp_tile_tokens=64", "--set", "model.offload_activations=true"]
    args = ["--side", "appliance", "--objective", "all", "--checkpointing", "on", "--model-dir", str(tiny.model_dir("tiny")),
            "--seq-len", "256", "--steps", "4", "--batch-size", "1", "--out", str(out), *sets]
    proc = run_cli(*args, module="appliance.bench.sides", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["useful_tok_per_s"] > 0 and len(result["losses"]) == 4
    assert result["trained_tok_per_s"] == pytest.approx(result["useful_tok_per_s"] * 255 / 256, rel=0.02)  # every token but each row's first
    planned = result["planner_settings"]
    assert planned["task"] == "cpt" and planned["seq_len"] == 256 and planned["batch_size"] == 1
    assert planned["mlp_tile_tokens"] == 64 and planned["offload_activations"] and planned["gradient_checkpointing"]


def test_a_shape_folder_is_built_without_a_gpu_shard_by_shard(tmp_path, monkeypatch):
    """`--shape` weights come from the CPU, one shard at a time, and load as the real shape."""
    import appliance.bench.shapes as bench
    from transformers import AutoConfig

    monkeypatch.setattr(bench, "SHARD_BYTES", 64 * 2**20)
    folder = bench.shape_folder("smollm2-135m", tmp_path)
    shards = sorted(folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 4 and set(index["weight_map"].values()) == {p.name for p in shards}
    config = AutoConfig.from_pretrained(folder)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    from safetensors import safe_open

    with safe_open(str(folder / index["weight_map"]["model.norm.weight"]), "pt") as f:
        assert float(f.get_tensor("model.norm.weight").float().mean()) == 1.0
