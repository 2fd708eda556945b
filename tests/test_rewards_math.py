"""Math accuracy: gold solutions of MATH-500 and GSM8K, extraction rules, adversarial outputs, the pool's limit."""
import json
import time
from pathlib import Path

import pytest

from r1mega.rewards import RewardConfig, RewardManager, SourceConfig, TermConfig
from r1mega.rewards.math import accuracy, extract_answer, gold_answer
from r1mega.rewards.pool import WorkerPool

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/eval"


def _manager(workers=2, timeout_s=10.0):
    cfg = RewardConfig(sources={"default": SourceConfig([TermConfig("accuracy")])}, workers=workers, timeout_s=timeout_s)
    return RewardManager(cfg)


@pytest.fixture(scope="module")
def manager():
    with _manager() as m:
        yield m


def _load(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} absent: the shared eval data is not checked out next to the repo")
    return [json.loads(line) for line in path.open()]


@pytest.mark.parametrize("name, solution_key", [("math500.jsonl", "solution"), ("gsm8k.jsonl", "answer")])
def test_gold_solutions_score_their_own_answer_only(manager, capsys, name, solution_key):
    rows = _load(name)
    own = [(row, row[solution_key]) for row in rows]
    # Against the next row's answer, skipping pairs whose gold answers are the same string.
    shifted = [(nxt, row[solution_key]) for row, nxt in zip(rows, rows[1:] + rows[:1])
               if gold_answer(row["answer"]) != gold_answer(nxt["answer"])]
    start = time.monotonic()
    scores = manager.score(own + shifted)
    elapsed = time.monotonic() - start
    hit = sum(s["total"] for s in scores[:len(own)]) / len(own)
    false_pos = sum(s["total"] for s in scores[len(own):]) / len(shifted)
    with capsys.disabled():
        print(f"\n[gold check] {name}: own answer {hit:.2%} of {len(own)}, "
              f"other row's answer {false_pos:.2%} of {len(shifted)} ({elapsed:.1f}s)")
    assert hit >= 0.99
    assert false_pos <= 0.01


@pytest.mark.parametrize("completion, expected", [
    ("so \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("<think>\\boxed{7}</think> final: \\boxed{8}", "8"),
    ("<think>\\boxed{7}</think> no answer here", None),
    ("<think>unfinished \\boxed{7}", None),
    ("<think>x</think><answer> 12 </answer>", "12"),
    ("<answer>it is \\boxed{\\{1, 2\\}}</answer>", "\\{1, 2\\}"),
    ("work\n#### 1,000", "1,000"),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{(1, 3]}", "(1,3]", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("#### 1,000", "#### 1000", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("<think>\\boxed{4}</think> so \\boxed{3}", "3", 1.0),
])
def test_accuracy_values(completion, gold, expected):
    assert accuracy(completion, {"answer": gold}) == expected


HUGE = "9" * 10**6
ADVERSARIAL = {
    "million_digit_answer": (f"\\boxed{{{HUGE}}}", HUGE),
    "million_digit_gold_match": ("\\boxed{7}", "7" * 10**6),
    "deep_braces": ("\\boxed{" + "{" * 200_000 + "1" + "}" * 200_000 + "}", "1"),
    "deep_braces_short": ("\\boxed{" + "{" * 250 + "1" + "}" * 250 + "}", "2"),
    "deep_frac": ("\\boxed{" + "\\frac{1}{" * 50 + "2" + "}" * 50 + "}", "3"),  # its value is 2
    "megabyte_text": ("x" * 2**20 + "\\boxed{3}" + "y" * 2**20, "4"),
    "megabyte_unclosed": ("\\boxed{" + "{" * 2**20, "1"),
    "gold_only_in_think": ("<think>the answer is \\boxed{42}</think> I am not sure.", "42"),
    "gold_in_unclosed_think": ("<think>the answer is \\boxed{42}", "42"),
}


def test_adversarial_math_outputs_are_bounded_and_score_zero(manager):
    batch = [({"answer": gold}, completion) for completion, gold in ADVERSARIAL.values()]
    start = time.monotonic()
    scores = manager.score(batch)
    assert time.monotonic() - start < 20
    assert {name: s["total"] for name, s in zip(ADVERSARIAL, scores)} == {name: 0.0 for name in ADVERSARIAL}


def test_pool_kills_a_task_past_its_limit_and_keeps_working():
    pool = WorkerPool(1)
    try:
        start = time.monotonic()
        out = pool.run([(time.sleep, (60,), {}, 1.0), (accuracy, ("\\boxed{2}", {"answer": "2"}), {}, 10.0)],
                       default=0.0)
        assert out == [0.0, 1.0]
        assert time.monotonic() - start < 10
    finally:
        pool.close()
