"""JSONL rows with errors that name the file and line, never a silent skip."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    """A data file that cannot be used: one line, `<file>:<line>: <what>` (the line and field are
    also attributes; `line` is None for the file as a whole, `field` None when no field is at fault)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.path, self.line, self.field = (str(path) if path is not None else None), line, field


Key = str | tuple[str, ...]


def _blank(value) -> bool:
    return isinstance(value, str) and not value.strip()


def read_jsonl(path: str | Path, required: Sequence[Key] = (), nonblank: Sequence[str] = (),
               allow_empty: bool = True) -> list[dict]:
    """All rows of `path`. Each entry of `required` is a key, or a tuple of alternative keys of which
    one must be present and not null; the keys in `nonblank` must hold a non-empty value (text that is
    not only whitespace, or a number). Blank lines are allowed; anything else that is not a JSON
    object fails, as do bytes that are not UTF-8, and (unless `allow_empty`) a file without rows."""
    rows = [row for _, row in numbered_jsonl(path, required, nonblank)]
    if not rows and not allow_empty:
        raise DataError(f"{path}: no rows (the file is empty)", path)
    return rows


def iter_jsonl(path: str | Path, required: Sequence[Key] = (), nonblank: Sequence[str] = ()) -> Iterator[dict]:
    for _, row in numbered_jsonl(path, required, nonblank):
        yield row


def numbered_jsonl(path: str | Path, required: Sequence[Key] = (),
                   nonblank: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every row of `path`, checked as `read_jsonl` says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                path, lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # so an error's column is on this line
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})", path, lineno) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}", path, lineno)
            for key in required:
                alternatives = (key,) if isinstance(key, str) else key
                present = [k for k in alternatives if k in row]
                if not present:
                    raise DataError(f"{path}:{lineno}: missing key {' or '.join(map(repr, alternatives))}",
                                    path, lineno, alternatives[0])
                if all(row[k] is None for k in present):
                    raise DataError(f"{path}:{lineno}: field {present[0]!r} is null", path, lineno, present[0])
            for key in nonblank:
                value = row.get(key)
                if value is None:
                    raise DataError(f"{path}:{lineno}: field {key!r} is {'null' if key in row else 'missing'}",
                                    path, lineno, key)
                if _blank(value) or isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise DataError(f"{path}:{lineno}: field {key!r} must be non-empty text, got {value!r}"[:300],
                                    path, lineno, key)
            yield lineno, row


def read_sft_rows(path: str | Path) -> list[dict]:
    """SFT rows ({problem, response} or {problem, reasoning, summary}, `r1mega.data.chat`): a non-empty
    `problem`, and a `response`, or a `reasoning` with its `summary`."""
    rows = []
    for lineno, row in numbered_jsonl(path, required=["problem", ("response", "reasoning")], nonblank=["problem"]):
        if row.get("response") is None and "summary" not in row:
            raise DataError(f"{path}:{lineno}: missing key 'summary' (a row without 'response' needs "
                            f"'reasoning' and 'summary')", path, lineno, "summary")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)", path)
    return rows


def write_jsonl(path: str | Path, rows) -> None:
    """Atomic: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
