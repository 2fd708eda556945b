"""JSONL data files. Every kind of file the pipeline reads has a schema (`SCHEMAS`), checked row by
row at load: an error names the file, the line and the field, never a silent skip."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A data file that cannot be used: one line, `<file>:<line>: <what>` (the line and field are
    also attributes; `line` is None for the file as a whole, `field` None when no field is at fault)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.path, self.line, self.field = (str(path) if path is not None else None), line, field


# Field kinds. Null is never a value of any kind.
TEXT = "text"  # a string, not empty or only whitespace
STR = "str"  # a string, possibly empty
ANSWER = "answer"  # a gold answer: TEXT or a finite number (not a bool); a GSM8K `#### ` marker must be followed by one
ID = "id"  # a TEXT or an integer, unique within the file
VALUE = "value"  # anything
_WANT = {TEXT: "non-empty text", STR: "text", ANSWER: "non-empty text or a finite number",
         ID: "non-empty text or an integer"}


@dataclass(frozen=True)
class Schema:
    """The fields of one kind of row, each `name -> kind`: every `required` field is present and of
    its kind; an `optional` one is checked when present; of `one_of`'s groups the row holds one whole,
    the first group it has any field of (`r1mega.data.chat.sft_text` picks the same one)."""

    required: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    one_of: tuple[dict[str, str], ...] = ()

    def renamed(self, **names: str) -> Schema:
        """This schema with fields renamed, e.g. `renamed(problem="question")`."""
        rename = lambda fields: {names.get(k, k): kind for k, kind in fields.items()}  # noqa: E731
        return Schema(rename(self.required), rename(self.optional), tuple(map(rename, self.one_of)))


SCHEMAS: dict[str, Schema] = {
    # RL prompts and data=... eval rows (`r1mega.data.prompts.load_rows`; `problem` and `answer` are
    # renamed to data.prompt_key / data.answer_key); also the rejection-sampling and distillation prompts.
    "prompts": Schema({"problem": TEXT, "answer": ANSWER}, optional={"id": ID, "data_source": TEXT}),
    # SFT rows (`r1mega.data.chat`): cold-start and non-reasoning files, rejection-sampled and distilled
    # rows, their mix. An empty chain of thought is allowed (the paper's non-reasoning data).
    "sft": Schema({"problem": TEXT}, one_of=({"response": TEXT}, {"reasoning": STR, "summary": TEXT})),
    # The evaluation benchmarks (`r1mega.eval.benchmarks`).
    "aime24": Schema({"id": ID, "problem": TEXT, "answer": ANSWER}),
    "amc23": Schema({"id": ID, "problem": TEXT, "answer": ANSWER}),
    "math500": Schema({"unique_id": ID, "problem": TEXT, "answer": ANSWER}),
    "gsm8k": Schema({"question": TEXT, "answer": ANSWER}),
    # A stage's own metrics file (`r1mega.trainer.metrics.MetricsLogger`), read for its loss summary.
    "metrics": Schema({"step": VALUE, "loss": VALUE}),
}


def _why_not(kind: str, value) -> str | None:
    """Why `value` (not None) is not of `kind`; None when it is."""
    text = isinstance(value, str) and bool(value.strip())
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {VALUE: True, STR: isinstance(value, str), TEXT: text, ID: text or (number and isinstance(value, int)),
          ANSWER: text or (number and math.isfinite(value))}[kind]
    if not ok:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return f"must be {_WANT[kind]}, got {shown}"
    if kind == ANSWER:
        from r1mega.rewards.math import gold_problem  # what the accuracy reward can compare with

        return gold_problem(value)
    return None


def _check(schema: Schema, row: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for the first field of `row` that breaks `schema`, else None."""
    fields = dict(schema.required)
    fields.update({k: kind for k, kind in schema.optional.items() if k in row})
    if schema.one_of:
        group = next((g for g in schema.one_of if any(k in row for k in g)), None)
        if group is None:
            first, *others = (" and ".join(map(repr, g)) for g in schema.one_of)
            return next(iter(schema.one_of[0])), f"missing key {first}" + (f" (or {' or '.join(others)})" if others else "")
        fields.update(group)
    for key, kind in fields.items():
        if key not in row:
            return key, f"missing key {key!r}"
        if row[key] is None:
            return key, f"field {key!r} is null"
        why = _why_not(kind, row[key])
        if why is not None:
            return key, f"field {key!r} {why}"
    return None


def _numbered(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of `path`."""
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
            yield lineno, row


def read_jsonl(path: str | Path, schema: Schema | str | None = None, allow_empty: bool = True) -> list[dict]:
    """All rows of `path`, each checked against `schema` (a `Schema` or a `SCHEMAS` name; None: any
    JSON object). Blank lines are allowed. Raises `DataError` (`<file>:<line>: <what>`, with the field)
    for bytes that are not UTF-8, a line that is not a JSON object, a row that breaks the schema, an
    `ID` field whose value an earlier line has, and (unless `allow_empty`) a file without rows."""
    path = Path(path)
    schema = SCHEMAS[schema] if isinstance(schema, str) else schema
    ids = [k for k, kind in {**schema.required, **schema.optional}.items() if kind == ID] if schema else []
    rows, seen = [], {}
    for lineno, row in _numbered(path):
        problem = _check(schema, row) if schema is not None else None
        if problem is not None:
            raise DataError(f"{path}:{lineno}: {problem[1]}", path, lineno, problem[0])
        for key in (k for k in ids if k in row):
            first = seen.setdefault((key, str(row[key])), lineno)  # str: ids 1 and "1" name the same row
            if first != lineno:
                raise DataError(f"{path}:{lineno}: field {key!r} repeats the value {row[key]!r} of line {first}",
                                path, lineno, key)
        rows.append(row)
    if not rows and not allow_empty:
        raise DataError(f"{path}: no rows (the file is empty)", path)
    return rows


def read_sft_rows(path: str | Path) -> list[dict]:
    """SFT rows (`SCHEMAS["sft"]`: a non-empty `problem`, and a non-empty `response`, or a `reasoning`
    with a non-empty `summary`); a file without rows is a `DataError` too."""
    return read_jsonl(path, "sft", allow_empty=False)


def write_jsonl(path: str | Path, rows) -> None:
    """Atomic: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
