"""Evaluation: answers by greedy generation, and (with the methods issue) task metrics."""

from __future__ import annotations

from typing import Any, Sequence


def generate_answers(model: Any, tokenizer: Any, questions: Sequence[str], *, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to single-turn questions, rendered with the model's chat template."""
    import torch

    from appliance.data.template import render

    answers = []
    model.eval()
    for question in questions:
        prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def load_for_inference(model_dir, adapter_dir=None, *, load_in_4bit: bool = True, device: str = "cpu"):
    """The base (4-bit as trained, or 16-bit) with an optional adapter, ready for generation."""
    from appliance.config import ModelSpec
    from appliance.hardware import detect
    from appliance.train.model import compute_dtype, load_base, quiet_libraries

    quiet_libraries()
    spec = ModelSpec(load_in_4bit=load_in_4bit, gradient_checkpointing=False)
    model = load_base(model_dir, spec, device, compute_dtype(spec, device, detect()))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model
