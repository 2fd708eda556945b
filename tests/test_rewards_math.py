"""Math accuracy: the grader audit on every benchmark, known hard cases, extraction rules, grading
conventions, adversarial outputs, the pool's limit."""
import time

import pytest

from r1mega.eval.benchmarks import data_dir
from r1mega.rewards import RewardConfig, RewardManager, SourceConfig, TermConfig
from r1mega.rewards.audit import CASES, audit, check_cases
from r1mega.rewards.math import accuracy, extract_answer
from r1mega.rewards.pool import WorkerPool

DATA = data_dir() / "eval"


def _manager(workers=2, timeout_s=10.0):
    cfg = RewardConfig(sources={"default": SourceConfig([TermConfig("accuracy")])}, workers=workers, timeout_s=timeout_s)
    return RewardManager(cfg, "r1_zero")


@pytest.fixture(scope="module")
def manager():
    with _manager() as m:
        yield m


@pytest.mark.skipif(not DATA.is_dir(), reason="the shared eval data is not checked out next to the repo")
def test_grader_audit_on_every_benchmark(capsys):
    """Own solutions accepted, other rows' golds refused (one partner per row, as CI time allows;
    `tools/grader_audit.py` runs five)."""
    results = audit(others=1)
    with capsys.disabled():
        for r in results:
            print(f"\n[grader audit] {r.name}: own-gold {r.own_rate:.2%} of {r.graded}, cross-gold {r.cross_rate:.2%} "
                  f"of {r.cross_pairs} ({r.seconds:.1f}s); failing: {r.failures[:3]}")
    assert {r.name for r in results} == {"aime24", "amc23", "math500", "gsm8k"}
    for r in results:
        assert r.own_rate >= 0.99 and r.cross_rate <= 0.005 and r.cross_pairs >= 0.9 * r.graded, r


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_known_hard_cases(case):
    assert check_cases([case]) == [(case, case.expected)]


@pytest.mark.parametrize("completion, expected", [
    ("so \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("<think>\\boxed{7}</think> final: \\boxed{8}", "8"),
    ("<think>\\boxed{7}</think> no answer here", None),
    ("<think>unfinished \\boxed{7}", None),
    ("<think>x</think><answer> 12 </answer>", "12"),
    ("<answer>it is \\boxed{\\{1, 2\\}}</answer>", "\\{1, 2\\}"),
    ("work\n#### 1,000", "1,000"),
    ("\\boxed{unclosed", None),
    # every boxing form MATH's `last_boxed_only_string` takes; an empty box states nothing
    ("so $\\boxed 5$.", "5"), ("\\boxed {12}", "12"), ("\\fbox{3}", "3"), ("\\boxed{}", None),
    ("\\boxed{\\{1\\}}", "\\{1\\}"), ("\\boxedx{3}", None),
    # the last stated answer wins, whatever its form
    ("#### 4 then \\boxed{5}", "5"), ("\\boxed{5} then\n#### 4", "4"),
    ("<answer>3</answer> on second thought \\boxed{4}", "4"), ("\\boxed{4} <answer>3</answer>", "3"),
    # an unclosed think after the last close: unfinished
    ("<think>first pass</think> <think>second pass, maybe \\boxed{5} but", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("Let me try 2+3. Maybe \\boxed{5}? Wait, let me re-check the", None),
    ("2+3=5 </think> The answer is \\boxed{5}.", "5"),
    ("2+3 </think> <think> again \\boxed{5}", None),
])
def test_extract_answer_after_a_template_that_opens_think(completion, expected):
    assert extract_answer(completion, think_open=True) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{(1, 3]}", "(1,3]", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("#### 1,000", "#### 1000", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("<think>\\boxed{4}</think> so \\boxed{3}", "3", 1.0),
    # values far from 1: equal only when relatively equal (exactly, for exact values)
    ("\\boxed{\\frac{2^{2005}+1}{3 \\cdot 2^{2006}}}", "\\frac{1+2^{2005}}{3 \\cdot 2^{2006}}", 1.0),
    # (more in rewards.audit.CASES)
    ("\\boxed{10^{-30}}", "10^{-31}", 0.0), ("\\boxed{1.5 \\times 10^{-30}}", "1.6 \\times 10^{-30}", 0.0),
    ("\\boxed{1.58e-30}", "\\frac{1}{2^{99}}", 0.0), ("\\boxed{(2^{-98}, 1)}", "(2^{-99}, 1)", 0.0),
    ("\\boxed{0.333333}", "\\frac{1}{3}", 1.0), ("\\boxed{0.000001}", "0.0000012", 0.0),
    ("\\boxed{100000}", "100001", 0.0), ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    # conventions, applied to gold and prediction alike
    ("\\boxed{104.}", "104", 1.0), ("\\boxed{\\textbf{(073)}}", "073", 1.0), ("\\boxed{90^\\circ}", "90", 1.0), ("\\boxed{90}", "90^{\\circ}", 1.0), ("\\boxed{\\$5}", "5", 1.0),
    ("\\boxed{5}", "\\$5", 1.0), ("\\boxed{5}", "5\\text{ cm}", 1.0), ("\\boxed{1\\,000}", "1000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0), ("\\boxed{\\dfrac{1}{2}}", "\\tfrac12", 1.0),
])
def test_accuracy_values(completion, gold, expected):
    assert accuracy(completion, {"answer": gold}) == expected


@pytest.mark.parametrize("completion, think_open, expected", [
    ("Let me try 2+3. Maybe \\boxed{5}? Wait, let me re-check the", True, 0.0),
    ("Let me try 2+3. Maybe \\boxed{5}? Wait, let me re-check the", False, 1.0),
    ("<think>first pass</think> <think>second pass, maybe \\boxed{5} but", False, 0.0),
    ("<think>first pass</think> <think>second pass, maybe \\boxed{5} but", True, 0.0),
    ("2+3 </think> so \\boxed{5}", True, 1.0),
])
def test_accuracy_counts_only_what_follows_the_think_the_template_opened(completion, think_open, expected):
    assert accuracy(completion, {"answer": "5"}, think_open=think_open) == expected


@pytest.mark.parametrize("gold", [None, "", "  ", True])
def test_a_row_without_gold_scores_zero(gold):
    assert accuracy("\\boxed{None}", {"answer": gold}) == 0.0
    assert accuracy("\\boxed{}", {"answer": gold}) == 0.0


def test_the_reward_manager_reads_completions_as_the_template_opened_them():
    cfg = RewardConfig(workers=0, sources={"default": SourceConfig([TermConfig("accuracy")])})
    unfinished = "Let me try 2+3. Maybe \\boxed{5}? Wait, let me re-check the"
    assert RewardManager(cfg, "r1").score([({"answer": "5"}, unfinished)])[0]["accuracy"] == 0.0
    assert RewardManager(cfg, "r1_zero").score([({"answer": "5"}, unfinished)])[0]["accuracy"] == 1.0


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
