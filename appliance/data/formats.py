"""Data formats: detection by keys and record-numbered validation, one parser each.

A format is a set of required (and optional) keys and a parser from a JSON object to a typed
example. Adding a format is adding one `Format` to `FORMATS`; nothing else in the loader changes.

The chat formats read what the tools users come from write: OpenAI's fine-tuning format (content
as a string or a list of text parts, `developer` as the system role, `weight: 0` on an assistant
turn not to learn, `tool_calls` and `tool` turns), ShareGPT (`conversations` of `from`/`value`),
Alpaca and LLaMA-Factory's instruction format (with `system` and `history`), and TRL's
prompt/completion pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

ROLES = ("system", "user", "assistant", "tool")
# Other names of those roles: OpenAI's newer system role, and ShareGPT's and LLaMA-Factory's names.
ROLE_ALIASES = {
    "developer": "system",
    "human": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    "function_response": "tool",
}


class RecordError(ValueError):
    """One record is wrong; the loader adds file and record number."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    trained: bool = True  # an assistant turn with OpenAI's `weight: 0` carries no loss
    tool_calls: tuple[dict, ...] | None = None  # an assistant turn that calls tools (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def conversation_key(messages: Sequence["Message"]) -> str:
    """Turns as one comparable string (roles kept, surrounding space dropped): what the leakage check compares."""
    return "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in messages)


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[Message, ...]
    tools: tuple[dict, ...] | None = None  # the tools the conversation may call (OpenAI's `tools`), for the template

    @property
    def prompt_key(self) -> str:
        """Everything before the last assistant turn: what leaks if seen in two splits."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return conversation_key(self.messages[:last])

    @property
    def key(self) -> str:
        return "\x1e".join(f"{m.role}\x1f{m.content}\x1f{m.tool_calls}" for m in self.messages)


@dataclass(frozen=True)
class TextExample:
    text: str

    @property
    def prompt_key(self) -> str:
        return self.text.strip()

    key = prompt_key


@dataclass(frozen=True)
class PreferenceExample:
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    @property
    def prompt_key(self) -> str:
        return conversation_key(self.prompt)

    @property
    def key(self) -> str:
        return f"{self.prompt_key}\x1d{self.chosen}\x1d{self.rejected}"


@dataclass(frozen=True)
class UnpairedExample:
    """KTO's unpaired feedback: one answer, marked desirable or not."""

    prompt: tuple[Message, ...]
    completion: str
    desirable: bool

    @property
    def prompt_key(self) -> str:
        return conversation_key(self.prompt)

    @property
    def key(self) -> str:
        return f"{self.prompt_key}\x1d{self.completion}\x1d{self.desirable}"


@dataclass(frozen=True)
class PromptExample:
    """A prompt alone (GRPO samples the answers), with an optional reference answer for the rewards."""

    prompt: tuple[Message, ...]
    answer: str | None

    @property
    def prompt_key(self) -> str:
        return conversation_key(self.prompt)

    key = prompt_key


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: str

    @property
    def prompt_key(self) -> str:
        return self.text.strip()

    @property
    def key(self) -> str:
        return f"{self.text}\x1d{self.label}"


Example = ChatExample | TextExample | PreferenceExample | UnpairedExample | PromptExample | ClassificationExample


# -- field helpers -----------------------------------------------------------


def _string(record: dict[str, Any], key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing key {key!r}")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{key!r} is empty")
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text is read."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError(f"{where}[{j}] is a {kind!r} part; only text parts can be trained on ({{'type': 'text', 'text': ...}})")
            texts.append(part["text"])
        return "".join(texts)
    raise RecordError(f"{where} must be a string or a list of text parts")


def _tool_calls(value: Any, where: str) -> tuple[dict, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
        raise RecordError(f"{where} must be a non-empty list of tool calls ({{'type': 'function', 'function': {{'name', 'arguments'}}}})")
    for j, call in enumerate(value):
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{where}[{j}] needs 'function': {{'name': ..., 'arguments': ...}}")
    return tuple(value)


def parse_messages(value: Any, key: str = "messages", *, need_assistant_last: bool = True, role_key: str = "role",
                   content_key: str = "content") -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{key!r} must be a non-empty list of {{{role_key!r}, {content_key!r}}} objects")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RecordError(f"{key}[{i}] must be an object with {role_key!r} and {content_key!r}")
        raw_role = item.get(role_key)
        role = ROLE_ALIASES.get(raw_role, raw_role) if isinstance(raw_role, str) else raw_role
        if role not in ROLES:
            raise RecordError(f"{key}[{i}].{role_key} is {raw_role!r}; allowed roles: {', '.join(ROLES)} (or developer, human, gpt)")
        calls = _tool_calls(item.get("tool_calls"), f"{key}[{i}].tool_calls") if role == "assistant" else None
        content = item.get(content_key)
        content = "" if content is None and calls else _content(content, f"{key}[{i}].{content_key}")
        if not content.strip() and role != "system" and not calls:
            raise RecordError(f"{key}[{i}].{content_key} is empty")
        trained = True
        if "weight" in item:
            if role != "assistant" or item["weight"] not in (0, 1) or isinstance(item["weight"], bool):
                raise RecordError(f"{key}[{i}].weight must be 0 or 1, on an assistant turn (OpenAI's format)")
            trained = item["weight"] == 1
        call_id = item.get("tool_call_id") if role == "tool" and isinstance(item.get("tool_call_id"), str) else None
        messages.append(Message(role, content, trained, calls, call_id))
    _check_order(messages, key, need_assistant_last)
    return tuple(messages)


def _check_order(messages: list[Message], key: str, need_assistant_last: bool) -> None:
    """system? then user first; user and assistant alternate; tool turns answer the assistant turn before them."""
    turns = messages[1:] if messages[0].role == "system" else messages
    if any(m.role == "system" for m in turns):
        raise RecordError(f"{key}: a system message may only come first")
    if not turns or turns[0].role != "user":
        raise RecordError(f"{key}: the first turn after the system message must be 'user'")
    for a, b in zip(turns, turns[1:]):
        if b.role == "tool":
            if a.role not in ("assistant", "tool"):
                raise RecordError(f"{key}: a 'tool' turn must follow the assistant turn that called the tool")
        elif a.role == b.role:
            raise RecordError(f"{key}: roles must alternate user/assistant, found two {a.role!r} turns in a row")
        elif a.role == "tool" and b.role != "assistant":
            raise RecordError(f"{key}: after a 'tool' turn comes the assistant's answer")
    if need_assistant_last:
        if not any(m.role == "assistant" for m in turns):
            raise RecordError(f"{key}: no assistant turn to learn from")
        if turns[-1].role != "assistant":
            raise RecordError(f"{key}: the last turn must be 'assistant' (nothing to learn after a final user or tool turn)")
        if not any(m.trained for m in turns if m.role == "assistant"):
            raise RecordError(f"{key}: every assistant turn has weight 0: nothing to learn")
    elif turns[-1].role != "user":
        raise RecordError(f"{key}: the prompt must end with a 'user' turn")


# -- parsers ---------------------------------------------------------------------


def _tools(record: dict[str, Any]) -> tuple[dict, ...] | None:
    tools = record.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("'tools' must be a list of tool definitions ({'type': 'function', 'function': {...}})")
    return tuple(tools) or None


def parse_chat(record: dict[str, Any]) -> ChatExample:
    return ChatExample(parse_messages(record.get("messages")), _tools(record))


def parse_sharegpt(record: dict[str, Any]) -> ChatExample:
    """ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system"|"tool", "value": ...}], "system"?}."""
    messages = parse_messages(record.get("conversations"), "conversations", role_key="from", content_key="value")
    if isinstance(record.get("system"), str) and record["system"].strip() and messages[0].role != "system":
        messages = (Message("system", record["system"]), *messages)
    return ChatExample(messages, _tools(record))


def parse_instruction(record: dict[str, Any]) -> ChatExample:
    """Alpaca (instruction, input, output), with LLaMA-Factory's `system` and `history` of earlier [question, answer] turns."""
    instruction = _string(record, "instruction")
    extra = _string(record, "input", required=False, allow_empty=True)
    output = _string(record, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = []
    if "system" in record:
        messages.append(Message("system", _string(record, "system", allow_empty=True)))
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise RecordError("'history' must be a list of [question, answer] pairs of strings")
    for question, answer in history:
        messages += [Message("user", question), Message("assistant", answer)]
    messages += [Message("user", user), Message("assistant", output)]
    _check_order(messages, "instruction", True)
    return ChatExample(tuple(messages))


def parse_prompt_completion(record: dict[str, Any]) -> ChatExample:
    """TRL's prompt/completion pairs: strings, or conversations (the prompt's, then the completion's turns)."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not prompt.strip() or not completion.strip():
            raise RecordError("'prompt' and 'completion' must not be empty")
        return ChatExample((Message("user", prompt), Message("assistant", completion)))
    if isinstance(prompt, list) and isinstance(completion, list):
        return ChatExample(parse_messages(prompt + completion, "prompt + completion"))
    raise RecordError("'prompt' and 'completion' must both be strings or both be message lists")


def parse_text(record: dict[str, Any]) -> TextExample:
    return TextExample(_string(record, "text"))


def _prompt(record: dict[str, Any]) -> tuple[Message, ...]:
    """A preference prompt: a string (one user turn) or the conversation before the answer."""
    prompt_value = record.get("prompt")
    if isinstance(prompt_value, str):
        if not prompt_value.strip():
            raise RecordError("'prompt' is empty")
        return (Message("user", prompt_value),)
    return parse_messages(prompt_value, "prompt", need_assistant_last=False)


def parse_preference(record: dict[str, Any]) -> PreferenceExample:
    prompt = _prompt(record)
    chosen, rejected = (_completion(record.get(k), k) for k in ("chosen", "rejected"))
    if chosen.strip() == rejected.strip():
        raise RecordError("'chosen' and 'rejected' are the same answer: the pair teaches nothing")
    return PreferenceExample(prompt, chosen, rejected)


def parse_unpaired(record: dict[str, Any]) -> UnpairedExample:
    """TRL's unpaired preference lines: {"prompt", "completion", "label": true (desirable) | false}."""
    label = record.get("label")
    if not isinstance(label, bool):
        raise RecordError("'label' must be true (a desirable answer) or false (an undesirable one)")
    return UnpairedExample(_prompt(record), _completion(record.get("completion"), "completion"), label)


def parse_prompt(record: dict[str, Any]) -> PromptExample:
    """GRPO's prompts: {"prompt"} with an optional reference {"answer"} that reward functions may read."""
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RecordError("'answer' must be a string or a number")
    return PromptExample(_prompt(record), None if answer is None else str(answer))


def _completion(value: Any, key: str) -> str:
    """A preference answer: a string, or chat-style [{'role': 'assistant', 'content': ...}]."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise RecordError(f"{key!r} as a message list must hold one 'assistant' message")
        value = _content(value[0].get("content"), f"{key}[0].content")
    if not isinstance(value, str):
        raise RecordError(f"missing key {key!r}" if value is None else f"{key!r} must be a string or one assistant message")
    if not value.strip():
        raise RecordError(f"{key!r} is empty")
    return value


def parse_classification(record: dict[str, Any]) -> ClassificationExample:
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RecordError("'label' must be a string or an integer")
    if isinstance(label, str) and not label.strip():
        raise RecordError("'label' is empty")
    return ClassificationExample(_string(record, "text"), str(label))


@dataclass(frozen=True)
class Format:
    name: str
    required: frozenset[str]
    optional: frozenset[str]
    parse: Callable[[dict[str, Any]], Example]
    describe: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("chat", frozenset({"messages"}), frozenset({"tools"}), parse_chat, '{"messages": [{"role", "content"}, ...]}'),
        Format("sharegpt", frozenset({"conversations"}), frozenset({"system", "tools"}), parse_sharegpt,
               '{"conversations": [{"from", "value"}, ...]}'),
        Format(
            "instruction",
            frozenset({"instruction", "output"}),
            frozenset({"input", "system", "history"}),
            parse_instruction,
            '{"instruction", "input"?, "output", "system"?, "history"?}',
        ),
        Format("prompt-completion", frozenset({"prompt", "completion"}), frozenset(), parse_prompt_completion, '{"prompt", "completion"}'),
        Format("preference", frozenset({"prompt", "chosen", "rejected"}), frozenset(), parse_preference,
               '{"prompt", "chosen", "rejected"}'),
        Format("unpaired", frozenset({"prompt", "completion", "label"}), frozenset(), parse_unpaired,
               '{"prompt", "completion", "label": true|false}'),
        Format("prompt", frozenset({"prompt"}), frozenset({"answer"}), parse_prompt, '{"prompt", "answer"?}'),
        Format("classification", frozenset({"text", "label"}), frozenset(), parse_classification, '{"text", "label"}'),
        Format("text", frozenset({"text"}), frozenset(), parse_text, '{"text"}'),
    )
}

# Which formats each task accepts.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("chat", "sharegpt", "instruction", "prompt-completion"),
    "cpt": ("text",),
    "dpo": ("preference",),
    "kto": ("unpaired",),
    "grpo": ("prompt",),
    "classify": ("classification",),
}

# Metadata keys tolerated beside a format's own (ids, sources): they are ignored.
IGNORED_KEYS = frozenset({"id", "source", "meta", "metadata"})


def detect(record: dict[str, Any]) -> Format | None:
    """The format a record is written in: of those whose keys it has exactly, the most specific;
    else the one that shares most of its keys, so that a pair without its "rejected" is read as a
    preference pair missing a key, not as a prompt with a stray one."""
    keys = set(record) - IGNORED_KEYS

    def fit(f: Format) -> tuple[bool, int, bool, int]:
        exact = f.required <= keys <= f.required | f.optional
        return exact, len(keys & (f.required | f.optional)), f.required <= keys, len(f.required)

    best = max(FORMATS.values(), key=fit)
    return best if keys & best.required else None


def expected_keys() -> str:
    return "; ".join(f"{f.name}: {f.describe}" for f in FORMATS.values())
