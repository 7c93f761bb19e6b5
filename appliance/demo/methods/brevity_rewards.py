"""A verifiable reward for the GRPO test: answers of at most 8 words score 1, longer ones less."""


def brief(prompt, completion):
    words = len(completion.split())
    return 1.0 if words <= 8 else 8 / words
