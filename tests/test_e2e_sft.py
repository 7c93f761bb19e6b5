"""End to end on the real SmolLM2: a 4-bit fine-tune teaches made-up facts the base does not know."""

import json

import pytest

from appliance.config import load_run_config
from appliance.evaluate import generate_answers, load_for_inference
from appliance.train.loop import run_training
from appliance.train.model import load_tokenizer
from conftest import DEMO

pytestmark = pytest.mark.slow


def test_qlora_teaches_smollm2_the_demo_facts(smollm2):
    questions = json.loads((DEMO / "questions.json").read_text())
    facts = [q for q in questions if not q.get("general")]
    cfg = load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": "smollm2"},
            "data": {"files": [{"path": str(DEMO / "facts.jsonl")}], "val_file": str(DEMO / "facts_val.jsonl")},
            "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "eval_every": 10, "save_every": 10},
        },
    )
    result = run_training(cfg, smollm2, "facts")
    assert result.metrics["val_loss"] < 0.6

    model_dir = smollm2.model_dir("smollm2")
    tokenizer = load_tokenizer(model_dir)
    asked = [q["question"] for q in questions]
    base = generate_answers(load_for_inference(model_dir), tokenizer, asked)
    tuned = generate_answers(load_for_inference(model_dir, result.adapter_dir), tokenizer, asked)
    for q, before, after in zip(questions, base, tuned):
        print(f"\n{q['question']}\n  base:    {before}\n  adapter: {after}")
    for q, before, after in zip(questions, base, tuned):
        assert q["expect"] in after, (q, after)
        if not q.get("general"):
            assert q["expect"] not in before, (q, before)
    assert len(facts) == 4
