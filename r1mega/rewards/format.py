"""Format rewards: the R1-Zero template and the R1 output form.

R1-Zero (paper Table 1): "<think> reasoning process here </think> <answer> answer here </answer>"
and nothing else. R1: "<think> ... </think>" followed by a non-empty summary. Each tag must occur
exactly once, so a second think or answer block cannot hide anything. When the prompt already
ends with "<think>" (a common template choice), set `think_in_prompt`.
"""
from __future__ import annotations

import re

_R1_ZERO = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_R1 = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str, row: dict | None = None, style: str = "r1_zero",
                  think_in_prompt: bool = False) -> float:
    """1.0 if the completion has the `style` form (`r1_zero` or `r1`), else 0.0."""
    text = "<think>" + completion if think_in_prompt else completion
    counts = {tag: text.count(tag) for tag in _TAGS}
    if style == "r1_zero":
        match = _R1_ZERO.fullmatch(text)
        ok = match is not None and all(n == 1 for n in counts.values())
    elif style == "r1":
        match = _R1.fullmatch(text)
        ok = (match is not None and counts["<think>"] == counts["</think>"] == 1
              and bool(match.group(2).strip()))
    else:
        raise ValueError(f"format style must be 'r1_zero' or 'r1', got {style!r}")
    return float(ok and bool(match.group(1).strip()))
