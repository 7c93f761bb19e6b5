"""Serving: the vLLM command line for a model and its adapters (command), running it in the
foreground (process), the endpoint's address, key and model list (endpoint), the systemd service
(service), adapters swapped at runtime (adapters), the key guard (auth) and the unit's start-up
health poll (health). Nothing here imports torch: vLLM runs in its own process."""

from appliance.serve.adapters import load as load_adapter
from appliance.serve.adapters import served
from appliance.serve.adapters import unload as unload_adapter
from appliance.serve.auth import server_key
from appliance.serve.command import ServeSpec, build_spec, check_servable, lora_rank_limit, shell_line, vllm_command, vllm_env
from appliance.serve.endpoint import DEFAULT_URL, Endpoint, find_endpoint, no_server, served_models
from appliance.serve.process import check_port, free_port, log_tail, require_vllm, running_server, serve_foreground, start_server

__all__ = [
    "DEFAULT_URL",
    "Endpoint",
    "ServeSpec",
    "build_spec",
    "check_port",
    "check_servable",
    "find_endpoint",
    "free_port",
    "load_adapter",
    "log_tail",
    "lora_rank_limit",
    "no_server",
    "require_vllm",
    "running_server",
    "serve_foreground",
    "served",
    "served_models",
    "server_key",
    "shell_line",
    "start_server",
    "unload_adapter",
    "vllm_command",
    "vllm_env",
]
