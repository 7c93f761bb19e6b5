"""LoRA variants through peft on the tiny LLaMA in real 4-bit: DoRA and rsLoRA train, merge to a
model that computes what the 4-bit model + adapter computed, and DoRA is kept away from vLLM;
NEFTune's noise reaches the embeddings while training only."""

import json

import pytest
import torch

from appliance.errors import ApplianceError
from appliance.merge import merge_adapter
from appliance.train import TrainingRun, run_training
from conftest import DEMO
from test_train import tiny_config


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_a_variant_trains_and_merges_to_the_model_it_evaluated(variant, tiny):
    cfg = tiny_config(DEMO / "facts.jsonl", steps=6, lr=5e-3).with_changes({f"lora.{variant}": True})
    run_training(cfg, tiny, "v")
    adapter_config = json.loads((tiny.adapter_dir("v") / "adapter_config.json").read_text())
    assert adapter_config[variant] is True
    from safetensors import safe_open

    with safe_open(str(tiny.adapter_dir("v") / "adapter_model.safetensors"), "pt") as f:
        magnitudes = [k for k in f.keys() if "lora_magnitude_vector" in k]
    assert bool(magnitudes) == (variant == "use_dora")  # DoRA's learned norms are saved with the adapter
    parity = merge_adapter(tiny, "v", name="tiny-v").parity
    print(f"\n{variant} merge: top-1 {parity.evaluated.top1_agreement_all:.4f}, KL {parity.evaluated.mean_kl:.2e}, "
          f"max |Δlogit| {parity.evaluated.max_abs_logit_diff:.2e}")
    # Before hf.keep_4bit_layout also covered DoRA at inference, peft read the packed CPU layout as
    # plain weights for its norm: this same DoRA check gave top-1 0.74, max |Δlogit| 0.16.
    assert parity.evaluated.top1_agreement_all >= 0.99 and abs(parity.evaluated.mean_kl) < 1e-6
    assert parity.evaluated.max_abs_logit_diff < 1e-2


def test_serve_refuses_a_dora_adapter_with_the_fix(tiny):
    from appliance.serve import build_spec

    run_training(tiny_config(DEMO / "facts.jsonl", steps=1).with_changes({"lora.use_dora": True}), tiny, "d")
    with pytest.raises(ApplianceError, match="DoRA") as caught:
        build_spec(tiny, "tiny", ["d"])
    assert "appliance merge d" in caught.value.fix


def test_neftune_adds_noise_to_the_embeddings_while_training_only(tiny):
    cfg = tiny_config(DEMO / "facts.jsonl", steps=1).with_changes({"train.neftune_noise_alpha": 5.0})
    run = TrainingRun(cfg, tiny, "n")
    run.setup()
    embed = run.model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 9, 13]])
    clean = embed.weight[ids].detach().float()
    run.model.train()
    noise = embed(ids).detach().float() - clean
    bound = 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5
    assert 0.5 * bound < float(noise.abs().max()) <= bound * 1.001  # uniform in ±alpha/sqrt(L·d)
    run.model.eval()
    assert torch.equal(embed(ids).detach().float(), clean)
