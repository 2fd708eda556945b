"""Format rewards: the R1-Zero template and the R1 output form.

R1-Zero (paper Table 1): "<think> reasoning process here </think> <answer> answer here </answer>"
and nothing else. R1: "<think> ... </think>" followed by a summary. Each tag must occur exactly
once, so a second think or answer block cannot hide anything, and every block must be substantive:
a letter or digit outside LaTeX command names (`<answer> </answer>`, `<think>...</think>` or
`\\boxed{}` earn nothing). When the template's prompt already ends with "<think>" the completion
is read as if it began with it (`think_open`, `data.templates.opens_think`).
"""
from __future__ import annotations

import re

_R1_ZERO = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_R1 = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_COMMAND = re.compile(r"\\(?:[A-Za-z]+|.)")  # a command name, or an escaped character such as `\\`
_WORD_CHAR = re.compile(r"[^\W_]")


def substantive(block: str) -> bool:
    """Whether a block holds a letter or digit that is not part of a LaTeX command name."""
    return _WORD_CHAR.search(_COMMAND.sub(" ", block)) is not None


def format_reward(completion: str, row: dict | None = None, style: str = "r1_zero",
                  think_open: bool = False) -> float:
    """1.0 if the completion has the `style` form (`r1_zero` or `r1`), else 0.0."""
    text = "<think>" + completion if think_open else completion
    counts = {tag: text.count(tag) for tag in _TAGS}
    if style == "r1_zero":
        match = _R1_ZERO.fullmatch(text)
        ok = match is not None and all(n == 1 for n in counts.values())
    elif style == "r1":
        match = _R1.fullmatch(text)
        ok = match is not None and counts["<think>"] == counts["</think>"] == 1
    else:
        raise ValueError(f"format style must be 'r1_zero' or 'r1', got {style!r}")
    return float(ok and substantive(match.group(1)) and substantive(match.group(2)))
