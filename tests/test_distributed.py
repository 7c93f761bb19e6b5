"""Training under torchrun: 2 CPU ranks over gloo, against 1 process with the same global batch.

Both runs compute in fp32 on the same 4-bit base with the same seed and no dropout. The only
difference is where sums happen: each rank sums its 4 examples, then gloo sums the two ranks'
gradients (in fp32), where one process sums 8 at once. Reordered fp32 sums differ by a few
units in the 7th digit; AdamW divides by the root of the squared gradient, which can amplify
such a difference where a gradient is near zero, so over 6 steps the losses are compared to
1e-3 relative: far tighter than a difference in data (another batch moves the loss by ~1e-1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import DEMO, REPO, run_cli

STEPS = 6
COMMON = ["--model", "tiny", "--data", str(DEMO / "facts.jsonl"), "--steps", str(STEPS), "--lr", "1e-3", "--save-every", "2",
          "--set", "lora.dropout=0", "--set", "model.compute_dtype=float32", "--set", "data.val=2"]
ONE_BY_TWO = {"OMP_NUM_THREADS": "1"}


def _losses(store, name):
    lines = (store.run_dir(name) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture
def one_and_two(tiny):
    one = run_cli("train", *COMMON, "--name", "one", "--batch-size", "8", env=ONE_BY_TWO)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = run_cli("train", *COMMON, "--name", "two", "--batch-size", "4", "--nproc-per-node", "2", env=ONE_BY_TWO)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    return tiny, one, two


def test_two_ranks_of_batch_4_follow_one_process_of_batch_8_and_leave_an_ordinary_adapter(one_and_two):
    store, _, two = one_and_two
    one_curve, two_curve = _losses(store, "one"), _losses(store, "two")
    assert sorted(one_curve) == sorted(two_curve) == list(range(1, STEPS + 1))
    for step in one_curve:
        assert two_curve[step] == pytest.approx(one_curve[step], rel=1e-3), (step, one_curve, two_curve)
    assert len(set(one_curve.values())) > 1  # it trains: the loss moves
    # One dashboard (rank 0's), showing the global batch.
    assert two.stdout.count("adapter saved") == 1 and "global batch 4 × 2 ranks × 1 = 8 examples per step" in " ".join(two.stdout.split())
    # The adapter is an ordinary one: the same tensors as one process's, and it merges.
    from safetensors import safe_open

    def tensors(name):
        with safe_open(str(store.adapter_dir(name) / "adapter_model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    one, two = tensors("one"), tensors("two")
    assert one.keys() == two.keys()
    assert all(one[k].shape == two[k].shape and (one[k] - two[k]).abs().max() < 1e-2 for k in one)
    merged = run_cli("merge", "two", "--name", "two-merged", env=ONE_BY_TWO)
    assert merged.returncode == 0, merged.stdout[-2000:] + merged.stderr[-2000:]
    assert store.model("two-merged").parity.evaluated.top1_agreement >= store.model("two-merged").parity.gate_min_top1


def test_fsdp_shards_the_base_between_the_ranks_and_follows_the_same_curve(tiny):
    """--fsdp: each of 2 ranks holds half of the base (FSDP2 over gloo, 4-bit weights included) and the
    run follows one process's curve as closely as data-parallel does; the adapter saved is an ordinary one."""
    import re

    one = run_cli("train", *COMMON, "--name", "one", "--batch-size", "8", env=ONE_BY_TWO)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    sharded = run_cli("train", *COMMON, "--name", "sharded", "--batch-size", "4", "--nproc-per-node", "2", "--fsdp", env=ONE_BY_TWO)
    assert sharded.returncode == 0, sharded.stdout[-2000:] + sharded.stderr[-2000:]
    held, whole = map(float, re.search(r"this rank holds ([\d.]+) of its layers' ([\d.]+) MiB", " ".join(sharded.stdout.split())).groups())
    assert 0.45 < held / whole < 0.55, (held, whole)
    one_curve, sharded_curve = _losses(tiny, "one"), _losses(tiny, "sharded")
    assert sorted(one_curve) == sorted(sharded_curve) == list(range(1, STEPS + 1))
    for step in one_curve:
        assert sharded_curve[step] == pytest.approx(one_curve[step], rel=1e-3), (step, one_curve, sharded_curve)
    assert tiny.adapter("sharded").rank == tiny.adapter("one").rank


def test_fsdp_needs_several_processes(tiny):
    result = run_cli("train", *COMMON, "--name", "alone", "--fsdp")
    assert result.returncode == 2 and "--nproc-per-node 2" in result.stdout + result.stderr and "Traceback" not in result.stderr


IN_TURN = """
import json, sys, time
from appliance.train import distributed

ranks = distributed.from_environment()
distributed.start(ranks, "cpu", patient=True)

def build():
    began = time.monotonic()  # one clock for every process of the machine
    time.sleep(0.5)
    return began, time.monotonic()

span = distributed.in_turn(ranks, build)
open(f"{sys.argv[1]}/{ranks.rank}.json", "w").write(json.dumps(span))
distributed.stop(ranks)
"""


def test_the_ranks_of_a_machine_load_in_turn(tmp_path):
    """--fsdp loads the whole base in host memory on each rank: one rank at a time, so the host
    holds one base at once. Each rank's build must end before the next one's begins."""
    script = tmp_path / "in_turn.py"
    script.write_text(IN_TURN)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", str(script), str(tmp_path)],
                              env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    spans = sorted(tuple(json.loads((tmp_path / f"{rank}.json").read_text())) for rank in range(3))
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans


def test_place_moves_every_shard_and_every_quantization_state(tiny):
    """A base sharded in host memory reaches the GPU whole: its layers' shards, what stays whole, the
    adapter, and the 4-bit weights' quantization states, which bitsandbytes keeps on the modules where
    the model's own move does not reach them. Checked by moving to the meta device (no GPU here):
    whatever a move leaves behind stays on the CPU."""
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from appliance.config import LoraSpec, ModelSpec
    from appliance.hf import load_base
    from appliance.train import distributed
    from appliance.train.model import attach_lora, prepare_for_training

    def states(model):
        out = []
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                s = module.quant_state
                out += [s.absmax, s.code] + ([s.offset, s.state2.absmax, s.state2.code] if s.nested else [])
        return out

    def devices(model):
        tensors = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()] + list(model.buffers())
        return {t.device.type for t in tensors}, {t.device.type for t in states(model)}

    def sharded():
        spec = ModelSpec(gradient_checkpointing=False)
        model = attach_lora(prepare_for_training(load_base(tiny.model_dir("tiny"), spec, "cpu", torch.float32), spec, "cpu"), LoraSpec(rank=4))
        distributed.shard_base(model)
        assert any(isinstance(p, DTensor) for p in model.parameters()) and len(states(model)) >= 14 * 2
        return model

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        moved = sharded().to("meta")
        assert devices(moved) == ({"meta"}, {"cpu"})  # what place is for
        placed = sharded()
        distributed.place(placed, "meta")
        assert devices(placed) == ({"meta"}, {"meta"})
    finally:
        dist.destroy_process_group()

def _rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.Error, OSError):
            continue
        if rank is not None and "appliance" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


@pytest.mark.fault
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["data-parallel", "fsdp"])
def test_a_killed_rank_stops_the_run_and_resume_continues_the_curve(tiny, sharding):
    """SIGKILL rank 1 after a checkpoint: one message, exit 1, nothing half-written; --resume
    continues and ends on the curve of a run that was never interrupted (the base sharded or not)."""
    args = ["train", *COMMON, "--name", "k", "--batch-size", "4", "--nproc-per-node", "2", "--steps", "12", *sharding]
    whole = run_cli(*[a if a != "k" else "whole" for a in args], env=ONE_BY_TWO)
    assert whole.returncode == 0, whole.stderr[-2000:]
    launcher = subprocess.Popen([sys.executable, "-m", "appliance", *args], cwd=REPO, env={**os.environ, **ONE_BY_TWO},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tiny.run_dir("k") / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    _rank_processes(launcher)[1].send_signal(signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 1, out[-2000:] + err[-2000:]
    assert "Rank 1 of the run was killed by SIGKILL" in " ".join(err.split()) and "--resume" in err and "Traceback" not in err, err[-6000:]
    assert not (tiny.store.root / "adapters" / "k").exists()
    assert not [p for p in checkpoints.iterdir() if not p.name.startswith("step-")]  # no half-written checkpoint
    resumed = run_cli(*args, "--resume", env=ONE_BY_TWO)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    whole_curve, resumed_curve = _losses(tiny, "whole"), _losses(tiny, "k")
    assert sorted(resumed_curve) == list(range(1, 13))
    for step in whole_curve:
        assert resumed_curve[step] == pytest.approx(whole_curve[step], rel=1e-5), step


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "flags, words",
    [
        (["--nproc-per-node", "0"], "--nproc-per-node"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1", "--master-port", "29500"], "--node-rank 0 to 1"),
        (["--nnodes", "2"], "--master-addr HOST --master-port PORT"),
    ],
)
def test_launch_mistakes(tiny, flags, words):
    proc = run_cli("train", *COMMON, "--name", "bad", *flags)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and words in " ".join(out.split()) and "Traceback" not in out, out
