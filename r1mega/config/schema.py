"""Typed config schemas, registered with Hydra's ConfigStore.

Every YAML file under `conf/` is merged onto one of these dataclasses, so a wrong type
(`model.num_layers=abc`) fails at composition with the field's name, and cross-field rules
(`r1mega.config.validate`) run before any model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """One transformer decoder, described in megatron-core's vocabulary.

    `arch` picks the family: `deepseek_v3` (MLA + DeepSeekMoE), `qwen2` (GQA with q/k/v biases),
    `llama` (GQA, no biases). MoE fields apply when `num_experts` is set.
    """

    name: str = MISSING
    arch: str = MISSING  # deepseek_v3 | qwen2 | llama
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING  # dense MLP width (the first-k dense layers of a MoE model)
    num_attention_heads: int = MISSING
    num_query_groups: Optional[int] = None  # GQA groups; None = MHA
    kv_channels: Optional[int] = None  # head dim of non-MLA attention; None = hidden / heads
    vocab_size: int = MISSING
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False
    init_method_std: float = 0.02

    # Multi-head latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # "qk_nope_head_dim"
    qk_pos_emb_head_dim: int = 64  # "qk_rope_head_dim"
    v_head_dim: int = 128
    rope_type: str = "rope"  # rope | yarn
    rotary_scaling_factor: float = 1.0  # YaRN factor
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    # DeepSeekMoE.
    num_experts: Optional[int] = None  # routed experts; None = dense model
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None  # n_shared_experts * moe_ffn_hidden_size
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing bias
    moe_router_bias_update_rate: float = 1e-3
    moe_router_num_groups: Optional[int] = None  # group-limited routing
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None  # routed_scaling_factor
    moe_router_pre_softmax: bool = False
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = "none"  # none | aux_loss | seq_aux_loss
    first_k_dense_layers: int = 0
    mtp_num_layers: int = 0  # multi-token-prediction depth (DeepSeek-V3: 1)

    # Numerics.
    params_dtype: str = "fp32"  # fp32 | bf16
    fp8: Optional[str] = None  # blockwise | delayed | null (GPU + Transformer Engine only)


@dataclass
class ParallelConfig:
    """Megatron-core parallel layout. `world_size` None means: the launcher's WORLD_SIZE (1 if unset)."""

    name: str = "single"
    world_size: Optional[int] = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True


@dataclass
class PlatformConfig:
    """Where the job runs. `cpu` applies `r1mega.platform.cpu` patches, uses gloo and the local spec."""

    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda
    backend: str = "gloo"  # gloo | nccl
    transformer_engine: bool = False
    deterministic: bool = True
    seed: int = 1234


@dataclass
class RolloutConfig:
    """The colocated vLLM engine: its own parallel layout (independent of training) and memory."""

    name: str = "vllm_cpu"
    tensor_parallel_size: int = 1
    expert_parallel: bool = False  # vLLM enable_expert_parallel: experts sharded over the engine's TP x DP ranks
    data_parallel_size: int = 1
    dtype: str = "float32"  # float32 | bfloat16
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.6  # fraction of GPU memory the engine may take (GPU only)
    kv_cache_space_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU only); vLLM's default takes most of RAM
    enforce_eager: bool = True
    enable_sleep_mode: bool = False  # GPU only; sleep/wake are no-ops on CPU
    sync_bucket_mb: int = 256  # weight-sync bucket size


@dataclass
class OptimConfig:
    """megatron-core optimizer (Adam, distributed over DP when parallel.use_distributed_optimizer)."""

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | cosine | linear
    lr_decay_steps: Optional[int] = None


@dataclass
class RecipeConfig:
    """Which pipeline runs. Recipes add their own fields in later schemas; `none` only builds and checks."""

    name: str = "none"


@dataclass
class R1MegaConfig:
    defaults: list[Any] = field(
        default_factory=lambda: [
            {"model": "tiny_moe"},
            {"parallel": "single"},
            {"platform": "cpu"},
            {"rollout": "vllm_cpu"},
            {"recipe": "none"},
            "_self_",
        ]
    )
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    platform: PlatformConfig = MISSING
    rollout: RolloutConfig = MISSING
    recipe: RecipeConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/${recipe.name}/${model.name}"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="r1mega_schema", node=R1MegaConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="platform", name="platform_schema", node=PlatformConfig)
    cs.store(group="rollout", name="rollout_schema", node=RolloutConfig)
    cs.store(group="recipe", name="recipe_schema", node=RecipeConfig)
