"""The rollout engine interface the trainer codes against, and the train–inference consistency metric."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


@dataclass
class Completion:
    """One sampled continuation. `logprobs[i]` is the log-probability of `token_ids[i]` under the
    engine's raw model distribution (log-softmax of the logits, before temperature / top-p).
    `routed_experts` (MoE models, `generate(..., return_routes=True)`): the engine's routing of the
    whole sequence prompt + token_ids, `[n - 1, num_moe_layers, topk]` (row t: the experts position t
    was routed to; format and coverage in `r1mega.rollout.routes`), else None."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    routed_experts: torch.Tensor | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    completions: list[Completion]  # n of them


def call_seed(*parts: int) -> int:
    """A 31-bit seed for one `generate` call, mixed from e.g. (run seed, step, chunk): distinct
    calls get unrelated streams (a plain `seed + i` would make call i+1 of one run replay call i of
    the next seed)."""
    import hashlib

    digest = hashlib.blake2b(repr(tuple(int(x) for x in parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class RolloutEngine(ABC):
    @abstractmethod
    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
        return_routes: bool = False,
    ) -> list[RequestOutput]:
        """Sample `n` completions per prompt; outputs are in prompt order. With `seed`, every
        (prompt, sample) draw of this call comes from one random stream seeded by it: independent
        across prompts and samples, and the same call with the same seed gives the same outputs.
        Callers pass a different seed per call (`call_seed`). `return_routes` (MoE models): fill each
        completion's `routed_experts`; engines that cannot raise NotImplementedError."""

    @abstractmethod
    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token_ids[i][t] | token_ids[i][:t]) for t = 1..len-1 (len-1 values per sequence)."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (HF name, full tensor) pairs; the iterable is consumed lazily, once. After it returns the
        engine generates with the new weights (no stale caches)."""

    @abstractmethod
    def sleep(self, level: int = 1) -> None:
        """Release GPU memory: level 1 offloads weights to host and drops the KV cache."""

    @abstractmethod
    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-take GPU memory for `tags` ("weights", "kv_cache"; None = all)."""

    @abstractmethod
    def shutdown(self) -> None: ...
