"""Schema of the `algorithm` group: every knob of the GRPO update (`r1mega.algorithms.grpo`) and its
rollout correction (`r1mega.algorithms.correction`). Plain dataclasses, so composing and validating a
config imports no torch; the defaults in conf/algorithm/grpo.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# `GRPOConfig.loss_agg`: how per-token losses become one number (`r1mega.algorithms.grpo._aggregate`).
LOSS_AGG = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
# `RolloutCorrectionConfig.mode`: the importance weight of the engine-trainer gap (`r1mega.algorithms.correction`).
CORRECTION_MODES = ("none", "tis", "mis_token", "mis_sequence", "geo_mis")


@dataclass
class RolloutCorrectionConfig:
    """`algorithm.rollout_correction`: which importance weight corrects the rollout-trainer gap."""

    mode: str = "none"  # one of CORRECTION_MODES (r1mega.algorithms.correction's docstring)
    tis_cap: float = 2.0  # C of `tis`: w = min(r, C) (verl, slime: 2)
    mis_low: float = 0.5  # the `mis_*` / `geo_mis` modes keep ratios in [mis_low, mis_high]
    mis_high: float = 2.0


@dataclass
class GRPOConfig:
    """Every knob of the GRPO update; defaults are the R1 paper's where it gives one."""

    group_size: int = 16  # G outputs per prompt (R1-Zero: 16)
    clip_eps_low: float = 0.2  # rho >= 1 - eps_low ...
    clip_eps_high: float = 0.2  # ... rho <= 1 + eps_high; DAPO clip-higher: 0.28
    dual_clip_c: Optional[float] = None  # for A < 0 the objective is at least c * A (verl: 3.0); None = off
    kl_coef: float = 0.001  # beta (R1 paper)
    ref_update_optimizer_steps: Optional[int] = 400  # optimizer steps between reference <- policy (R1 paper: 400); None = fixed reference
    loss_agg: str = "seq_mean_token_mean"  # one of LOSS_AGG; paper: mean over tokens, then over outputs
    norm_length: Optional[int] = None  # Dr.GRPO's constant divisor, tokens; None = the rollout's max_response_tokens
    std_normalize: bool = True  # divide advantages by the group std; False = Dr.GRPO
    adv_eps: float = 1e-6  # added to the group std
    ppo_epochs: int = 1  # passes over each rollout batch (R1 paper: one inner epoch)
    num_mini_batches: int = 16  # optimizer steps per rollout batch (R1 paper: 8,192 outputs in 16)
    dynamic_sampling: bool = False  # drop zero-variance groups and refill (DAPO)
    overlong_filter: bool = False  # zero loss weight for truncated outputs (DAPO)
    # Weight of the multi-token-prediction loss (mean MTP NLL over response tokens) added to the update
    # on a model with MTP layers. 0 = off: the MTP layer then never runs in RL and its weights stay as
    # trained. RL frameworks (verl, NeMo-RL) drop MTP: the GRPO objective has no MTP term, and on the
    # policy's own samples it only keeps the MTP head in step with the policy (for speculative decoding).
    mtp_loss_coef: float = 0.0
    # The PPO ratio's denominator pi_old: `trainer` recomputes the sampled tokens' log-probs with the
    # policy before the update (one forward pass); `engine` takes vLLM's own log-probs and skips that
    # pass, so the ratio is against the policy that actually sampled (the engine as behaviour policy,
    # verl's "bypass" mode). `engine` needs recipe.temperature 1 (the engine reports temperature-1 log-probs).
    old_logp_source: str = "trainer"
    # Importance weights for the gap between engine and trainer log-probs (r1mega.algorithms.correction);
    # with old_logp_source=engine the ratio is 1 and they change nothing.
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    # MoE routing replay (r1mega.models.router_replay): `r2` replays the routes of the trainer's own
    # old-policy pass in the update passes; `r3` replays the rollout engine's routes (captured at
    # sampling) in the old-policy and update passes; `auto`: r3 for MoE where the engine's numerics
    # differ from the trainer's (GPU, or another dtype), else none. The reference model routes itself.
    router_replay: str = "auto"  # auto | none | r2 | r3
