"""A sequence-scoring reward model on megatron-core: the policy architecture with a scalar value head.

Design: `RewardGPTModel` is a megatron `GPTModel` subclass. `build_reward_model` builds exactly the
policy's model with `r1mega.models.build.build_model` (same spec, CPU adaptation, expert-DP marking,
any preset: dense, MLA + MoE) and turns it into a `RewardGPTModel`, whose only differences are a
`value_head` (`Linear(hidden, 1)`) on the last pipeline stage and a `_postprocess` that returns the
head's value at every position (`[b, s]`) instead of LM logits. Why a subclass and not a wrapper
module or a second "post_process=False" model:
- megatron's schedules, DDP, `finalize_model_grads` and the PP tied-embedding sync look up
  `set_input_tensor`, `pre_process`, `share_embeddings_and_output_weights`,
  `shared_embedding_or_output_weight()` on the unwrapped model: a subclass keeps all of them, so
  `MegatronEngine.forward_backward` runs the RM under every TP / PP / EP / VPP layout unchanged;
- the decoder (with its final norm on the last stage) is the policy's, so the checkpoint keeps the
  policy's keys plus `value_head.{weight,bias}`: `dist_checkpointing` reshards it like any policy
  checkpoint, and `init_from_policy` starts an RM from a policy (SFT) checkpoint;
- the LM head stays (it is the tied embedding copy PP needs). When it is untied it is unused, so it is
  frozen: no gradient buffer, no optimizer state, still in the checkpoint.

Values come out per position; the caller reads each sequence's last token (padded rows: `last_index`;
packed rows: the `placement` of `r1mega.data.packing`). Under TP the head runs replicated on every TP
rank: with sequence parallelism the final hidden states are all-gathered first, with a backward that
only splits (every TP rank computes the same full-sequence gradient, so a reduce-scatter would count
it TP times); without SP the hidden states are already replicated. Context parallelism is not
supported (a sequence's last token would live on one CP rank).

Training: `pair_microbatches` lays (chosen, rejected) pairs out as padded microbatches (right padding;
the last real token only attends to its own prefix, so padding cannot change it) and
`bradley_terry_loss` is the `loss_fn` for `MegatronEngine` (`-log sigmoid(r_chosen - r_rejected)`,
mean over pairs). `RewardModelEngine(cfg)` is a `MegatronEngine` whose chunks are reward models.
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from omegaconf import DictConfig, OmegaConf

from r1mega.models.build import build_model
from r1mega.trainer.engine import MegatronEngine

VALUE_HEAD = "value_head"


class RewardGPTModel(GPTModel):
    """`GPTModel` whose last stage returns one scalar per position (`[b, s]`) from `value_head`."""

    def init_value_head(self, seed: int) -> None:
        """Adds the head on the last stage. Its own generator gives every TP rank (and every layout)
        the same initial head; std 1/sqrt(hidden + 1) as in common RM heads."""
        if not self.post_process:
            return
        hidden = self.config.hidden_size
        head = torch.nn.Linear(hidden, 1, bias=True, dtype=self.config.params_dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, hidden, generator=g) / math.sqrt(hidden + 1))
            head.bias.zero_()
        self.value_head = head.to(self.output_layer.weight.device if self.output_layer.weight is not None
                                  else next(self.parameters()).device)
        if not self.share_embeddings_and_output_weights:
            self.output_layer.weight.requires_grad_(False)  # unused; kept for the checkpoint layout

    def _postprocess(self, hidden_states, *args, **kwargs):
        if not self.post_process:
            return hidden_states
        if self.config.sequence_parallel:
            # [s/tp, b, h] -> [s, b, h]; backward: this rank's slice of an identical full gradient.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp
            )
        values = self.value_head(hidden_states).squeeze(-1)  # [s, b]
        return values.transpose(0, 1).contiguous()  # [b, s]


def _without_mtp(m):
    """The RM has no multi-token prediction (it predicts no tokens)."""
    if not getattr(m, "mtp_num_layers", 0):
        return m
    if isinstance(m, DictConfig):
        m = OmegaConf.create(OmegaConf.to_container(m))
    else:
        m = deepcopy(m)
    m.mtp_num_layers = 0
    return m


def build_reward_model(m, par, plat, vp_stage: int | None = None) -> RewardGPTModel:
    """This rank's reward model (its pipeline stage): the policy's `build_model` + a value head."""
    if par.context_parallel_size != 1:
        raise ValueError("reward model: context parallelism is not supported (context_parallel_size must be 1)")
    model = build_model(_without_mtp(m), par, plat, vp_stage=vp_stage)
    model.__class__ = RewardGPTModel  # a subclass that only adds the head and overrides _postprocess
    model.init_value_head(seed=plat.seed)
    return model


class RewardModelEngine(MegatronEngine):
    """A `MegatronEngine` (DDP + megatron optimizer + schedules) over reward-model chunks.
    `trainable=False` gives a frozen scorer."""

    def __init__(self, cfg, trainable: bool = True):
        super().__init__(cfg, trainable, build_fn=build_reward_model)


# -- data and loss ------------------------------------------------------------------------------------
def pair_microbatches(
    pairs: list[tuple[list[int], list[int]]],
    pairs_per_microbatch: int,
    pad_to_multiple: int = 1,
    pad_id: int = 0,
) -> list[dict]:
    """(chosen, rejected) token lists -> microbatches of `[2p, S]` rows: chosen rows `0..p-1`, their
    rejected partners at `p..2p-1`, right-padded to one S for all microbatches (pipeline schedules
    need one shape). `last_index[r]`: the position of row r's last real token."""
    if not pairs or len(pairs) % pairs_per_microbatch:
        raise ValueError(f"{len(pairs)} pairs do not split into microbatches of {pairs_per_microbatch}")
    longest = max(len(s) for pair in pairs for s in pair)
    S = -(-longest // pad_to_multiple) * pad_to_multiple
    out = []
    for k in range(0, len(pairs), pairs_per_microbatch):
        chunk = pairs[k:k + pairs_per_microbatch]
        rows = [c for c, _ in chunk] + [r for _, r in chunk]
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty sequence in a preference pair")
        tokens = torch.full((len(rows), S), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        out.append(dict(
            tokens=tokens,
            position_ids=torch.arange(S).expand(len(rows), S).contiguous(),
            last_index=torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
        ))
    return out


def last_token_values(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """`[b, s]` per-position values -> `[b]` at each row's last real token."""
    return values.gather(1, last_index.to(values.device)[:, None]).squeeze(1)


def bradley_terry_loss(values: torch.Tensor, batch: dict):
    """`loss_fn` for `MegatronEngine.forward_backward` on `pair_microbatches`: summed
    `-log sigmoid(r_chosen - r_rejected)` over the microbatch's pairs, divided by megatron by the
    number of pairs (and microbatches)."""
    r = last_token_values(values.float(), batch["last_index"])
    p = r.shape[0] // 2
    margin = r[:p] - r[p:]
    loss = -torch.nn.functional.logsigmoid(margin).sum()
    metrics = {
        "loss_sum": loss.detach().clone(),
        "correct": (margin > 0).sum().detach().float(),
        "margin_sum": margin.sum().detach(),
        "pairs": torch.tensor(float(p)),
    }
    return loss, torch.tensor(p), metrics


def summarize(metrics: list[dict]) -> dict:
    """Pair-weighted loss / accuracy / margin from the last stage's per-microbatch metrics ({} elsewhere)."""
    pairs = sum(float(m["pairs"]) for m in metrics or [])
    if not pairs:
        return {}
    return {
        "loss": sum(float(m["loss_sum"]) for m in metrics) / pairs,
        "accuracy": sum(float(m["correct"]) for m in metrics) / pairs,
        "margin": sum(float(m["margin_sum"]) for m in metrics) / pairs,
    }


# -- initialisation from a policy checkpoint --------------------------------------------------------------
def init_from_policy(chunks, path) -> None:
    """Loads a policy's megatron dist checkpoint directory (e.g. `CheckpointManager(root).path(step)`)
    into the reward model's trunk (and its LM head); the value head keeps its initialisation."""
    from megatron.core import dist_checkpointing

    from r1mega.checkpoint.distributed import keyed_modules, model_sharded_state_dict

    sd = model_sharded_state_dict(chunks)
    sd = {k: {n: t for n, t in v.items() if not n.startswith(VALUE_HEAD + ".")} for k, v in sd.items()}
    loaded = dist_checkpointing.load(sd, str(path))
    for key, module in keyed_modules(chunks):
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        missing = [n for n in missing if not n.startswith(VALUE_HEAD + ".")]
        if missing or unexpected:
            raise RuntimeError(f"init_from_policy: missing {missing}, unexpected {unexpected}")
