"""The training loop on the tiny LLaMA in real 4-bit: artefacts, exact resume, signals, bad input."""

import json
import signal
import subprocess
import sys
import time

import pytest

from appliance.config import load_run_config
from appliance.errors import ApplianceError
from appliance.train.loop import run_training
from appliance.train.optim import schedule_factor
from conftest import DEMO, REPO, SmallFilesystem


def tiny_config(data, **train):
    return load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": "tiny"},
            "data": {"files": [{"path": str(data)}], "val": 2},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "save_every": 2, "eval_every": 2, **train},
        },
    )


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_leaves_a_self_describing_adapter(tiny):
    result = run_training(tiny_config(DEMO / "facts.jsonl"), tiny, "demo")
    adapter = result.adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file()
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    # The folder vLLM serves it over: the base's 4-bit twin, written by the run (see test_serve).
    twin = tiny.twin_4bit_dir(tiny.model("tiny"))
    assert peft_config["base_model_name_or_path"] == str(twin) and (twin / "config.json").is_file()
    assert peft_config["r"] == 16
    manifest = tiny.adapter("demo")
    assert manifest.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert manifest.base == "tiny" and manifest.base_fingerprint == tiny.model("tiny").fingerprint
    assert manifest.data[0].format == "chat" and len(manifest.data[0].sha256) == 64
    assert manifest.config["train"]["steps"] == 4 and manifest.config["lora"]["rank"] == 16
    assert {"train_loss", "val_loss", "steps"} <= set(manifest.metrics)
    steps = [m for m in metrics(result.run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all({"lr", "tokens_per_s", "memory_gib", "elapsed_s"} <= set(m) for m in steps)
    assert any("val_loss" in m for m in metrics(result.run_dir))
    assert (result.run_dir / "config.yaml").is_file()
    assert [p.name for p in sorted((result.run_dir / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]


def test_base_layers_are_really_4bit_and_only_lora_trains(tiny):
    import bitsandbytes as bnb
    import torch

    from appliance.train.loop import TrainingRun

    run = TrainingRun(tiny_config(DEMO / "facts.jsonl"), tiny, "x")
    run.setup()
    linear4 = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 14  # 7 projections × 2 layers
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    assert linear4[0].weight.quant_state.nested  # double quantization
    assert all("lora_" in n for n in run.adapter_params)

    # A validation pass must not change how the next training step computes (bitsandbytes repacks
    # 4-bit weights for CPU inference in eval mode, and that layout has no backward).
    def layer0_grad():
        batch = run._micro_batch(0)
        loss, _ = run.objective.loss_sum(run.model, batch.tensors)
        loss.backward()
        name = next(n for n in run.adapter_params if "layers.0." in n and "lora_B" in n)
        grad = run.adapter_params[name].grad.clone()
        run.model.zero_grad()
        return grad

    before = layer0_grad()
    run.evaluate()
    assert torch.allclose(before, layer0_grad())
    assert before.abs().sum() > 0


def test_schedule_warms_up_then_decays():
    f = [schedule_factor(s, 10, 2, "cosine") for s in range(10)]
    assert f[0] < f[1] < f[2] == 1.0 and f[-1] < 0.05 and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert [schedule_factor(s, 10, 0, "constant") for s in (0, 9)] == [1.0, 1.0]
    assert schedule_factor(9, 10, 0, "linear") == pytest.approx(0.1)


def _train_cli(*extra):
    return [
        sys.executable, "-m", "appliance", "train", "--model", "tiny", "--data", str(DEMO / "facts.jsonl"),
        "--steps", "60", "--batch-size", "4", "--lr", "1e-3", "--save-every", "5", "--eval-every", "10",
        "--set", "lora.dropout=0.1", *extra,
    ]


def _stop_after(args, step, sig, run_dir):
    """Start training, wait until `step` is logged, send `sig`; return the process result."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    log = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(l).get("step", 0) >= step for l in log.read_text().splitlines() if l.strip()):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def test_sigterm_saves_and_resume_replays_the_same_losses(tiny, appliance_home):
    full = subprocess.run(_train_cli("--name", "full"), cwd=REPO, capture_output=True, text=True)
    assert full.returncode == 0, full.stdout + full.stderr
    reference = {m["step"]: m["loss"] for m in metrics(appliance_home / "runs" / "full") if "loss" in m}

    run_dir = appliance_home / "runs" / "cut"
    code, out = _stop_after(_train_cli("--name", "cut"), 7, signal.SIGTERM, run_dir)
    assert code == 143, out
    assert "--resume" in out and "Traceback" not in out
    stopped_at = max(m["step"] for m in metrics(run_dir) if "loss" in m)
    assert stopped_at < 60 and (run_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir()

    resumed = subprocess.run(_train_cli("--name", "cut", "--resume"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}
    assert sorted(after) == list(range(1, 61))
    following = [s for s in after if s > stopped_at]
    print(f"\nstopped at step {stopped_at}; compared {len(following)} following steps")
    for s in following:
        assert abs(after[s] - reference[s]) <= 1e-4, (s, after[s], reference[s])


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny, appliance_home):
    run_dir = appliance_home / "runs" / "intr"
    code, out = _stop_after(_train_cli("--name", "intr"), 3, signal.SIGINT, run_dir)
    assert code == 130, out
    assert "Traceback" not in out
    assert list((run_dir / "checkpoints").glob("step-*"))


def test_existing_adapter_is_not_overwritten_without_the_flag(tiny):
    cfg = tiny_config(DEMO / "facts.jsonl", steps=1)
    run_training(cfg, tiny, "taken")
    before = (tiny.adapter_dir("taken") / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ApplianceError, match="already exists"):
        run_training(cfg, tiny, "taken")
    assert (tiny.adapter_dir("taken") / "adapter_model.safetensors").read_bytes() == before
    run_training(cfg, tiny, "taken", overwrite=True)


def test_not_enough_disk_for_a_checkpoint_is_refused_before_writing(tiny, appliance_home):
    """A real 1 MiB file system under runs/ (a tmpfs in a user namespace, no root needed): the check
    refuses the checkpoint that would not fit; earlier checkpoints survive."""
    from appliance.train.checkpoint import verify

    runs = appliance_home / "runs"
    with SmallFilesystem(runs, "1m") as fs:
        result = fs.run_cli(
            "train", "--model", "tiny", "--data", str(DEMO / "facts.jsonl"), "--name", "big", "--steps", "40",
            "--save-every", "1", "--batch-size", "4", "--lr", "1e-3", "--val", "2", "--eval-every", "2",
        )
        text = " ".join((result.stdout + result.stderr).split())
        print("\n" + text[-400:])
        assert result.returncode == 2 and "Not enough disk space for the checkpoint" in text, text
        assert "Traceback" not in text
        kept = sorted(fs.path(runs / "big" / "checkpoints").glob("step-*"))
        assert kept, "earlier checkpoints survive"
        assert all(verify(p) is None for p in kept)
        assert not list(fs.path(runs / "big" / "checkpoints").glob(".tmp-*"))


def test_a_run_started_with_overwrite_resumes_with_it_and_keeps_the_old_adapter_until_done(tiny, appliance_home):
    """`--name X --overwrite` over an existing adapter, stopped; `--name X --resume` carries the
    overwrite on, and the old adapter stays whole until the new one is complete."""
    first = subprocess.run(_train_cli("--name", "x", "--steps", "4"), cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    old = (appliance_home / "adapters" / "x" / "adapter_model.safetensors").read_bytes()
    code, out = _stop_after(_train_cli("--name", "x", "--overwrite"), 6, signal.SIGTERM, appliance_home / "runs" / "x")
    assert code == 143, out
    assert (appliance_home / "adapters" / "x" / "adapter_model.safetensors").read_bytes() == old
    resumed = subprocess.run(_train_cli("--name", "x", "--resume"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (appliance_home / "adapters" / "x" / "adapter_model.safetensors").read_bytes() != old
    assert tiny.adapter("x").metrics["steps"] == 60
    # A run started without --overwrite does not replace someone's adapter on resume.
    code, _ = _stop_after(_train_cli("--name", "fresh"), 3, signal.SIGTERM, appliance_home / "runs" / "fresh")
    assert code == 143
    import shutil

    shutil.copytree(appliance_home / "adapters" / "x", appliance_home / "adapters" / "fresh")
    refused = subprocess.run(_train_cli("--name", "fresh", "--resume"), cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_a_4bit_base_counts_its_parameters_as_the_16bit_one_does(tiny):
    """The dashboard's "N trainable of M": bitsandbytes packs two 4-bit values a byte, so counting the
    stored tensors gives about half of a quantized layer; M is the model's size whatever it is stored in."""
    import torch

    from appliance.config import LoraSpec, ModelSpec
    from appliance.hf import load_base
    from appliance.train.model import attach_lora, trainable_parameters

    counts = {}
    for four_bit in (True, False):
        spec = ModelSpec(load_in_4bit=four_bit, gradient_checkpointing=False)
        counts[four_bit] = trainable_parameters(attach_lora(load_base(tiny.model_dir("tiny"), spec, "cpu", torch.float32), LoraSpec(rank=4)))
    assert counts[True] == counts[False], counts
    assert counts[True][1] - counts[True][0] == sum(p.numel() for p in load_base(tiny.model_dir("tiny"), spec, "cpu", torch.float32).parameters())


def test_a_start_refused_before_its_first_step_leaves_no_run_behind(tiny, tmp_path):
    """Data that cannot be read is found after the run folder is made: the folder goes again, so
    `runs list` shows no empty run and the same command, fixed, starts cleanly."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text((DEMO / "facts.jsonl").read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ApplianceError, match="bad line"):
        run_training(tiny_config(bad, steps=1), tiny, "refused")
    assert not tiny.run_dir("refused").exists()
    assert run_training(tiny_config(DEMO / "facts.jsonl", steps=1), tiny, "refused").steps == 1
