"""megatron-core ↔ Hugging Face names and layouts (DeepSeek-V3, Qwen2, Llama), one table per family.

Public API (used by the checkpoint converter and by the rollout weight sync):

    export_plan(model_cfg, parallel_cfg) -> list[PlanEntry]
        Every HF tensor of the model, in the fixed order `iter_hf_tensors` yields them:
        PlanEntry(hf_name, shape, dtype, pp_stage, ep_rank). `pp_stage` is the pipeline stage holding
        it, `ep_rank` the expert-parallel rank holding it (None for non-expert tensors, which every
        EP rank holds). Pure: no communication, no model needed; the same on every rank.

    iter_hf_tensors(chunks, model_cfg) -> Iterator[tuple[str, torch.Tensor]]
        Collective over the whole world: every rank must call it and consume it to the end.
        Yields (hf_name, full tensor) for the whole model in `export_plan` order, on every rank:
        TP shards gathered with fused layouts undone (QKV per query group, [gate; up]), experts
        gathered across EP, layers broadcast from their PP stage. `chunks` is this rank's list of
        model chunks (DDP-wrapped or not). Tensors are in the model's params dtype, on CPU; one
        tensor is alive at a time (the caller may keep references).

    load_hf_tensors(chunks, model_cfg, read) -> int
        Fill this rank's parameters from HF tensors; `read(hf_name) -> torch.Tensor` is called once
        per needed tensor (streamed from safetensors by `hf_io`). Returns the number of elements set.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch


class PlanEntry(NamedTuple):
    hf_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pp_stage: int
    ep_rank: int | None


def export_plan(model_cfg, parallel_cfg) -> list[PlanEntry]:
    raise NotImplementedError


def iter_hf_tensors(chunks, model_cfg) -> Iterator[tuple[str, torch.Tensor]]:
    raise NotImplementedError


def load_hf_tensors(chunks, model_cfg, read: Callable[[str], torch.Tensor]) -> int:
    raise NotImplementedError
