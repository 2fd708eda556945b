"""Reward composition: each data source names its weighted reward terms; `RewardManager` scores batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from r1mega.rewards import code, format as fmt, language, math
from r1mega.rewards.pool import WorkerPool
from r1mega.rewards.sandbox import SandboxConfig

REWARDS: dict[str, Callable[..., float]] = {
    "accuracy": math.accuracy,
    "format": fmt.format_reward,
    "language": language.consistency,
    "code": code.pass_rate,
}


@dataclass
class TermConfig:
    name: str = MISSING  # a key of REWARDS
    weight: float = 1.0
    params: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward function


@dataclass
class SourceConfig:
    terms: List[TermConfig] = field(default_factory=list)  # summed with their weights


@dataclass
class RewardConfig:
    sources: Dict[str, SourceConfig] = field(default_factory=dict)  # data_source -> its reward terms
    source_key: str = "data_source"  # the row field that picks the terms
    default_source: Optional[str] = "default"  # terms for sources without an entry; None = error
    workers: int = 2  # grading processes; 0 grades inline (no parent-enforced timeout)
    timeout_s: float = 10.0  # wall-clock per term, enforced by the parent; code adds wall_s per test
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


def register_configs() -> None:
    ConfigStore.instance().store(group="reward", name="reward_schema", node=RewardConfig)


class RewardManager:
    """Scores (row, completion) pairs: `score(batch)` -> one {term: value, ..., "total": weighted sum} per pair."""

    def __init__(self, cfg: RewardConfig | DictConfig) -> None:
        self.cfg: RewardConfig = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
        for source, entry in self.cfg.sources.items():
            for term in entry.terms:
                if term.name not in REWARDS:
                    raise ValueError(f"reward.sources.{source}: unknown reward {term.name!r}; known: {sorted(REWARDS)}")
        self.pool = WorkerPool(self.cfg.workers) if self.cfg.workers > 0 else None

    def terms_for(self, row: dict) -> list[TermConfig]:
        source = row.get(self.cfg.source_key)
        if source in self.cfg.sources:
            return self.cfg.sources[source].terms
        if self.cfg.default_source in self.cfg.sources:
            return self.cfg.sources[self.cfg.default_source].terms
        raise KeyError(f"no reward terms for data source {source!r} and no default_source entry")

    def _task(self, term: TermConfig, row: dict, completion: str) -> tuple[Callable, tuple, dict, float]:
        kwargs, limit = dict(term.params), self.cfg.timeout_s
        if term.name == "code":
            kwargs["sandbox"] = self.cfg.sandbox
            limit += len(code.load_tests(row, kwargs.get("tests_key", "tests"))["inputs"]) * self.cfg.sandbox.wall_s
        return REWARDS[term.name], (completion, row), kwargs, limit

    def score(self, batch: list[tuple[dict, str]]) -> list[dict[str, float]]:
        plan = [(i, term) for i, (row, _) in enumerate(batch) for term in self.terms_for(row)]
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
