"""The memory levers for long sequences: shared-input LoRA, MLP tiling, activation offload.

Each is checked for exact gradients on the tiny LLaMA in real 4-bit, and for the
mechanism the planner counts on: what stays saved for backward.
"""

import pytest
import torch

from appliance import plan
from appliance.config import LoraSpec, ModelSpec, load_run_config
from appliance.plan import TrainSettings, estimate, find_gpu, find_model, recommend
from appliance.metrics.lm import causal_lm_loss_sum
from appliance.hf import load_base
from appliance.train.model import attach_lora, prepare_for_training
from conftest import DEMO

TOKENS = (2, 96)  # rows × length: three tiles of 64 tokens, the last one short


def _model(tiny, dropout=0.0, dtype=torch.float32, shared_inputs=True, **spec):
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    spec = ModelSpec(compute_dtype=dtype_name, **{"gradient_checkpointing": False, **spec})
    torch.manual_seed(0)  # the same LoRA A matrices in every model
    lora = LoraSpec(rank=4, dropout=dropout, shared_inputs=shared_inputs)
    model = attach_lora(prepare_for_training(load_base(tiny.model_dir("tiny"), spec, "cpu", dtype), spec, "cpu"), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so every gradient is non-zero
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def _step(model, seed=1):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, TOKENS)
    torch.manual_seed(seed)
    loss, _ = causal_lm_loss_sum(model, {"input_ids": ids, "labels": ids})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_same_loss_and_gradients(tiny, checkpointing):
    loss, grads = _step(_model(tiny, gradient_checkpointing=checkpointing))
    tiled_loss, tiled_grads = _step(_model(tiny, gradient_checkpointing=checkpointing, mlp_tile_tokens=64))
    assert tiled_loss == pytest.approx(loss, rel=1e-6)
    assert _max_difference(grads, tiled_grads) < 1e-6 * max(g.abs().max().item() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in tiled_grads.values())


def test_tiled_mlp_replays_each_tiles_dropout_in_backward(tiny):
    """LoRA dropout draws per tile; backward must see the same masks as forward."""
    tiled_loss, tiled_grads = _step(_model(tiny, dropout=0.3, gradient_checkpointing=True, mlp_tile_tokens=64))
    reference = _model(tiny, dropout=0.3)
    for name, mlp in reference.named_modules():
        if name.endswith(".mlp"):
            # The same tiles, differentiated by plain autograd: same draws, no recompute.
            def tiles(x, mlp=mlp):
                rows = x.reshape(-1, x.shape[-1])
                out = torch.cat([type(mlp).forward(mlp, t) for t in rows.split(64)])
                return out.view(*x.shape[:-1], -1)

            mlp.forward = tiles
    loss, grads = _step(reference)
    assert tiled_loss == pytest.approx(loss, rel=1e-6)
    assert _max_difference(grads, tiled_grads) < 1e-6 * max(g.abs().max().item() for g in grads.values())


def _saved_while_inside(model, is_inside) -> list[torch.Tensor]:
    """The tensors autograd saves over one step while a module for which `is_inside(name, module)`
    holds runs its forward."""
    saved, inside = [], []
    for name, module in model.named_modules():
        if is_inside(name, module):
            module.register_forward_pre_hook(lambda *_: inside.append(True))
            module.register_forward_hook(lambda *_: inside.clear())

    def pack(tensor):
        if inside:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(model)
    return saved


def _saved_inside_mlps(model):
    """Shapes of the tensors autograd saves while an MLP runs its forward."""
    return [tuple(t.shape) for t in _saved_while_inside(model, lambda name, _: name.endswith(".mlp"))]


def test_a_tiled_mlp_keeps_only_its_input(tiny):
    untiled = _saved_inside_mlps(_model(tiny))
    tiled = _saved_inside_mlps(_model(tiny, mlp_tile_tokens=64))
    hidden, layers = 64, 2
    assert tiled == [(*TOKENS, hidden)] * layers
    assert any(shape[-1] == 128 for shape in untiled)  # the intermediate-width tensors it no longer keeps


def test_offload_moves_exactly_the_checkpointed_block_inputs(tiny, monkeypatch):
    """What the planner counts as offloaded (layers × tokens × hidden) is what goes through the hook.

    transformers offloads with `save_on_cpu(pin_memory=True)`; pinned memory needs an
    accelerator, so here the hook copies to ordinary memory and records what it moves.
    """
    import transformers.modeling_utils

    moved = []

    class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory=False, device_type=device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: (moved.append(tuple(tensor.shape)), pack(tensor))[1]

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", RecordingSaveOnCpu)
    loss, grads = _step(_model(tiny, gradient_checkpointing=True))
    model = _model(tiny, gradient_checkpointing=True)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    offloaded_loss, offloaded_grads = _step(model)
    assert moved == [(*TOKENS, 64)] * 2
    assert offloaded_loss == pytest.approx(loss, rel=1e-6)
    assert _max_difference(grads, offloaded_grads) == 0


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match="offload_activations moves what gradient checkpointing saves"):
        ModelSpec(offload_activations=True, gradient_checkpointing=False)


def test_the_levers_are_run_settings_the_planner_reads():
    cfg = load_run_config(
        "sft-qlora",
        flags={"model": {"name": "x", "offload_activations": True, "mlp_tile_tokens": 2048}, "data": {"files": [{"path": str(DEMO / "facts.jsonl")}]}},
    )
    settings = plan.settings_from_config(cfg)
    assert settings.offload_activations and settings.mlp_tile_tokens == 2048


def test_llama_8b_at_24k_tokens_fits_12_gib_only_with_both_levers():
    shape, gpu = find_model("llama-3.1-8b"), find_gpu("RTX 3060")
    settings = TrainSettings(seq_len=24576, batch_size=1)
    both = TrainSettings(seq_len=24576, batch_size=1, offload_activations=True, mlp_tile_tokens=plan.MLP_TILE_TOKENS)
    assert not estimate(shape, gpu, settings).fits
    assert not estimate(shape, gpu, settings.model_copy(update={"offload_activations": True})).fits
    assert not estimate(shape, gpu, settings.model_copy(update={"mlp_tile_tokens": plan.MLP_TILE_TOKENS})).fits
    assert estimate(shape, gpu, both).fits
    advice = recommend(shape, gpu, settings)
    assert [c.field for c in advice[-1].changes] == ["offload_activations", "mlp_tile_tokens"] and advice[-1].fits
    # Tiling buys memory with one more MLP forward; a micro-batch within one tile is not tiled.
    assert plan.flops_per_token(shape, both) > plan.flops_per_token(shape, settings)
    short = TrainSettings(seq_len=1024, batch_size=1)
    assert estimate(shape, gpu, short.model_copy(update={"mlp_tile_tokens": 2048})).total_gib == estimate(shape, gpu, short).total_gib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_lora_gives_peft_s_loss_and_gradients(tiny, dtype):
    loss, grads = _step(_model(tiny, dtype=dtype, shared_inputs=False))
    shared_loss, shared_grads = _step(_model(tiny, dtype=dtype, shared_inputs=True))
    assert shared_loss == pytest.approx(loss, rel=1e-6)
    assert _max_difference(grads, shared_grads) <= 1e-5 * max(g.abs().max().item() for g in grads.values())


def _saved_by_lora(model) -> int:
    """Bytes LoRA layers keep for backward over one step, each storage counted once, weights not counted."""
    from peft.tuners.lora import LoraLayer

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _saved_while_inside(model, lambda _, m: isinstance(m, LoraLayer))}
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in weights)


def test_shared_input_lora_keeps_what_the_planner_counts(tiny):
    """In a bf16 stream peft keeps an fp32 copy of each adapted layer's input; we keep the input itself."""
    import json

    shape = plan.shape_from_config("tiny", json.loads((tiny.model_dir("tiny") / "config.json").read_text()))
    tokens = TOKENS[0] * TOKENS[1]
    for shared in (False, True):
        settings = TrainSettings(rank=4, lora_shared_inputs=shared)
        planned = shape.num_hidden_layers * tokens * plan._lora_kept_bytes(shape, settings, "appliance", plan.LINEAR_MODULES)
        assert _saved_by_lora(_model(tiny, dtype=torch.bfloat16, shared_inputs=shared)) == planned
    # With dropout the mask would have to be kept: peft's forward runs, and the planner knows it.
    cfg = load_run_config("sft-qlora", flags={"model": {"name": "x"}, "lora": {"dropout": 0.1}, "data": {"files": [{"path": str(DEMO / "facts.jsonl")}]}})
    assert plan.settings_from_config(cfg).lora_shared_inputs is False
