"""End to end on the real SmolLM2: fine-tune in 4-bit, then answer through transformers and
through a real vLLM server over HTTP (the base with the adapter loaded on demand; the merged
model through vLLM is tests/test_quickstart.py's).

Every question asked is a paraphrase that appears nowhere in the data the adapter saw (training
or validation), and the general-knowledge controls are not in it either: a right answer shows
that the fact was learned, not recalled, and the controls show what was kept.
"""

import json
import re

import pytest

from appliance.client import ask
from appliance.quickstart import demo_questions, score
from conftest import DEMO, serve_for_test

QUESTIONS = demo_questions()
FACTS = [q for q in QUESTIONS if q.group == "fact"]
CONTROLS = [q for q in QUESTIONS if q.group == "control"]


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def test_no_question_is_in_the_data_the_adapter_sees():
    seen = set()
    for name in ("facts.jsonl", "facts_val.jsonl"):
        for line in (DEMO / name).read_text().splitlines():
            seen.update(_words(m["content"]) for m in json.loads(line)["messages"] if m["role"] == "user")
    assert FACTS and CONTROLS
    for q in QUESTIONS:
        assert _words(q.question) not in seen, q.question
        for expected in q.expect:  # a control's answer is not taught either
            if q.group == "control":
                assert all(expected.lower() not in line.lower() for line in (DEMO / "facts.jsonl").read_text().splitlines()), expected


def _check(answers_base: list[str], answers_tuned: list[str]) -> None:
    before, after = score(QUESTIONS, answers_base), score(QUESTIONS, answers_tuned)
    print(f"\nbase {before}  tuned {after}")
    for q, b, a in zip(QUESTIONS, answers_base, answers_tuned):
        print(f"{q.group:8} {q.question}\n  base:  {b}\n  tuned: {a}")
    assert after["fact"] == (len(FACTS), len(FACTS)), "every taught fact, asked as a new paraphrase"
    assert before["fact"][0] == 0, "the base does not know the made-up facts"
    assert after["control"][0] >= before["control"][0], "the controls are answered as well as the base answered them"


@pytest.mark.slow
def test_transformers_base_does_not_know_and_adapter_does(facts):
    from appliance.evaluate import generate_answers
    from appliance.hf import load_for_inference
    from appliance.hf import load_tokenizer

    model_dir = facts.model_dir("smollm2")
    tokenizer = load_tokenizer(model_dir)
    asked = [q.question for q in QUESTIONS]
    base = generate_answers(load_for_inference(model_dir), tokenizer, asked)
    tuned = generate_answers(load_for_inference(model_dir, facts.adapter_dir("facts")), tokenizer, asked)
    _check(base, tuned)


@pytest.mark.slow
def test_merge_matches_the_evaluated_model_on_smollm2(facts):
    parity = facts.model("smollm2-facts").parity
    print(f"\nSmolLM2 merge parity: {parity.model_dump_json(indent=1)}")
    assert parity.weights == "dequantized" and parity.dtype == "float32" and parity.validation_examples > 0
    assert parity.evaluated.top1_agreement >= parity.gate_min_top1 and parity.evaluated.mean_kl <= parity.gate_max_mean_kl


@pytest.mark.slow
def test_vllm_serves_the_base_and_loads_the_adapter_by_name_on_its_first_request(facts):
    """The base served with LoRA on (over its 4-bit twin); a request naming 'facts' loads it on first
    use through vLLM's filesystem resolver (nothing loaded it before); it answers every taught fact,
    each answer ending at the end-of-turn token; a name that is no adapter is one clear error.
    (The merged model through vLLM: tests/test_quickstart.py.)"""
    from appliance.errors import ApplianceError
    from appliance.serve import served_models

    server, endpoint = serve_for_test(facts, "smollm2", port=8125, runtime_adapters=True)
    try:
        before = [m["id"] for m in served_models(endpoint)]
        base = [ask(endpoint, q.question, model="smollm2", max_tokens=64).text for q in QUESTIONS]
        tuned = [ask(endpoint, q.question, model="facts", max_tokens=64) for q in QUESTIONS]
        after = [m["id"] for m in served_models(endpoint)]
        with pytest.raises(ApplianceError) as missing:
            ask(endpoint, "Hello", model="no-such-adapter", max_tokens=8)
    finally:
        server.stop()
    assert "facts" not in before and "facts" in after
    assert all(a.finish_reason == "stop" for a in tuned)
    _check(base, [a.text for a in tuned])
    assert "no-such-adapter" in missing.value.message and "it serves: smollm2" in missing.value.message
