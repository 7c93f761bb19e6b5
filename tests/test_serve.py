"""The vLLM command line, and what happens when vLLM fails to start."""

import re
import sys

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.serve.command import build_spec, lora_rank_limit, vllm_command, vllm_env
from test_bad_inputs import _adapter


def test_cpu_command_uses_the_flags_that_give_correct_output(tiny):
    spec = build_spec(tiny, "tiny", port=8009)
    cmd = vllm_command(spec)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    line = " ".join(cmd)
    assert f"--model {tiny.model_dir('tiny')}" in line and "--served-model-name tiny" in line
    assert "--host 127.0.0.1 --port 8009" in line
    assert "--dtype float32" in line and "--enforce-eager" in line and "--max-model-len 1024" in line
    assert "--enable-lora" not in line
    assert vllm_env(spec)["VLLM_CPU_KVCACHE_SPACE"]


def test_lora_limits_are_sized_from_the_adapters(tiny):
    _adapter("a", rank=8)
    _adapter("b", rank=32)
    spec = build_spec(tiny, "tiny", ["a", "b"])
    line = " ".join(vllm_command(spec))
    assert "--enable-lora --max-lora-rank 32 --max-loras 2" in line
    assert f"--lora-modules a={tiny.adapter_dir('a')}" in line and f"--lora-modules b={tiny.adapter_dir('b')}" in line
    assert vllm_env(spec)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert [lora_rank_limit([r]) for r in (1, 4, 16, 17, 300)] == [16, 16, 16, 32, 320]


@pytest.mark.slow
def test_vllm_exiting_during_start_up_shows_its_log_and_the_likely_cause(tiny):
    result = CliRunner().invoke(main, ["serve", "tiny", "--port", "8131", "--max-model-len", "100000"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    print(text[-1500:])
    assert result.exit_code == 2
    assert "vLLM exited during start-up" in text and "Last lines of" in text
    assert "max_model_len" in text.lower() or "max-model-len" in text.lower()
    assert "Traceback (most recent call last)" not in text.split("Last lines of")[0]
