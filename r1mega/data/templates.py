"""Prompt templates. R1-Zero's is the paper's Table 1, verbatim; `prompt` is replaced by the question."""
from __future__ import annotations

R1_ZERO_PREFIX = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: "
)
R1_ZERO_SUFFIX = ". Assistant:"

# R1 (cold start onwards): the user turn, then the model thinks and writes a summary.
R1_USER = "<|User|>"
R1_ASSISTANT = "<|Assistant|>"

TEMPLATES = ("r1_zero", "r1")


def render(problem: str, template: str = "r1_zero") -> str:
    if template == "r1_zero":
        return f"{R1_ZERO_PREFIX}{problem}{R1_ZERO_SUFFIX}"
    if template == "r1":
        return f"{R1_USER}{problem}{R1_ASSISTANT}<think>\n"
    raise ValueError(f"template={template!r}; expected one of {TEMPLATES}")


def opens_think(template: str) -> bool:
    """Whether the template's prompt ends inside an open `<think>` (r1): the completion starts in
    the chain of thought, so its final answer can only follow a `</think>` it writes itself."""
    return render("", template).rstrip().endswith("<think>")
