"""The evaluation benchmarks (`<data dir>/eval/*.jsonl`) as rows {id, problem, answer, data_source}.

`answer` is the gold final answer as `rewards.math.accuracy` takes it: AIME integers and MATH-500
LaTeX as given, AMC's floats without a spurious ".0", GSM8K's worked solution cut to what follows
`#### `. The data dir is `$R1MEGA_DATA_DIR`, else `shared/data` next to the repository.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from r1mega.data.jsonl import read_jsonl
from r1mega.rewards.math import gold_answer

REPO = Path(__file__).resolve().parents[2]


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# name -> row -> (id, problem, answer); each file's schema is `SCHEMAS[name]`. GSM8K rows have no
# id: the row's index is used.
_FIELDS: dict[str, Callable[[dict, int], tuple]] = {
    "aime24": lambda r, i: (r["id"], r["problem"], str(r["answer"])),
    "amc23": lambda r, i: (r["id"], r["problem"], _number(r["answer"])),
    "math500": lambda r, i: (r["unique_id"], r["problem"], r["answer"]),
    "gsm8k": lambda r, i: (i, r["question"], gold_answer(r["answer"])),
}
BENCHMARKS = tuple(_FIELDS)


def data_dir() -> Path:
    return Path(os.environ.get("R1MEGA_DATA_DIR") or REPO.parent / "shared" / "data")


def load(name: str, limit: int | None = None, root: str | Path | None = None) -> list[dict]:
    """The first `limit` rows (all when None) of benchmark `name`. Every row of the file is checked
    against `SCHEMAS[name]` first: a `DataError` names the file, line and field of a bad one."""
    if name not in _FIELDS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be at least 1 (the first N problems of each benchmark).")
    rows = read_jsonl(Path(root or data_dir()) / "eval" / f"{name}.jsonl", name, allow_empty=False)[:limit]
    out = []
    for i, row in enumerate(rows):
        id_, problem, answer = _FIELDS[name](row, i)
        out.append({"id": f"{name}/{id_}", "problem": problem, "answer": answer, "data_source": name})
    return out
