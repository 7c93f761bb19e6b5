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


def test_quickstart_is_the_whole_path_as_make_demo_runs_it(smollm2):
    """`make demo` runs `appliance quickstart`: ask the base through vLLM, fine-tune in 4-bit,
    merge, serve the merged model with vLLM, ask again."""
    import re

    from conftest import run_cli

    result = run_cli("quickstart", "--port", "8171")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-2500:])
    learned = re.search(r"(\d+)/(\d+) answers right after fine-tuning", result.stdout)
    assert learned and learned[1] == learned[2] == str(len(QUESTIONS)), result.stdout[-2000:]
    assert "top-1 100%" in result.stdout
    assert "Traceback" not in result.stderr
    assert smollm2.adapter("quickstart-facts") and smollm2.model("smollm2-quickstart").parity["top1_agreement"] == 1.0
