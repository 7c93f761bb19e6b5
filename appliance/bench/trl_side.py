"""The peer users pick first: TRL's `SFTTrainer`, run for `appliance bench train`.

Configured as TRL documents QLoRA (a 4-bit NF4 base with double quantization and bf16
compute, `peft_config` with LoRA on every linear layer) for the objective asked for:
- `assistant`: prompt-completion rows with `completion_only_loss` (TRL's way of training on the
  answers only), padding-free batches (its packing option that keeps the batch size: every
  example of a batch in one row, position ids restarting per example);
- `all`: conversational `messages` rows, loss on every token, padding-free batches;
- `default`: what a user gets from `SFTConfig()` with the same batch size, learning rate and
  steps: `messages` rows, loss on every token, padded batches, gradient checkpointing on.
Random-token runs (`--shape`) pass pre-tokenized rows, loss on every token.

Timing: a callback reads the clock at each step's start and end (forward, backward, clipping,
optimizer), and a wrapper around TRL's own collator counts each batch's tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.bench.sides import SideResult, peak_memory, warm_slice


def trl_rows(data: Path | None, objective: str, seq_len: int, batch_size: int, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """The benchmark's data in the shape TRL documents for the objective."""
    if data is None:
        import torch

        g = torch.Generator().manual_seed(seed)
        return [{"input_ids": torch.randint(0, vocab_size - 1, (seq_len,), generator=g).tolist()} for _ in range(batch_size * 4)]
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if objective == "assistant":
        # The answer is the last assistant turn; the conversation before it is the prompt.
        out = []
        for r in rows:
            messages = r["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out.append({"prompt": messages[:last], "completion": [messages[last]]})
        return out
    return [{"messages": r["messages"]} for r in rows]


def run_trl(
    model_dir: Path,
    data: Path | None,
    *,
    objective: str,
    gradient_checkpointing: bool | None,
    seq_len: int,
    steps: int,
    batch_size: int,
    rank: int,
    lr: float,
    seed: int,
) -> SideResult:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    defaults = objective == "default"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0} if on_gpu else {"": "cpu"}, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.time() - started
    rows = trl_rows(data, "all" if defaults else objective, seq_len, batch_size, model.config.vocab_size, seed)
    padding_free = not defaults
    with tempfile.TemporaryDirectory() as out:
        options: dict[str, Any] = dict(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            seed=seed,
            use_cpu=not on_gpu,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        if not defaults:
            options.update(
                lr_scheduler_type="constant",
                gradient_checkpointing=bool(gradient_checkpointing),
                padding_free=padding_free,
                max_length=None,  # padding-free without packing does not truncate: the rows are within seq_len
                completion_only_loss=objective == "assistant",
                optim="paged_adamw_8bit" if on_gpu else "adamw_torch",
                weight_decay=0.0,
                max_grad_norm=1.0,
            )
        else:
            options.update(max_length=seq_len)
        config = SFTConfig(**options)
        lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)

        tokens: list[tuple[int, int]] = []
        collate = trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            useful = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["position_ids"].numel())
            trained = int((batch["labels"][:, 1:] != -100).sum())
            tokens.append((useful, trained))
            return batch

        trainer.data_collator = counting_collator
        times: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                times.append(time.perf_counter() - self.start)

        trainer.add_callback(StepClock())
        trainer.train()
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        used_checkpointing = bool(trainer.args.gradient_checkpointing)
        optimizer = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    warm = warm_slice(steps)
    w_t, w_tokens = times[warm], tokens[warm]
    return SideResult(
        side="trl",
        objective="all" if defaults else objective,
        gradient_checkpointing=used_checkpointing,
        batching="padding-free (one row per batch)" if padding_free else "padded to the longest",
        optimizer=optimizer,
        device="cuda" if on_gpu else "cpu",
        load_s=round(load_s, 1),
        steps=len(times),
        step_s_median=round(sorted(w_t)[len(w_t) // 2], 3),
        useful_tok_per_s=round(sum(u for u, _ in w_tokens) / sum(w_t)),
        trained_tok_per_s=round(sum(t for _, t in w_tokens) / sum(w_t)),
        losses=losses,
        **peak_memory(),
    )
