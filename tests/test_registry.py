"""The registry: manifests written and read back typed, the adapter's base by fingerprint, removal."""

from __future__ import annotations

import json

import pytest

from appliance.errors import ApplianceError
from appliance.registry import AdapterManifest, Agreement, Evaluation, ModelManifest, Registry
from appliance.store import Store


def _model(registry: Registry, name: str, fingerprint: str = "f" * 16) -> ModelManifest:
    folder = registry.model_dir(name)
    folder.mkdir(parents=True)
    manifest = ModelManifest(name=name, source="test", fingerprint=fingerprint, architecture="LlamaForCausalLM", model_type="llama",
                             parameters=1, dtype="bfloat16")
    registry.write_manifest(folder, manifest)
    return manifest


def _adapter(registry: Registry, name: str, base: str, fingerprint: str = "f" * 16, **extra) -> AdapterManifest:
    folder = registry.adapter_dir(name)
    folder.mkdir(parents=True)
    manifest = AdapterManifest(name=name, base=base, base_fingerprint=fingerprint, task="sft", recipe="sft-qlora", rank=8, alpha=16,
                               target_modules=["q_proj"], **extra)
    registry.write_manifest(folder, manifest)
    return manifest


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(Store(tmp_path / "store"))


def test_results_come_back_typed(registry):
    _model(registry, "base")
    evaluation = Evaluation(adapter="a", against="base", task="sft", split="test", examples=3, before={"exact_match": 0.0}, after={"exact_match": 1.0})
    _adapter(registry, "a", "base", evaluation=evaluation)
    read = registry.adapter("a")
    assert isinstance(read.evaluation, Evaluation) and read.evaluation.after["exact_match"] == 1.0


def test_a_manifest_missing_a_result_field_is_damaged_not_zero(registry):
    """A renamed or missing key must fail loudly, never read as 0 %."""
    _model(registry, "base")
    _adapter(registry, "a", "base")
    path = registry.adapter_dir("a") / "manifest.json"
    data = json.loads(path.read_text())
    data["evaluation"] = {"adapter": "a", "against": "base", "task": "sft", "split": "test", "examples": 3, "after": {"exact_match": 1.0},
                          "exact_match_renamed": 0.5}
    path.write_text(json.dumps(data))
    with pytest.raises(ApplianceError, match="damaged"):
        registry.adapter("a")
    with pytest.raises(Exception):
        Agreement.model_validate({"positions": 3})


def test_an_adapter_needs_its_own_base(registry):
    _model(registry, "base", fingerprint="a" * 16)
    _adapter(registry, "ok", "base", fingerprint="a" * 16)
    _adapter(registry, "other", "base", fingerprint="b" * 16)
    _adapter(registry, "orphan", "gone")
    assert registry.base_of(registry.adapter("ok")).name == "base"
    with pytest.raises(ApplianceError, match="fingerprint"):
        registry.base_of(registry.adapter("other"))
    with pytest.raises(ApplianceError, match="not in the store"):
        registry.base_of(registry.adapter("orphan"))


def test_a_typo_gets_the_close_names(registry):
    _model(registry, "smollm2")
    with pytest.raises(ApplianceError) as err:
        registry.model("smolm2")
    assert "smollm2" in err.value.fix


def test_a_base_with_adapters_is_not_removed(registry):
    _model(registry, "base")
    _adapter(registry, "a", "base")
    with pytest.raises(ApplianceError, match="base of adapter"):
        registry.remove_model("base")
    assert registry.model("base")
    registry.remove_adapter("a")
    registry.remove_model("base")
    assert registry.store.names("models") == []


@pytest.mark.bad_input
def test_an_adapter_whose_run_stopped_early_points_to_resume(tmp_path):
    registry = Registry(Store(tmp_path))
    (registry.run_dir("stopped") / "checkpoints" / "step-00000002").mkdir(parents=True)
    with pytest.raises(ApplianceError, match="not saved yet") as stopped:
        registry.adapter("stopped")
    assert "--name stopped --resume" in stopped.value.fix
    with pytest.raises(ApplianceError, match="Unknown adapter 'never'"):
        registry.adapter("never")
