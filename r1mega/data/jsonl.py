"""JSONL rows with errors that name the file and line, never a silent skip."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    pass


def read_jsonl(path: str | Path, required: Sequence[str | tuple[str, ...]] = ()) -> list[dict]:
    """All rows of `path`. Each entry of `required` is a key, or a tuple of alternative keys of which
    one must be present. Blank lines are allowed; anything else that is not a JSON object fails."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | Path, required: Sequence[str | tuple[str, ...]] = ()) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                alternatives = (key,) if isinstance(key, str) else key
                if not any(k in row for k in alternatives):
                    raise DataError(f"{path}:{lineno}: missing key {' or '.join(map(repr, alternatives))}")
            yield row


def write_jsonl(path: str | Path, rows) -> None:
    """Atomic: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
