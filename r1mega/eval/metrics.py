"""Evaluation metrics over k sampled completions per problem (DeepSeek-R1 paper, section 3.1).

- pass@1: the mean over problems of the fraction of a problem's k samples that are correct.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), averaged over problems.
- cons@k: majority vote over the k extracted answers; the problem counts as solved when the
  winning answer is correct. Answers are grouped by math-verify equivalence (so "1/2", "0.5" and
  "\\frac{1}{2}" are one vote), a sample without an answer (None) never votes, and a tie between
  classes goes to the class whose first member is the earliest sample.
"""
from __future__ import annotations

from typing import Callable, Sequence

from r1mega.rewards.math import accuracy


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them correct, is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    p_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a product, no big binomials
        p_all_wrong *= 1.0 - k / i
    return 1.0 - p_all_wrong


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over (at least one) problems; `correct[i]` holds the outcomes of problem i's
    samples. With k = 1 this is pass@1: the mean per-problem fraction correct."""
    return sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in correct) / len(correct)


def same_answer(a: str, b: str) -> bool:
    """Whether two extracted answers are equivalent, judged exactly as grading judges an answer
    against a gold one (`rewards.math.accuracy`, math-verify). Needs a main thread (SIGALRM)."""
    return a == b or accuracy(f"\\boxed{{{a}}}", {"answer": b}) == 1.0


def majority_vote(answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = same_answer) -> int | None:
    """Index of the sample whose answer wins the vote (the first member of the largest class of
    equivalent answers); None when no sample has an answer. Each answer joins the first class whose
    first member it is equivalent to. Ties: the class whose first member comes first wins."""
    classes: list[list[int]] = []  # in order of their first member
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for members in classes:
            if equivalent(answers[members[0]], answer):
                members.append(i)
                break
        else:
            classes.append([i])
    return max(classes, key=len)[0] if classes else None  # max keeps the first of equal lengths


def cons_at_k(winners: Sequence[int | None], correct: Sequence[Sequence[bool]]) -> float:
    """cons@k over (at least one) problems: the fraction whose majority-vote winner (`majority_vote`
    of problem i's answers, None when no sample answered) is a correct sample."""
    return sum(w is not None and bool(c[w]) for w, c in zip(winners, correct, strict=True)) / len(correct)
