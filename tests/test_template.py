"""Chat template rendering and assistant-only labels, token by token on SmolLM2's real template."""

import pytest

from appliance.data.formats import Message
from appliance.data.template import IGNORE_INDEX, end_of_turn, tokenize_chat


@pytest.fixture(scope="module")
def tokenizer(smollm2_store):
    from appliance.hf import load_tokenizer

    return load_tokenizer(smollm2_store / "models" / "smollm2")


def test_end_of_turn_is_read_from_the_template(tokenizer):
    assert end_of_turn(tokenizer) == "<|im_end|>"


def test_labels_cover_each_assistant_turn_and_its_end_of_turn_only(tokenizer):
    messages = (
        Message("user", "What is the capital of Zorvania?"),
        Message("assistant", "Kelmora."),
        Message("user", "And its river?"),
        Message("assistant", "The Vell."),
    )
    example = tokenize_chat(tokenizer, messages, "<|im_end|>")
    pieces = [tokenizer.decode([t]) for t in example.input_ids]
    trained = [(p, lab != IGNORE_INDEX) for p, lab in zip(pieces, example.labels)]
    print("\ntoken-by-token (✓ = carries loss):")
    for piece, carries in trained:
        print(f"  {'✓' if carries else ' '} {piece!r}")

    learned = "".join(p for p, carries in trained if carries)
    assert learned == "Kelmora.<|im_end|>The Vell.<|im_end|>"
    # Labels equal the token ids where they carry loss.
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(example.input_ids, example.labels))
    # The default system prompt, user turns, role headers and the newline after <|im_end|> carry none.
    not_learned = "".join(p for p, carries in trained if not carries)
    assert "You are a helpful AI assistant" in not_learned
    assert "<|im_start|>assistant\n" in not_learned
    assert "What is the capital of Zorvania?" in not_learned
    assert pieces[-1] == "\n" and example.labels[-1] == IGNORE_INDEX


def test_system_prompt_given_by_the_user_replaces_the_default(tokenizer):
    messages = (Message("system", "Be terse."), Message("user", "Hi"), Message("assistant", "Hello."))
    example = tokenize_chat(tokenizer, messages, "<|im_end|>")
    text = tokenizer.decode(example.input_ids)
    assert "Be terse." in text and "SmolLM" not in text
    assert tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX]) == "Hello.<|im_end|>"


def test_a_hostile_template_fails_with_a_clear_message(tokenizer):
    from appliance.data.template import render
    from appliance.errors import ApplianceError

    hostile = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    hostile.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ApplianceError, match="sandbox forbids"):
        render(hostile, [{"role": "user", "content": "hi"}])
