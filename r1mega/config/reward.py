"""Schema of the `reward` group: the weighted rule-reward terms of each data source
(`r1mega.rewards.compose.RewardManager`) and the sandbox that runs graded code (`r1mega.rewards.sandbox`).
Plain dataclasses, so composing and validating a config imports none of the graders (math-verify);
the defaults in conf/reward/*.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# `SandboxConfig.isolation`: the levels of `r1mega.rewards.sandbox` (its module docstring).
ISOLATIONS = ("auto", "bwrap", "namespace", "audit")


@dataclass
class SandboxConfig:
    """`reward.sandbox`: limits and isolation of each run of graded code (`r1mega.rewards.sandbox.run_python`)."""

    cpu_s: int = 2  # per test run
    wall_s: float = 4.0  # per test run, includes interpreter start-up
    memory_mb: int = 1024  # RLIMIT_AS
    file_mb: int = 8  # RLIMIT_FSIZE; with bwrap also the size of the private /tmp and of the work dir
    nproc: int = 16  # RLIMIT_NPROC: per namespace with `unshare`/bwrap, per uid without
    output_kb: int = 256  # stdout beyond this fails the run
    # auto | bwrap | namespace | audit: auto = bwrap, and an error where it does not run; namespace and
    # audit let the program read the host's world-readable files (r1mega.rewards.sandbox's docstring)
    isolation: str = "auto"
    audit_hook: bool = True  # the interpreter-level layer; off only to test the kernel layers alone
    python: str = ""  # interpreter for untrusted code; "" = this one, or a system one nobody can run


@dataclass
class TermConfig:
    name: str = MISSING  # a key of r1mega.rewards.compose.REWARDS
    weight: float = 1.0
    params: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward function


@dataclass
class SourceConfig:
    terms: List[TermConfig] = field(default_factory=list)  # summed with their weights


@dataclass
class RewardConfig:
    """The `reward` group: which weighted terms score each data source, and how grading runs."""

    sources: Dict[str, SourceConfig] = field(default_factory=dict)  # data_source -> its reward terms
    source_key: str = "data_source"  # the row field that picks the terms
    default_source: Optional[str] = "default"  # terms for sources without an entry; None = error
    workers: int = 2  # grading processes; 0 grades inline (no parent-enforced timeout)
    timeout_s: float = 10.0  # wall-clock per term, enforced by the parent; code adds wall_s per test
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
