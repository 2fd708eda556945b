"""Rollout records: what the policy generated at a rollout and the per-token numbers its update used,
one Parquet file per recorded rollout, `<run_dir>/rollouts/step_<NNNNNN>.parquet` (the 1-based rollout
number, the `step` of metrics.jsonl). Open with `pyarrow.parquet.read_table(path)` (or pandas).

One row per sample, in rollout order (the order the update trained them; groups are consecutive):

| column | type | meaning |
| --- | --- | --- |
| step | int32 | rollout number, 1-based |
| sample | int32 | index in the rollout |
| prompt_index | int64 | the prompt's row in the training set (`PromptSource`) |
| group | int32 | the sample's group in the rollout (`sample // group_size`) |
| prompt, response | string | decoded ids (the response as the reward saw it) |
| prompt_ids, response_ids | list<int32> | token ids |
| engine_logp | list<float32> | the rollout engine's log-prob of each response token |
| trainer_logp | list<float32> | pi_old of each response token as the trainer computed it (the ratio's denominator); null with `algorithm.old_logp_source=engine` |
| truncated | bool | stopped at the length limit |
| reward/<term>, reward/total | float64 | each reward term and the weighted total |
| advantage | float64 | the group-normalised advantage it trained with |
| routes, routes_shape | list<int16>, list<int32> | R3 (`algorithm.router_replay=r3`): the engine's routed experts, flattened from `routes_shape` = [prompt + response - 1 tokens, MoE layers, top-k]; null otherwise |

Data parallelism: every rank holds every sample; the trainer log-probs of a sample live on the
last-pipeline-stage ranks of the data-parallel rank that trained it, and are gathered to rank 0,
which writes the one file of the rollout. Routes are recorded when one process trains every sample
with every MoE layer (DP1 and PP1, e.g. the CPU runs); at DP>1 or PP>1 the column is null: each rank
holds only its share's routes, cut to its stage's layers, and they are not gathered (DeepSeek-V3:
58 layers x top-8 per token, more than a host holds).

Bounded disk (`recipe.records`): a file every `every` rollouts; past `max_gb` in all, the oldest
files go. Writes are atomic (temporary file, fsync, rename): a kill leaves whole files only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from r1mega.checkpoint.atomic import fsync, temporary
from r1mega.config.schema import RecordsConfig
from r1mega.parallel.state import data_parallel, gather_object, is_rank0


def path_of(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}.parquet"


class RolloutRecords:
    """Writes the records of a run into `root` (`<run_dir>/rollouts`); `tokenizer` decodes the texts,
    `trainer_logp`: whether the trainer computed pi_old itself (`algorithm.old_logp_source=trainer`)."""

    def __init__(self, root: str | Path, cfg: RecordsConfig, tokenizer, group_size: int, trainer_logp: bool = True):
        self.root, self.cfg, self.tok, self.group_size = Path(root), cfg, tokenizer, group_size
        self.trainer_logp = trainer_logp
        self.reported = False

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def write(self, step: int, samples, parts, minibatches) -> Path | None:
        """Collective when `due(step)`. `samples`: the rollout's `Sample`s; `parts` / `minibatches`:
        its mini-batches as trained (`_split`, this rank's `Packed` shares, after the updates).
        Rank 0 writes the file and returns its path; other ranks return None."""
        if not self.due(step):
            return None
        logp = gather_object(_trainer_logprobs(samples, parts, minibatches) if self.trainer_logp else {})
        if not is_rank0():
            return None
        table = self._table(step, samples, {k: v for part in logp for k, v in part.items()})
        path = _write_atomic(table, path_of(self.root, step))
        self._prune(keep=path)
        if not self.reported:
            self.reported = True
            print(f"rollout records: {path.stat().st_size / 1e3:,.1f} kB per rollout in {self.root} "
                  f"(every {self.cfg.every} rollout(s), oldest removed past {self.cfg.max_gb:g} GB)", flush=True)
        return path

    def _table(self, step: int, samples, trainer_logp: dict[int, torch.Tensor]):
        import pyarrow as pa

        terms = list(samples[0].scores)
        n = len(samples)
        route = [s.routes if _one_trainer() else None for s in samples]
        cols = {
            "step": pa.array([step] * n, pa.int32()),
            "sample": pa.array(range(n), pa.int32()),
            "prompt_index": pa.array([s.row for s in samples], pa.int64()),
            "group": pa.array([i // self.group_size for i in range(n)], pa.int32()),
            "prompt": [self.tok.decode(s.prompt_ids) for s in samples],
            "response": [self.tok.decode(s.response_ids, skip_special_tokens=True) for s in samples],
            "prompt_ids": pa.array([s.prompt_ids for s in samples], pa.list_(pa.int32())),
            "response_ids": pa.array([s.response_ids for s in samples], pa.list_(pa.int32())),
            "engine_logp": pa.array([s.engine_logp for s in samples], pa.list_(pa.float32())),
            "trainer_logp": pa.array([trainer_logp[i].tolist() if i in trainer_logp else None for i in range(n)],
                                     pa.list_(pa.float32())),
            "truncated": pa.array([s.truncated for s in samples], pa.bool_()),
            **{f"reward/{t}": pa.array([s.scores[t] for s in samples], pa.float64()) for t in terms},
            "advantage": pa.array([s.advantage for s in samples], pa.float64()),
            "routes": pa.array([None if r is None else r.reshape(-1).tolist() for r in route], pa.list_(pa.int16())),
            "routes_shape": pa.array([None if r is None else list(r.shape) for r in route], pa.list_(pa.int32())),
        }
        return pa.table(cols)

    def _prune(self, keep: Path) -> None:
        files = sorted(self.root.glob("step_*.parquet"))
        total = sum(f.stat().st_size for f in files)
        for f in files:
            if total <= self.cfg.max_gb * 1e9 or f == keep:
                break
            total -= f.stat().st_size
            f.unlink()


def _trainer_logprobs(samples, parts, minibatches) -> dict[int, torch.Tensor]:
    """{index in `samples`: pi_old of its response tokens ([response tokens], float32)} for the
    samples this rank trained, read from its microbatches' `old_logp` (packed rows, prediction
    coordinates: a sequence placed at [start, start + n), whole or from its last prompt token on
    (`recipe.share_prompts`), has its r response tokens' log-probs at [start + n - 1 - r, start + n - 1))."""
    index = {id(s): k for k, s in enumerate(samples)}
    out = {}
    for part, packed in zip(parts, minibatches, strict=True):
        for mb, place in zip(packed.microbatches, packed.placement):
            if "old_logp" not in mb:
                continue  # not the last pipeline stage
            row = mb["old_logp"].reshape(-1)
            for i, start, n in place:
                if i >= 0:
                    s = part[i]
                    out[index[id(s)]] = row[start + n - 1 - len(s.response_ids): start + n - 1].float()
    return out


def _one_trainer() -> bool:
    """Whether this process trains every sample with every layer (DP1, PP1): then it holds each
    sample's full route tensor; otherwise each rank has its share's, cut to its stage's layers."""
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    return data_parallel()[1] == 1 and pp == 1


def _write_atomic(table, path: Path) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    pq.write_table(table, tmp)
    fsync(tmp)
    os.replace(tmp, path)
    return path


def read(run_dir: str | Path, step: int):
    """The record of rollout `step` (1-based) of the run in `run_dir`, a pyarrow Table. Raises
    FileNotFoundError naming the file and the steps that were recorded."""
    import pyarrow.parquet as pq

    path = path_of(Path(run_dir) / "rollouts", step)
    if not path.is_file():
        have = sorted(int(p.stem[5:]) for p in path.parent.glob("step_*.parquet"))
        raise FileNotFoundError(f"{path}: no record of rollout {step} (recorded: {have or 'none'}; recipe.records.every)")
    return pq.read_table(path)
