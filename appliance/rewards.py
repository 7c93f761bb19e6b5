"""Reward functions for GRPO: the user's, from a Python file, and a few ready ones to use in it.

A reward function is a plain function of (prompt, completion) returning a float; one that also
takes `answer` receives the data line's reference answer. The file named by `--reward` is the
user's own code, run as they asked: `REWARDS = [f, g]` in it names the functions to use, else every
public function defined in the file is one. A completion's reward is the sum of the functions'.

    # rewards.py
    from appliance.rewards import exact_match, regex

    answer_in_tags = regex(r"<answer>.*</answer>")

    def short(prompt, completion):
        return -len(completion) / 500

Sampling the completions (transformers' generate, on the device the model is on) sits here too,
below both training and evaluation, which score completions the same way.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from appliance.errors import ApplianceError

Reward = Callable[..., float]


# -- ready rewards -----------------------------------------------------------------------------------


def exact_match(prompt: str, completion: str, answer: str | None = None) -> float:
    """1 when the completion, stripped, is the reference answer (case and surrounding punctuation aside)."""
    if answer is None:
        return 0.0
    return float(completion.strip().strip(".!").lower() == str(answer).strip().strip(".!").lower())


def regex(pattern: str, flags: int = re.DOTALL) -> Reward:
    """A reward of 1 when the completion matches `pattern` anywhere (a format check), else 0."""
    compiled = re.compile(pattern, flags)

    def matches(prompt: str, completion: str) -> float:
        return float(compiled.search(completion) is not None)

    matches.__name__ = f"regex({pattern!r})"
    return matches


def length(target: int, per_char: float = 1 / 100) -> Reward:
    """0 at `target` characters, minus `per_char` for each character away from it."""

    def near(prompt: str, completion: str) -> float:
        return -abs(len(completion) - target) * per_char

    near.__name__ = f"length({target})"
    return near


def judge(question: str = "Rate the answer to the question from 0 to 10. Question: {prompt}\nAnswer: {completion}\nReply with the number only.",
          model: str | None = None, url: str | None = None) -> Reward:
    """A model served by the local endpoint (`appliance serve`) grades each completion 0-10; the reward
    is the grade / 10 (0 when the reply holds no number)."""

    def graded(prompt: str, completion: str) -> float:
        # The one reward that reaches up the flow: it is a client of the served endpoint, by design.
        from appliance.client import ask
        from appliance.serve import find_endpoint

        reply = ask(find_endpoint(url, None), question.format(prompt=prompt, completion=completion), model=model, temperature=0.0, max_tokens=8).text
        found = re.search(r"\d+(\.\d+)?", reply)
        return min(float(found.group()), 10.0) / 10 if found else 0.0

    graded.__name__ = "judge"
    return graded


# -- the user's file ----------------------------------------------------------------------------------


def load_rewards(path: Path) -> list[Reward]:
    """The reward functions of the user's file (see the module's notes)."""
    path = Path(path)
    if not path.is_file():
        raise ApplianceError(f"--reward {path} does not exist.", "write a Python file of reward functions f(prompt, completion) -> float")
    spec = importlib.util.spec_from_file_location(f"appliance_user_rewards_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: any error it raises is theirs to fix
        raise ApplianceError(f"{path} failed to load: {type(err).__name__}: {err}", "fix the reward file; run `python FILE` to see where") from None
    named = getattr(module, "REWARDS", None)
    functions = list(named) if named is not None else [
        f for name, f in vars(module).items() if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == module.__name__
    ]
    if not functions or not all(callable(f) for f in functions):
        raise ApplianceError(f"{path} defines no reward function.", "define f(prompt, completion) -> float, or list them: REWARDS = [f, g]")
    return functions


def _takes_answer(function: Reward) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "answer" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def score(functions: Sequence[Reward], prompt: str, completion: str, answer: str | None) -> float:
    """The sum of the functions' rewards; a function that fails or returns no number is the user's mistake."""
    total = 0.0
    for function in functions:
        name = getattr(function, "__name__", repr(function))
        try:
            value = function(prompt, completion, answer=answer) if _takes_answer(function) else function(prompt, completion)
            value = float(value)
        except Exception as err:  # the user's code
            raise ApplianceError(f"The reward function {name} failed: {type(err).__name__}: {err}",
                                 "fix it in the reward file; it gets (prompt, completion[, answer]) as strings") from None
        if math.isnan(value) or math.isinf(value):
            raise ApplianceError(f"The reward function {name} returned {value}.", "return a finite float")
        total += value
    return total


# -- sampling ------------------------------------------------------------------------------------------


@dataclass
class Sampled:
    prompt_index: int
    ids: list[int]  # the completion's tokens, through its end-of-turn token when it stopped
    text: str


def sample(model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, per_prompt: int, max_new_tokens: int, temperature: float,
           greedy: bool = False) -> list[Sampled]:
    """`per_prompt` completions of each prompt from the model (left-padded batch, no gradient)."""
    import torch

    stops = stop_ids(tokenizer)
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(per_prompt)]
    width = max(len(p) for _, p in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for _, p in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in rows], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                 temperature=temperature if not greedy else None, top_p=1.0, top_k=0, eos_token_id=stops, pad_token_id=pad)
    finally:
        model.train(was_training)
    sampled = []
    for (index, _), row in zip(rows, out[:, width:].tolist()):
        end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        completion = row[:end]
        sampled.append(Sampled(index, completion, tokenizer.decode(completion, skip_special_tokens=True).strip()))
    return sampled


def stop_ids(tokenizer: Any) -> list[int]:
    """The tokens that end an answer: end of text, and the template's end of turn."""
    ids = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in _end_tokens(tokenizer))}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _end_tokens(tokenizer: Any) -> list[str]:
    from appliance.data import end_of_turn

    eot = end_of_turn(tokenizer)
    return [eot] if eot else []


def mean_reward(model: Any, tokenizer: Any, prompts: Sequence[Any], rewards: Sequence[Reward], max_new_tokens: int) -> float:
    """The mean reward of one greedy answer to each prompt (data.encoders.PromptTokens): GRPO's validation, and `appliance eval`."""
    sampled = sample(model, tokenizer, [p.input_ids for p in prompts], per_prompt=1, max_new_tokens=max_new_tokens, temperature=1.0, greedy=True)
    return sum(score(rewards, prompts[s.prompt_index].prompt, s.text, prompts[s.prompt_index].answer) for s in sampled) / len(sampled)
