"""The embedded default's synthetic task: two-number addition, stated in words, answered in the
R1-Zero format. Nothing is downloaded, so the CPU default makes its own base model from this.

The pretraining corpus imitates a base model with latent skill and noisy habits: every document
states the problem with the paper's template, but only `p_format` of the completions use the
`<think>…</think> <answer>…</answer>` form, and only `p_correct` of them give the right sum (the rest
are off by one or by ten). A model trained on it can add, yet samples a wrong or malformed answer
most of the time; R1-Zero's accuracy and format rewards have something to elicit. Held-out pairs
(a, b) never occur in the corpus, so accuracy on them is measured on unseen problems.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from r1mega.data.templates import render

SOURCE = "arithmetic"


@dataclass
class ArithmeticConfig:
    max_operand: int = 49  # a, b in [0, max_operand]
    num_heldout: int = 256  # pairs never seen in pretraining (eval and RL prompts come from here)
    p_format: float = 0.5  # pretraining completions in the R1-Zero form
    p_correct: float = 0.4  # pretraining completions with the right sum
    seed: int = 0


def problem_text(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def row(a: int, b: int, split: str) -> dict:
    return {"id": f"{split}-{a}+{b}", "problem": problem_text(a, b), "answer": str(a + b), "data_source": SOURCE}


def split_pairs(cfg: ArithmeticConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train pairs, held-out pairs): a fixed permutation of all pairs, by seed."""
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    return pairs[cfg.num_heldout:], pairs[: cfg.num_heldout]


def heldout_rows(cfg: ArithmeticConfig) -> list[dict]:
    return [row(a, b, "heldout") for a, b in split_pairs(cfg)[1]]


def train_rows(cfg: ArithmeticConfig) -> list[dict]:
    return [row(a, b, "train") for a, b in split_pairs(cfg)[0]]


def completion(a: int, b: int, rng: random.Random, cfg: ArithmeticConfig) -> str:
    """One noisy base-model continuation of the template for `a + b`."""
    c = a + b
    if rng.random() >= cfg.p_correct:
        c = max(0, c + rng.choice((-1, 1, 10, -10)))
        c = c if c != a + b else a + b + 1
    think = f"{a} + {b} = {c}"
    if rng.random() < cfg.p_format:
        return f" <think> {think} </think> <answer> {c} </answer>"
    return rng.choice((f" {c}", f" The answer is {c}.", f" <think> {think} </think> {c}", f" {think}"))


def pretraining_corpus(cfg: ArithmeticConfig, num_docs: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs over the training pairs only."""
    rng = random.Random(seed)
    train = split_pairs(cfg)[0]
    docs = []
    for _ in range(num_docs):
        a, b = train[rng.randrange(len(train))]
        docs.append((render(problem_text(a, b), "r1_zero"), completion(a, b, rng, cfg)))
    return docs
