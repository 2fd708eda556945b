"""`evaluate`: sample k completions per problem with a `RolloutEngine`, grade them, and compute
per-benchmark pass@1, cons@k, pass@k, format rate, mean length and truncated fraction.

Grading uses `rewards.math` (accuracy, answer extraction) and `rewards.format`; the math-verify
calls (accuracy per sample, answer equivalence for the vote) run in `rewards.pool.WorkerPool`,
which kills a check that hangs. Prompts that leave less than `max_tokens` of the engine's
`max_model_len` are skipped and counted, so every sample gets the same budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from r1mega.data.templates import opens_think, render
from r1mega.eval.metrics import cons_at_k, majority_vote, mean_pass_at_k
from r1mega.rewards.format import format_reward
from r1mega.rewards.math import accuracy, extract_answer
from r1mega.rewards.pool import WorkerPool
from r1mega.rollout.engine import RolloutEngine, call_seed

@dataclass
class EvalResult:
    settings: dict
    metrics: dict[str, dict] = field(default_factory=dict)  # benchmark -> its numbers (see `_summary`)
    samples: list[dict] = field(default_factory=list)  # one record per completion


def evaluate(engine: RolloutEngine, tokenizer, rows: list[dict], template: str = "r1_zero", k: int = 4,
             temperature: float = 0.6, top_p: float = 0.95, max_tokens: int = 256, seed: int = 0,
             max_model_len: int | None = None, workers: int = 2, timeout_s: float = 10.0, chunk: int = 64,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluate `rows` ({id, problem, answer, data_source}); metrics are per data_source. Every sample
    is an independent draw, reproducible from `seed` (one stream per engine call, `call_seed(seed,
    first problem of the call)`); `max_model_len` is the engine's.
    Generation runs `chunk` problems per engine call, then calls `progress(problems done, total)`."""
    settings = dict(template=template, k=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                    seed=seed, max_model_len=max_model_len)
    prompts = [tokenizer.encode(render(row["problem"], template)) for row in rows]
    kept = [i for i, p in enumerate(prompts) if max_model_len is None or len(p) + max_tokens <= max_model_len]
    outs = []
    for start in range(0, len(kept), chunk):
        outs += engine.generate([prompts[i] for i in kept[start:start + chunk]], n=k, temperature=temperature,
                                top_p=top_p, max_tokens=max_tokens, seed=call_seed(seed, start))
        if progress is not None:
            progress(len(outs), len(kept))
    samples, think_open = [], opens_think(template)
    for i, out in zip(kept, outs, strict=True):
        row = rows[i]
        for j, c in enumerate(out.completions):
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            samples.append(dict(
                data_source=row["data_source"], id=row["id"], sample=j, gold=row["answer"],
                answer=extract_answer(text, think_open), format=format_reward(text, style=template, think_open=think_open),
                num_tokens=len(c.token_ids), finish_reason=c.finish_reason, completion=text,
            ))
    correct, winners = _grade(samples, k, workers, timeout_s, think_open)
    for s, ok in zip(samples, correct, strict=True):
        s["correct"] = ok
    result, evaluated = EvalResult(settings, samples=samples), set(kept)
    for source in dict.fromkeys(row["data_source"] for row in rows):
        skipped = [row["id"] for i, row in enumerate(rows) if row["data_source"] == source and i not in evaluated]
        groups = [(p, samples[p * k:(p + 1) * k]) for p, i in enumerate(kept) if rows[i]["data_source"] == source]
        result.metrics[source] = _summary(groups, winners, k, skipped)
    return result


def _grade(samples: list[dict], k: int, workers: int, timeout_s: float, think_open: bool):
    """(correct per sample, per problem (k consecutive samples) the index of its vote's winner or None)."""
    checks = [(accuracy, (s["completion"], {"answer": s["gold"]}), {"think_open": think_open}, timeout_s)
              for s in samples]
    votes = [(majority_vote, ([s["answer"] for s in samples[p:p + k]],), {}, timeout_s * k)
             for p in range(0, len(samples), k)]
    pool = WorkerPool(workers)
    try:
        values = pool.run(checks + votes)  # None where a check timed out or failed
    finally:
        pool.close()
    return [v == 1.0 for v in values[:len(checks)]], values[len(checks):]


def _summary(groups: list[tuple[int, list[dict]]], winners: list, k: int, skipped: list) -> dict:
    """Numbers of one benchmark; rates are None when no problem was evaluated."""
    flat = [s for _, group in groups for s in group]
    outcomes = [[s["correct"] for s in group] for _, group in groups]

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "problems": len(groups),
        "skipped": len(skipped),
        "pass@1": mean_pass_at_k(outcomes, 1) if groups else None,
        f"cons@{k}": cons_at_k([winners[p] for p, _ in groups], outcomes) if groups else None,
        f"pass@{k}": mean_pass_at_k(outcomes, k) if groups else None,
        "format": mean([s["format"] for s in flat]),
        "mean_tokens": mean([s["num_tokens"] for s in flat]),
        "truncated": mean([s["finish_reason"] == "length" for s in flat]),
        "skipped_ids": skipped,
    }
