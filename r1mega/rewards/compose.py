"""Reward composition: each data source names its weighted reward terms; `RewardManager` scores batches."""
from __future__ import annotations

import inspect
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from r1mega.config.reward import RewardConfig, TermConfig
from r1mega.data.templates import opens_think
from r1mega.rewards import code, format as fmt, language, math
from r1mega.rewards.pool import WorkerPool
from r1mega.rewards.sandbox import resolve_isolation

REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": math.accuracy,
    "format": fmt.format_reward,
    "language": language.consistency,
    "code": code.pass_rate,
}

_SET_BY_MANAGER = {"completion", "row", "think_open", "sandbox"}


def term_problems(cfg: RewardConfig, template: str | None = None, where: str = "reward") -> list[str]:
    """One sentence per term that names an unknown reward, a parameter its function does not take (it
    would fail inside the grading pool, where a failure scores 0.0), or a format style other than
    the prompt `template` (when given)."""
    p = []
    for source, entry in cfg.sources.items():
        for i, term in enumerate(entry.terms):
            at = f"{where}.sources.{source}.terms[{i}]"
            if term.name not in REWARDS:
                p.append(f"{at}.name={term.name!r} is not one of {', '.join(sorted(REWARDS))}.")
                continue
            takes = set(inspect.signature(REWARDS[term.name]).parameters) - _SET_BY_MANAGER
            for key in term.params:
                if key in _SET_BY_MANAGER:
                    p.append(f"{at}.params.{key} is not settable: the reward manager sets it (think_open from the "
                             f"recipe's template).")
                elif key not in takes:
                    p.append(f"{at}.params.{key} is not a parameter of the {term.name} reward ({', '.join(sorted(takes))}).")
            style = term.params.get("style", "r1_zero")
            if term.name == "format" and template is not None and style != template:
                p.append(f"{at}.params.style={style!r} does not match the prompt template {template!r}: no "
                         f"completion of that template can earn it.")
    return p


class RewardManager:
    """Scores (row, completion) pairs: `score(batch)` -> one {term: value, ..., "total": weighted sum} per pair.

    `template` is the prompt template the completions answer (`data.templates`): when it opens
    `<think>` every term reads the completion as starting inside the chain of thought."""

    def __init__(self, cfg: RewardConfig | DictConfig, template: str) -> None:
        self.cfg: RewardConfig = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
        problems = term_problems(self.cfg, template)
        if problems:
            raise ValueError(" ".join(problems))
        self.template, self.think_open = template, opens_think(template)
        self._isolation: str | None = None  # the sandbox level, resolved at the first code row
        self.pool = WorkerPool(self.cfg.workers) if self.cfg.workers > 0 else None

    def terms_for(self, row: dict) -> list[TermConfig]:
        source = row.get(self.cfg.source_key)
        if source in self.cfg.sources:
            return self.cfg.sources[source].terms
        if self.cfg.default_source in self.cfg.sources:
            return self.cfg.sources[self.cfg.default_source].terms
        raise KeyError(f"no reward terms for data source {source!r} and no default_source entry")

    def _task(self, term: TermConfig, row: dict, completion: str) -> tuple[Callable, tuple, dict, float]:
        kwargs, limit = dict(term.params, think_open=self.think_open), self.cfg.timeout_s
        if term.name == "code":
            kwargs["sandbox"] = self.cfg.sandbox
            limit += len(code.load_tests(row, kwargs.get("tests_key", "tests"))["inputs"]) * self.cfg.sandbox.wall_s
        return REWARDS[term.name], (completion, row), kwargs, limit

    def score(self, batch: list[tuple[dict, str]]) -> list[dict[str, float]]:
        plan = [(i, term) for i, (row, _) in enumerate(batch) for term in self.terms_for(row)]
        if self._isolation is None and any(term.name == "code" for _, term in plan):
            # Here, not in the pool, where an error would only score 0.0: a host without the
            # requested isolation stops the first batch with code rows, saying why.
            self._isolation = resolve_isolation(self.cfg.sandbox)
        tasks = [self._task(term, batch[i][0], batch[i][1]) for i, term in plan]
        if self.pool is not None:
            values = self.pool.run(tasks, default=0.0)
        else:
            values = [fn(*args, **kwargs) for fn, args, kwargs, _ in tasks]
        out: list[dict[str, float]] = [{"total": 0.0} for _ in batch]
        for (i, term), value in zip(plan, values):
            out[i][term.name] = float(value)
            out[i]["total"] += term.weight * float(value)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
