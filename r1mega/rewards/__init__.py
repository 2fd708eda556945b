"""Rule-based rewards (R1 paper 2.2.2): math/code accuracy, format, language consistency.

One module per reward kind; `compose` weighs them per data source and grades batches in a
worker pool. The config schemas live in `r1mega.config.reward` (ConfigStore `reward/reward_schema`,
defaults in `conf/reward/*.yaml`); re-exported here for callers of `RewardManager`.
"""
from r1mega.config.reward import RewardConfig, SandboxConfig, SourceConfig, TermConfig
from r1mega.rewards.compose import REWARDS, RewardManager

__all__ = ["REWARDS", "RewardConfig", "RewardManager", "SandboxConfig", "SourceConfig", "TermConfig"]
