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
