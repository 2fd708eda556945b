"""The prompt stream of an RL run: rows from the data config, rendered with the recipe's template
and tokenized once; batches in a seeded per-epoch order that depends only on the step (resume-safe)."""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

from r1mega.data import arithmetic
from r1mega.data.jsonl import SCHEMAS, DataError, read_jsonl
from r1mega.data.templates import render


def data_dir(cfg) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir)
    return Path(os.environ.get("R1MEGA_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))


def load_rows(cfg, split: str) -> list[dict]:
    """`split` is "train" or "eval"; rows get `id`, `problem`, `answer` and `data_source` keys.
    `eval_limit` keeps the first N eval rows of either source. A JSONL file must have rows, each of
    `SCHEMAS["prompts"]` (a non-empty prompt and gold answer under `prompt_key` / `answer_key`; an
    `id` unique in the file); a `DataError` names the file, line and field otherwise."""
    limit = cfg.eval_limit if split == "eval" else None
    if cfg.source == "arithmetic":
        return arithmetic.rows(cfg.arithmetic, "rl" if split == "train" else "eval")[:limit]
    if cfg.source != "jsonl":
        raise DataError(f"data.source={cfg.source!r}; expected arithmetic or jsonl")
    name = cfg.train_file if split == "train" else cfg.eval_file
    if name is None:
        raise DataError(f"data.{split}_file is not set for data={cfg.name}")
    path = Path(name) if Path(name).is_absolute() else data_dir(cfg) / name
    rows = []
    schema = SCHEMAS["prompts"].renamed(problem=cfg.prompt_key, answer=cfg.answer_key)
    for i, r in enumerate(read_jsonl(path, schema, allow_empty=False)):
        rows.append({**r, "id": r.get("id", f"{path.stem}-{i}"), "problem": r[cfg.prompt_key],
                     "answer": r[cfg.answer_key], "data_source": cfg.data_source or r.get("data_source", cfg.name)})
    return rows[:limit]


class PromptSource:
    """Rows whose rendered prompt fits `max_prompt_tokens`; the rest are counted and reported."""

    def __init__(self, rows: list[dict], tokenizer, template: str, max_prompt_tokens: int, seed: int = 0):
        ids = tokenizer([render(r["problem"], template) for r in rows], add_special_tokens=False)["input_ids"]
        keep = [i for i, t in enumerate(ids) if len(t) <= max_prompt_tokens]
        self.skipped = len(rows) - len(keep)
        if not keep:
            raise DataError(f"no prompt fits max_prompt_tokens={max_prompt_tokens} ({len(rows)} rows)")
        self.rows = [rows[i] for i in keep]
        self.ids = [ids[i] for i in keep]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batch(self, step: int, size: int) -> list[int]:
        """Indices of the prompts of `step`: consecutive slices of seeded per-epoch permutations."""
        return [self._order(pos // len(self.rows))[pos % len(self.rows)] for pos in range(step * size, (step + 1) * size)]

    def refill(self, step: int, attempt: int, size: int) -> list[int]:
        """Extra prompts for dynamic sampling, a function of (step, attempt) only."""
        rng = random.Random(f"{self.seed}/{step}/{attempt}")
        return [rng.randrange(len(self.rows)) for _ in range(size)]
