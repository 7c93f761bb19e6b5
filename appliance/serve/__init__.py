"""Serving: the vLLM command line for a model and its adapters (command), running it in the
foreground (process), the endpoint's address, key and model list (endpoint), the systemd service
(service), adapters swapped at runtime (adapters), the key guard (auth) and the unit's start-up
health poll (health). Nothing here imports torch: vLLM runs in its own process."""

from appliance.serve.adapters import load as load_adapter
from appliance.serve.adapters import served
from appliance.serve.adapters import unload as unload_adapter
from appliance.serve.auth import server_key
from appliance.serve.command import LOCAL_HOSTS, ServeSpec, build_spec, vllm_torch_sees_gpu, check_servable, lora_rank_limit, shell_line, vllm_command, vllm_env
from appliance.serve.endpoint import DEFAULT_URL, Endpoint, find_endpoint, no_server, served_labels, served_models
from appliance.serve.health import wait as wait_healthy
from appliance.serve.sampler import grpo_sampler
from appliance.serve.process import check_port, free_port, log_tail, require_vllm, running_server, serve_foreground, start_server, vllm_installed
from appliance.serve.service import control as control_service
from appliance.serve.service import install as install_service
from appliance.serve.service import installed as installed_service
from appliance.serve.service import installed_endpoint, plan_install, plan_ray_worker, rank_limit_for, ray_unit_path, read_env_file, running_servers
from appliance.serve.service import journal as service_journal
from appliance.serve.service import status as service_status
from appliance.serve.service import uninstall as uninstall_service

__all__ = [
    "DEFAULT_URL",
    "LOCAL_HOSTS",
    "build_spec",
    "check_port",
    "check_servable",
    "control_service",
    "Endpoint",
    "find_endpoint",
    "free_port",
    "grpo_sampler",
    "install_service",
    "installed_endpoint",
    "installed_service",
    "load_adapter",
    "log_tail",
    "lora_rank_limit",
    "no_server",
    "plan_install",
    "plan_ray_worker",
    "rank_limit_for",
    "ray_unit_path",
    "read_env_file",
    "require_vllm",
    "running_server",
    "running_servers",
    "serve_foreground",
    "served",
    "served_labels",
    "served_models",
    "server_key",
    "ServeSpec",
    "service_journal",
    "service_status",
    "shell_line",
    "start_server",
    "uninstall_service",
    "unload_adapter",
    "vllm_command",
    "vllm_env",
    "vllm_installed",
    "vllm_torch_sees_gpu",
    "wait_healthy",
]
