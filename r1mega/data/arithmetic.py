"""The embedded default's synthetic task: two-number addition, stated in words, answered in the
R1-Zero format. Nothing is downloaded, so the CPU default makes its own base model from this.

The pretraining corpus imitates a base model with latent skill and noisy habits: every document
states the problem with the paper's template and works the sum out column by column, but only
`p_format` of the completions use the `<think>…</think> <answer>…</answer>` form, and only
`p_correct` of them state the sum the reasoning reached (the rest are off by one or by ten). A model
trained on it can add, yet samples a wrong or malformed answer most of the time; R1-Zero's accuracy
and format rewards have something to elicit.

The pairs (a, b) are split three ways: pretraining, RL prompts, and eval; RL and eval problems never
occur in the corpus, and eval problems are not RL prompts either. `cfg` is `ArithmeticConfig`
(`r1mega.config.schema`).
"""
from __future__ import annotations

import random

from r1mega.data.templates import render

SOURCE = "arithmetic"
VERSION = 3  # of the corpus text; part of the embedded base's cache key


def problem_text(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def row(a: int, b: int, split: str) -> dict:
    return {"id": f"{split}-{a}+{b}", "problem": problem_text(a, b), "answer": str(a + b), "data_source": SOURCE}


def split_pairs(cfg) -> dict[str, list[tuple[int, int]]]:
    """{"pretrain", "rl", "eval"} pairs: a fixed permutation of all pairs, by seed."""
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    n = cfg.num_heldout
    if 3 * n > len(pairs):
        raise ValueError(f"data.arithmetic.num_heldout={n} leaves too few of {len(pairs)} pairs for pretraining")
    return {"eval": pairs[:n], "rl": pairs[n:2 * n], "pretrain": pairs[2 * n:]}


def rows(cfg, split: str) -> list[dict]:
    return [row(a, b, split) for a, b in split_pairs(cfg)[split]]


def reasoning(a: int, b: int) -> str:
    """Column addition, ones then tens: each step is a one-digit fact the corpus repeats often, so a
    tiny model can add numbers it never saw by composing them. No spaces: every token counts on CPU."""
    ones = a % 10 + b % 10
    return f"{a % 10}+{b % 10}={ones},{a // 10}+{b // 10}+{ones // 10}={a // 10 + b // 10 + ones // 10}"


def completion(a: int, b: int, rng: random.Random, cfg) -> str:
    """One noisy base-model continuation of the template for `a + b`: the reasoning is always right,
    the stated answer only with probability `p_correct` (else off by one or by ten)."""
    c = a + b
    if rng.random() >= cfg.p_correct:
        c = max(0, c + rng.choice((-1, 1, 10, -10)))
        c = c if c != a + b else a + b + 1
    think = reasoning(a, b)
    if rng.random() < cfg.p_format:
        return f"<think>{think}</think><answer>{c}</answer>"
    return rng.choice((f" {c}", f" The answer is {c}.", f"<think>{think}</think>{c}", f" {think}. {c}"))


def pretraining_corpus(cfg, num_docs: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs over the pretraining pairs only."""
    rng = random.Random(seed)
    train = split_pairs(cfg)["pretrain"]
    docs = []
    for _ in range(num_docs):
        a, b = train[rng.randrange(len(train))]
        docs.append((render(problem_text(a, b), "r1_zero"), completion(a, b, rng, cfg)))
    return docs
