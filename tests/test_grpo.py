"""GRPO with reward functions from a user's file, on the tiny LLaMA in real 4-bit: the ready rewards, a
run's figures, and bad files and functions as the user's mistakes (the reward rising on SmolLM2 is in
test_methods.py)."""

import json

import pytest

from appliance.config import load_run_config
from appliance.errors import ApplianceError
from appliance.rewards import exact_match, length, regex, score
from appliance.train import run_training
from conftest import REPO

DATA = REPO / "appliance" / "demo" / "methods"


def grpo_config(model, rewards, **train):
    return load_run_config("grpo", flags={
        "model": {"name": model},
        "data": {"files": [{"path": str(DATA / "prompts.jsonl")}], "val": 4},
        "grpo": {"reward_file": str(rewards), "max_new_tokens": 24},
        "train": {"save_every": 100, "eval_every": 100, **train},
    })


def test_ready_rewards_and_their_sum():
    assert exact_match("q", " Madrid. ", answer="madrid") == 1.0 and exact_match("q", "Paris", answer="Madrid") == 0.0
    assert regex(r"^\d+$")("q", "42") == 1.0 and regex(r"^\d+$")("q", "forty-two") == 0.0
    assert length(10)("q", "x" * 30) == pytest.approx(-0.2)
    # A function taking `answer` gets the line's reference; one that does not is called without it.
    assert score([exact_match, regex("Mad")], "q", "Madrid", "Madrid") == 2.0


def test_a_grpo_run_on_the_tiny_model_logs_its_rewards_and_saves_an_adapter(tiny):
    result = run_training(grpo_config("tiny", DATA / "brevity_rewards.py", steps=2, batch_size=2, grad_accum=1), tiny, "g")
    steps = [m for m in (json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(steps) == 2 and all({"reward", "reward_std", "completion_tokens"} <= set(m) for m in steps)
    assert "val_reward" in result.metrics and (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("body, words", [
    ("x = 1\n", "defines no reward function"),
    ("def f(prompt, completion):\n    return 1 / 0\n", "The reward function f failed: ZeroDivisionError"),
    ("def f(prompt, completion):\n    return 'high'\n", "The reward function f failed: ValueError"),
    ("import nosuchmodule\n", "failed to load: ModuleNotFoundError"),
])
def test_a_broken_reward_file_is_the_users_mistake(tiny, tmp_path, body, words):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(body)
    with pytest.raises(ApplianceError, match=words):
        run_training(grpo_config("tiny", rewards, steps=1, batch_size=2, grad_accum=1), tiny, "broken")


def test_grpo_needs_reward_functions():
    with pytest.raises(Exception, match="GRPO needs reward functions"):
        load_run_config("grpo", flags={"model": {"name": "tiny"}, "data": {"files": [{"path": str(DATA / "prompts.jsonl")}]}})


@pytest.mark.slow
def test_grpo_samples_through_vllm_from_the_policy_as_it_trains(store, smollm2_store, tmp_path):
    """grpo.sampler=vllm on vLLM's CPU build: a server of the run's own serves the 4-bit twin with the
    adapter as it is at each step. At step 2 the policy has moved far from the base (a large learning
    rate), yet vLLM's log-probabilities of the answers it drew are the policy's own: it sampled the
    current adapter, not the base or a stale one. The server is gone when the run ends."""
    import psutil

    from appliance.doctor_run import tiny_llama
    from appliance.models import import_model
    from appliance.serve import grpo_sampler

    import_model(str(tiny_llama(tmp_path / "tiny")), store, name="tiny")  # heads of 64: vLLM's CPU attention has no 16
    cfg = load_run_config("grpo", flags={
        "model": {"name": "tiny"},
        "data": {"files": [{"path": str(DATA / "prompts.jsonl")}], "val": 4},
        "grpo": {"reward_file": str(DATA / "brevity_rewards.py"), "max_new_tokens": 16, "sampler": "vllm", "beta": 0.04},
        "train": {"steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 0.05, "save_every": 100, "eval_every": 100},
    })
    result = run_training(cfg, store, "sampled-by-vllm", sampler_for=grpo_sampler)
    steps = [m for m in (json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    # Measured: gaps of 0.0003 nats per token at both steps, while at step 2 the policy is 0.04 (KL per
    # token) from the base, which a sampler serving the base or step 1's adapter (the base: B starts at 0)
    # would have shown as a gap of that order.
    assert len(steps) == 2 and steps[1]["kl"] > 0.02, steps
    assert all(m["sampler_logprob_gap"] < 0.005 for m in steps), steps
    assert not (result.run_dir / "sampler").exists()
    assert not [p for p in psutil.Process().children(recursive=True) if "vllm" in " ".join(p.cmdline())]


def test_the_sampler_is_vllm_on_a_gpu_and_refuses_what_vllm_cannot_serve():
    from appliance.config import LoraSpec
    from appliance.serve.sampler import resolve_sampler

    assert resolve_sampler("auto", LoraSpec(), "cuda", 1) == "vllm"  # vLLM is installed here
    assert resolve_sampler("auto", LoraSpec(), "cpu", 1) == "transformers"
    assert resolve_sampler("vllm", LoraSpec(), "cpu", 1) == "vllm"
    for lora, world, words in ((LoraSpec(use_dora=True), 1, "DoRA"), (LoraSpec(), 2, "2 processes")):
        assert resolve_sampler("auto", lora, "cuda", world) == "transformers"
        with pytest.raises(ApplianceError, match=words) as refused:
            resolve_sampler("vllm", lora, "cuda", world)
        assert "grpo.sampler=transformers" in refused.value.fix
    # PiSSA moves part of the base into the adapter, which vLLM would serve over the unchanged base: the
    # config refuses it for GRPO before any sampler is chosen; a sharded base is refused there too.
    for lora, train, words in (({"init": "pissa"}, {}, "lora.init=pissa"), ({}, {"fsdp": True}, "train GRPO data-parallel")):
        with pytest.raises(Exception, match=words):
            load_run_config("grpo", flags={"model": {"name": "tiny", "load_in_4bit": False}, "lora": lora, "train": train,
                                           "data": {"files": [{"path": str(DATA / "prompts.jsonl")}]},
                                           "grpo": {"reward_file": str(DATA / "brevity_rewards.py")}})
