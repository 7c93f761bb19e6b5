"""What the machine has, and the decisions taken from it, with the figures of real cards
(nvidia-smi's totals in MiB; compute capabilities from NVIDIA's tables). None needs a GPU."""

import pytest

from appliance.errors import ApplianceError
from appliance.hardware import Hardware, compute_dtype_name, cuda_unusable_reason, native_bf16
from appliance.merge import merge_dtype
from appliance.serve.command import gpu_memory_utilization, serving_quantization

T4, RTX_3060, A100, RTX_4090, RTX_4060_TI, H100 = (7, 5), (8, 6), (8, 0), (8, 9), (8, 9), (9, 0)
GIB = 2**30


def gpu(capability, total_mib=24564, name="NVIDIA GeForce RTX 4090"):
    return Hardware("cuda", name, total_mib * 2**20, native_bf16(capability), 16, free_bytes=total_mib * 2**20, capability=capability)


@pytest.mark.parametrize(
    "capability, expected",
    [(T4, "float16"), (RTX_3060, "bfloat16"), (A100, "bfloat16"), (RTX_4090, "bfloat16"), (H100, "bfloat16")],
    ids=["T4 (Turing, bf16 only emulated)", "RTX 3060", "A100", "RTX 4090", "H100"],
)
def test_compute_dtype_is_the_cards_native_type(capability, expected):
    assert compute_dtype_name("cuda", capability, cpu_bf16=False) == expected
    assert merge_dtype("auto", gpu(capability)) == expected


def test_the_cpu_computes_in_its_own_type_whatever_the_gpu_has():
    assert compute_dtype_name("cpu", None, cpu_bf16=True) == "bfloat16"  # AVX-512 BF16 / AMX
    assert compute_dtype_name("cpu", None, cpu_bf16=False) == "float32"  # AVX2 only: emulated bf16 is slow and inexact
    assert compute_dtype_name("cpu", H100, cpu_bf16=False) == "float32"  # evaluation on the CPU of an H100 machine
    cpu = Hardware("cpu", "CPU", 64 * GIB, bf16=False, cpu_count=8)
    assert merge_dtype("auto", cpu) == "float32" and merge_dtype("bfloat16", cpu) == "bfloat16"


def test_the_loop_picks_the_device_dtype_and_refuses_a_gpu_torch_cannot_use():
    import torch

    from appliance.config import ModelSpec
    from appliance.hf import compute_dtype, resolve_device

    spec = ModelSpec()
    assert compute_dtype(spec, "cuda", gpu(T4)) == torch.float16
    assert compute_dtype(spec, "cuda", gpu(H100)) == torch.bfloat16
    broken = Hardware("cpu", "CPU", 64 * GIB, bf16=False, cpu_count=8, gpu_problem=cuda_unusable_reason("2.14.0+cu130", "13.0", "550.54.15"))
    with pytest.raises(ApplianceError, match="driver 550.54.15 may be too old") as err:
        resolve_device("auto", broken)
    assert "train.device=cpu" in err.value.fix
    assert resolve_device("cpu", broken) == "cpu"  # asked for: allowed
    assert "CPU-only build" in cuda_unusable_reason("2.13.0+cpu", None, "580.1")


@pytest.mark.parametrize(
    "free_mib, total_mib, expected",
    [
        (12288, 12288, 0.90),  # RTX 3060, headless: vLLM's default
        (11688, 12288, 0.90),  # a desktop drawing 600 MiB: 95 % of the free memory is still above 0.90
        (10788, 12288, 0.83),  # the quickstart's own process still holding 1.5 GiB
        (23364, 24564, 0.90),  # RTX 4090 with a desktop
        (1966, 24564, 0.08),  # the service holds the card
    ],
)
def test_vllm_gets_a_share_it_can_have(free_mib, total_mib, expected):
    share = gpu_memory_utilization(free_mib, total_mib)
    assert share == pytest.approx(expected, abs=0.005)
    assert share * total_mib <= free_mib  # vLLM refuses to start when free < share × total


LLAMA_8B = 2 * 8_030_261_248  # bytes of 16-bit weights
LLAMA_1B = 2 * 1_235_814_400


@pytest.mark.parametrize(
    "weights, total_mib, capability, expected",
    [
        (LLAMA_1B, 12288, RTX_3060, None),
        (LLAMA_8B, 12288, RTX_3060, "bitsandbytes"),  # Ampere: no fp8 tensor cores
        (LLAMA_8B, 16380, RTX_4060_TI, "fp8"),  # Ada: fp8 halves the weights
        (LLAMA_8B, 24564, RTX_4090, None),
        (LLAMA_8B, 81559, H100, None),
    ],
    ids=["1B on 3060", "8B on 3060", "8B on 4060 Ti 16GB", "8B on 4090", "8B on H100"],
)
def test_serving_quantizes_only_when_the_16_bit_weights_do_not_fit(weights, total_mib, capability, expected):
    budget = 0.90 * total_mib * 2**20
    assert serving_quantization(weights, budget, capability) == expected


def test_a_model_that_fits_in_no_form_is_refused():
    with pytest.raises(ApplianceError, match="even in 4 bits"):
        serving_quantization(2 * 70_553_706_496, 0.90 * 24564 * 2**20, RTX_4090)


def test_fp16_training_scales_the_loss_and_resume_restores_the_scale(tiny):
    """GPUs before Ampere train in fp16: the loss is scaled (GradScaler), and a checkpoint keeps the scale."""
    from appliance.config import load_run_config
    from appliance.train.loop import TrainingRun
    from conftest import DEMO

    flags = {"model": {"name": "tiny", "compute_dtype": "float16"}, "data": {"files": [{"path": str(DEMO / "facts.jsonl")}], "val": 0},
             "train": {"steps": 3, "batch_size": 4, "lr": 1e-3}}
    run = TrainingRun(load_run_config("sft-qlora", flags=flags), tiny, "fp16")
    run.setup()
    assert run.scaler is not None
    for _ in range(2):
        figures = run.train_step()
    assert figures["loss"] == figures["loss"] and run.state.extra["loss_scale"]["scale"] > 1  # finite, scaled
    run.scaler.update(123.0)  # a scale no fresh run has
    run.state.extra["loss_scale"] = run.scaler.state_dict()
    run.save_checkpoint("test")
    resumed = TrainingRun(load_run_config("sft-qlora", flags=flags), tiny, "fp16", resume=True)
    resumed.setup()
    resumed.load_checkpoint()
    assert resumed.scaler.get_scale() == 123.0

    bf16 = TrainingRun(load_run_config("sft-qlora", flags={**flags, "model": {"name": "tiny", "compute_dtype": "bfloat16"}}), tiny, "bf16")
    bf16.setup()
    assert bf16.scaler is None


def test_a_checkpoint_of_another_optimizer_is_refused_on_resume(tiny):
    from appliance.config import load_run_config
    from appliance.train.loop import TrainingRun
    from conftest import DEMO

    flags = {"model": {"name": "tiny"}, "data": {"files": [{"path": str(DEMO / "facts.jsonl")}], "val": 0}, "train": {"steps": 2, "batch_size": 4}}
    run = TrainingRun(load_run_config("sft-qlora", flags=flags), tiny, "opt")
    run.setup()
    run.train_step()
    run.state.extra["optimizer"] = "paged_adamw_8bit"  # as a GPU run saves it
    run.save_checkpoint("test")
    resumed = TrainingRun(load_run_config("sft-qlora", flags=flags), tiny, "opt", resume=True)
    resumed.setup()
    with pytest.raises(ApplianceError, match="checkpointed with the paged_adamw_8bit optimizer"):
        resumed.load_checkpoint()
