"""Language consistency (R1 stage 2): the share of the chain of thought's words in the target language.

Word- and script-based, no model: letter runs are words, except that each CJK ideograph or kana
counts as one word (those scripts do not separate words by spaces). A word is in the target
language when all of its characters belong to that language's scripts.
"""
from __future__ import annotations

import re

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")
_LATIN = "A-Za-z\u00c0-\u024f"
SCRIPTS = {  # language -> characters its words are made of
    "en": "A-Za-z",
    "fr": _LATIN, "de": _LATIN, "es": _LATIN,
    "zh": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "ja": _CJK,
    "ko": "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f",
    "ru": "\u0400-\u04ff",
    "ar": "\u0600-\u06ff",
}
MAX_CHARS = 200_000  # bounds the scan; the share is stable long before that


def chain_of_thought(completion: str, think_open: bool = False) -> str:
    """The think block's content (to the end if unclosed); the whole text if there is none. With
    `think_open` (the prompt opened the block) it starts at the completion's first character."""
    start = -1 if think_open else completion.find("<think>")
    start = 0 if start < 0 else start + len("<think>")
    end = completion.find("</think>", start)
    return completion[start:] if end < 0 else completion[start:end]


def words(text: str) -> list[str]:
    return _WORD.findall(text[:MAX_CHARS])


def count_in_language(ws: list[str], language: str) -> int:
    """How many of the words `ws` are written in `language`."""
    if language not in SCRIPTS:
        raise ValueError(f"language {language!r} not in {sorted(SCRIPTS)}")
    in_language = re.compile(rf"[{SCRIPTS[language]}]+")
    return sum(1 for w in ws if in_language.fullmatch(w))


def consistency(completion: str, row: dict | None = None, language: str = "en", think_open: bool = False) -> float:
    """Share of the chain of thought's words written in `language`; 0.0 if it has no words."""
    ws = words(chain_of_thought(completion, think_open))
    n = count_in_language(ws, language)  # validates `language` even without words
    return n / len(ws) if ws else 0.0
