"""Every data file the pipeline reads is checked against its schema (`r1mega.data.jsonl.SCHEMAS`) at
load: a null, empty, whitespace-only, wrongly typed or missing gold answer (or prompt, or SFT target)
fails with the file, the line and the field, for RL prompts, eval benchmarks, SFT rows and the rows
the recipes' stages write and read back. The real shared benchmark data loads."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from r1mega.config.schema import DataConfig
from r1mega.data.jsonl import SCHEMAS, DataError, read_jsonl, read_sft_rows
from r1mega.data.prompts import load_rows
from r1mega.eval import benchmarks

BAD_ANSWERS = {  # answer value (absent: no key) -> what the message says
    "null": (None, "field 'answer' is null"),
    "empty": ("", "field 'answer' must be non-empty text or a finite number, got ''"),
    "whitespace": (" \n", "field 'answer' must be non-empty text or a finite number, got ' \\n'"),
    "list": ([4], "field 'answer' must be non-empty text or a finite number, got [4]"),
    "dict": ({"value": 4}, "field 'answer' must be non-empty text or a finite number, got {'value': 4}"),
    "bool": (True, "field 'answer' must be non-empty text or a finite number, got True"),
    "nan": (float("nan"), "field 'answer' must be non-empty text or a finite number, got nan"),
    "gsm8k_marker_only": ("2 + 2 = 4\n#### ", "field 'answer' has nothing after its '#### ' marker (no final answer)"),
    "missing": (..., "missing key 'answer'"),
    # golds no completion could ever match: refused, not left to score 0 forever
    "empty_box": ("\\boxed{}", "field 'answer' has no letter or digit left to grade ('\\\\boxed{}' after the grading conventions)"),
    "percent_only": ("%", "field 'answer' has no letter or digit left to grade ('%' after the grading conventions)"),
    "zero_width": ("\u200b", "field 'answer' has no letter or digit left to grade ('\\u200b' after the grading conventions)"),
    "none_as_text": ("None", "field 'answer' is 'None', a missing value written as text (write a real answer 'none' as \\text{none})"),
    "digit_run": ("9" * 80, "field 'answer' has a run of more than 64 digits, beyond the grader's bound"),
    "too_long": ("x" * 600, "field 'answer' has 600 characters, more than the grader's bound of 512"),
}


def _write(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _with_answer(row: dict, value) -> dict:
    return {k: v for k, v in row.items() if k != "answer"} | ({} if value is ... else {"answer": value})


def _prompt_cfg(root, prompt_key="problem"):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "name": "t", "source": "jsonl", "data_dir": str(root), "train_file": "train.jsonl", "eval_file": "eval.jsonl",
        "prompt_key": prompt_key})


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_gold_answers_fail_every_prompt_and_benchmark_loader(tmp_path, case):
    value, message = BAD_ANSWERS[case]
    # RL (and rejection-sampling / distillation) prompts, both splits, with the data config's prompt key.
    good = {"question": "What is 1+1?", "answer": "2"}
    for split in ("train", "eval"):
        path = _write(tmp_path / f"{split}.jsonl", [good, _with_answer({"question": "What is 2+2?"}, value)])
        with pytest.raises(DataError) as e:
            load_rows(_prompt_cfg(tmp_path, "question"), split)
        assert str(e.value) == f"{path}:2: {message}"
        assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, "answer")
    # The evaluation benchmarks, each with its own fields.
    firsts = {"aime24": {"id": 1, "problem": "p", "answer": "3"}, "amc23": {"id": 1, "problem": "p", "answer": 3.0},
              "math500": {"unique_id": "a/1", "problem": "p", "answer": "3"}, "gsm8k": {"question": "p", "answer": "#### 3"}}
    for name, first in firsts.items():
        second = {k: (v + 1 if isinstance(v, int) else v + "b" if k == "unique_id" else v) for k, v in first.items()}
        path = _write(tmp_path / "eval" / f"{name}.jsonl", [first, _with_answer(second, value)])
        with pytest.raises(DataError) as e:
            benchmarks.load(name, limit=1, root=tmp_path)  # the limit does not skip the check of later rows
        assert str(e.value) == f"{path}:2: {message}" and e.value.field == "answer"


def test_the_issue_row_is_refused_with_file_line_and_field(tmp_path):
    path = _write(tmp_path / "train.jsonl", [{"problem": "What is 2+2?", "answer": None}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'answer' is null$"):
        load_rows(_prompt_cfg(tmp_path), "train")
    assert read_jsonl(path) == [{"problem": "What is 2+2?", "answer": None}]  # without a schema: any object


@pytest.mark.parametrize("row, message", [
    ({"answer": "2"}, "missing key 'problem'"),
    ({"problem": None, "answer": "2"}, "field 'problem' is null"),
    ({"problem": 7, "answer": "2"}, "field 'problem' must be non-empty text, got 7"),
    ({"problem": "p", "answer": "2", "id": None}, "field 'id' is null"),
    ({"problem": "p", "answer": "2", "id": 1.5}, "field 'id' must be non-empty text or an integer, got 1.5"),
    ({"problem": "p", "answer": "2", "data_source": ""}, "field 'data_source' must be non-empty text, got ''"),
    ({"problem": "p", "answer": "2", "id": "1"}, "field 'id' repeats the value '1' of line 1"),
])
def test_prompt_rows_fields(tmp_path, row, message):
    path = _write(tmp_path / "train.jsonl", [{"problem": "q", "answer": 1, "id": 1}, row])
    with pytest.raises(DataError) as e:
        load_rows(_prompt_cfg(tmp_path), "train")
    assert str(e.value) == f"{path}:2: {message}"


def test_numeric_answers_and_generated_ids_load(tmp_path):
    _write(tmp_path / "train.jsonl", [{"problem": "a", "answer": 4}, {"problem": "b", "answer": -0.5, "id": "x"}])
    rows = load_rows(_prompt_cfg(tmp_path), "train")
    assert [(r["id"], r["problem"], r["answer"], r["data_source"]) for r in rows] == [("train-0", "a", 4, "t"),
                                                                                      ("x", "b", -0.5, "t")]


@pytest.mark.parametrize("row, message", [
    ({"response": "r"}, "missing key 'problem'"),
    ({"problem": "  ", "response": "r"}, "field 'problem' must be non-empty text, got '  '"),
    ({"problem": "p"}, "missing key 'response' (or 'reasoning' and 'summary')"),
    ({"problem": "p", "response": None, "reasoning": "r", "summary": "s"}, "field 'response' is null"),
    ({"problem": "p", "response": ""}, "field 'response' must be non-empty text, got ''"),
    ({"problem": "p", "reasoning": "r"}, "missing key 'summary'"),
    ({"problem": "p", "reasoning": "r", "summary": " "}, "field 'summary' must be non-empty text, got ' '"),
    ({"problem": "p", "reasoning": None, "summary": "s"}, "field 'reasoning' is null"),
    ({"problem": "p", "reasoning": ["r"], "summary": "s"}, "field 'reasoning' must be text, got ['r']"),
])
def test_sft_rows_fields(tmp_path, row, message):
    from r1mega.recipes.stages import load_sft_rows, read_rows

    path = _write(tmp_path / "sft.jsonl", [{"problem": "p", "reasoning": "", "summary": "s"}, row])
    for read in (read_sft_rows, load_sft_rows, read_rows):  # configured files; rows a stage wrote
        with pytest.raises(DataError) as e:
            read(path)
        assert str(e.value) == f"{path}:2: {message}"


def test_sft_rows_load_and_an_empty_file_does_not(tmp_path):
    rows = [{"problem": "p", "response": "r", "reasoning": None}, {"problem": "q", "reasoning": "", "summary": "s"}]
    assert read_sft_rows(_write(tmp_path / "ok.jsonl", rows)) == rows  # `response` wins, as in chat.sft_text
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows \(the file is empty\)$"):
        read_sft_rows(_write(tmp_path / "empty.jsonl", []))


def test_stage_metrics_are_read_through_their_schema(tmp_path):
    from r1mega.recipes.stages import _loss_summary

    path = _write(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25}])
    assert _loss_summary(path) == {"first_loss": 2.5, "last_loss": 1.25}
    assert _loss_summary(tmp_path / "none.jsonl") == {}
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # a half-written last line
    with pytest.raises(DataError, match=r"m\.jsonl:2: not valid JSON"):
        _loss_summary(path)


def test_every_benchmark_has_a_schema_and_the_shared_data_loads():
    assert set(benchmarks.BENCHMARKS) <= set(SCHEMAS)
    assert {n: len(benchmarks.load(n)) for n in benchmarks.BENCHMARKS} == {
        "aime24": 30, "amc23": 40, "math500": 500, "gsm8k": 1319}
    preset = OmegaConf.load(benchmarks.REPO / "conf" / "data" / "gsm8k.yaml")
    preset.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), preset, {"eval_limit": None})
    assert (len(load_rows(cfg, "train")), len(load_rows(cfg, "eval"))) == (7473, 1319)
