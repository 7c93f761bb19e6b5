"""GRPO's answers drawn by vLLM: the policy as it is now, served as a LoRA adapter over the base's 4-bit twin.

Sampling a group of answers per prompt is most of a GRPO step, and vLLM generates far faster than
transformers' `generate` on a GPU. The run gets its own vLLM server (this package's process
control: a free port on 127.0.0.1, a random API key, stopped with the run). Training never imports
serving: `appliance train` and `appliance bench methods` hand `run_training` this module's
`grpo_sampler`, which the run calls once it knows its device and ranks. Before each step's sampling
the adapter as it is now is saved and loaded into the server by name (vLLM's runtime LoRA loading),
the previous one unloaded; each prompt's group is one completions request for `n` answers, with
their token ids and log-probabilities.

vLLM serves the base's 4-bit twin (appliance.models.write_twin_4bit): the weights as the 4-bit model
computes with them, so the sampling policy is the training policy up to arithmetic. How far up to is
the `sampler_logprob_gap` each step logs: the mean over answers of |log p_vLLM − log p_policy| per
answer token.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from appliance.errors import ApplianceError
from appliance.rewards import Sampled, stop_ids

PORT = 8390


def grpo_sampler(run: Any) -> "VllmSampler | None":
    """What samples the answers of `run` (appliance.train.TrainingRun, set up), as its grpo.sampler says:
    a VllmSampler, or None for transformers' generate."""
    from appliance.models import write_serving_base

    cfg = run.cfg
    if resolve_sampler(cfg.grpo.sampler, cfg.lora, run.device, run.ranks.world) != "vllm":
        return None
    return VllmSampler(run.registry, run.model_manifest.name, write_serving_base(run.registry, run.model_manifest, cfg.model, cfg.task),
                       rank=cfg.lora.rank, max_model_len=cfg.data.seq_len + cfg.grpo.max_new_tokens,
                       gpu_share=cfg.grpo.vllm_gpu_memory_utilization, workdir=run.run_dir / "sampler")


def resolve_sampler(choice: str, lora: Any, device: str, world: int, python: str = sys.executable) -> str:
    """'vllm' or 'transformers' for grpo.sampler: 'auto' is vLLM on a GPU where it is installed and can
    serve the adapter as it trains (not DoRA; one process). PiSSA and OLoRA, which change the base, are
    refused for GRPO by the config already."""
    from appliance.serve.process import require_vllm, vllm_installed

    unservable = ("DoRA, which vLLM does not serve" if lora.use_dora else
                  f"{world} processes, and the sampler serves one process's policy" if world > 1 else None)
    if choice == "transformers" or (choice == "auto" and (unservable or device != "cuda" or not vllm_installed(python))):
        return "transformers"
    if unservable:
        raise ApplianceError(f"GRPO's vLLM sampler cannot sample this run: it trains with {unservable}.",
                             "sample with transformers: --set grpo.sampler=transformers")
    require_vllm(python)
    return "vllm"


class VllmSampler:
    """Answers from a vLLM server of the run's own, started on first use; `close()` stops it."""

    def __init__(self, registry: Any, model_name: str, serving_folder: Path, *, rank: int, max_model_len: int, gpu_share: float,
                 workdir: Path, python: str = sys.executable):
        self.registry, self.model_name, self.serving_folder = registry, model_name, serving_folder
        self.rank, self.max_model_len, self.gpu_share, self.workdir, self.python = rank, max_model_len, gpu_share, workdir, python
        self.log = workdir.with_name(workdir.name + "-vllm.log")  # kept: what the server said, should it fail
        self.server = None
        self.loaded: str | None = None
        self.step = 0

    def _start(self) -> None:
        from appliance.serve.command import build_spec, lora_rank_limit
        from appliance.serve.endpoint import Endpoint
        from appliance.serve.process import free_port, start_server

        spec = build_spec(self.registry, self.model_name, runtime_adapters=True, port=free_port(PORT), python=self.python,
                          max_lora_rank=lora_rank_limit([self.rank]), max_loras=1, max_model_len=self.max_model_len,
                          gpu_memory_utilization=self.gpu_share)  # on a GPU, a set share: training holds the rest
        spec.model_dir = self.serving_folder  # the twin of this run's 4-bit settings
        key = secrets.token_urlsafe(24)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server = start_server(spec, self.log, api_key=key, timeout=900)
        self.endpoint = Endpoint(spec.url, key)

    def _post(self, route: str, payload: dict, timeout: float = 900) -> dict:
        import httpx

        response = httpx.post(self.endpoint.url + route, json=payload, headers=self.endpoint.headers, timeout=timeout)
        if response.status_code != 200:
            raise ApplianceError(f"GRPO's vLLM sampler: {route} answered {response.status_code}: {response.text[:300]}",
                                 f"see {self.log}; or sample with transformers: --set grpo.sampler=transformers")
        return response.json() if response.content.strip().startswith(b"{") else {}

    def _load_policy(self, model: Any) -> str:
        """The adapter as it is now, saved and loaded into the server; the previous one unloaded and deleted."""
        self.step += 1
        name = f"policy-{self.step}"
        model.save_pretrained(str(self.workdir / name))
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(self.workdir / name)})
        if self.loaded:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.loaded})
            shutil.rmtree(self.workdir / self.loaded, ignore_errors=True)
        self.loaded = name
        return name

    def sample(self, model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, per_prompt: int, max_new_tokens: int,
               temperature: float) -> tuple[list[Sampled], list[list[float]]]:
        """`per_prompt` answers of each prompt from the policy as it is now, and each answer token's log-probability."""
        if self.server is None:
            self._start()
        name = self._load_policy(model)
        out = self._post("/v1/completions", {
            "model": name, "prompt": [list(p) for p in prompts], "n": per_prompt, "max_tokens": max_new_tokens,
            "temperature": temperature, "top_p": 1.0, "stop_token_ids": stop_ids(tokenizer), "logprobs": 0, "return_token_ids": True,
        })
        sampled, logprobs = [], []
        # vLLM numbers the answers prompt by prompt: the i-th prompt's are i·n … i·n + n − 1.
        for choice in sorted(out["choices"], key=lambda c: c["index"]):
            ids = list(choice["token_ids"])
            sampled.append(Sampled(choice["index"] // per_prompt, ids, tokenizer.decode(ids, skip_special_tokens=True).strip()))
            logprobs.append([float(x) for x in choice["logprobs"]["token_logprobs"]])
        return sampled, logprobs

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.workdir, ignore_errors=True)  # the adapter's snapshots
