"""The vLLM command line, and what happens when vLLM fails to start."""

import re
import sys

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.serve import build_spec, lora_rank_limit, vllm_command, vllm_env
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
    """A weights file cut short after import (a disk error, a copy stopped half-way): vLLM dies
    loading it; the CLI names the cause and the fix above the log's last lines."""
    weights = next(tiny.model_dir("tiny").glob("*.safetensors"))
    cut = weights.read_bytes()[:4096]
    weights.unlink()  # the import hard-linked it to the session's tiny model: a new file, not that one cut
    weights.write_bytes(cut)
    result = CliRunner().invoke(main, ["serve", "tiny", "--port", "8131"])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    print(text[-1500:])
    assert result.exit_code == 2
    assert "vLLM exited during start-up" in text and "Last lines of" in text
    assert "damaged or incomplete" in text and "--overwrite" in text
    assert "Traceback (most recent call last)" not in text.split("Last lines of")[0]


def _guarded_app(monkeypatch, key="sk-appliance-test-key"):
    """The real middleware in front of a small ASGI app that answers 200 on every path."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from appliance.serve.auth import RequireKey

    monkeypatch.setenv("VLLM_API_KEY", key)
    paths = ["/health", "/ping", "/v1/models", "/tokenize", "/metrics", "/version", "/invocations", "/v1/load_lora_adapter"]
    app = Starlette(routes=[Route(p, lambda request: PlainTextResponse("ok"), methods=["GET", "POST"]) for p in paths])
    return RequireKey(app), paths


def test_every_path_but_health_needs_the_key(monkeypatch):
    from starlette.testclient import TestClient

    app, paths = _guarded_app(monkeypatch)
    with TestClient(app) as client:
        open_paths = {p for p in paths for method in ("GET", "POST") if client.request(method, p).status_code != 401}
        assert open_paths == {"/health"}
        good = {"Authorization": "Bearer sk-appliance-test-key"}
        assert all(client.post(p, headers=good).status_code == 200 for p in paths)
        assert client.get("/ping", headers={"Authorization": "Bearer wrong"}).status_code == 401


# -- the key of a foreground server ------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "0.0.0.0", "10.1.2.3"])
@pytest.mark.parametrize("lora", [True, False])
def test_a_foreground_server_has_a_key_unless_opted_out_on_loopback(host, lora):
    from appliance.errors import ApplianceError
    from appliance.serve import server_key

    loopback = host in ("127.0.0.1", "localhost", "::1")
    generated = server_key(host, lora=lora, given=None, opt_out=False, service_key=None)
    assert generated.source == "generated" and generated.key.startswith("sk-appliance-") and len(generated.key) > 30
    assert server_key(host, lora=lora, given=None, opt_out=False, service_key=None).key != generated.key  # fresh each time
    assert server_key(host, lora=lora, given=None, opt_out=False, service_key="sk-svc").key == "sk-svc"
    assert server_key(host, lora=lora, given="sk-mine", opt_out=False, service_key="sk-svc").key == "sk-mine"
    if loopback:
        open_ = server_key(host, lora=lora, given=None, opt_out=True, service_key="sk-svc")
        assert open_.key is None and open_.source == "none"
        assert ("load adapters" in open_.warning) == lora
    else:
        with pytest.raises(ApplianceError, match="--no-api-key") as refused:
            server_key(host, lora=lora, given=None, opt_out=True, service_key=None)
        assert "127.0.0.1" in refused.value.fix
    with pytest.raises(ApplianceError, match="--no-api-key"):
        server_key(host, lora=lora, given="sk-mine", opt_out=True, service_key=None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "0.0.0.0", "--allow-remote", "--no-api-key"], "127.0.0.1"),
        (["--no-api-key", "--api-key", "sk-mine"], "--no-api-key"),
    ],
)
def test_serve_refuses_an_open_server_it_should_not_run(tiny, args, message):
    result = CliRunner().invoke(main, ["serve", "tiny", "--runtime-adapters", "--port", "8139", *args])
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    print(text)
    assert result.exit_code == 2 and message in text and "Traceback" not in text
    assert "No such option" not in text and "Fix" in text


def test_adapters_are_served_over_the_bases_4bit_twin_which_computes_what_training_did(tiny):
    """Training writes the base's 4-bit twin once; with LoRA on, vLLM loads it instead of the
    16-bit base: the weights bitsandbytes quantizes are its 4-bit values, everything else the base's."""
    import torch
    from safetensors.torch import load_file

    from appliance.hf import roundtrip_4bit

    _adapter("a")
    model = tiny.model("tiny")
    twin = tiny.twin_4bit_dir(model)
    assert build_spec(tiny, "tiny", ["a"]).model_dir == twin and build_spec(tiny, "tiny", runtime_adapters=True).model_dir == twin
    assert build_spec(tiny, "tiny").model_dir == tiny.model_dir("tiny")  # no LoRA: the base itself
    base = load_file(str(next(tiny.model_dir("tiny").glob("*.safetensors"))))
    served = load_file(str(next(twin.glob("*.safetensors"))))
    assert base.keys() == served.keys()
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(served[name], base[name]) and served[name].dtype == base[name].dtype
    assert torch.equal(served[name], roundtrip_4bit(base[name]).to(base[name].dtype))
    assert torch.equal(served["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert (twin / "tokenizer.json").samefile(tiny.model_dir("tiny") / "tokenizer.json")  # linked, not copied
    # A running server is matched to the store by the folder it loaded: the twin is the base's.
    assert tiny.holds_weights_of(model, twin) and tiny.holds_weights_of(model, tiny.model_dir("tiny"))
    assert not tiny.holds_weights_of(model, tiny.adapter_dir("a"))
