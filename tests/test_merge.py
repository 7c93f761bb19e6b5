"""Merging into 16-bit weights on the tiny LLaMA: a complete folder, parity, refusals."""

import json
import shutil

import pytest

from appliance.errors import ApplianceError
from appliance.merge import merge_adapter
from appliance.train.loop import run_training
from test_train import tiny_config
from conftest import DEMO


@pytest.fixture
def trained(tiny):
    run_training(tiny_config(DEMO / "facts.jsonl", steps=6, lr=5e-3), tiny, "a")
    return tiny


def test_merge_writes_a_complete_model_with_parity(trained):
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
    print(f"\ntiny merge parity: {parity}")
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] < 1e-3 and parity["positions"] > 50
    assert manifest.kind == "merged" and manifest.adapter == "a" and manifest.base == "tiny"
    assert manifest.base_fingerprint == trained.model("tiny").fingerprint
    # The merge really changed the weights: the merged model is not the base.
    assert manifest.fingerprint != trained.model("tiny").fingerprint


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
