"""Data formats: detection by keys and line-numbered validation, one parser each.

A format is a set of required (and optional) keys and a parser from a JSON
object to a typed example. Adding a format is adding one `Format` to
`FORMATS`; nothing else in the loader changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """One record is wrong; the loader adds file and line."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[Message, ...]

    @property
    def prompt_key(self) -> str:
        """Everything before the last assistant turn: what leaks if seen in two splits."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in self.messages[:last])

    @property
    def key(self) -> str:
        return "\x1e".join(f"{m.role}\x1f{m.content}" for m in self.messages)


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
        return "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in self.prompt)

    @property
    def key(self) -> str:
        return f"{self.prompt_key}\x1d{self.chosen}\x1d{self.rejected}"


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


Example = ChatExample | TextExample | PreferenceExample | ClassificationExample


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


def parse_messages(value: Any, key: str = "messages", *, need_assistant_last: bool = True) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{key!r} must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RecordError(f"{key}[{i}] must be an object with 'role' and 'content'")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise RecordError(f"{key}[{i}].role is {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{key}[{i}].content must be a string")
        if not content.strip() and role != "system":
            raise RecordError(f"{key}[{i}].content is empty")
        messages.append(Message(role, content))
    _check_order(messages, key, need_assistant_last)
    return tuple(messages)


def _check_order(messages: list[Message], key: str, need_assistant_last: bool) -> None:
    """system? then user/assistant alternating, starting with user."""
    turns = messages[1:] if messages[0].role == "system" else messages
    if any(m.role == "system" for m in turns):
        raise RecordError(f"{key}: a system message may only come first")
    if not turns or turns[0].role != "user":
        raise RecordError(f"{key}: the first turn after the system message must be 'user'")
    for a, b in zip(turns, turns[1:]):
        if a.role == b.role:
            raise RecordError(f"{key}: roles must alternate user/assistant, found two {a.role!r} turns in a row")
    if need_assistant_last:
        if not any(m.role == "assistant" for m in turns):
            raise RecordError(f"{key}: no assistant turn to learn from")
        if turns[-1].role != "assistant":
            raise RecordError(f"{key}: the last turn must be 'assistant' (nothing to learn after a final user turn)")
    elif turns[-1].role != "user":
        raise RecordError(f"{key}: the prompt must end with a 'user' turn")


# -- parsers ---------------------------------------------------------------------


def parse_chat(record: dict[str, Any]) -> ChatExample:
    return ChatExample(parse_messages(record.get("messages")))


def parse_instruction(record: dict[str, Any]) -> ChatExample:
    instruction = _string(record, "instruction")
    extra = _string(record, "input", required=False, allow_empty=True)
    output = _string(record, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [Message("user", user), Message("assistant", output)]
    if "system" in record:
        messages.insert(0, Message("system", _string(record, "system", allow_empty=True)))
    return ChatExample(tuple(messages))


def parse_text(record: dict[str, Any]) -> TextExample:
    return TextExample(_string(record, "text"))


def parse_preference(record: dict[str, Any]) -> PreferenceExample:
    prompt_value = record.get("prompt")
    if isinstance(prompt_value, str):
        if not prompt_value.strip():
            raise RecordError("'prompt' is empty")
        prompt = (Message("user", prompt_value),)
    else:
        prompt = parse_messages(prompt_value, "prompt", need_assistant_last=False)
    chosen, rejected = (_completion(record.get(k), k) for k in ("chosen", "rejected"))
    if chosen.strip() == rejected.strip():
        raise RecordError("'chosen' and 'rejected' are the same answer: the pair teaches nothing")
    return PreferenceExample(prompt, chosen, rejected)


def _completion(value: Any, key: str) -> str:
    """A preference answer: a string, or chat-style [{'role': 'assistant', 'content': ...}]."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise RecordError(f"{key!r} as a message list must hold one 'assistant' message")
        value = value[0].get("content")
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
        Format("chat", frozenset({"messages"}), frozenset(), parse_chat, '{"messages": [{"role", "content"}, ...]}'),
        Format(
            "instruction",
            frozenset({"instruction", "output"}),
            frozenset({"input", "system"}),
            parse_instruction,
            '{"instruction", "input"?, "output"}',
        ),
        Format("preference", frozenset({"prompt", "chosen", "rejected"}), frozenset(), parse_preference,
               '{"prompt", "chosen", "rejected"}'),
        Format("classification", frozenset({"text", "label"}), frozenset(), parse_classification, '{"text", "label"}'),
        Format("text", frozenset({"text"}), frozenset(), parse_text, '{"text"}'),
    )
}

# Which formats each task accepts.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("chat", "instruction"),
    "cpt": ("text",),
    "dpo": ("preference",),
    "classify": ("classification",),
}

# Metadata keys tolerated beside a format's own (ids, sources): they are ignored.
IGNORED_KEYS = frozenset({"id", "source", "meta", "metadata"})


def detect(record: dict[str, Any]) -> Format | None:
    """The most specific format whose required keys are all present."""
    keys = set(record)
    matches = [f for f in FORMATS.values() if f.required <= keys]
    if not matches:
        return None
    return max(matches, key=lambda f: len(f.required))


def expected_keys() -> str:
    return "; ".join(f"{f.name}: {f.describe}" for f in FORMATS.values())
