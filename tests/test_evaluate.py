"""`appliance eval NAME --against OTHER` for every recipe, on the tiny LLaMA in real 4-bit.

The 'before' column comes from OTHER, loaded as a plain model (no adapter to switch off). A twin
of the base (the same weights under another name) must score exactly as the base with the adapter
switched off; another model must score differently, and the adapter's own column must not move.
"""

import json
import re

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.config import load_run_config
from appliance.models import import_model
from appliance.train.loop import run_training
from conftest import DEMO, REPO

DATA = REPO / "tests" / "data"
METHODS = REPO / "appliance" / "demo" / "methods"
RECIPES = {
    "sft": ("sft-qlora", DEMO / "facts.jsonl", {}),
    "cpt": ("cpt", DATA / "domain.txt", {"seq_len": 64}),
    "dpo": ("dpo", METHODS / "prefs.jsonl", {}),
    "kto": ("kto", METHODS / "feedback.jsonl", {}),
    "classify": ("classify", DATA / "reviews.jsonl", {}),
}


@pytest.fixture(scope="session")
def other_folder(tiny_model_folder, tmp_path_factory):
    """Another random tiny LLaMA with the same tokenizer: a 'before' model that is not the base."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("other-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_model_folder / name, folder / name)
    torch.manual_seed(1)
    config = LlamaConfig.from_pretrained(tiny_model_folder)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _train(store, task: str) -> None:
    recipe, path, data = RECIPES[task]
    cfg = load_run_config(
        recipe,
        flags={
            "model": {"name": "tiny"},
            "data": {"files": [{"path": str(path)}], "val": 8, **data},
            "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "save_every": 100, "eval_every": 100},
        },
    )
    run_training(cfg, store, task)


def _text(result) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def _eval(*args: str) -> dict:
    result = CliRunner().invoke(main, ["eval", *args, "--limit", "4", "--json"])
    assert result.exit_code == 0, _text(result)
    return json.loads(result.output[result.output.index("{") :])


@pytest.mark.parametrize("task", ["sft", "cpt", "dpo", "kto"])
def test_eval_against_another_model(task, tiny, tiny_model_folder, other_folder):
    _train(tiny, task)
    import_model(str(tiny_model_folder), tiny, name="twin")
    import_model(str(other_folder), tiny, name="other")
    base = _eval(task)
    twin = _eval(task, "--against", "twin")
    other = _eval(task, "--against", "other")
    print(f"\n{task}: before {base['before']} · twin {twin['before']} · other {other['before']}; after {base['after']}")
    assert (base["against"], twin["against"], other["against"]) == ("tiny", "twin", "other")
    assert set(twin["before"]) == set(base["after"]) == set(other["before"])
    assert twin["before"] == pytest.approx(base["before"], rel=1e-4, abs=1e-6)
    assert twin["forgetting"]["base_ppl"] == pytest.approx(base["forgetting"]["base_ppl"], rel=1e-4)
    assert other["before"] != pytest.approx(base["before"], rel=1e-3)
    assert other["forgetting"]["base_ppl"] != pytest.approx(base["forgetting"]["base_ppl"], rel=1e-3)
    assert other["after"] == pytest.approx(base["after"], rel=1e-4, abs=1e-6)
    if task == "sft":  # generation scores, sacrebleu's 0-100
        assert {"exact_match", "token_f1", "rouge_l", "bleu", "chrf"} <= set(base["after"])
        assert all(0 <= base[side][m] <= 100 for side in ("before", "after") for m in ("bleu", "chrf"))


def test_eval_against_is_refused_for_a_classifier_except_its_own_base(tiny, other_folder):
    """A classifier's 'before' is the majority class: another model has no trained head to compare."""
    _train(tiny, "classify")
    import_model(str(other_folder), tiny, name="other")
    result = CliRunner().invoke(main, ["eval", "classify", "--against", "other"])
    text = _text(result)
    print(text)
    assert result.exit_code == 2 and "Traceback" not in text
    assert "majority class" in text and "drop --against" in text
    report = _eval("classify", "--against", "tiny")
    assert report["against"].startswith("majority class") and {"accuracy", "macro_f1"} <= set(report["before"])


def test_eval_against_a_model_with_another_tokenizer_is_refused(tiny, other_folder, tmp_path):
    """Held-out data is tokenized by the base's tokenizer: a model reading other ids would score nonsense."""
    import shutil

    changed = tmp_path / "other-tokenizer"
    shutil.copytree(other_folder, changed)
    tokenizer = json.loads((changed / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]  # two ids swapped: same words, other ids
    (changed / "tokenizer.json").write_text(json.dumps(tokenizer))
    import_model(str(changed), tiny, name="stranger")
    _train(tiny, "cpt")
    result = CliRunner().invoke(main, ["eval", "cpt", "--against", "stranger"])
    text = _text(result)
    print(text)
    assert result.exit_code == 2 and "Traceback" not in text and "tokenizer" in text
