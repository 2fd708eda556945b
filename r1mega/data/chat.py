"""SFT rows as text: the prompt (a template's rendering of the problem) and the response the model
must learn, in the template's output form.

R1 (`template="r1"`): the prompt ends with "<think>\\n", so the response is
"<reasoning>\\n</think>\\n<summary>" (EOS is added at tokenization). R1-Zero: the Table 1 form
" <think> reasoning </think> <answer> summary </answer>". A row carries either a finished
`response` (e.g. a rejection-sampled completion, used verbatim) or `reasoning` + `summary`.
"""
from __future__ import annotations

from r1mega.data.templates import render


def render_response(reasoning: str, summary: str, template: str = "r1") -> str:
    if template == "r1":
        return f"{reasoning.strip()}\n</think>\n{summary.strip()}"
    if template == "r1_zero":
        return f" <think> {reasoning.strip()} </think> <answer> {summary.strip()} </answer>"
    raise ValueError(f"template={template!r}; expected r1 or r1_zero")


def split_response(response: str) -> tuple[str, str]:
    """(reasoning, summary) of an R1-form response (after a prompt that opened <think>); the whole
    text is the reasoning while no </think> closes it."""
    head, sep, tail = response.partition("</think>")
    return head.replace("<think>", "", 1).strip(), tail.strip() if sep else ""


def sft_text(row: dict, template: str = "r1") -> tuple[str, str]:
    """(prompt, response) of an SFT row ({problem, response} or {problem, reasoning, summary})."""
    if "response" in row:
        response = row["response"]
    elif "reasoning" in row and "summary" in row:
        response = render_response(row["reasoning"], row["summary"], template)
    else:
        raise KeyError(f"SFT row {row.get('id', '?')!r} needs 'response' or 'reasoning' + 'summary'")
    return render(row["problem"], template), response
