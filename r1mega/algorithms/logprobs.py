"""Log-probabilities of target tokens and entropy from vocab-sharded logits.

Under tensor parallelism each rank holds logits `[..., V/tp]` for its slice of the vocabulary
(megatron GPTModel without labels returns `[b, s, V/tp]`). The full softmax is never gathered:
like megatron-core's `vocab_parallel_cross_entropy` we all-reduce the max, then (in one packed
all-reduce) the sum of exp, the sum of exp * logit and the target's logit over the TP group.

megatron's function is not reused: it overwrites its input in place and returns only the loss,
so entropy would need a second pass with its own all-reduces and a copy of the logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility


def _tp_group():
    """megatron's TP group, or None in a single process without parallel state."""
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return parallel_state.get_tensor_model_parallel_group()
    return None


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, with_entropy: bool):
        local_vocab = logits.size(-1)
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(local_vocab, rank, world)

        logit_max = logits.amax(-1)
        if group is not None:
            dist.all_reduce(logit_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logit_max.unsqueeze(-1)
        exp = shifted.exp()
        in_shard = (target >= start) & (target < end)
        local_target = (target - start).clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * in_shard
        # vecdot: sum(exp * logit) without a [.., V] temporary.
        sum_exp_logit = torch.linalg.vecdot(exp, shifted) if with_entropy else torch.zeros_like(target_logit)
        stats = torch.stack([exp.sum(-1), sum_exp_logit, target_logit])
        if group is not None:
            dist.all_reduce(stats, group=group)
        sum_exp, sum_exp_logit, target_logit = stats

        log_z = sum_exp.log()  # of the shifted logits; logp and entropy are shift-invariant
        mean_logit = sum_exp_logit / sum_exp  # E_p[logit], shifted
        logp = target_logit - log_z
        entropy = log_z - mean_logit if with_entropy else None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(shifted, log_z, mean_logit, local_target, in_shard)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        # d logp / dz_k = 1[k = target] - p_k;  d H / dz_k = -p_k (z_k - E_p[z]).
        # Both need only global scalars per token, so the local shard's gradient is local: no
        # collective here (the output layer's backward all-reduces the hidden-state gradient).
        # Shifted logits (max 0) keep p and z - E_p[z] accurate in fp32. An output used by no loss
        # (the entropy, a statistic in GRPO) has no gradient here: None, and no pass over the vocabulary.
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        shifted, log_z, mean_logit, local_target, in_shard = ctx.saved_tensors
        grad = (shifted - log_z.unsqueeze(-1)).exp_()  # p
        if grad_entropy is None:
            grad.mul_(-grad_logp.unsqueeze(-1))
        else:
            scale = shifted - mean_logit.unsqueeze(-1)
            scale.mul_(grad_entropy.unsqueeze(-1))
            if grad_logp is not None:
                scale.add_(grad_logp.unsqueeze(-1))
            grad.mul_(scale).neg_()
        if grad_logp is not None:
            grad.scatter_add_(-1, local_target.unsqueeze(-1), (grad_logp * in_shard).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi(target), entropy of pi), each `[...]`, for `logits` `[..., V/tp]` (this rank's vocab
    shard, megatron's TP group) and `target` `[...]` token ids in the full vocabulary.

    pi = softmax(logits / temperature): pass the sampling temperature so the log-probs match the
    rollout's. Computed in fp32 (or fp64 if given), differentiable in both outputs. `entropy=False`
    skips it (None in its place: one pass over the vocabulary less). Positions whose target lies
    outside [0, V) give meaningless values: mask them.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return _VocabParallelLogprobEntropy.apply(logits, target, _tp_group(), entropy)
