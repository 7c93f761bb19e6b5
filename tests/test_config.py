"""Typed configuration: precedence, validation once, errors that name the field."""

import pytest
import yaml

from appliance.config import RunConfig, load_run_config, parse_set, profiles_dir, validate_config
from appliance.errors import ApplianceError


def test_every_shipped_recipe_validates():
    recipes = sorted((profiles_dir() / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        # GRPO's reward functions are the user's own file: its recipe cannot name one.
        flags = {"grpo": {"reward_file": "rewards.py"}} if path.stem == "grpo" else None
        cfg = load_run_config(path.stem, flags=flags)
        assert isinstance(cfg, RunConfig) and cfg.recipe == path.stem
        assert path.read_text().startswith("#"), f"{path.name} starts with a comment giving its command"


def test_precedence_recipe_then_file_then_set_then_flags(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"lr": 0.001, "batch_size": 2}, "lora": {"rank": 8}}))
    cfg = load_run_config(
        "sft-qlora", config_file, ["train.lr=0.002", "lora.rank=32"], {"lora": {"rank": 64}}
    )
    assert cfg.train.batch_size == 2  # from the file
    assert cfg.train.lr == 0.002  # --set beats the file
    assert cfg.lora.rank == 64  # flags beat --set
    assert cfg.lora.target_modules == "all-linear"  # the recipe's


def test_set_parses_yaml_values():
    assert parse_set(["lora.target_modules=[q_proj, v_proj]", "train.packing=false", "train.lr=1e-4"]) == {
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "train": {"packing": False, "lr": 1e-4},
    }
    with pytest.raises(ApplianceError, match="key=value"):
        parse_set(["train.lr"])


def test_errors_name_every_bad_field_and_the_allowed_values():
    with pytest.raises(ApplianceError) as err:
        validate_config({"train": {"lr": -1, "schedule": "wavy", "bogus": 1}, "lora": {"rank": 0}})
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "train.lr" in text and "train.schedule" in text and "lora.rank" in text
    assert "'cosine', 'linear' or 'constant'" in text
    assert "train.bogus: unknown field" in text and "train accepts:" in text


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ApplianceError) as err:
        load_run_config("nope")
    assert "sft-qlora" in err.value.fix


def test_bad_yaml_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ApplianceError, match="not valid YAML"):
        load_run_config("sft-qlora", bad)
