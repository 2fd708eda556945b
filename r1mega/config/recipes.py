"""Schemas of the multi-stage recipes: `recipe=r1` (cold start -> reasoning RL -> rejection sampling +
SFT of the base -> RL for all scenarios) and `recipe=distill` (teacher samples -> correctness filter ->
SFT of a student). Registered in the ConfigStore group "recipe" as `r1_recipe_schema` and
`distill_recipe_schema`; values live in conf/recipe/{r1,distill}.yaml and the CPU overlays in
conf/recipe_platform/{r1,distill}_cpu.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from r1mega.config.schema import EvalConfig, PretrainConfig, RecipeConfig, RLRunConfig


@dataclass
class SFTStageConfig:
    """An SFT run inside a recipe: epochs over packed samples, lr warmup + decay over the stage's
    optimizer steps, a checkpoint (model + optimizer + scheduler) every `save_every` optimizer steps;
    a restarted stage resumes from its last checkpoint."""

    steps: int = 100000  # cap on optimizer steps; the epochs usually end first
    epochs: int = 2
    batch_size: int = 128  # samples per optimizer step
    max_tokens: int = 32768  # tokens per packed microbatch; longer samples are dropped (and counted)
    lr: float = 5.0e-5
    min_lr: float = 5.0e-6
    warmup_steps: int = 0  # optimizer steps
    lr_decay_style: str = "cosine"  # constant | cosine | linear
    save_every: int = 100  # optimizer steps
    keep_last: int = 1
    wandb: bool = True


@dataclass
class ColdStartConfig:
    """R1 stage 1: SFT of the base on long chain-of-thought examples in the R1 output form."""

    data: Optional[str] = None  # JSONL ({problem, response} or {problem, reasoning, summary}); None: synthetic
    num_examples: int = 4000  # synthetic examples (correct column-addition CoT + \boxed{} summary)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)


@dataclass
class RewardModelTermConfig:
    """A reward-model term next to the rule rewards (`r1mega.rewards.reward_model.RewardModelScorer`,
    scored in the GRPO step on every rank). It scores the policy's token ids: same tokenizer."""

    checkpoint: Optional[str] = None  # a CheckpointManager root (latest) or a step_<N> dir; None: no term
    model: Optional[str] = None  # conf/model preset of the reward model; None: the policy's architecture
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    sources: Optional[List[str]] = None  # data sources it applies to (e.g. general data); None: all
    max_tokens: int = 4096  # tokens per packed scoring microbatch


@dataclass
class RLStageConfig(RLRunConfig):
    """A GRPO stage (`r1mega.recipes.r1_zero.rl_stage`): the RL settings of `RLRunConfig` (copied onto
    the stage's `recipe`, `r1mega.recipes.stages.rl_recipe`) with stage defaults, plus overlays merged
    onto the run's top-level `algorithm`, `optim`, `reward` for this stage only."""

    template: str = "r1"
    rollouts: int = 100  # GRPO iterations, each num_mini_batches x ppo_epochs optimizer steps
    prompts_per_rollout: int = 32  # x group_size outputs per rollout
    max_prompt_tokens: int = 2048
    train_max_tokens: int = 65536  # tokens per packed training microbatch (>= prompt + longest response)
    algorithm: Dict[str, Any] = field(default_factory=dict)  # keys of GRPOConfig (r1mega.config.algorithm)
    optim: Dict[str, Any] = field(default_factory=dict)  # keys of OptimConfig
    reward: Dict[str, Any] = field(default_factory=dict)  # keys of RewardConfig (r1mega.config.reward)
    reward_model: RewardModelTermConfig = field(default_factory=RewardModelTermConfig)  # all-scenario RL


@dataclass
class RejectionConfig:
    """k samples per prompt from a checkpoint, and the filters a kept one passes (`r1mega.data.rejection`:
    the filters in the order they are checked). `recipe.rejection_sft.rejection` of recipe=r1 and
    `recipe.generate` of recipe=distill."""

    k: int = 4  # samples per prompt
    m: int = 1  # kept per prompt at most
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0
    batch_prompts: int = 256  # prompts per engine call
    required: Dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})  # term -> minimum
    min_total: Optional[float] = None  # minimum weighted reward total, if set
    drop_truncated: bool = True
    max_language_mixing: float = 0.1  # share of chain-of-thought words outside the target script
    language: Optional[str] = None  # a `rewards.language.SCRIPTS` key; None = the prompt's script
    max_paragraph_chars: int = 2000
    reject_code_blocks: bool = True
    dedup: bool = True


@dataclass
class MixConfig:
    """The SFT mixture: rejection-sampled reasoning rows plus a non-reasoning source (`rejection.mix`)."""

    non_reasoning_data: Optional[str] = None  # JSONL ({problem, response}); None: a small synthetic set
    num_synthetic: int = 200  # synthetic non-reasoning rows when no file is given
    ratio: float = 3.0  # reasoning rows per non-reasoning row (paper: 600k / 200k)
    seed: int = 0


@dataclass
class RejectionSFTConfig:
    """R1 stage 3: rejection sampling on the reasoning-RL checkpoint (`r1mega.data.rejection`: k per
    prompt, rule-accepted, readability filters, dedupe, <= m per prompt), mixed with non-reasoning
    data, then SFT of the BASE model on the mix."""

    num_prompts: Optional[int] = None  # first N prompts of the RL split; None: all
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)


@dataclass
class R1RecipeConfig(RecipeConfig):
    """`recipe=r1`: four stages in one run directory with a manifest (`r1mega.recipes.r1`)."""

    base: str = "embedded"  # embedded (CPU default) | an HF directory
    stage: Optional[str] = None  # run only this stage (earlier ones must be done in run_dir)
    template: str = "r1"
    cache_dir: str = "runs/cache"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    rl_reasoning: RLStageConfig = field(default_factory=RLStageConfig)
    rejection_sft: RejectionSFTConfig = field(default_factory=RejectionSFTConfig)
    rl_all: RLStageConfig = field(default_factory=RLStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the final table: every stage's model, held out


@dataclass
class TeacherConfig:
    """The distillation teacher. `checkpoint`: a megatron checkpoint root (with `latest`) or step dir,
    e.g. an r1_zero / r1 run's `ckpt`; `hf_dir`: a Hugging Face directory (weights + tokenizer).
    Neither: `embedded` — the embedded base made good at the task by a short cold-start SFT."""

    model: Optional[str] = None  # a conf/model preset; None: the run's top-level `model` is the teacher too
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    parallel: Optional[str] = None  # a conf/parallel preset for the teacher; None: the top-level `parallel`
    parallel_overrides: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    tokenizer_dir: Optional[str] = None  # with `checkpoint`: its tokenizer (default: the embedded base's)
    hf_dir: Optional[str] = None
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)  # embedded teacher only


@dataclass
class DistillRecipeConfig(RecipeConfig):
    """`recipe=distill`: the top-level `model`/`parallel` are the student's; `teacher` has its own."""

    base: str = "embedded"  # the student's starting weights: embedded | an HF directory | random
    stage: Optional[str] = None
    cache_dir: str = "runs/cache"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    num_prompts: Optional[int] = None  # first N prompts of the RL split the teacher answers; None: all
    generate: RejectionConfig = field(default_factory=RejectionConfig)  # k samples, correctness filter, <= m
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    template: str = "r1"  # the prompt form the teacher answers and the student learns


def register_recipe_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="recipe", name="r1_recipe_schema", node=R1RecipeConfig)
    cs.store(group="recipe", name="distill_recipe_schema", node=DistillRecipeConfig)


register_recipe_configs()

__all__: List[str] = ["ColdStartConfig", "DistillRecipeConfig", "MixConfig", "R1RecipeConfig", "RLStageConfig",
                      "RejectionConfig", "RejectionSFTConfig", "RewardModelTermConfig", "SFTStageConfig", "TeacherConfig"]
