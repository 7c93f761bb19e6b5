"""Chat templates: render with the model's own template, find which tokens carry loss.

transformers renders templates in jinja's ImmutableSandboxedEnvironment; a
template that reaches for Python internals raises a SecurityError, which we
turn into a clear message. Labels cover each assistant turn's content and its
end-of-turn token, nothing else (not the system prompt, the user turns, the
role headers, or the newline a template puts after the end-of-turn token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from appliance.data.formats import Message
from appliance.errors import ApplianceError

IGNORE_INDEX = -100
_SENTINEL = "\u2063APPLIANCE_SENTINEL\u2063"


class TemplateMismatch(ValueError):
    """The template renders a conversation so that its prefix is not a prefix of the whole."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, model_name: str) -> None:
    if not has_chat_template(tokenizer):
        raise ApplianceError(
            f"The model {model_name!r} has no chat template, so chat or instruction data cannot be rendered.",
            "import an instruct/chat model, add chat_template.jinja to its folder, or train raw text with --recipe cpt",
        )


def render(tokenizer: Any, messages: Sequence[Message | dict], *, add_generation_prompt: bool = False, tools: Sequence[dict] | None = None) -> str:
    """The conversation as text, by the model's template, in jinja's sandbox."""
    import jinja2

    dicts = [m.as_dict() if isinstance(m, Message) else m for m in messages]
    try:
        return tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=add_generation_prompt, tools=list(tools) if tools else None
        )
    except jinja2.exceptions.SecurityError as err:
        raise ApplianceError(
            f"The model's chat template tried something the sandbox forbids ({err}).",
            "the template may be hostile: replace chat_template.jinja with the model's published template",
        ) from None
    except jinja2.exceptions.TemplateError as err:
        # Templates raise on conversations they do not accept (e.g. no system role).
        raise TemplateMismatch(f"the chat template refused this conversation: {err}") from None


def end_of_turn(tokenizer: Any) -> str | None:
    """The special token that closes an assistant turn, read from the template itself.

    Renders a one-exchange conversation and takes the first special token after
    the assistant's text: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3.
    """
    if not has_chat_template(tokenizer):
        return None
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}])
    except (TemplateMismatch, ApplianceError):
        return None
    tail = text.split(_SENTINEL, 1)[-1]
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True)
    best: tuple[int, str] | None = None
    for token in specials:
        pos = tail.find(token)
        if token and pos >= 0 and (best is None or pos < best[0]):
            best = (pos, token)
    if best is not None:
        return best[1]
    return tokenizer.eos_token


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss

    @property
    def trained_tokens(self) -> int:
        # An item's first token is predicted from nothing of its own: batches never train it.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def assistant_spans(tokenizer: Any, messages: Sequence[Message], eot: str | None, tools: Sequence[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that carry loss: each trained assistant turn's
    content (its tool calls included) and end-of-turn; a turn with `weight: 0` carries none."""
    full = render(tokenizer, messages, tools=tools)
    for message in messages:
        for call in message.tool_calls or ():
            if call["function"]["name"] not in full:
                raise TemplateMismatch(
                    "this model's chat template does not render tool calls (the call to "
                    f"{call['function']['name']!r} vanished): use a model whose template supports tools, or put the call in the content"
                )
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant" or not message.trained:
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render(tokenizer, messages[: i + 1], tools=tools)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise TemplateMismatch("the chat template does not render conversations incrementally")
        start, end = len(prefix), len(upto)
        if eot:
            close = upto.find(eot, start)
            if close >= 0:
                end = close + len(eot)
        spans.append((start, end))
    return full, spans


def tokenize_chat(tokenizer: Any, messages: Sequence[Message], eot: str | None, tools: Sequence[dict] | None = None) -> TokenizedExample:
    full, spans = assistant_spans(tokenizer, messages, eot, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return TokenizedExample(list(enc["input_ids"]), labels)


def end_of_text_id(tokenizer: Any) -> int:
    """The document separator for packed raw text: <|endoftext|>-style tokens first, else eos."""
    vocab = tokenizer.get_vocab()
    for token in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"):
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise ApplianceError("The tokenizer has no end-of-text or eos token to separate documents.", "add an eos token")
    return tokenizer.eos_token_id
