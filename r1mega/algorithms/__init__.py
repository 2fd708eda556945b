"""GRPO (R1 paper 2.2.1): group advantages, the clipped objective with k3 KL, the rollout correction
(importance weights for the engine-trainer log-prob gap), and vocab-parallel log-probs.
`conf/algorithm/grpo.yaml` holds the defaults (schema `algorithm/grpo_schema`)."""
from r1mega.algorithms.advantages import group_advantages, overlong_filter, zero_variance_groups
from r1mega.algorithms.correction import (RolloutCorrectionConfig, reduce_correction_stats, rollout_correction_stats,
                                          rollout_is_weight)
from r1mega.algorithms.grpo import LOSS_AGG, GRPOConfig, grpo_loss, loss_normalizer, reduce_stats, register_configs
from r1mega.algorithms.logprobs import vocab_parallel_logprobs

register_configs()

__all__ = ["LOSS_AGG", "GRPOConfig", "RolloutCorrectionConfig", "group_advantages", "grpo_loss", "loss_normalizer",
           "overlong_filter", "reduce_correction_stats", "reduce_stats", "register_configs", "rollout_correction_stats",
           "rollout_is_weight", "vocab_parallel_logprobs", "zero_variance_groups"]
