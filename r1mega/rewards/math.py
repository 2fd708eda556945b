"""Math accuracy: the final answer (last `\\boxed{}`, `<answer>` or GSM8K `#### `) checked by math-verify.

Only text after the chain of thought counts: a gold answer boxed inside `<think>` scores 0.
Inputs are bounded before sympy sees them, and `math_verify` arms SIGALRM timeouts, so this
must run in the main thread of a process: `RewardManager` runs it in its worker pool.
"""
from __future__ import annotations

import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

MAX_ANSWER_CHARS = 512  # longer "answers" are not answers; keeps sympy's time bounded
MAX_DIGIT_RUN = 64  # a 10^6-digit number would stall int/sympy conversion
_DIGIT_RUN = re.compile(r"\d{%d}" % (MAX_DIGIT_RUN + 1))
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]


def final_region(text: str) -> str:
    """The text after the chain of thought; empty while a `<think>` is left open."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return "" if "<think>" in text else text


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer string of a completion, or None if it states none."""
    region = final_region(completion)
    tags = _ANSWER_TAG.findall(region)
    if tags:
        region = tags[-1]
        boxed = last_boxed(region)
        return boxed if boxed is not None else region.strip()
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed
    marker = region.rfind("#### ")  # GSM8K's convention, also used by models tuned on it
    return region[marker + 5:].strip() if marker >= 0 else None


def gold_answer(answer: str) -> str:
    """A dataset's gold field: MATH-style answers as is, GSM8K solutions after `#### `."""
    marker = answer.rfind("#### ")
    return answer[marker + 5:].strip() if marker >= 0 else answer.strip()


def _bounded(answer: str | None) -> bool:
    return bool(answer) and len(answer) <= MAX_ANSWER_CHARS and not _DIGIT_RUN.search(answer)


def _parse(answer: str, timeout: int):
    return parse("\\boxed{" + answer + "}", _EXTRACTION, parsing_timeout=timeout)


def accuracy(completion: str, row: dict, answer_key: str = "answer", timeout: int = 5) -> float:
    """1.0 if the completion's final answer equals the row's gold answer, else 0.0."""
    pred = extract_answer(completion)
    gold = gold_answer(str(row[answer_key]))
    if not (_bounded(pred) and _bounded(gold)):
        return 0.0
    gold_parsed, pred_parsed = _parse(gold, timeout), _parse(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return 0.0
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
