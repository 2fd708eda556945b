"""Typed config and layout rules: bad configs fail before anything is built, naming the field."""
from __future__ import annotations

import subprocess
import sys

import pytest

from r1mega.config import ConfigError, compose
from r1mega.parallel.state import Launch, launch_from_env


def _problems(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    return e.value.problems


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["parallel.tensor_model_parallel_size=3", "parallel.world_size=3", "parallel.sequence_parallel=true"],
         "parallel.tensor_model_parallel_size=3 does not divide model.num_attention_heads=4"),
        (["parallel=ep2", "parallel.expert_model_parallel_size=3", "parallel.world_size=3"],
         "parallel.expert_model_parallel_size=3 does not divide model.num_experts=8"),
        (["parallel=tp2", "parallel.world_size=3"], "parallel.world_size=3 is not divisible"),
        (["parallel=pp2", "parallel.pipeline_model_parallel_size=3", "parallel.world_size=3"],
         "parallel.pipeline_model_parallel_size=3"),
        (["parallel=tp2", "parallel.sequence_parallel=false"], "parallel.sequence_parallel must be true"),
        (["model=tiny_dense", "parallel=ep2"], "needs a MoE model"),
        (["model.fp8=blockwise"], "model.fp8='blockwise' needs Transformer Engine on a GPU"),
        (["platform.backend=nccl"], "platform.backend='nccl' cannot run on CPU"),
        (["parallel=ep2", "parallel.expert_tensor_parallel_size=2", "parallel.world_size=4"],
         "expert_tensor_parallel_size > 1 fails under gloo"),
        (["model.moe_router_num_groups=3"], "model.moe_router_num_groups=3 does not divide model.num_experts=8"),
        (["model.moe_router_num_groups=4", "model.moe_router_group_topk=2"], "must be 2 x model.moe_router_group_topk=2"),
        (["model.num_query_groups=3"], "model.num_query_groups=3 does not divide"),
        (["parallel.recompute_granularity=some"], "parallel.recompute_granularity='some' is not one of"),
        (["parallel.recompute_granularity=full"], "parallel.recompute_method=None must be one of uniform, block"),
        (["parallel.recompute_granularity=full", "parallel.recompute_method=block"],
         "parallel.recompute_num_layers=None must be at least 1"),
        (["parallel.recompute_granularity=selective", "parallel.recompute_num_layers=1"],
         "parallel.recompute_method and parallel.recompute_num_layers must be null"),
        (["parallel.recompute_method=uniform"], "while parallel.recompute_granularity is null"),
        (["model=deepseek_v3_671b", "parallel=dsv3_256xh100", "parallel.recompute_num_layers=2"],
         "parallel.recompute_num_layers=2 does not divide the 3 layers"),
        (["recipe=r1", "platform=gpu", "model=deepseek_v3_671b", "recipe.rejection_sft.sft.max_tokens=32768"],
         "recipe.rejection_sft.sft.max_tokens=32768 is below recipe.rl_reasoning.max_prompt_tokens=2048 + "
         "recipe.rejection_sft.rejection.max_tokens=32768 = 34816"),
    ],
)
def test_rule_violation_names_the_field(overrides, field):
    problems = _problems(overrides)
    assert any(field in p for p in problems), problems


def test_valid_layouts_pass():
    for overrides in (
        [],
        ["parallel=tp2"],
        ["parallel=ep2"],
        ["parallel=pp2"],
        ["model=tiny_dense", "parallel=tp2"],
        ["model=deepseek_v3_671b", "parallel=dsv3_256xh100", "model.params_dtype=bf16"],
        ["model=deepseek_v3_671b", "parallel=dsv3_256xh100", "platform=gpu", "model.fp8=blockwise"],
        ["model=llama3_70b", "parallel.tensor_model_parallel_size=8", "parallel.world_size=64",
         "parallel.pipeline_model_parallel_size=4"],
    ):
        compose(overrides)


def test_uneven_pipeline_split_must_add_up():
    problems = _problems(["model=deepseek_v3_671b", "parallel=dsv3_256xh100", "parallel.num_layers_in_last_pipeline_stage=3"])
    assert any("parallel.pipeline_model_parallel_size=16" in p for p in problems), problems


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1mega", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, field",
    [
        ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size=3 does not divide model.num_attention_heads=4"),
        ("model.num_layers=abc", "model.num_layers"),
        ("model.no_such_field=1", "model.no_such_field"),
        ("model=no_such_model", "model/no_such_model"),
    ],
)
def test_cli_bad_override_is_one_line_naming_the_field(override, field):
    r = _cli(override)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("r1mega:")]
    assert len(errors) == 1 and field in errors[0], r.stderr


def test_cli_prints_671b_config_and_parameter_count():
    r = _cli("--cfg", "job", "model=deepseek_v3_671b", "parallel=dsv3_256xh100")
    assert r.returncode == 0, r.stderr
    assert "num_layers: 61" in r.stdout and "num_experts: 256" in r.stdout
    assert "deepseek_v3_671b: 671.03B total / 37.55B active parameters" in r.stderr


def test_launch_from_torchrun_and_slurm_env():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    assert launch_from_env(torchrun) == Launch(3, 1, 8, "n0", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "MASTER_ADDR": "node7"}
    launch = launch_from_env(slurm)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port) == (5, 16, 5, "node7", 29500)
    assert launch_from_env({}).world_size == 1


# README's 671B command at the R1 paper's lengths (2,048 prompt + 65,536 response tokens).
README_671B = ["recipe=r1_zero", "platform=gpu", "model=deepseek_v3_671b", "parallel=dsv3_256xh100", "rollout=dsv3_tp32"]


def test_readme_671b_command_validates_with_the_paper_lengths():
    cfg = compose(README_671B)
    assert (cfg.rollout.max_model_len, cfg.recipe.train_max_tokens) == (67584, 67584)
    assert cfg.parallel.recompute_granularity == "full"
    r = _cli("--cfg", "job", *README_671B)  # validation and the memory pre-flight check pass
    assert r.returncode == 0, r.stderr
    assert "recompute_granularity: full" in r.stdout and "gpu_memory_utilization: 0.75" in r.stdout


def test_readme_671b_command_without_recompute_is_refused_by_the_memory_check():
    r = _cli("--cfg", "job", *README_671B, "parallel.recompute_granularity=null", "parallel.recompute_method=null",
             "parallel.recompute_num_layers=null")
    assert r.returncode == 2, r.stderr
    head = next(line for line in r.stderr.splitlines() if line.startswith("r1mega:"))
    assert head.startswith("r1mega: does not fit: recipe needs 288.8 GB per device, a h100_80gb GPU"), head
    assert "recompute=none" in r.stderr and "activations" in r.stderr
    assert "TP8 PP16 EP16 DP2 [3+4x14+2] recompute=full" in r.stderr  # what would fit


@pytest.mark.parametrize("util", [0.3, 0.6])
def test_rollout_kv_cache_must_hold_one_max_model_len_sequence(util):
    from r1mega.plan.preflight import check

    res = check(compose([*README_671B, f"rollout.gpu_memory_utilization={util}"]))
    assert not res.fits
    head = res.lines()[0]
    assert f"rollout.gpu_memory_utilization={util}" in head and "rollout=dsv3_tp32" in head, head
    assert "fewer than one rollout.max_model_len=67,584-token sequence" in head
    assert "raise rollout.gpu_memory_utilization to at least 0.64" in head
    if util == 0.6:
        assert "KV cache of 32,322 tokens" in head


@pytest.mark.parametrize("override, field", [
    ("rollout.max_model_len=32768", "exceeds rollout.max_model_len=32768"),
    ("recipe.train_max_tokens=65536", "exceeds recipe.train_max_tokens=65536"),
    ("recipe.eval.max_tokens=66000", "recipe.eval.max_tokens=66000"),
    ("rollout.max_model_len=200000", "exceeds model.max_position_embeddings=163840"),
    ("algorithm.ref_update_optimizer_steps=100", "algorithm.ref_update_optimizer_steps=100 must be a positive multiple"),
])
def test_length_rules_name_the_field(override, field):
    problems = _problems([*README_671B, override])
    assert any(field in p for p in problems), problems
    if "rollout.max_model_len=32768" in override:
        assert problems == ["recipe.max_prompt_tokens=2048 + recipe.max_response_tokens=65536 (from "
                            "response_length_schedule at optimizer step 8200) = 67584 exceeds rollout.max_model_len=32768; "
                            "raise rollout.max_model_len or shorten the responses."]


def test_r1_stage_lengths_are_checked():
    problems = _problems(["recipe=r1", "recipe.rl_all.max_response_tokens=100"])
    assert any("recipe.rl_all.max_prompt_tokens=64 + recipe.rl_all.max_response_tokens=100" in p for p in problems), problems


def test_r1_rl_stage_settings_reach_the_stage_recipe(tmp_path):
    """What an RL stage of recipe=r1 sets is what `rl_stage` reads as `cfg.recipe` (offload_reference,
    offload_train_state and records had drifted out of the stages); the other stage keeps the defaults."""
    from r1mega.recipes.stages import rl_recipe, stage_cfg

    cfg = compose(["recipe=r1", "recipe.rl_all.offload_reference=true", "recipe.rl_all.offload_train_state=false",
                   "recipe.rl_all.records.every=3"])
    got = {name: stage_cfg(cfg, name, tmp_path, recipe=rl_recipe(cfg.recipe[name])).recipe
           for name in ("rl_reasoning", "rl_all")}
    assert [(r.offload_reference, r.offload_train_state, r.records.every) for r in got.values()] == [(False, True, 1),
                                                                                                   (True, False, 3)]


def test_cli_length_violation_is_one_line():
    r = _cli("--cfg", "job", *README_671B, "recipe.train_max_tokens=65536")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("r1mega:")]
    assert len(errors) == 1 and "recipe.train_max_tokens=65536" in errors[0], r.stderr


def _cli_measured(*args: str):
    """`python -m r1mega` in a child; (result, seconds, peak RSS of that child in bytes). A fresh
    wrapper process waits for it, so RUSAGE_CHILDREN holds this child alone (in the test process it
    would be the largest child any earlier test ran)."""
    import time

    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "r1mega", *args], capture_output=True,
                       text=True, timeout=120)
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    return r, time.monotonic() - t, peak_kb * 1024


def test_memory_check_refuses_671b_on_this_host_before_building():
    r, seconds, peak = _cli_measured("model=deepseek_v3_671b", "recipe=r1_zero", "platform=cpu")
    assert r.returncode == 2, r.stderr
    assert "r1mega: does not fit: recipe needs" in r.stderr and "this host" in r.stderr
    assert "optimizer" in r.stderr and "activations" in r.stderr  # the planner's breakdown
    assert seconds < 60 and peak < 2**30, (seconds, peak)


def test_memory_check_passes_the_tiny_default_and_can_be_skipped():
    from r1mega.plan.preflight import check

    assert check(compose(["recipe=r1_zero"])).fits
    assert check(compose(["recipe=r1"])).fits and check(compose(["recipe=distill"])).fits
    big = compose(["model=deepseek_v3_671b", "recipe=r1_zero"])
    assert not check(big).fits
    big.platform.memory_check = False
    assert check(big).fits
    r = _cli("--cfg", "job", "recipe=r1_zero")
    assert r.returncode == 0 and "rollouts: 30" in r.stdout, r.stderr
    r = _cli("--cfg", "job", "model=deepseek_v3_671b", "recipe=r1_zero", "platform.memory_check=false")
    assert r.returncode == 0, r.stderr
