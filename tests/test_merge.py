"""Merging into 16-bit weights on the tiny LLaMA: a complete folder, judged against the 4-bit model
that was trained and evaluated; the arithmetic against peft's own merge; refusals."""

import json
import shutil

import pytest

from appliance.errors import ApplianceError
from appliance.merge import merge_adapter
from appliance.train.loop import run_training
from conftest import DEMO
from test_train import tiny_config


@pytest.fixture
def trained(tiny):
    # A high rate for a few steps: the adapter moves the logits a lot, so merge errors would show.
    run_training(tiny_config(DEMO / "facts.jsonl", steps=6, lr=5e-3), tiny, "a")
    return tiny


def test_merge_writes_a_complete_model_that_reproduces_the_evaluated_model(trained):
    manifest = merge_adapter(trained, "a", name="tiny-a")
    folder = trained.model_dir("tiny-a")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "manifest.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(n.endswith(".bin") for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    parity = manifest.parity
    print(f"\ntiny merge parity: {parity.model_dump_json(indent=1)}")
    assert parity.weights == "dequantized" and parity.dtype == "float32" and parity.compute_dtype == "float32"
    assert parity.validation_examples == 2 and parity.evaluated.positions > 100
    # The dequantized NF4 weights + B·A are the 4-bit model's own arithmetic: equal but for the order
    # of fp32 sums. The random tiny model's distributions are flat (no clear positions), so a near-tie
    # may flip at one position in a hundred; the KL shows the two models are the same.
    assert parity.evaluated.top1_agreement_all >= 0.99 and abs(parity.evaluated.mean_kl) < 1e-6
    assert parity.evaluated.max_abs_logit_diff < 1e-2 and parity.saved_max_rel_diff < 1e-6
    assert manifest.kind == "merged" and manifest.adapter == "a" and manifest.base == "tiny"
    assert manifest.base_fingerprint == trained.model("tiny").fingerprint
    assert manifest.fingerprint != trained.model("tiny").fingerprint  # the merge changed the weights


def test_merging_into_the_dequantized_weights_agrees_better_than_into_the_original(trained):
    dequantized = merge_adapter(trained, "a", name="deq", weights="dequantized").parity.evaluated
    original = merge_adapter(trained, "a", name="orig", weights="original").parity.evaluated
    print(f"\ndequantized: {dequantized}\noriginal:    {original}")
    assert dequantized.mean_kl < original.mean_kl / 100
    assert dequantized.max_abs_logit_diff < original.max_abs_logit_diff


def test_the_original_weights_merge_is_peft_s_own_arithmetic(trained):
    """W + s·B·A written shard by shard equals peft's merge_and_unload of the 16-bit base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge_adapter(trained, "a", name="orig", weights="original")
    base = AutoModelForCausalLM.from_pretrained(trained.model_dir("tiny"), dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(trained.adapter_dir("a"))).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(trained.model_dir("orig"), dtype=torch.float32).state_dict()
    assert expected.keys() == merged.keys()
    worst = max(float((expected[k] - merged[k]).abs().max()) for k in expected)
    assert worst < 1e-6, worst


def test_a_bf16_merge_passes_the_gate_at_clear_positions(trained):
    """Rounding W + B·A to bf16 moves logits by a few hundredths: near-ties may flip, clear positions do not."""
    parity = merge_adapter(trained, "a", name="bf16", dtype="bfloat16").parity
    print(f"\nbf16 merge: {parity.evaluated}")
    config = json.loads((trained.model_dir("bf16") / "config.json").read_text())
    assert parity.dtype == config["dtype"] == "bfloat16" and parity.compute_dtype == "float32"
    assert parity.evaluated.max_abs_logit_diff > 1e-4  # the rounding is real
    assert parity.evaluated.top1_agreement >= parity.gate_min_top1 and parity.evaluated.mean_kl <= parity.gate_max_mean_kl


def test_a_wrong_merge_fails_the_gate_and_saves_nothing(trained, monkeypatch):
    """A merge whose deltas are wrong (ten times too large) does not match the evaluated model."""
    import appliance.merge as merge

    monkeypatch.setattr(merge.LoraDelta, "weight", lambda self: 10 * self.scaling * (self.b.float() @ self.a.float()))
    with pytest.raises(ApplianceError, match="does not match the model you evaluated"):
        merge_adapter(trained, "a", name="wrong")
    assert not trained.model_dir("wrong").exists()
    assert not list(trained.model_dir("wrong").parent.glob(".tmp-*"))


def test_merge_refuses_an_adapter_whose_base_is_missing(trained):
    shutil.rmtree(trained.model_dir("tiny"))
    with pytest.raises(ApplianceError, match="base model 'tiny' of adapter 'a' is not in the store"):
        merge_adapter(trained, "a")


def test_merge_refuses_an_adapter_for_another_base(trained, tiny_model_folder):
    from appliance.models import import_model

    other = tiny_model_folder.parent / "other"
    shutil.copytree(tiny_model_folder, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(config))
    import_model(str(other), trained, name="tiny", overwrite=True)
    with pytest.raises(ApplianceError, match="fingerprint"):
        merge_adapter(trained, "a")


def test_a_name_that_exists_needs_overwrite(trained):
    merge_adapter(trained, "a", name="m")
    with pytest.raises(ApplianceError, match="already in the store"):
        merge_adapter(trained, "a", name="m")
