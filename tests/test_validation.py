"""Every input checked before anything is built: each config field against its range, the rules across
fields, and every data row; one line naming the field (or file, line and field), exit status 2."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from r1mega.config import ConfigError, compose
from r1mega.config.validate import RANGES, rules_of
from tests.cli import cli_env


def _problems(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    return e.value.problems


# ---- ranges and cross-field rules, through the composition API ---------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["recipe=r1_zero", "algorithm.group_size=1"],
     "algorithm.group_size=1 must be at least 2 (GRPO normalises rewards within a group)."),
    (["recipe=r1_zero", "recipe.max_response_tokens=0"], "recipe.max_response_tokens=0 must be positive."),
    (["recipe=r1_zero", "optim.lr=-1"], "optim.lr=-1.0 must be non-negative."),
    (["recipe=r1_zero", "recipe.rollouts=0"], "recipe.rollouts=0 must be at least 1."),
    (["recipe=r1_zero", "algorithm.num_mini_batches=3"],
     "recipe.prompts_per_rollout=16 does not split into algorithm.num_mini_batches=3 mini-batches of whole groups"),
    (["recipe=r1_zero", "recipe.temperature=0"], "recipe.temperature=0.0 must be positive"),
    (["recipe=r1_zero", "recipe.top_p=1.5"], "recipe.top_p=1.5 must be in (0, 1]."),
    (["recipe=r1_zero", "algorithm.loss_agg=mean"], "algorithm.loss_agg='mean' is not one of seq_mean_token_mean"),
    (["recipe=r1_zero", "algorithm.kl_coef=-0.1"], "algorithm.kl_coef=-0.1 must be non-negative."),
    (["recipe=r1_zero", "algorithm.clip_eps_low=1.0"], "algorithm.clip_eps_low=1.0 must be in [0, 1)"),
    (["recipe=r1_zero", "algorithm.dual_clip_c=0.5"], "algorithm.dual_clip_c=0.5 must be above 1"),
    (["recipe=r1_zero", "algorithm.adv_eps=0"], "algorithm.adv_eps=0.0 must be positive while algorithm.std_normalize=true"),
    (["recipe=r1_zero", "recipe.share_prompts=true"],
     "recipe.share_prompts=true is not supported with model=tiny_moe (MLA computes its rotary embedding by packed index)."),
    (["recipe=r1", "model=tiny_dense", "recipe.rl_all.share_prompts=true", "platform.transformer_engine=true"],
     "recipe.rl_all.share_prompts=true is not supported with platform.transformer_engine=true"),
    (["recipe=r1_zero", "recipe.eval.k=0"], "recipe.eval.k=0 must be positive."),
    (["recipe=r1_zero", "recipe.pretrain.min_lr=1"], "recipe.pretrain.min_lr=1.0 must not exceed recipe.pretrain.lr="),
    (["optim.min_lr=0.1", "optim.lr=0.01"], "optim.min_lr=0.1 must not exceed optim.lr=0.01"),
    (["optim.lr_decay_style=step"], "optim.lr_decay_style='step' is not one of constant, linear, cosine"),
    (["optim.adam_beta2=1"], "optim.adam_beta2=1.0 must be in [0, 1)."),
    (["rollout.dtype=int8"], "rollout.dtype='int8' is not one of float32, bfloat16"),
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization=1.5 must be in (0, 1]."),
    (["data.eval_limit=0"], "data.eval_limit=0 must be at least 1."),
    (["data.arithmetic.p_correct=2"], "data.arithmetic.p_correct=2.0 must be in [0, 1]."),
    (["data.arithmetic.num_heldout=600"], "data.arithmetic.num_heldout=600 x 3 (eval, RL and pretraining splits) exceeds"),
    (["model.params_dtype=fp16"], "model.params_dtype='fp16' is not one of fp32, bf16."),
    (["platform.seed=-1"], "platform.seed=-1 must be non-negative."),
    (["platform.cluster=h300"], "platform.cluster='h300' is not a conf/cluster preset"),
    (["reward.workers=-1"], "reward.workers=-1 must be non-negative (0 grades inline)."),
    (["reward.default_source=math"], "reward.default_source='math' is not a key of reward.sources"),
    (["reward.sources.default.terms.0.name=accurracy"], "reward.sources.default.terms[0].name='accurracy' is not one of"),
    (["recipe=r1", "recipe.rl_reasoning.algorithm.group_size=1"], "recipe.rl_reasoning.algorithm.group_size=1 must be at least 2"),
    (["recipe=r1", "recipe.rl_all.algorithm.num_mini_batches=3"],
     "recipe.rl_all.prompts_per_rollout=8 does not split into recipe.rl_all.algorithm.num_mini_batches=3"),
    (["recipe=r1", "recipe.rl_reasoning.eval.top_p=0"], "recipe.rl_reasoning.eval.top_p=0.0 must be in (0, 1]."),
    (["recipe=r1", "recipe.cold_start.sft.epochs=0"], "recipe.cold_start.sft.epochs=0 must be at least 1."),
    (["recipe=r1", "recipe.rejection_sft.rejection.max_language_mixing=1.5"],
     "recipe.rejection_sft.rejection.max_language_mixing=1.5 must be in [0, 1]."),
    (["recipe=r1", "recipe.rejection_sft.mix.ratio=0"], "recipe.rejection_sft.mix.ratio=0.0 must be positive."),
    (["recipe=distill", "recipe.generate.k=0"], "recipe.generate.k=0 must be at least 1."),
    (["recipe=distill", "recipe.teacher.model=tiny_moee"], "recipe.teacher.model='tiny_moee' is not a conf/model preset"),
])
def test_out_of_range_names_the_field_and_the_range(overrides, message):
    problems = _problems(overrides)
    assert any(message in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_presets_pass():
    for overrides in ([], ["recipe=r1_zero"], ["recipe=r1"], ["recipe=distill"], ["recipe=distill", "recipe.base=random"],
                      ["recipe=r1_zero", "platform=gpu", "model=deepseek_v3_671b", "parallel=dsv3_256xh100",
                       "rollout=dsv3_tp32"]):
        compose(overrides)


def _schemas():
    """Every schema class reachable from the main config, the eval CLI and the planner."""
    import r1mega.config.recipes as recipes
    import r1mega.config.schema as schema
    from r1mega.config.algorithm import GRPOConfig, RolloutCorrectionConfig
    from r1mega.config.recipes import RejectionConfig
    from r1mega.config.reward import RewardConfig, SandboxConfig, TermConfig
    from r1mega.eval.config import EvalOptions
    from r1mega.plan.schema import ClusterConfig, PlanConfig

    mods = [getattr(schema, n) for n in dir(schema)] + [getattr(recipes, n) for n in dir(recipes)]
    out = {c for c in mods if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__.startswith("r1mega")}
    return out | {GRPOConfig, RolloutCorrectionConfig, RejectionConfig, EvalOptions, ClusterConfig, PlanConfig, RewardConfig, TermConfig, SandboxConfig}


# Fields whose every value is legal (or checked by a rule across fields / at load time, as named).
FREE = {"seed", "name", "data_dir", "train_file", "eval_file", "prompt_key", "answer_key", "data_source", "base",
        "cache_dir", "stage", "data", "non_reasoning_data", "checkpoint", "tokenizer_dir", "hf_dir", "model",
        "parallel", "cluster", "model_dir", "out_dir", "source_key", "default_source", "python", "run_dir",
        "response_length_schedule"}


def test_every_numeric_or_enumerated_field_has_a_range():
    missing = []
    for cls in _schemas():
        rules = rules_of(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            base = next((a for a in typing.get_args(t) if a is not type(None)), t) if typing.get_origin(t) is typing.Union else t
            numeric = base in (int, float) or (base is str and f.name not in FREE)
            if numeric and f.name not in rules and f.name not in FREE:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"fields without a rule in r1mega.config.validate.RANGES: {missing}"
    assert set(RANGES) <= {c.__name__ for cls in _schemas() for c in cls.__mro__}


def test_eval_limit_works_on_the_arithmetic_data():
    from r1mega.data.prompts import load_rows

    cfg = compose(["data.eval_limit=5"])
    assert len(load_rows(cfg.data, "eval")) == 5 and len(load_rows(cfg.data, "train")) == 128


# ---- data rows ----------------------------------------------------------------------------------------

GOOD = '{"question": "1+1?", "answer": "#### 2"}\n'
BAD_ROWS = {  # name -> (file bytes, what the message must say)
    "empty": (b"", "no rows (the file is empty)"),
    "not_utf8": (GOOD.encode() + b'{"question": "caf\xe9", "answer": "#### 1"}\n', ":2: not UTF-8 (byte 0xe9"),
    "malformed": (GOOD.encode() + b'{"question": "x", "answer": \n', ":2: not valid JSON"),
    "missing": (GOOD.encode() * 2 + b'{"question": "x"}\n', ":3: missing key 'answer'"),
    "null_answer": (GOOD.encode() + b'{"question": "x", "answer": null}\n', ":2: field 'answer' is null"),
    "blank_question": (b'{"question": "  ", "answer": "#### 2"}\n', ":1: field 'question' must be non-empty text"),
}


def _data_dir(tmp_path, case: str, split: str = "train"):
    """A gsm8k data dir (conf/data/gsm8k.yaml file names) whose `split` file holds the bad rows; the
    eval benchmark file eval/gsm8k.jsonl is the same file as data=gsm8k's eval_file."""
    root = tmp_path / case
    (root / "train").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "train" / "gsm8k_train.jsonl").write_text(GOOD * 3)
    (root / "eval" / "gsm8k.jsonl").write_text(GOOD * 3)
    bad = root / ("train/gsm8k_train.jsonl" if split == "train" else "eval/gsm8k.jsonl")
    bad.write_bytes(BAD_ROWS[case][0])
    return root, bad


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_fail_validation_with_file_line_and_field(tmp_path, case):
    root, bad = _data_dir(tmp_path, case, "train" if case != "null_answer" else "eval")
    problems = _problems(["recipe=r1_zero", "data=gsm8k", f"data.data_dir={root}"])
    key = "data.train_file" if case != "null_answer" else "data.eval_file"
    assert problems == [p for p in problems if "\n" not in p]
    assert any(p.startswith(f"{key}: {bad}") and BAD_ROWS[case][1] in p for p in problems), problems


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_one_line_from_the_main_and_eval_clis(tmp_path, case, capsys):
    """The CLIs' own code paths in-process (`preflight`, `r1mega.eval.main`); subprocesses below."""
    from r1mega.__main__ import preflight
    from r1mega.eval.__main__ import main as eval_main

    root, bad = _data_dir(tmp_path, case, "eval")
    with pytest.raises(SystemExit) as e:
        preflight(["recipe=r1_zero", "data=gsm8k", f"data.data_dir={root}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(bad) in err[0] and BAD_ROWS[case][1] in err[0], err
    assert "data.eval_file" in err[0]
    assert eval_main(["benchmarks=gsm8k", f"data_dir={root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and BAD_ROWS[case][1] in err[0], err


def test_sft_rows_are_checked_at_validation(tmp_path):
    path = tmp_path / "cold.jsonl"
    path.write_text('{"problem": "p", "response": "r"}\n{"problem": "q", "reasoning": "r"}\n')
    problems = _problems(["recipe=r1", f"recipe.cold_start.data={path}"])
    assert any(p.startswith(f"recipe.cold_start.data: {path}:2: missing key 'summary'") for p in problems), problems


def test_eval_options_are_checked_when_parsed(capsys):
    from r1mega.eval.__main__ import main as eval_main

    for arg, message in (("k=0", "k=0 must be positive."), ("limit=-1", "limit=-1 must be at least 1"),
                         ("top_p=0", "top_p=0.0 must be in (0, 1]."), ("benchmarks=aime25", "benchmarks: unknown benchmark 'aime25'")):
        assert eval_main([arg]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (arg, err)


@pytest.mark.parametrize("override, message", [
    ("num_gpus=0", "num_gpus=0 must be at least 1."),
    ("num_gpus=-8", "num_gpus=-8 must be at least 1."),
    ("mfu=1.5", "mfu=1.5 must be in (0, 1]."),
    ("cluster.gpu_memory_gb=0", "cluster.gpu_memory_gb=0.0 must be positive."),
    ("prompt_length=8192", "prompt_length=8192 must be below seq_length=4096."),
])
def test_planner_fields_have_ranges(override, message):
    from r1mega.plan import compose_plan

    with pytest.raises(ConfigError) as e:
        compose_plan([override])
    assert any(message in p for p in e.value.problems), e.value.problems


# ---- the real command lines, a few representative cases, run concurrently -------------------------------

def test_clis_print_one_line_and_exit_2(tmp_path):
    root, bad = _data_dir(tmp_path, "null_answer", "train")
    runs = {
        "group_size": (["r1mega", "recipe=r1_zero", "algorithm.group_size=1"], "algorithm.group_size=1 must be at least 2"),
        "null_answer": (["r1mega", "recipe=r1_zero", "data=gsm8k", f"data.data_dir={root}"],
                        f"data.train_file: {bad}:2: field 'answer' is null"),
        "eval_k": (["r1mega.eval", "k=0"], "k=0 must be positive."),
        "plan_gpus": (["r1mega.plan", "num_gpus=0"], "num_gpus=0 must be at least 1."),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=cli_env()) for name, (args, _) in runs.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=180)
        lines = _error_lines(err)
        assert p.returncode == 2, (name, err)
        assert len(lines) == 1 and runs[name][1] in lines[0] and "Traceback" not in err, (name, err)


def _error_lines(stderr: str) -> list[str]:
    """stderr without Python's warnings from library imports (megatron-core warns that Transformer
    Engine and Apex are missing on CPU: a `file:line: XWarning: text` line and its source line)."""
    out, lines = [], stderr.strip().splitlines()
    for i, line in enumerate(lines):
        if re.search(r":\d+: \w*Warning: ", line) or (i and re.search(r":\d+: \w*Warning: ", lines[i - 1])):
            continue
        out.append(line)
    return out


@pytest.mark.parametrize("overrides, mode", [
    ([], "none"),  # tiny_moe, CPU, engine and trainer in fp32: routes agree
    (["rollout.dtype=bfloat16"], "r3"),
    (["model=tiny_dense"], "none"),
    (["model=deepseek_v3_671b", "platform=gpu", "parallel=dsv3_256xh100", "rollout=dsv3_tp32"], "r3"),
    (["algorithm.router_replay=r2"], "r2"),
])
def test_router_replay_auto_resolves_by_model_and_numerics(overrides, mode):
    from r1mega.models.router_replay import router_replay_mode

    assert router_replay_mode(compose(["recipe=r1_zero", *overrides])) == mode
