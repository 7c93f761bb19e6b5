"""Models of a real shape with random weights (no download): what `--shape` benchmarks run on.

Built without a GPU and without the whole model in memory: the shapes come from a model on the
meta device, each tensor is drawn on the CPU in bf16 and written shard by shard. SmolLM2's
tokenizer goes with them (only the pad id and the range of random tokens come from it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

SHARD_BYTES = 2 * 2**30  # one shard in memory at a time


def shape_folder(shape: str, cache: Path, progress: Callable[[str], None] = lambda _: None) -> Path:
    """The folder of a profile's shape with random weights, written once and reused."""
    from appliance.plan import find_model

    s = find_model(shape)
    path = cache / s.name
    if (path / "config.json").is_file():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from appliance.hf import quiet_libraries
    from appliance.models import embedded_gguf
    from appliance.store import atomic_dir

    quiet_libraries()
    progress(f"writing random {s.name} weights into {path}")
    config = LlamaConfig(
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim or s.hidden_size // s.num_attention_heads,
        vocab_size=s.vocab_size,
        tie_word_embeddings=s.tie_word_embeddings,
        max_position_embeddings=s.max_position_embeddings,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if s.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(0)
    with atomic_dir(path, overwrite=True) as tmp:  # a run stopped while saving leaves no half folder to reuse
        shards: list[dict] = [{}]
        sizes = [0]
        for name, dims in shapes.items():
            n = math.prod(dims) * 2
            if sizes[-1] and sizes[-1] + n > SHARD_BYTES:
                shards.append({})
                sizes.append(0)
            shards[-1][name] = dims
            sizes[-1] += n
        weight_map = {}
        for i, shard in enumerate(shards):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {
                name: torch.ones(dims, dtype=torch.bfloat16) if "norm" in name else (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
                for name, dims in shard.items()
            }
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            weight_map.update({name: filename for name in shard})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(tmp)
        gguf = embedded_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    return path


