"""GRPO (R1 paper 2.2.1): group advantages, the clipped objective with k3 KL, the rollout correction
(importance weights for the engine-trainer log-prob gap), and vocab-parallel log-probs.
The config schemas live in `r1mega.config.algorithm` (ConfigStore `algorithm/grpo_schema`, defaults in
`conf/algorithm/grpo.yaml`); re-exported here for callers of the loss."""
from r1mega.algorithms.advantages import group_advantages, zero_variance_groups
from r1mega.algorithms.correction import reduce_correction_stats, rollout_correction_stats, rollout_is_weight
from r1mega.algorithms.grpo import grpo_loss, loss_normalizer, reduce_stats
from r1mega.algorithms.logprobs import vocab_parallel_logprobs
from r1mega.config.algorithm import LOSS_AGG, GRPOConfig, RolloutCorrectionConfig

__all__ = ["LOSS_AGG", "GRPOConfig", "RolloutCorrectionConfig", "group_advantages", "grpo_loss", "loss_normalizer",
           "reduce_correction_stats", "reduce_stats", "rollout_correction_stats",
           "rollout_is_weight", "vocab_parallel_logprobs", "zero_variance_groups"]
