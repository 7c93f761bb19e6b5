"""Model import: GGUF → HF folder, local folders, the HF cache; fingerprints and refusals."""

import json
import shutil

import pytest

from appliance.errors import ApplianceError
from appliance.models import import_model
from appliance.registry import fingerprint_model
from conftest import run_cli


def test_smollm2_gguf_becomes_a_normal_hf_folder(smollm2_store):
    folder = smollm2_store / "models" / "smollm2"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in (folder / "tokenizer_config.json").read_text()
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert 2 in eos  # <|im_end|>, SmolLM2's end of turn
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["end_of_turn"] == "<|im_end|>" and manifest["chat_template"] is True
    assert manifest["parameters"] == 134_515_008
    assert manifest["fingerprint"] == fingerprint_model(folder)


def test_the_converted_model_knows_paris(smollm2_store):
    from appliance.evaluate import generate_answers
    from appliance.hf import load_tokenizer

    import torch
    from transformers import AutoModelForCausalLM

    folder = smollm2_store / "models" / "smollm2"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    answers = generate_answers(model, load_tokenizer(folder), ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answers[0]


def test_local_folder_import_and_listing(tiny, tiny_model_folder):
    out = run_cli("models", "list", "--json")
    assert out.returncode == 0, out.stderr
    names = [m["name"] for m in json.loads(out.stdout)]
    assert names == ["tiny"]
    shown = json.loads(run_cli("models", "show", "tiny", "--json").stdout)
    assert shown["architecture"] == "LlamaForCausalLM" and shown["chat_template"] is True
    assert shown["context_length"] == 2048 and shown["dtype"] == "bfloat16"
    # Same bytes, same fingerprint.
    assert shown["fingerprint"] == import_model(str(tiny_model_folder), tiny, name="tiny2").fingerprint


def test_import_twice_needs_overwrite(tiny, tiny_model_folder):
    with pytest.raises(ApplianceError, match="already in the store"):
        import_model(str(tiny_model_folder), tiny, name="tiny")
    import_model(str(tiny_model_folder), tiny, name="tiny", overwrite=True)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pickle_weights_are_refused(tiny_model_folder, tmp_path, store):
    folder = _copy(tiny_model_folder, tmp_path / "pickled")
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ApplianceError, match="pickle"):
        import_model(str(folder), store)


def test_custom_code_is_refused_unless_allowed(tiny_model_folder, tmp_path, store):
    folder = _copy(tiny_model_folder, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ApplianceError, match="auto_map"):
        import_model(str(folder), store)


def test_folder_without_tokenizer_is_refused(tiny_model_folder, tmp_path, store):
    folder = _copy(tiny_model_folder, tmp_path / "notok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ApplianceError, match="no tokenizer"):
        import_model(str(folder), store)


def test_unsupported_gguf_architecture_is_refused(tmp_path, store):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ApplianceError, match="'bert' model"):
        import_model(str(path), store)


def test_hf_id_from_the_local_cache(tiny_model_folder, tmp_path, store, monkeypatch):
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_folder, snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    manifest = import_model("acme/tiny-llama", store)
    assert manifest.name == "tiny-llama" and manifest.source == "hf:acme/tiny-llama"
    with pytest.raises(ApplianceError, match="huggingface-cli download acme/absent"):
        import_model("acme/absent", store)


def test_unknown_model_name_suggests_close_ones(tiny):
    with pytest.raises(ApplianceError) as err:
        tiny.model("tiyn")
    assert "tiny" in err.value.fix
