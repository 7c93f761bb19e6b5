"""End to end on the real SmolLM2: fine-tune in 4-bit, then answer through transformers and
through a real vLLM server over HTTP (merged model, and base + adapter as a LoRA module)."""

import json

import pytest

from appliance.client import Endpoint, ask
from appliance.registry import Registry
from appliance.serve.command import build_spec, vllm_command, vllm_env
from appliance.serve.process import VllmProcess
from appliance.store import Store
from conftest import DEMO, _link_tree

pytestmark = pytest.mark.slow
QUESTIONS = json.loads((DEMO / "questions.json").read_text())


@pytest.fixture(scope="module")
def facts(smollm2_store, tmp_path_factory):
    """A store with SmolLM2, a 4-bit QLoRA adapter 'facts' trained on the demo data, and its merge."""
    from appliance.config import load_run_config
    from appliance.merge import merge_adapter
    from appliance.train.loop import run_training

    root = tmp_path_factory.mktemp("facts-store")
    _link_tree(smollm2_store / "models" / "smollm2", root / "models" / "smollm2")
    registry = Registry(Store(root))
    cfg = load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": "smollm2"},
            "data": {"files": [{"path": str(DEMO / "facts.jsonl")}], "val_file": str(DEMO / "facts_val.jsonl")},
            "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "eval_every": 10, "save_every": 10},
        },
    )
    result = run_training(cfg, registry, "facts")
    assert result.metrics["val_loss"] < 0.6
    merge_adapter(registry, "facts", name="smollm2-facts")
    return registry


def test_transformers_base_does_not_know_and_adapter_does(facts):
    from appliance.evaluate import generate_answers, load_for_inference
    from appliance.train.model import load_tokenizer

    model_dir = facts.model_dir("smollm2")
    tokenizer = load_tokenizer(model_dir)
    asked = [q["question"] for q in QUESTIONS]
    base = generate_answers(load_for_inference(model_dir), tokenizer, asked)
    tuned = generate_answers(load_for_inference(model_dir, facts.adapter_dir("facts")), tokenizer, asked)
    for q, before, after in zip(QUESTIONS, base, tuned):
        print(f"\n{q['question']}\n  base:    {before}\n  adapter: {after}")
        assert q["expect"] in after, (q, after)
        if not q.get("general"):
            assert q["expect"] not in before, (q, before)


def test_merge_parity_on_smollm2(facts):
    parity = facts.model("smollm2-facts").parity
    print(f"\nSmolLM2 merge parity: {parity}")
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] < 1e-2 and parity["dtype"] == "float32"


def _serve(registry, model, adapters=(), port=8123):
    spec = build_spec(registry, model, adapters, port=port)
    server = VllmProcess(vllm_command(spec), vllm_env(spec), registry.store.root / "logs" / f"test-{model}.log")
    server.start()
    try:
        seconds = server.wait_healthy(spec.url)
    except BaseException:
        server.stop()
        raise
    print(f"\nvLLM up in {seconds:.0f} s for {spec.served_names}")
    return server, Endpoint(spec.url)


def test_vllm_serves_the_merged_model(facts):
    server, endpoint = _serve(facts, "smollm2-facts")
    try:
        for q in QUESTIONS:
            answer = ask(endpoint, q["question"], model="smollm2-facts", max_tokens=64)
            print(f"{q['question']} -> {answer.text} [{answer.finish_reason}]")
            assert q["expect"] in answer.text
            assert answer.finish_reason == "stop"  # generation ends at <|im_end|>
    finally:
        server.stop()


def test_vllm_serves_the_base_with_the_adapter_as_a_lora_module(facts):
    server, endpoint = _serve(facts, "smollm2", ["facts"], port=8124)
    try:
        for q in QUESTIONS:
            tuned = ask(endpoint, q["question"], model="facts", max_tokens=64)
            base = ask(endpoint, q["question"], model="smollm2", max_tokens=64)
            print(f"{q['question']}\n  base: {base.text}\n  facts: {tuned.text} [{tuned.finish_reason}]")
            assert q["expect"] in tuned.text and tuned.finish_reason == "stop"
            if not q.get("general"):
                assert q["expect"] not in base.text
    finally:
        server.stop()
