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


@pytest.fixture
def splittable(store, tiny_model_folder, tmp_path):
    """A random 2-layer LLaMA whose heads split over two ranks (2 query and 2 key-value heads of 64)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.models import import_model

    folder = tmp_path / "splittable"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_model_folder / name, folder / name)
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(tiny_model_folder)
    config.update({"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    import_model(str(folder), store, name="splittable")
    return store


@pytest.mark.slow
def test_tensor_parallel_2_on_the_cpu_build_answers_as_transformers_does(splittable):
    """`appliance serve --tensor-parallel-size 2` without a GPU: vLLM's CPU build splits each layer over two
    processes (gloo). Its greedy tokens and their log-probabilities are transformers' own, computed whole."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import serve_for_test

    prompt = AutoTokenizer.from_pretrained(splittable.model_dir("splittable"))("The capital of France is").input_ids
    server, endpoint = serve_for_test(splittable, "splittable", port=8160, tensor_parallel_size=2)
    try:
        assert "world_size=2" in server.log_path.read_text()
        body = {"model": "splittable", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 0,
                "return_tokens_as_token_ids": True}
        response = httpx.post(f"{endpoint.url}/v1/completions", json=body, headers=endpoint.headers, timeout=120)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    served_ids = [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]]

    model = AutoModelForCausalLM.from_pretrained(splittable.model_dir("splittable"), torch_dtype=torch.float32)
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt):]
        scores = model(torch.tensor([prompt + ids.tolist()])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    expected = scores.gather(1, ids[:, None])[:, 0]
    print(f"\ntensor parallel 2 on CPU: {served_ids} against transformers {ids.tolist()}; "
          f"max |Δ log-prob| {max(abs(a - b) for a, b in zip(logprobs['token_logprobs'], expected.tolist())):.2e}")
    assert served_ids == ids.tolist()
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"]), expected, atol=1e-3)


def test_cpu_ranks_split_the_cores_and_more_ranks_than_cores_are_refused(tiny):
    import os

    from appliance.errors import ApplianceError

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        env = vllm_env(build_spec(tiny, "tiny", device="cpu", tensor_parallel_size=2))
        half = len(cores) // 2
        first, second = cores[:half], cores[half:2 * half]
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in (first, second))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_env(build_spec(tiny, "tiny", device="cpu"))
    with pytest.raises(ApplianceError, match=f"runs {len(cores) + 1} vLLM workers on the CPU; this machine lets it use {len(cores)} cores"):
        build_spec(tiny, "tiny", device="cpu", pipeline_parallel_size=len(cores) + 1)
