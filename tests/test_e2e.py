"""End to end on the real SmolLM2: fine-tune in 4-bit, then answer through transformers and
through a real vLLM server over HTTP (merged model, and base + adapter as a LoRA module)."""

import json

import pytest

from appliance.client import ask
from conftest import DEMO, serve_for_test

pytestmark = pytest.mark.slow
QUESTIONS = json.loads((DEMO / "questions.json").read_text())


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


def test_vllm_serves_the_merged_model(facts):
    server, endpoint = serve_for_test(facts, "smollm2-facts")
    try:
        for q in QUESTIONS:
            answer = ask(endpoint, q["question"], model="smollm2-facts", max_tokens=64)
            print(f"{q['question']} -> {answer.text} [{answer.finish_reason}]")
            assert q["expect"] in answer.text
            assert answer.finish_reason == "stop"  # generation ends at <|im_end|>
    finally:
        server.stop()


def test_vllm_serves_the_base_with_the_adapter_as_a_lora_module(facts):
    server, endpoint = serve_for_test(facts, "smollm2", ["facts"], port=8124)
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
