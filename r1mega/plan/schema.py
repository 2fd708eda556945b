"""Planner config: a `cluster` group and the planner's own fields, next to r1mega's model/parallel/rollout.

Every number the estimates rest on (bytes per value, efficiencies, reserves) is a field here, so a
user can argue with it on the command line (`mfu=0.25`) instead of in the code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from r1mega.config.schema import LayoutGroups


@dataclass
class ClusterConfig:
    """One GPU type and its node. Bandwidths are GB/s per GPU per direction; FLOP/s are dense peaks."""

    name: str = MISSING
    gpu_memory_gb: float = MISSING
    bf16_tflops: float = MISSING
    fp8_tflops: float = MISSING
    hbm_tbps: float = MISSING
    nvlink_gbps: float = MISSING
    network_gbps: float = MISSING  # scale-out NIC bandwidth per GPU
    pcie_gbps: float = MISSING  # GPU <-> host, for offload traffic
    gpus_per_node: int = MISSING  # GPUs sharing one NVLink domain
    host_memory_gb: float = MISSING  # per node


@dataclass
class PlannerConfig:
    """What one RL step does, and the efficiencies assumed for it."""

    # Workload. One RL step = rollout of `global_batch_size` sequences, ref/old-policy forwards, training.
    seq_length: int = 4096  # prompt + response tokens (training length; the engine's context)
    prompt_length: int = 1024
    global_batch_size: int = 512  # sequences per RL step (prompts x generations)
    micro_batch_size: int = 1
    optimizer_steps_per_rl_step: int = 1  # minibatches; each one flushes the pipeline
    rl: bool = True  # false: pretraining, no rollout/ref/sync phases
    include_mtp: bool = False  # RL recipes (verl, NeMo-RL) drop MTP; DeepSeek pretraining trains it
    old_policy_forward: bool = True  # recompute old log-probs in training numerics
    ref_on_gpu: bool = False  # False: reference weights wait in host memory between forwards

    # Memory choices (megatron-core names).
    recompute: str = "selective"  # none | selective | full (recompute_granularity)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # for selective
    recompute_method: str = "uniform"  # for full: uniform | block (megatron-core's meanings)
    recompute_num_layers: int = 1  # for full: layers per checkpointed chunk (uniform) / per stage (block)
    optimizer_offload_fraction: float = 0.0  # optimizer_cpu_offload + optimizer_offload_fraction
    offload_train_states_in_rollout: bool = True  # weights/grads/optimizer to host while vLLM runs

    # Bytes per value.
    param_bytes: float = 2.0  # bf16 weights
    grad_bytes: float = 4.0  # fp32 main_grad buffer (accumulate/reduce grads in fp32)
    optimizer_bytes: float = 12.0  # fp32 master + Adam m + v, sharded by the distributed optimizer
    fp8_weight_bytes: float = 2.0  # model.fp8: row- and column-wise fp8 copies kept by Transformer Engine
    activation_bytes: float = 2.0  # bf16
    fp8_activation_bytes: float = 1.0  # model.fp8: GEMM inputs saved for backward in fp8
    logits_bytes: float = 6.0  # per vocab entry on the last stage: bf16 logits + fp32 softmax
    kv_cache_bytes: float = 2.0  # bf16 KV cache

    # Reserves and limits.
    reserved_gb: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation
    rollout_activation_gb: float = 2.0  # vLLM's profiled activation peak + CUDA graphs
    rollout_max_num_seqs: int = 256  # vLLM max_num_seqs per engine
    host_memory_fraction: float = 0.9  # of host memory usable for pinned offload

    # Efficiencies.
    mfu: float = 0.35  # achieved fraction of peak FLOP/s in training and ref/old-policy forwards
    prefill_mfu: float = 0.5
    decode_mfu: float = 0.3
    hbm_efficiency: float = 0.7  # achieved fraction of HBM bandwidth in decode
    comm_efficiency: float = 0.7  # achieved fraction of link bandwidth in collectives
    comm_overlap: float = 0.5  # fraction of TP/EP/DP/PP communication hidden behind compute
    collective_latency_us: float = 15.0  # per decode-step collective (two per layer under TP)
    sync_efficiency: float = 0.4  # refit: achieved fraction of link bandwidth (bucketing, HF conversion)

    # Search.
    top_k: int = 5
    search_recompute: list[str] = field(default_factory=lambda: ["selective", "full"])


@dataclass
class PlanConfig(LayoutGroups, PlannerConfig):
    """The planner's root: planner fields at top level (`seq_length=8192`), groups as in the main app."""

    defaults: list[Any] = field(
        default_factory=lambda: [
            {"model": "deepseek_v3_671b"},
            {"parallel": "single"},
            {"platform": "gpu"},
            {"rollout": "vllm_gpu"},
            {"cluster": "h100_80gb"},
            "_self_",
        ]
    )
    cluster: ClusterConfig = MISSING
    num_gpus: Optional[int] = None  # None: parallel.world_size, else one node
    layout: str = "given"  # given | best: the breakdown's training layout (the CLI picks best unless parallel= is set)
    rollout_layout: str = "given"  # given | best: the engine's TP/DP (the CLI picks best unless rollout= is set)
    output: str = "table"  # table | json | wandb


def register_plan_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="plan_schema", node=PlanConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
