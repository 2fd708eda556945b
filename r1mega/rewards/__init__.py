"""Rule-based rewards (R1 paper 2.2.2): math/code accuracy, format, language consistency.

One module per reward kind; `compose` weighs them per data source and grades batches in a
worker pool. `conf/reward/*.yaml` hold the defaults (schema `reward/reward_schema`).
"""
from r1mega.rewards.compose import (REWARDS, RewardConfig, RewardManager, SourceConfig, TermConfig,
                                    register_configs)
from r1mega.rewards.sandbox import SandboxConfig

register_configs()

__all__ = ["REWARDS", "RewardConfig", "RewardManager", "SandboxConfig", "SourceConfig", "TermConfig",
           "register_configs"]
