"""Reward-model scores as a reward term: `RewardModelScorer(cfg, checkpoint).score(sequences)`.

The scorer is a frozen `RewardModelEngine` (`r1mega.trainer.reward_model`) loaded through
`CheckpointManager` (any saved layout; megatron reshards on load). `score` packs the token
sequences for the engine's layout (`MegatronEngine.pack`: per-sequence attention boundaries, so a
packed score equals the sequence scored alone), runs megatron's forward-only schedule
(`MegatronEngine.infer`) and reads the value at each sequence's last token.

It is collective, like the reference model: every rank of the model-parallel layout calls `score`
with the same sequences, and every rank gets the same list back (the last pipeline stage's values are
shared). At world size 1 this is simply a call in the main process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from r1mega.data.packing import unpack
from r1mega.trainer.reward_model import RewardModelEngine

NAME = "reward_model"  # the reward term's name in Sample.scores (logged as reward/reward_model)


def _resolve(checkpoint: str | Path, step: Optional[int]) -> tuple[Path, Optional[int]]:
    """A CheckpointManager root (with `latest`), or one of its `step_<N>` directories."""
    path = Path(checkpoint)
    if step is None and path.name.startswith("step_") and path.name[5:].isdigit() and not (path / "latest").exists():
        return path.parent, int(path.name[5:])
    return path, step


class RewardModelScorer:
    """`cfg`: a composed config whose `model` is the RM's architecture (any preset), `parallel` the
    layout megatron's parallel state was initialised with, `platform` the device. `checkpoint`: the
    CheckpointManager root the RM was saved under (latest step, or `step`), or a `step_<N>` dir.
    `weight`: the term's weight in the total reward; `sources`: data sources it applies to (None: all)."""

    name = NAME

    def __init__(self, cfg, checkpoint: str | Path | None = None, step: Optional[int] = None,
                 max_tokens: int = 4096, weight: float = 1.0, sources: Optional[Iterable[str]] = None,
                 engine: Optional[RewardModelEngine] = None):
        from r1mega.checkpoint.manager import CheckpointManager, rng_state, set_rng_state

        self.cfg, self.max_tokens, self.weight = cfg, max_tokens, weight
        self.sources = None if sources is None else set(sources)
        self.step = None
        # Building draws initial weights and loading restores the saver's RNG: keep the caller's.
        rng = rng_state()
        try:
            self.engine = engine if engine is not None else RewardModelEngine(cfg, trainable=False)
            if checkpoint is not None:
                root, step = _resolve(checkpoint, step)
                self.step = CheckpointManager(root).load(self.engine.model, None, step=step)["step"]
        finally:
            set_rng_state(rng)

    def applies_to(self, row: dict, source_key: str = "data_source") -> bool:
        return self.sources is None or row.get(source_key) in self.sources

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One scalar per token-id sequence (prompt + response), in order. Collective."""
        if not sequences:
            return []
        if any(len(s) == 0 for s in sequences):
            raise ValueError("RewardModelScorer.score: empty sequence")
        packed = self.engine.pack([{"tokens": torch.as_tensor(list(s), dtype=torch.long)} for s in sequences],
                                  self.max_tokens, dp_share=False)
        for mb, place in zip(packed.microbatches, packed.placement):
            mb["placement"] = place
        values: list[Optional[float]] = [None] * len(sequences)
        for place, last in zip(packed.placement, self.engine.infer(packed.microbatches, _last_token_values)):
            for (i, _, _), v in zip(place, last.tolist()):
                values[i] = float(v)
        return _from_last_stage(values)

    def close(self) -> None:
        self.engine = None


def _last_token_values(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """[sequences] value at each packed sequence's last token, from the [1, T] per-position values."""
    return torch.stack([seg[-1] for seg in unpack(values.float(), batch["placement"])]).detach()


def _from_last_stage(values: list[Optional[float]]) -> list[float]:
    """Only the last pipeline stage computed values; every rank returns them."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values if None not in values else None)
        values = next((v for v in gathered if v is not None), None)
        if values is None:
            raise RuntimeError("RewardModelScorer: no rank computed the values")
    return values  # type: ignore[return-value]
