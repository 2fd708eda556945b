"""Rejection sampling (R1 paper 2.3.3): SFT data from an RL checkpoint.

`rejection_sample` generates `k` completions per prompt with a `RolloutEngine`, scores them with the
rule rewards, and keeps a completion only if it passes every filter, checked in this order (a
rejected completion is counted under the first filter it fails, so `generated = kept + sum(rejected)`):

- `truncated`: generation hit `max_tokens` (an unfinished answer is no SFT target);
- `reward`: each `required` reward term reaches its minimum (default accuracy = 1 and format = 1) and
  the weighted total reaches `min_total` when set;
- `language_mixing`: more than `max_language_mixing` of the chain of thought's words are not in the
  prompt's script (or in `language` when set);
- `long_paragraph`: a paragraph of the chain of thought is longer than `max_paragraph_chars`;
- `code_block`: the chain of thought contains a ``` fence;
- `duplicate`: the same prompt already has this completion (case and whitespace normalised);
- `over_cap`: the prompt already has `m` kept completions.

Kept rows are written as JSONL (`r1mega.data.jsonl.write_jsonl`) in the SFT row form of
`r1mega.data.chat` (`problem`, `response`, plus `reasoning` / `summary`) with provenance: prompt id,
source tag and step of the checkpoint that generated them, sample index, sampling settings, reward
terms and the filters' measurements. `mix` adds a non-reasoning SFT source by ratio (the paper:
600k reasoning + 200k non-reasoning samples). Run it where the engine lives (rank 0 on CPU).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from r1mega.config.recipes import RejectionConfig
from r1mega.data.chat import split_response
from r1mega.data.jsonl import write_jsonl
from r1mega.data.templates import render
from r1mega.rewards import language
from r1mega.rollout.engine import call_seed

FILTERS = ("truncated", "reward", "language_mixing", "long_paragraph", "code_block", "duplicate", "over_cap")

# Script classes for "the prompt's language": a word belongs to the first class that spells it whole.
_SCRIPT_CLASSES = {
    "latin": "A-Za-z\u00c0-\u024f",
    "cjk": "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "hangul": "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f",
    "cyrillic": "\u0400-\u04ff",
    "arabic": "\u0600-\u06ff",
    "greek": "\u0370-\u03ff",
}
_CLASS_RE = {name: re.compile(f"[{chars}]+") for name, chars in _SCRIPT_CLASSES.items()}
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def script_of(word: str) -> str | None:
    return next((name for name, rx in _CLASS_RE.items() if rx.fullmatch(word)), None)


def prompt_script(text: str) -> str | None:
    """The script most of `text`'s words are written in (None if it has no words)."""
    counts: dict[str, int] = {}
    for w in language.words(text):
        s = script_of(w)
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    return max(counts, key=counts.get) if counts else None


def language_mixing(cot: str, problem: str, target: str | None = None) -> float:
    """Share of the chain of thought's words not written in the target language (`rewards.language.SCRIPTS`)
    or, without one, in the prompt's script. 0 when either has no words (numbers and symbols mix nothing)."""
    words = language.words(cot)
    if not words:
        return 0.0
    if target is not None:
        return (len(words) - language.count_in_language(words, target)) / len(words)
    script = prompt_script(problem)
    if script is None:
        return 0.0
    return sum(1 for w in words if script_of(w) != script) / len(words)


def measure(completion: str, problem: str, cfg: RejectionConfig, think_open: bool = False) -> dict:
    """The readability measurements of a completion's chain of thought."""
    cot = language.chain_of_thought(completion, think_open)
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(cot)]
    return {"language_mixing": language_mixing(cot, problem, cfg.language),
            "longest_paragraph": max((len(p) for p in paragraphs), default=0),
            "code_block": "```" in cot}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def rejection_sample(engine, tokenizer, rows: list[dict], template: str, rewards, cfg: RejectionConfig,
                     out_path: str | Path, source: str = "", step: int | None = None,
                     rejected_path: str | Path | None = None, max_model_len: int | None = None) -> dict:
    """Generate, filter, write `out_path`; returns counts: prompts, skipped_prompts (too long for
    `max_model_len`), generated, kept, rejected {filter: n}, prompts_with_kept, path.

    `rows`: {id, problem, answer, data_source?}. `rewards`: a `RewardManager` or its config (then
    a manager is made and closed here). `source`/`step` tag the checkpoint for provenance. With
    `rejected_path`, rejected completions are written there too, with `rejected_by`."""
    from r1mega.rewards import RewardManager

    own = not isinstance(rewards, RewardManager)
    manager = RewardManager(rewards, template) if own else rewards
    try:
        if manager.template != template:
            raise ValueError(f"rejection: the reward manager grades template {manager.template!r}, the prompts use {template!r}")
        ids = tokenizer([render(r["problem"], template) for r in rows], add_special_tokens=False)["input_ids"] if rows else []
        fits = [i for i, p in enumerate(ids) if max_model_len is None or len(p) + cfg.max_tokens <= max_model_len]
        counts = {"prompts": len(rows), "skipped_prompts": len(rows) - len(fits), "generated": 0, "kept": 0,
                  "rejected": {f: 0 for f in FILTERS}, "prompts_with_kept": 0, "path": str(out_path)}
        kept, rejected = [], []
        for start in range(0, len(fits), cfg.batch_prompts):
            chunk = fits[start:start + cfg.batch_prompts]
            outs = engine.generate([ids[i] for i in chunk], n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_tokens=cfg.max_tokens, seed=call_seed(cfg.seed, step or 0, start))
            batch = [(rows[i], j, c, tokenizer.decode(c.token_ids, skip_special_tokens=True))
                     for i, out in zip(chunk, outs, strict=True) for j, c in enumerate(out.completions)]
            scores = manager.score([(row, text) for row, _, _, text in batch])
            for (row, j, c, text), score in zip(batch, scores, strict=True):
                missing = [t for t in cfg.required if t not in score]
                if missing:
                    raise ValueError(f"rejection: required reward terms {missing} are not computed for data source "
                                     f"{row.get(manager.cfg.source_key)!r} (terms: {sorted(score)})")
                record = _record(row, j, c, text, score, measure(text, row["problem"], cfg, manager.think_open), template, source, step, cfg)
                reason = _first_failure(record, c, score, cfg)
                (kept if reason is None else rejected).append((reason, record))
            counts["generated"] += len(batch)
        rows_out, seen, per_prompt = [], set(), {}
        for reason, record in kept:
            key = (normalise(record["problem"]), normalise(record["response"]))
            if cfg.dedup and key in seen:
                rejected.append(("duplicate", record))
            elif per_prompt.get(record["prompt_id"], 0) >= cfg.m:
                rejected.append(("over_cap", record))
            else:
                seen.add(key)
                per_prompt[record["prompt_id"]] = per_prompt.get(record["prompt_id"], 0) + 1
                rows_out.append(record)
        for reason, _ in rejected:
            counts["rejected"][reason] += 1
        counts["kept"], counts["prompts_with_kept"] = len(rows_out), len(per_prompt)
        write_jsonl(out_path, rows_out)
        if rejected_path is not None:
            write_jsonl(rejected_path, [{**record, "rejected_by": reason} for reason, record in rejected])
        return counts
    finally:
        if own:
            manager.close()


def _record(row, j, completion, text, score, filters, template, source, step, cfg) -> dict:
    reasoning, summary = split_response(text) if template == "r1" else (language.chain_of_thought(text).strip(), "")
    return {
        "id": f"{row['id']}/{j}", "prompt_id": row["id"], "problem": row["problem"], "answer": row.get("answer"),
        "data_source": row.get("data_source"), "template": template, "response": text,
        "reasoning": reasoning, "summary": summary,
        "provenance": {"source": source, "step": step, "sample": j, "seed": cfg.seed, "temperature": cfg.temperature,
                       "top_p": cfg.top_p, "num_tokens": len(completion.token_ids),
                       "finish_reason": completion.finish_reason, "rewards": score, "filters": filters},
    }


def _first_failure(record: dict, completion, score: dict, cfg: RejectionConfig) -> str | None:
    f = record["provenance"]["filters"]
    if cfg.drop_truncated and completion.finish_reason == "length":
        return "truncated"
    if any(score[t] < v for t, v in cfg.required.items()) or (cfg.min_total is not None and score["total"] < cfg.min_total):
        return "reward"
    if f["language_mixing"] > cfg.max_language_mixing:
        return "language_mixing"
    if f["longest_paragraph"] > cfg.max_paragraph_chars:
        return "long_paragraph"
    if cfg.reject_code_blocks and f["code_block"]:
        return "code_block"
    return None


def mix(reasoning_rows: list[dict], non_reasoning_rows: list[dict], ratio: float = 3.0, seed: int = 0) -> list[dict]:
    """All reasoning rows plus `len(reasoning) / ratio` non-reasoning rows (a seeded draw without
    replacement, all of them if there are fewer), shuffled; each row gets `mix`: reasoning | non_reasoning.
    `ratio` is reasoning rows per non-reasoning row (the paper: 600k / 200k = 3)."""
    if ratio <= 0:
        raise ValueError(f"mix: ratio must be > 0, got {ratio}")
    rng = random.Random(seed)
    want = min(len(non_reasoning_rows), round(len(reasoning_rows) / ratio))
    extra = rng.sample(non_reasoning_rows, want)
    out = [{**r, "mix": "reasoning"} for r in reasoning_rows] + [{**r, "mix": "non_reasoning"} for r in extra]
    rng.shuffle(out)
    return out

