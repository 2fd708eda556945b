"""Typed config schemas, registered with Hydra's ConfigStore.

Every YAML file under `conf/` is merged onto one of these dataclasses, so a wrong type
(`model.num_layers=abc`) fails at composition with the field's name, and cross-field rules
(`r1mega.config.validate`) run before any model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from r1mega.config.algorithm import GRPOConfig
from r1mega.config.reward import RewardConfig


@dataclass
class ModelConfig:
    """One transformer decoder, described in megatron-core's vocabulary.

    `arch` picks the family: `deepseek_v3` (MLA + DeepSeekMoE), `qwen2` (GQA with q/k/v biases),
    `llama` (GQA, no biases), `qwen3` (GQA with per-head q/k RMSNorm; Qwen3-MoE when `num_experts`
    is set). MoE fields apply when `num_experts` is set. `model=hf` reads every field from a Hugging
    Face directory's config.json (`r1mega.config.hf`).
    """

    name: str = MISSING
    hf_dir: Optional[str] = None  # model=hf: the HF directory read (None: recipe.base); presets: unused
    arch: str = MISSING  # deepseek_v3 | qwen2 | llama | qwen3
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
    qk_layernorm: bool = False  # RMSNorm of each query/key head before rope (Qwen3); MLA has its own
    init_method_std: float = 0.02

    # Multi-head latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # "qk_nope_head_dim"
    qk_pos_emb_head_dim: int = 64  # "qk_rope_head_dim"
    v_head_dim: int = 128
    rope_type: str = "rope"  # rope | yarn (MLA only) | llama3 (GQA only: Llama-3.1's frequency scaling)
    rotary_scaling_factor: float = 1.0  # YaRN / llama3 factor
    original_max_position_embeddings: int = 4096  # YaRN; llama3: 8192 (megatron-core's fixed value)
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
    moe_router_pre_softmax: bool = False  # softmax over all experts, top-k not renormalised (HF norm_topk_prob=false)
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = "none"  # none | aux_loss | seq_aux_loss
    first_k_dense_layers: int = 0
    mtp_num_layers: int = 0  # multi-token-prediction depth (DeepSeek-V3: 1)
    # lambda, the MTP loss weight in SFT / pretraining (mean MTP NLL over the loss tokens, averaged over
    # depths). DeepSeek-V3 (section 4.2): 0.3 for the first 10T tokens, then 0.1 (its final value and
    # megatron-core's default). RL uses algorithm.mtp_loss_coef instead (0: off).
    mtp_loss_scaling_factor: float = 0.1

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
    # Activation recompute (megatron-core's TransformerConfig fields of the same names), a memory
    # choice of the layout; the pre-flight memory check estimates with it. `full` keeps only the
    # input of each recomputed chunk and rebuilds the rest in backward: `uniform` checkpoints every
    # chunk of `recompute_num_layers` layers, `block` the first `recompute_num_layers` layers of
    # each pipeline stage. `selective` recomputes core attention only (megatron's default modules;
    # method and num_layers stay null).
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: Optional[str] = None  # uniform | block (full only)
    recompute_num_layers: Optional[int] = None  # >= 1 (full only)


@dataclass
class PlatformConfig:
    """Where the job runs. `cpu` applies `r1mega.platform.cpu` patches, uses gloo and the local spec."""

    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda
    backend: str = "gloo"  # gloo | nccl
    transformer_engine: bool = False
    deterministic: bool = True
    seed: int = 1234
    # Pre-flight memory check (r1mega.plan.preflight): before anything is built, the planner's
    # per-device estimate for this model, layout, lengths and batch must fit the device: a GPU of
    # conf/cluster/<cluster>.yaml, or on CPU the host's memory divided among its local processes.
    memory_check: bool = True  # false: skip it (experts who know better than the estimate)
    cluster: Optional[str] = None  # conf/cluster preset whose GPU the check assumes (GPU platforms)


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
class ArithmeticConfig:
    """The embedded default's synthetic task (`r1mega.data.arithmetic`)."""

    max_operand: int = 39  # a, b in [0, max_operand]
    num_heldout: int = 128  # pairs in each of the eval and RL-prompt splits; the rest are pretraining
    p_format: float = 0.5  # pretraining completions in the R1-Zero form
    p_correct: float = 0.4  # pretraining completions with the right sum
    seed: int = 0


@dataclass
class DataConfig:
    """Prompts for RL and eval. `arithmetic` generates them; `jsonl` reads `train_file` / `eval_file`
    (relative paths are taken under `data_dir`)."""

    name: str = "arithmetic"
    source: str = "arithmetic"  # arithmetic | jsonl
    data_dir: Optional[str] = None  # None: $R1MEGA_DATA_DIR, else shared/data beside the repo
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    prompt_key: str = "problem"  # GSM8K: question
    answer_key: str = "answer"
    data_source: Optional[str] = None  # reward source for every row (None: the row's own or default)
    eval_limit: Optional[int] = None  # first N eval rows
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)


@dataclass
class PretrainConfig:
    """How the embedded default makes its own base model (cached by content hash under `cache_dir`)."""

    steps: int = 400  # optimizer steps
    batch_size: int = 64  # documents per optimizer step
    max_tokens: int = 256  # tokens per packed microbatch (attention is dense per microbatch on CPU)
    num_docs: int = 30000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    tokenizer_docs: int = 4000  # documents the BPE tokenizer is trained on


@dataclass
class EvalConfig:
    """Held-out evaluation (paper protocol: pass@1 from k samples at temperature 0.6, top-p 0.95)."""

    k: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    every: int = 0  # rollouts between evals inside the RL loop; 0 = only before and after


@dataclass
class RecordsConfig:
    """Rollout records (r1mega.trainer.records): one Parquet file per recorded rollout in <run_dir>/rollouts."""

    every: int = 1  # rollouts between records (0: no records)
    max_gb: float = 10.0  # cap on <run_dir>/rollouts in GB (1e9 bytes); the oldest files are removed beyond it
    wandb_every: int = 10  # rollouts between W&B tables of sample completions read from the record (0: none)


@dataclass
class RLRunConfig:
    """The settings of one GRPO run, read as `cfg.recipe` by `r1mega.recipes.r1_zero.rl_stage`: the
    whole of recipe=r1_zero (`RLRecipeConfig`) and each RL stage of recipe=r1 (`RLStageConfig`, whose
    fields of this class become the stage's `recipe`). Paper values in conf/recipe/r1_zero.yaml.

    Units (r1mega.config.steps): a *rollout* samples `algorithm.group_size` outputs for each of
    `prompts_per_rollout` prompts and runs `algorithm.num_mini_batches x algorithm.ppo_epochs`
    *optimizer steps* on them. `rollouts`, `save_every` and `eval.every` count rollouts.
    `response_length_schedule` maps an OPTIMIZER step K to a new `max_response_tokens`: it applies
    from the rollout that feeds optimizer step K (rollout floor(K / optimizer steps per rollout)) on,
    so every optimizer step >= K trains on outputs generated with the new limit.
    """

    template: str = "r1_zero"
    rollouts: int = 650  # GRPO iterations (paper: 650 x 16 = 10,400 optimizer steps)
    prompts_per_rollout: int = 512  # x group_size outputs per rollout (paper: 512 x 16 = 8,192)
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 32768
    response_length_schedule: Dict[int, int] = field(default_factory=dict)  # optimizer step -> max_response_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    train_max_tokens: int = 67584  # tokens per packed training microbatch (>= prompt + longest response)
    # Each group's prompt computed once in the reference, old-policy and update passes (CPU attention
    # path, RoPE models): same log-probs and gradients, (group_size - 1) x prompt tokens fewer per group.
    share_prompts: bool = False
    save_every: int = 50  # rollouts between checkpoints
    keep_last: int = 2
    offload_reference: bool = False  # keep the reference model in host memory between uses (CPU: copies, same bookkeeping)
    offload_train_state: bool = True  # free gradients, optimizer state to host memory while vLLM runs
    wandb: bool = True
    deterministic: bool = True  # CPU: resumed runs reproduce the uninterrupted run's metrics
    records: RecordsConfig = field(default_factory=RecordsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class RLRecipeConfig(RLRunConfig, RecipeConfig):
    """`recipe=r1_zero`: one GRPO run from a base model. The CPU overlay
    conf/recipe_platform/r1_zero_cpu.yaml shrinks the paper's values for the embedded default."""

    base: str = "embedded"  # embedded (pretrain a tiny base on the synthetic task) | an HF directory
    cache_dir: str = "runs/cache"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class LayoutGroups:
    """The groups the run and the planner (`r1mega.plan.schema.PlanConfig`) share: a model, its training
    layout, the platform, the rollout engine's layout."""

    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    platform: PlatformConfig = MISSING
    rollout: RolloutConfig = MISSING


@dataclass
class R1MegaConfig(LayoutGroups):
    """The root of conf/config.yaml: one field per group."""

    recipe: RecipeConfig = MISSING
    data: DataConfig = MISSING
    algorithm: GRPOConfig = MISSING
    reward: RewardConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/${recipe.name}/${model.name}"
    verbose: bool = False  # true: every library's output on the terminal; false: r1mega's lines there, all in <run_dir>/run.log


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="r1mega_schema", node=R1MegaConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="platform", name="platform_schema", node=PlatformConfig)
    cs.store(group="rollout", name="rollout_schema", node=RolloutConfig)
    cs.store(group="recipe", name="recipe_schema", node=RecipeConfig)
    cs.store(group="recipe", name="rl_recipe_schema", node=RLRecipeConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="algorithm", name="grpo_schema", node=GRPOConfig)
    cs.store(group="reward", name="reward_schema", node=RewardConfig)
