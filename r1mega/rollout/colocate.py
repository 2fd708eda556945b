"""Colocation protocol: the rollout engine and megatron take turns with the same GPU memory.

    rollout → engine.sleep(1) → onload grads/optimizer → train → offload grads/optimizer
            → engine.wake_up(["weights"]) → sync → engine.wake_up(["kv_cache"]) → rollout

Weights wake before the KV cache so the sync has room for its buckets before the cache takes the
rest. On CPU sleep/wake are no-ops and the sequence is the same."""
from __future__ import annotations

from typing import Callable

from r1mega.rollout.engine import RolloutEngine
from r1mega.rollout.sync import WeightSync


class Colocation:
    """`engine` is None on ranks without an engine shard (CPU tests: all but rank 0). `offload` and
    `onload` move the trainer's optimizer state and grads off / back onto the GPU (None: kept; the
    GRPO step passes `MegatronEngine.offload(weights=False)` / `MegatronEngine.onload`)."""

    def __init__(
        self,
        engine: RolloutEngine | None,
        sync: WeightSync,
        offload: Callable[[], None] | None = None,
        onload: Callable[[], None] | None = None,
    ):
        self.engine, self.weight_sync, self.offload, self.onload = engine, sync, offload, onload
        self.phase = "rollout"

    def to_training(self) -> None:
        """After a rollout: free the engine's memory and give the trainer back its state."""
        self._expect("rollout")
        if self.engine is not None:
            self.engine.sleep(level=1)
        if self.onload is not None:
            self.onload()
        self.phase = "train"

    def to_rollout(self, chunks) -> None:
        """After an optimizer step: offload trainer state, wake weights, sync, wake the KV cache."""
        self._expect("train")
        if self.offload is not None:
            self.offload()
        if self.engine is not None:
            self.engine.wake_up(["weights"])
        self.weight_sync.sync(chunks, self.engine)
        if self.engine is not None:
            self.engine.wake_up(["kv_cache"])
        self.phase = "rollout"

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise RuntimeError(f"colocation: called in phase {self.phase!r}, expected {phase!r}")
