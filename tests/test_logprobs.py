"""Vocab-parallel log-probs and entropy: equal to a plain full-vocabulary softmax in one process and
from TP2 vocab shards, values and gradients."""
from __future__ import annotations

import torch

from r1mega.algorithms import vocab_parallel_logprobs
from tests.distributed import run_distributed

VOCAB, TEMPERATURE = 12, 0.7


def _inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, VOCAB, generator=g) * 2
    target = torch.randint(0, VOCAB, (2, 5), generator=g)
    # Upstream gradients of both outputs, so the backward of each is checked.
    w_logp, w_ent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    return logits, target, w_logp, w_ent


def _reference(logits, target, w_logp, w_ent):
    """Full-vocabulary log_softmax and autograd in float64: independent of the code under test."""
    logits, w_logp, w_ent = (x.double() for x in (logits, w_logp, w_ent))
    logits.requires_grad_()
    logp_all = torch.log_softmax(logits / TEMPERATURE, -1)
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp * w_logp + entropy * w_ent).sum().backward()
    return logp.detach().float(), entropy.detach().float(), logits.grad.float()


def _ours(logits, target, w_logp, w_ent):
    logits = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(logits, target, TEMPERATURE)
    (logp * w_logp + entropy * w_ent).sum().backward()
    return logp.detach(), entropy.detach(), logits.grad


def _tp2_rank():
    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from megatron.core import parallel_state

    cfg = compose(["parallel=tp2", "model=tiny_dense"])
    init_distributed(cfg.parallel, cfg.platform)
    logits, target, w_logp, w_ent = _inputs()
    shard = VOCAB // 2
    rank = parallel_state.get_tensor_model_parallel_rank()
    return _ours(logits[..., rank * shard:(rank + 1) * shard], target, w_logp, w_ent)


def test_single_process_matches_full_softmax():
    ref = _reference(*_inputs())
    for name, a, b in zip(("logp", "entropy", "grad"), _ours(*_inputs()), ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_logp_alone_skips_the_entropy_and_its_gradient():
    """GRPO's loss uses the entropy only as a statistic: the backward of logp alone (entropy's gradient
    None) and `entropy=False` give the same numbers as the full-softmax reference."""
    logits, target, w_logp, _ = _inputs()
    ref_logp, _, ref_grad = _reference(logits, target, w_logp, torch.zeros_like(w_logp))
    x = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(x, target, TEMPERATURE)
    (logp * w_logp).sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, atol=1e-6, rtol=1e-6)
    only, none = vocab_parallel_logprobs(logits, target, TEMPERATURE, entropy=False)
    assert none is None and torch.equal(only, logp.detach())


def test_gradcheck_float64():
    logits, target, *_ = _inputs()
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: vocab_parallel_logprobs(z, target, TEMPERATURE), (logits,))


def test_tp2_shards_equal_one_process():
    inputs = _inputs()
    assert {int(t) < VOCAB // 2 for t in inputs[1].flatten()} == {True, False}  # targets on both ranks
    ref_logp, ref_entropy, ref_grad = _ours(*inputs)  # one process, checked against float64 above
    ranks = run_distributed(_tp2_rank, 2)
    for logp, entropy, _ in ranks:  # every TP rank holds the full per-token values
        torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-6, rtol=1e-6)
    grad = torch.cat([grad for *_, grad in ranks], -1)  # each rank's gradient wrt its own shard
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
