"""The pre-flight planner against published facts: parameter counts, layouts that ran, layouts that cannot.

Every expectation below cites where its number comes from. Run with -s to see the planner's numbers.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from r1mega.config import compose
from r1mega.models.params import count_parameters
from r1mega.plan import compose_plan, flat, plan
from r1mega.plan.memory import facts
from r1mega.plan.search import split_layers

# Published parameter counts, (total, tolerance).
PUBLISHED_PARAMS = {
    "deepseek_v3_671b": (671e9, 0.01),  # DeepSeek-V3 report, arXiv:2412.19437, abstract: "671B total parameters"
    "qwen2.5_32b": (32.5e9, 0.01),  # huggingface.co/Qwen/Qwen2.5-32B model card: "Number of Parameters: 32.5B"
    "llama3_70b": (70.6e9, 0.01),  # huggingface.co/meta-llama/Llama-3.3-70B-Instruct: 70.6B params (safetensors)
}
# arXiv:2412.19437 abstract: "37B activated for each token", given to two significant figures.
DSV3_ACTIVE = 37e9

# NeMo-RL DeepSeek-V3 GRPO on 32 nodes x 8 H100-80GB (NVIDIA-NeMo/RL examples/configs/recipes/llm/
# performance/grpo-deepseek-v3-32n8g.yaml): PP16 x EP16 (3 + 14x4 + 2 layers), activation checkpointing,
# max_total_sequence_length 1536, 32 prompts x 16 generations, micro batch 1, vLLM TP32. The prompt
# length is not published; 512 is assumed.
NEMO_RL_256 = ["model=deepseek_v3_671b", "cluster=h100_80gb", "num_gpus=256", "parallel=nemo_rl_dsv3_256xh100",
               "rollout=dsv3_tp32", "rollout.gpu_memory_utilization=0.6", "seq_length=1536", "prompt_length=512", "global_batch_size=512",
               "micro_batch_size=1", "recompute=full"]
# verl DeepSeek-V3 on 96 H20-96GB (volcengine/verl examples/grpo_trainer/run_deepseek671b_math_megatron_96gb.sh,
# docs/perf/dpsk.md): TP8 PP12 EP8, last stage 6 layers, optimizer_offload_fraction=1, full recompute,
# prompt 2048 + response 1204*8 tokens, 96 prompts x 8 responses in 3 minibatches of 32 prompts,
# dynamic batching at one sequence's tokens per GPU, vLLM TP32 at gpu_memory_utilization 0.6.
VERL_96 = ["model=deepseek_v3_671b", "cluster=h20_96gb", "num_gpus=96", "parallel=verl_dsv3_96xh20",
           "rollout=dsv3_tp32", "rollout.gpu_memory_utilization=0.6", "seq_length=11680", "prompt_length=2048", "global_batch_size=768",
           "optimizer_steps_per_rl_step=3", "recompute=full"]
VERL_REPORTED_GPU_GB = 66  # verl's DeepSeek-V3 671B runs report ~66 GB GPU memory in use on H20-96GB
VERL_REPORTED_HOST_TB = 1.6  # docs/perf/dpsk.md: "this configuration will use 1.6TB CPU memory per node"
# DeepSeek-V3 pretraining (arXiv:2412.19437): 2048 H800 (§3.1); PP16 DualPipe, EP64, ZeRO-1 DP (§3.2);
# FP8 training (§3.3); BF16 AdamW moments with FP32 master weights and gradients (§3.3.3: 4+2+2 bytes);
# RMSNorm and MLA up-projection recomputed, SwiGLU output recomputed from its cached input (§3.2.3, §3.3.2);
# MTP trained (§2.2); 4K sequences, batch size up to 15360 (§4.2).
DSV3_PRETRAIN = ["model=deepseek_v3_671b", "cluster=h800", "num_gpus=2048", "parallel=dsv3_pretrain_2048xh800",
                 "rl=false", "include_mtp=true", "model.fp8=blockwise", "seq_length=4096", "prompt_length=1",
                 "global_batch_size=15360", "optimizer_bytes=8", "recompute=selective",
                 "recompute_modules=[layernorm,mla_up_proj,moe_act]"]
# NeMo-RL, "Journey of Optimizing Weight Transfer in Large MoE Models by 10x" (nvidia-nemo.github.io/blog/
# 2025/08/12/nemo-rl-refit-performance): DeepSeek-V3 BF16 refit PP16xEP16 -> vLLM TP32 on 256 H100 in 2.4-2.8 s.
PUBLISHED_REFIT_S = (2.4, 2.8)


@pytest.fixture(scope="module")
def runs():
    return {
        "nemo_rl_256": plan(compose_plan(NEMO_RL_256)),
        "verl_96": plan(compose_plan(VERL_96 + ["optimizer_offload_fraction=1"])),
        "verl_96_no_offload": plan(compose_plan(VERL_96 + ["optimizer_offload_fraction=0"])),
        "pretrain_2048": plan(compose_plan(DSV3_PRETRAIN)),
    }


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name):
    total, tol = PUBLISHED_PARAMS[name]
    got = count_parameters(compose([f"model={name}"]).model).total
    print(f"{name}: {got / 1e9:.2f}B vs published {total / 1e9:.1f}B")
    assert abs(got - total) / total < tol


def test_deepseek_v3_active_parameters():
    f = facts(compose(["model=deepseek_v3_671b"]).model)
    print(f"DeepSeek-V3 active: {f.active / 1e9:.2f}B incl. input embedding, {f.active_matmul / 1e9:.2f}B without")
    # "37B" has two significant figures: our count must round to it. With the embedding lookup it would
    # round to 38B, so DeepSeek's figure leaves the lookup (no matmul) out, as the planner's FLOPs do.
    assert round(f.active_matmul / 1e9) == DSV3_ACTIVE / 1e9
    assert abs(f.active - DSV3_ACTIVE) / DSV3_ACTIVE < 0.02


def test_mla_latent_kv_cache_bytes(runs):
    # 61 layers x (kv_lora_rank 512 + qk_rope_head_dim 64) x 2 bytes, replicated on every TP rank.
    assert runs["nemo_rl_256"]["rollout_memory"]["kv_bytes_per_token"] == 61 * 576 * 2


def test_stage_split_matches_published():
    assert split_layers(61, 16) == (3, 2)  # NeMo-RL / Megatron-Bridge DeepSeek-V3: 3 + 14x4 + 2
    assert split_layers(64, 16) == (None, None)


def test_nemo_rl_256_h100_fits(runs):
    r = runs["nemo_rl_256"]
    tm, rm = r["train_memory"], r["rollout_memory"]
    print(f"NeMo-RL 256xH100: training {tm['total_gb']:.1f} GB/GPU, vLLM TP32 weights {rm['weights_gb']:.1f} GB, "
          f"KV {rm['kv_tokens_per_engine']} tokens/engine; step {r['step_s']:.0f} s")
    assert r["verdict"]["fits"], r["verdict"]
    assert 40 < tm["total_gb"] < 80
    assert 41 < rm["weights_gb"] < 46  # 1342 GB / 32 plus the replicated MLA down-projections


def test_verl_96_h20_fits_with_offload_near_reported_memory(runs):
    r = runs["verl_96"]
    tm = r["train_memory"]
    host_tb = tm["host_per_node_gb"] / 1000
    print(f"verl 96xH20: {tm['total_gb']:.1f} GB/GPU (reported {VERL_REPORTED_GPU_GB} GB), "
          f"host {host_tb:.2f} TB/node (reported {VERL_REPORTED_HOST_TB} TB)")
    assert r["verdict"]["fits"], r["verdict"]
    assert abs(tm["total_gb"] - VERL_REPORTED_GPU_GB) / VERL_REPORTED_GPU_GB < 0.2
    assert abs(host_tb - VERL_REPORTED_HOST_TB) / VERL_REPORTED_HOST_TB < 0.25


def test_verl_96_h20_without_offload_is_rejected(runs):
    # 96 GPUs = TP8 x PP12 x DP1 and EP8 x PP12 x expert-DP1: nothing shards the optimizer, so its
    # 12 bytes/param for the ~8.8B parameters on the last stage (over 100 GB) exceed the GPU alone.
    r = runs["verl_96_no_offload"]
    tm = r["train_memory"]
    print(f"verl 96xH20 without offload: {tm['total_gb']:.1f} GB/GPU, optimizer {tm['optimizer_gb']:.1f} GB")
    assert not r["verdict"]["fits"] and r["verdict"]["limit"] == "training memory"
    assert tm["dp"] == 1 and tm["expert_dp"] == 1 and tm["optimizer_gb"] > 96


def test_deepseek_v3_pretraining_2048_h800_fits(runs):
    r = runs["pretrain_2048"]
    tm = r["train_memory"]
    print(f"DeepSeek-V3 pretraining 2048xH800: {tm['total_gb']:.1f} GB/GPU (activations {tm['activations_gb']:.1f})")
    assert r["verdict"]["fits"], r["verdict"]
    assert tm["dp"] == 128 and tm["expert_dp"] == 2
    assert r["rollout_memory"] is None and r["weight_sync"] is None


def test_671b_bf16_on_8_gpus_is_rejected():
    r = plan(compose_plan(["model=deepseek_v3_671b", "cluster=h100_80gb", "num_gpus=8", "layout=best"]))
    print(f"671B on 8x80GB: {r['verdict']['reason']}")
    # BF16 weights alone are 1342 GB against 640 GB in the node: no layout can fit.
    assert r["feasible_layouts"] == 0
    assert not r["verdict"]["fits"] and r["verdict"]["limit"] == "training memory"
    assert r["train_memory"]["weights_gb"] > 80


def test_weight_sync_order_of_published(runs):
    ws = runs["nemo_rl_256"]["weight_sync"]
    lo, hi = PUBLISHED_REFIT_S
    print(f"weight sync 671B BF16 PP16xEP16 -> TP32: estimate {ws['estimate_s']:.2f} s, bandwidth floor "
          f"{ws['theory_s']:.2f} s (node ingress {ws['node_ingress_gb']:.0f} GB), published {lo}-{hi} s")
    assert ws["theory_s"] < lo  # a floor must sit below what was measured
    assert lo / 3 < ws["estimate_s"] < hi * 3  # same order of magnitude


def test_recompute_orders_activation_memory():
    act = {rc: plan(compose_plan(NEMO_RL_256 + [f"recompute={rc}"]))["train_memory"]["activations_gb"]
           for rc in ("none", "selective", "full")}
    assert act["full"] < act["selective"] <= act["none"]
    # megatron's full recompute: uniform chunks of 4 layers keep fewer inputs but hold 4 layers while one
    # is rebuilt; block 2 keeps every activation of the stage's other layers.
    full = {k: plan(compose_plan(NEMO_RL_256 + ["recompute=full", *k]))["train_memory"]["activations_gb"]
            for k in [(), ("recompute_num_layers=4",), ("recompute_method=block", "recompute_num_layers=2")]}
    uniform1, uniform4, block2 = full.values()
    assert uniform1 < uniform4 and uniform1 < block2 < act["none"]


def test_json_and_wandb_outputs(runs):
    r = runs["nemo_rl_256"]
    assert json.loads(json.dumps(r))["verdict"]["fits"]
    d = flat(r)
    assert d["plan/verdict/fits"] is True and d["plan/train_memory/total_gb"] == r["train_memory"]["total_gb"]
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in d.values())


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "r1mega.plan", *args], capture_output=True, text=True, timeout=60)


def test_cli_prints_breakdown_and_top_layouts():
    p = _cli("model=deepseek_v3_671b", "cluster=h100_80gb", "num_gpus=256")
    assert p.returncode == 0, p.stderr
    for text in ("Training memory per GPU", "Rollout memory per GPU", "Time per RL step", "weight sync",
                 "FITS", "Best feasible layouts"):
        assert text in p.stdout
    assert re.search(r"^1 .* TP\d+ PP\d+ EP\d+ DP\d+", p.stdout, re.M)  # the top-ranked layout


def test_cli_json_output():
    p = _cli(*NEMO_RL_256, "output=json")  # the published workload, which fits (exit 0)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["layout"].startswith("TP1 PP16 EP16")


@pytest.mark.parametrize("override,field", [
    ("num_gpus=abc", "num_gpus"),
    ("cluster=h100", "cluster"),
    ("recompute=some", "recompute"),
])
def test_cli_bad_override_is_one_line_naming_the_field(override, field):
    p = _cli(override)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and field in lines[0], p.stderr


def test_cli_layout_that_does_not_divide_names_the_field():
    p = _cli("parallel=dsv3_256xh100", "num_gpus=8")
    assert p.returncode == 2 and "parallel.world_size=8" in p.stderr
