"""Evaluation metrics over k sampled completions per problem (DeepSeek-R1 paper, section 3.1).

- pass@1: the mean over problems of the fraction of a problem's k samples that are correct.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), averaged over problems.
- cons@k: majority vote over the k extracted answers; the problem counts as solved when the
  winning answer is correct. Answers are grouped by symmetric math-verify equivalence (so "1/2",
  "0.5" and "\\frac{1}{2}" are one vote), a sample without an answer (None) never votes, and the
  outcome does not depend on the samples' order (`majority_vote`).
"""
from __future__ import annotations

from typing import Callable, Sequence

from r1mega.rewards import math as grading


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
    """Whether two extracted answers are equivalent: one, graded as a prediction against the other as
    gold (`rewards.math.equivalent`), passes, in either direction (math-verify is not symmetric:
    gold `1 \\le x \\le 2` accepts `[1,2]`, not the reverse). Needs a main thread (SIGALRM)."""
    return a == b or grading.equivalent(b, a) or grading.equivalent(a, b)


def majority_vote(answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = same_answer) -> int | None:
    """Index of a sample whose answer wins the vote, None when no sample has an answer; what wins
    does not depend on the samples' order. Answers are grouped into classes by the transitive
    closure of `equivalent` (identical strings compared once), the largest class wins, a tie goes
    to the class holding the smallest answer string, and the winner is the first sample holding its
    class's smallest answer string (all samples with one answer string grade alike)."""
    distinct = sorted({a for a in answers if a is not None})
    if not distinct:
        return None
    parent = list(range(len(distinct)))  # union-find over distinct answers

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            if root(i) != root(j) and equivalent(distinct[i], distinct[j]):
                parent[root(j)] = root(i)
    members: dict[int, list[str]] = {}  # class root -> its distinct answers, sorted
    for k, d in enumerate(distinct):
        members.setdefault(root(k), []).append(d)
    votes = {r: sum(answers.count(d) for d in ds) for r, ds in members.items()}
    best = min(members, key=lambda r: (-votes[r], members[r][0]))
    return answers.index(members[best][0])


def cons_at_k(winners: Sequence[int | None], correct: Sequence[Sequence[bool]]) -> float:
    """cons@k over (at least one) problems: the fraction whose majority-vote winner (`majority_vote`
    of problem i's answers, None when no sample answered) is a correct sample."""
    return sum(w is not None and bool(c[w]) for w, c in zip(winners, correct, strict=True)) / len(correct)
