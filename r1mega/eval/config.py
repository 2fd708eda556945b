"""`EvalOptions`: the options of `python -m r1mega.eval` (key=value on its command line). The loops'
periodic eval has its own settings (`EvalConfig` in `r1mega.config.schema`) and can call `runner.evaluate`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class EvalOptions:
    benchmarks: List[str] = field(default_factory=lambda: ["aime24", "math500", "gsm8k", "amc23"])
    k: int = 4  # samples per problem (the paper: 64 for cons@64, 4-64 for pass@1)
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256  # generation budget; the paper's is 32768 (raise rollout.max_model_len with it)
    limit: Optional[int] = None  # first N problems of each benchmark
    template: str = "r1_zero"  # r1_zero | r1
    seed: int = 0
    model_dir: Optional[str] = None  # a Hugging Face dir vLLM serves; None: a tiny random `model=` preset
    out_dir: Optional[str] = None  # None: runs/eval/<timestamp>
    data_dir: Optional[str] = None  # None: $R1MEGA_DATA_DIR or shared/data next to the repo
    cache_dir: str = "runs/cache"  # where the tiny random model is built once
    workers: int = 2  # grading processes (math-verify)
    timeout_s: float = 10.0  # per answer check, enforced by killing the grading worker

    def __post_init__(self) -> None:
        """Every option in its range (`r1mega.config.validate.RANGES["EvalOptions"]`), checked when the
        command line is parsed, before the model or the data are touched: `ConfigError` otherwise."""
        from r1mega.config.validate import ConfigError, range_problems

        problems = range_problems(self)
        if self.benchmarks is not None:
            from r1mega.eval.benchmarks import BENCHMARKS

            problems += [f"benchmarks: unknown benchmark {b!r}; known: {', '.join(BENCHMARKS)}." for b in self.benchmarks
                         if b not in BENCHMARKS]
            if not self.benchmarks:
                problems.append("benchmarks=[] names no benchmark.")
        if problems:
            raise ConfigError(problems)
