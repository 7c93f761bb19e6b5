"""Judging an export: loaded back in llama.cpp and compared with the model it came from, and its greedy answers must stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from appliance.errors import ApplianceError
from appliance.export.convert import threads
from appliance.export.spec import MAX_NEW_TOKENS, ExportMismatch, Progress, Quant
from appliance.registry import AdapterManifest, ExportParity, GreedyCheck, ModelManifest, Registry


@dataclass
class Probes:
    sequences: list[list[int]]  # teacher-forced: probe prompts, then validation conversations
    validation_examples: int
    prompts: list[list[int]]  # answered greedily: the validation prompts, else the probe prompts
    prompts_from: Literal["validation", "probes"]
    notes: list[str] = field(default_factory=list)


def _probe_prompt_ids(tokenizer: Any) -> list[list[int]]:
    from appliance.data import has_chat_template, render
    from appliance.merge import PROBE_PROMPTS

    chat = has_chat_template(tokenizer)
    texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) if chat else p for p in PROBE_PROMPTS]
    return [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]


def validation_prompts(adapter: AdapterManifest, tokenizer: Any) -> list[list[int]]:
    """The adapter's held-out conversations cut before the first trained answer."""
    from appliance.config import RunConfig
    from appliance.data import IGNORE_INDEX, prepare
    from appliance.merge import VALIDATION_EXAMPLES

    if adapter.task not in ("sft", "dpo", "kto"):  # the tasks with prompts
        return []
    try:
        prepared = prepare(RunConfig.model_validate(adapter.config).data, adapter.task, tokenizer)
    except ApplianceError:
        return []
    prompts = []
    for encoded in (prepared.val or prepared.test)[:VALIDATION_EXAMPLES]:
        item = encoded.item.chosen if hasattr(encoded.item, "chosen") else encoded.item
        first = next((i for i, label in enumerate(item.labels) if label != IGNORE_INDEX), 0)
        if first:
            prompts.append(list(item.input_ids[:first]))
    return prompts


def probes_for(registry: Registry, adapter: AdapterManifest | None, tokenizer: Any) -> Probes:
    from appliance.merge import PROBE_PROMPTS, probe_sequences

    if adapter is None:
        prompts = _probe_prompt_ids(tokenizer)
        return Probes(prompts, 0, prompts, "probes")
    sequences, validation, notes = probe_sequences(registry, adapter, tokenizer)
    prompts = validation_prompts(adapter, tokenizer) if validation else []
    if prompts:
        return Probes(sequences, validation, prompts, "validation", notes)
    return Probes(sequences, validation, sequences[: len(PROBE_PROMPTS)], "probes", notes)


def adapter_of_merged(registry: Registry, model: ModelManifest) -> tuple[AdapterManifest | None, list[str]]:
    """A merged model's adapter, whose validation answers the export is compared on, when it is still in the store."""
    if model.kind != "merged" or not model.adapter:
        return None, []
    try:
        return registry.adapter(model.adapter), []
    except ApplianceError:
        return None, [f"validation answers not compared: adapter {model.adapter!r} is no longer in the store"]


def hf_greedy(model: Any, prompt: list[int], stop_ids: set[int]) -> list[int]:
    """The reference's greedy answer, ending with its stop token when it stopped."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        past, ids = None, torch.tensor([prompt])
        for _ in range(MAX_NEW_TOKENS):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids = torch.tensor([[token]])
    return out


def llama_logits(llm: Any, ids: list[int]) -> Any:
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_greedy(llama_cpp: Any, llm: Any, prompt: list[int]) -> tuple[list[int], bool]:
    """llama.cpp's greedy answer: (tokens, stopped at an end-of-generation token)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return out, True
        if len(out) >= MAX_NEW_TOKENS:
            break
    return out, False


def open_gguf(gguf: Path, lora: Path | None, n_ctx: int) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=512, logits_all=True,
        n_threads=threads(), n_threads_batch=threads(), seed=0, verbose=False,
    )


def check_metadata(llm: Any, tokenizer: Any, eot_id: int | None) -> tuple[dict[str, Any], list[str]]:
    """The GGUF's chat template and special ids against the model's own; (what it holds, problems)."""
    meta = llm.metadata

    def as_id(key: str) -> int | None:
        return int(meta[key]) if key in meta else None

    held = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token_id": as_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": as_id("tokenizer.ggml.eos_token_id"),
        "eot_token_id": as_id("tokenizer.ggml.eot_token_id"),
    }
    problems = []
    if (tokenizer.chat_template or None) != held["chat_template"]:
        problems.append("the chat template in the GGUF differs from the model's")
    for key, expected in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id), ("eot_token_id", eot_id)):
        if expected is not None and held[key] != expected:
            problems.append(f"{key} is {held[key]} in the GGUF, {expected} in the model")
    return held, problems


@dataclass
class Judged:
    parity: ExportParity
    metadata: dict[str, Any]


def judge(
    gguf: Path,
    lora: Path | None,
    load_reference: Callable[[], Any],
    reference: str,
    tokenizer: Any,
    probes: Probes,
    quant: Quant,
    eot_id: int | None,
    progress: Progress,
) -> Judged:
    """The export in llama.cpp against the reference (transformers, fp32, CPU); raises ExportMismatch below the gate."""
    import gc

    import llama_cpp

    from appliance.merge import PROBE_PROMPTS, agreement, logits_of

    progress(f"the reference: {reference}")
    model = load_reference()
    expected = logits_of(model, probes.sequences, "cpu")
    stop_ids = {i for i in (eot_id, tokenizer.eos_token_id) if i is not None}
    reference_answers = [hf_greedy(model, p, stop_ids) for p in probes.prompts]
    del model
    gc.collect()

    progress(f"the export in llama.cpp {llama_cpp.__version__}: {len(probes.sequences)} sequences, {len(probes.prompts)} greedy answers")
    longest = max(len(s) for s in [*probes.sequences, *probes.prompts])
    llm = open_gguf(gguf, lora, n_ctx=longest + MAX_NEW_TOKENS + 8)
    try:
        metadata, problems = check_metadata(llm, tokenizer, eot_id)
        got = [llama_logits(llm, s) for s in probes.sequences]
        texts = [tokenizer.decode(s) for s in probes.sequences]
        matches = sum(
            llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts
        )
        generations = []
        for prompt, ref in zip(probes.prompts, reference_answers):
            answer, stopped = llama_greedy(llama_cpp, llm, prompt)
            generations.append(GreedyCheck(
                prompt=_question(tokenizer, prompt),
                answer=tokenizer.decode(answer, skip_special_tokens=True).strip(),
                stopped=stopped,
                stop_token=tokenizer.convert_ids_to_tokens(answer[-1]) if stopped else None,
                reference_stopped=bool(ref) and ref[-1] in stop_ids,
                same_as_reference=answer == ref,
            ))
    finally:
        llm.close()
    parity = ExportParity(
        reference=reference,
        quant=quant.name,
        prompts=len(PROBE_PROMPTS),
        validation_examples=probes.validation_examples,
        agreement=agreement(expected, got),
        tokenization_matches=matches,
        tokenization_checked=len(texts),
        generations=generations,
        generations_from=probes.prompts_from,
        gate_min_top1=quant.gate.min_top1,
        gate_max_mean_kl=quant.gate.max_mean_kl,
        notes=list(probes.notes),
    )
    endless = sum(not g.reference_stopped for g in generations)
    if endless and probes.prompts_from == "validation":
        parity.notes.append(f"the original model itself does not stop within {MAX_NEW_TOKENS} tokens on {endless} of {len(generations)} "
                            "validation prompts: train longer, or check that the answers in the data end their turn")
    failures = problems + gate_failures(parity)
    if failures:
        raise ExportMismatch(
            parity,
            f"The {quant.name} export does not match {reference}: " + "; ".join(failures) + "; nothing was kept.",
            "try a larger type (--quant q8_0 or f16)" if not problems else "report this: llama.cpp's converter changed the tokenizer metadata",
        )
    return Judged(parity, metadata)


def gate_failures(parity: ExportParity) -> list[str]:
    a, failures = parity.agreement, []
    if a.top1_agreement < parity.gate_min_top1:
        failures.append(f"top-1 agreement {a.top1_agreement:.2%} at {a.clear_positions} clear positions (gate {parity.gate_min_top1:.0%})")
    if a.mean_kl > parity.gate_max_mean_kl:
        failures.append(f"mean KL {a.mean_kl:.3g} (gate {parity.gate_max_mean_kl:g})")
    if parity.tokenization_matches < parity.tokenization_checked:
        failures.append(f"llama.cpp tokenizes {parity.tokenization_checked - parity.tokenization_matches} of {parity.tokenization_checked} probe texts differently")
    # The export must stop wherever the model it came from stops (a wrong eos or template is the
    # usual cause of an exported model that never stops); where the model itself runs on, the
    # fault is the training's, and judge() says so in a note.
    runaway = [g for g in parity.generations if not g.stopped and g.reference_stopped]
    if runaway:
        failures.append(f"{len(runaway)} of {len(parity.generations)} greedy answers did not stop at an end-of-turn token within "
                        f"{MAX_NEW_TOKENS} tokens where the original stops")
    return failures


def _question(tokenizer: Any, prompt: list[int]) -> str:
    lines = tokenizer.decode(prompt, skip_special_tokens=True).strip().splitlines()
    # ChatML and Llama 3 prompts end with the assistant's header line; the question is the line before.
    return (lines[-2] if len(lines) >= 2 else lines[-1] if lines else "")[:120]
