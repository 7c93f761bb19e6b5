"""More ways to ask: each example's prompt paraphrased by a model, written beside the originals.

Each paraphrase is a copy of its example with the prompt reworded and `meta.paraphrase_of` naming
the example's `id` (given one when it has none). The split keeps an example and its paraphrases on
one side, and the leakage check counts a paraphrase in another split as a leak, so held-out figures
still measure what was not seen in other words. The rewording comes from whatever `rewrite` the
caller passes (the CLI: the local endpoint); nothing here talks to a server.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from appliance.data.load import load_file, read_objects
from appliance.errors import ApplianceError

INSTRUCTION = (
    "Rewrite the following request in other words. Keep its meaning, its language and every detail it asks about; "
    "reply with the rewritten request only.\n\n{text}"
)


@dataclass
class AugmentReport:
    path: str
    out: str
    format: str
    examples: int
    paraphrases: int
    unchanged: int  # rewordings that came back empty or identical, not written
    seconds: float


def _last_user(messages: list[Any], role_key: str, content_key: str, user_roles: tuple[str, ...]) -> dict | None:
    users = [m for m in messages if isinstance(m, dict) and m.get(role_key) in user_roles and isinstance(m.get(content_key), str)]
    return users[-1] if users else None


def _prompt_slot(record: dict[str, Any], fmt: str) -> tuple[dict, str] | None:
    """The (object, key) holding the text to reword: the last user turn, the instruction or the prompt."""
    if fmt == "chat":
        turn = _last_user(record["messages"], "role", "content", ("user",))
        return (turn, "content") if turn else None
    if fmt == "sharegpt":
        turn = _last_user(record["conversations"], "from", "value", ("human", "user"))
        return (turn, "value") if turn else None
    if fmt == "instruction":
        return record, "instruction"
    if fmt == "classification":
        return record, "text"
    if fmt in ("prompt-completion", "preference", "unpaired", "prompt"):
        if isinstance(record["prompt"], str):
            return record, "prompt"
        turn = _last_user(record["prompt"], "role", "content", ("user",))
        return (turn, "content") if turn else None
    return None


def paraphrase_file(path: Path, out: Path, paraphrases: int, rewrite: Callable[[str], str], progress: Callable[[str], None] = lambda _: None) -> AugmentReport:
    """Write `out`: every example of `path`, each followed by up to `paraphrases` rewordings of its prompt."""
    from appliance.store import atomic_write

    started = time.time()
    loaded = load_file(path).require_clean()
    if loaded.format == "text":
        raise ApplianceError(f"{path} is raw text: it has no prompts to paraphrase.", "augment chat, instruction, prompt or preference data")
    records = dict(read_objects(path))
    lines, written, unchanged = [], 0, 0
    for n, (number, _) in enumerate(loaded.examples, 1):
        original = records[number]
        original.setdefault("id", f"{Path(path).stem}-{number}")
        lines.append(json.dumps(original, ensure_ascii=False))
        slot = _prompt_slot(original, loaded.format)
        if slot is None:
            continue
        holder, key = slot
        text, seen = holder[key], {holder[key].strip().lower()}
        progress(f"example {n}/{len(loaded.examples)}")
        for k in range(paraphrases):
            reworded = rewrite(text).strip().strip('"').strip()
            if not reworded or reworded.lower() in seen:
                unchanged += 1
                continue
            seen.add(reworded.lower())
            copy_ = copy.deepcopy(original)
            copy_holder, _ = _prompt_slot(copy_, loaded.format)
            copy_holder[key] = reworded
            copy_["id"] = f"{original['id']}-p{k + 1}"
            copy_["meta"] = {**(original.get("meta") if isinstance(original.get("meta"), dict) else {}), "paraphrase_of": original["id"]}
            lines.append(json.dumps(copy_, ensure_ascii=False))
            written += 1
    atomic_write(out, "\n".join(lines) + "\n")
    return AugmentReport(str(path), str(out), loaded.format, len(loaded.examples), written, unchanged, round(time.time() - started, 1))
