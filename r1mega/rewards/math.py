"""Math accuracy: the last stated final answer (`\\boxed{}`, `<answer>` or GSM8K `#### `) checked by math-verify.

Grading conventions (README "Grading"), applied to the gold and the prediction alike:
- Only the final region counts: the text after the last `</think>`, and nothing while a `<think>`
  is open, including the one a template's prompt opens (`think_open`, `templates.opens_think`).
- Of the answer forms there, the one stated last wins; `\\boxed{..}`, `\\boxed ..`, `\\fbox{..}`
  are the boxing forms (MATH's `last_boxed_only_string`); an empty box states no answer.
- `x\\%` means x (MATH / Minerva normalisers): `28\\%` = `28`, and `0.28` is not `28\\%`.
  Degrees (`^\\circ`), currency (`\\$`), trailing `\\text{..}` units and thousands separators
  (`1,000`, `1{,}000`, `1\\,000`), bold (`\\textbf{..}`) and a final full stop are dropped;
  `\\dfrac`/`\\tfrac` are `\\frac`.
- Numbers are equal only when they agree relatively: exactly for exact values (rationals,
  radicals, factorials, any size), to `FLOAT_REL_TOL` when either side is a decimal (and to
  math-verify's 6 decimals). math-verify 0.9 alone compares absolutely (see `_relative_numeric_eq`).
Inputs are bounded before sympy sees them, and `math_verify` arms SIGALRM timeouts, so this
must run in the main thread of a process: `RewardManager` runs it in its worker pool.
"""
from __future__ import annotations

import re
import unicodedata

import math_verify.grader as _grader
import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


MAX_ANSWER_CHARS = 512  # longer "answers" are not answers; keeps sympy's time bounded
MAX_DIGIT_RUN = 64  # a 10^6-digit number would stall int/sympy conversion
FLOAT_REL_TOL = 1e-5  # a decimal answer must carry 5 correct significant digits
EXACT_REL_TOL = 1e-25  # exact values compared at 40 significant digits
_DIGIT_RUN = re.compile(r"\d{%d}" % (MAX_DIGIT_RUN + 1))
_GSM8K = re.compile(r"^#### *([-+$\\(]?\s*\d[^\n]*)", re.MULTILINE)  # a number after the marker, to the line's end
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
# (pattern, replacement) in order; each a convention of the module docstring.
_NORMALISE = [
    (re.compile(r"\\?%"), ""),  # percent
    # degrees: in a trig function's numeric argument converted to radians, elsewhere dropped
    (re.compile(r"\\(sin|cos|tan|cot|sec|csc)\s*\(?\s*(\d+(?:\.\d+)?)\s*(?:\^\s*\{?\s*\\circ\s*\}?|°)\s*\)?"),
     r"\\\1\\left(\\frac{\2\\pi}{180}\\right)"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree"), ""),
    (re.compile(r"\\\$|^\$|\$$"), ""),  # currency, stray math delimiters
    (re.compile(r"(\d)(?:\{,\}|\\[,;:! ]\s*)(?=\d{3}(?!\d))"), r"\1"),  # 1{,}000, 1\,000
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\!"), ""),
    (re.compile(r"\\\\"), " "),  # a LaTeX line break
    (re.compile(r"\\(?:textbf|mathbf|boldsymbol)\{([^{}]*)\}"), r"\1"),  # emphasis: \textbf{(073)}
    (re.compile(r"\.$"), ""),  # a sentence's full stop: 104.
    (re.compile(r"(\d)\s*[eE]\s*([+-]?\d+)(?![\w.])"), r"\1\\times 10^{\2}"),  # 1e-05, as Python prints floats
]


def final_region(text: str, think_open: bool = False) -> str:
    """The text after the chain of thought: after the last `</think>`; empty while a `<think>` is
    open, counting the one the prompt opened when `think_open` (the template ends with `<think>`)."""
    end = text.rfind("</think>")
    if end >= 0:
        tail = text[end + len("</think>"):]
        return "" if "<think>" in tail else tail
    return "" if think_open or "<think>" in text else text


def _box_content(text: str, start: int) -> str | None:
    """What the box at `start` holds: `{...}` with braces matched (escaped characters such as `\\{`,
    `\\}` and `\\\\` skipped), or `\\boxed x` up to `$` or the line's end; None if unclosed or empty."""
    i = _BOX.match(text, start).end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            depth += 1 if c == "{" else -1 if c == "}" else 0
            if depth == 0:
                return text[i + 1:j].strip() or None
            j += 1
        return None
    if i == _BOX.match(text, start).end():  # `\boxed5`: not a box
        return None
    rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip().rstrip(".")
    return rest or None


def _last_box(text: str) -> tuple[int, str] | None:
    """(position, content) of the last box in `text` that states something (empty, bare or unclosed
    boxes state nothing), or None."""
    for m in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, m.start())
        if content is not None:
            return m.start(), content
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last box in `text` that states something (see `_box_content`), or None."""
    box = _last_box(text)
    return box[1] if box else None


def extract_answer(completion: str, think_open: bool = False) -> str | None:
    """The final answer a completion states last (an `<answer>` block, a box, or GSM8K's `#### `
    followed by a number, to the end of its line), or None."""
    region = final_region(completion, think_open)
    candidates = []  # (position, answer)
    tags = list(_ANSWER_TAG.finditer(region))
    offset = 0
    if tags:
        inner = tags[-1].group(1)
        boxed = last_boxed(inner)
        candidates.append((tags[-1].start(), boxed if boxed is not None else (inner.strip() or None)))
        offset = tags[-1].end()
    rest = region[offset:]
    box = _last_box(rest)
    if box:
        candidates.append((offset + box[0], box[1]))
    markers = list(_GSM8K.finditer(rest))  # `#### Check` (a Markdown heading) is not an answer
    if markers:
        candidates.append((offset + markers[-1].start(), markers[-1].group(1).strip()))
    return max(candidates)[1] if candidates else None


def gold_answer(answer: str) -> str:
    """A dataset's gold field: MATH-style answers as is, GSM8K solutions after `#### `."""
    marker = answer.rfind("#### ")
    return answer[marker + 5:].strip() if marker >= 0 else answer.strip()


_MISSING_AS_TEXT = {"none", "null", "nan", "n/a"}


def gold_problem(gold) -> str | None:
    """Why no completion could ever be graded correct against dataset value `gold` (text or a number,
    as `accuracy` reads it); None when one could. Data loading refuses such rows."""
    text = gold_answer(str(gold))
    if not text:
        return "has nothing after its '#### ' marker (no final answer)" if "####" in str(gold) else "is empty"
    if text.strip().lower() in _MISSING_AS_TEXT:
        return f"is {text!r}, a missing value written as text (write a real answer 'none' as \\text{{none}})"
    if len(text) > MAX_ANSWER_CHARS:
        return f"has {len(text)} characters, more than the grader's bound of {MAX_ANSWER_CHARS}"
    if _DIGIT_RUN.search(text):
        return f"has a run of more than {MAX_DIGIT_RUN} digits, beyond the grader's bound"
    if not _gradable(text):
        return f"has no letter or digit left to grade ({text!r} after the grading conventions)"
    return None


def normalise(answer: str) -> str:
    """The conventions of the module docstring that math-verify does not apply itself."""
    answer = answer.strip()
    for pattern, replacement in _NORMALISE:
        answer = pattern.sub(replacement, answer)
    return answer.strip()


def _bounded(answer: str | None) -> bool:
    """Whether the grader can take `answer`: within its size bounds, with a letter or digit."""
    return (bool(answer) and len(answer) <= MAX_ANSWER_CHARS and not _DIGIT_RUN.search(answer)
            and _gradable(answer))


# Markup that states nothing by itself: boxes, text and font wrappers, sizing and spacing.
_MARKUP = re.compile(r"\\(?:boxed|fbox|text|textbf|mathrm|mathbf|displaystyle|left|right|quad|qquad|[,;:! ])(?![A-Za-z])")


def _gradable(answer: str) -> bool:
    """Whether anything but markup, braces, dollars, spaces and invisible characters is left of
    `answer` after the grading conventions (`\\pi` is; `\\boxed{}`, `%`, a zero-width space are not)."""
    rest = _MARKUP.sub("", normalise(answer))
    return any(not c.isspace() and c not in "{}$" and unicodedata.category(c) != "Cf" for c in rest)


def _parse(answer: str, timeout: int):
    return parse("\\boxed{" + normalise(answer) + "}", _EXTRACTION, parsing_timeout=timeout)


_math_verify_numeric_eq = _grader.sympy_numeric_eq


def _relative_numeric_eq(a, b, float_rounding: int, numeric_precision: int) -> bool:
    """math-verify's numeric equality, then a relative check of the two values.

    math-verify 0.9 compares `(a - b).evalf(chop=True)` to 0 and rounds floats to 6 decimals, both
    absolute: 2^-98 "equals" 2^-99 and (2^2005+1)/(3*2^2006) "equals" 1/(3*2^2006). Installed as
    `math_verify.grader.sympy_numeric_eq`, so sets, tuples, intervals and relations, which compare
    their elements through it, get the same rule."""
    if not _math_verify_numeric_eq(a, b, float_rounding, numeric_precision):
        return False
    a, b = _grader.get_pct_val(a, a), _grader.get_pct_val(b, b)
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)) or a.free_symbols or b.free_symbols:
        return True  # symbolic or structured: math-verify's element-wise comparison decided
    try:
        x, y = sympy.N(a, 40), sympy.N(b, 40)
        scale = max(abs(x), abs(y))
        if scale == 0:
            return True
        tol = FLOAT_REL_TOL if (a.has(sympy.Float) or b.has(sympy.Float)) else EXACT_REL_TOL
        return bool(abs(x - y) <= tol * scale)
    except (TypeError, ValueError, ArithmeticError):  # not a number after all (e.g. zoo)
        return True


_grader.sympy_numeric_eq = _relative_numeric_eq


def equivalent(gold: str, pred: str, timeout: int = 5) -> bool:
    """Whether answer `pred` is `gold`, as graded (both bounded, parsed, normalised; math-verify)."""
    if not (_bounded(pred) and _bounded(gold)):
        return False
    gold_parsed, pred_parsed = _parse(gold, timeout), _parse(pred, timeout)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def accuracy(completion: str, row: dict, answer_key: str = "answer", timeout: int = 5,
             think_open: bool = False) -> float:
    """1.0 if the completion's final answer equals the row's gold answer, else 0.0 (also when the
    row has no gold: None or blank, which data loading refuses)."""
    gold = row.get(answer_key)
    if gold is None or isinstance(gold, bool):
        return 0.0
    return float(equivalent(gold_answer(str(gold)), extract_answer(completion, think_open), timeout))
