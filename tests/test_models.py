"""Model presets: analytic parameter counts (checked against built tiny models) and a training step."""
from __future__ import annotations

import pytest
import torch

from r1mega.config import compose
from r1mega.models.params import count_parameters
from tests.distributed import run_distributed


def test_deepseek_v3_671b_is_671b_total_37b_active():
    # DeepSeek-V3 technical report (arXiv:2412.19437), §1: "671B total parameters with 37B activated
    # for each token"; the 14B MTP module of the HF checkpoint (685B) is not part of the 671B.
    p = count_parameters(compose(["model=deepseek_v3_671b"]).model)
    assert abs(p.total / 671e9 - 1) <= 0.01
    # 37.55B counting every weight a token touches; 36.63B without the input-embedding lookup.
    # "37B" is given to two figures: both round to it within 1.5%.
    assert round((p.active - p.embedding / 2) / 1e9) == 37
    assert abs(p.active / 37e9 - 1) <= 0.015
    # HF README: 685B = 671B main model + 14B MTP module; the checkpoint's MTP layer stores its own
    # copies of the embedding and output head, which r1mega shares with the main model.
    assert abs((p.mtp + p.embedding) / 14e9 - 1) <= 0.05


def _build_and_train(overrides: list[str], rows: int, steps: int) -> dict:
    """Build from `overrides`, count this rank's parameters (+ the expert-bias buffers), and take
    `steps` Adam steps on one fixed batch of `rows` x 32 tokens through megatron's labels path
    (its LM loss, plus its MTP loss with MTP)."""
    from megatron.core import parallel_state as ps

    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([*overrides, "optim.lr=1e-3"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    module = engine.model[0].module
    numel = sum(p.numel() for p in module.parameters())
    # The aux-loss-free expert bias is a buffer in megatron and a tensor in the HF checkpoint.
    numel += sum(b.numel() for n, b in module.named_buffers() if n.endswith("expert_bias"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, 32), generator=g)
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), position_ids=torch.arange(32).expand(rows, 32))

    def loss_fn(per_token_loss, b):
        return per_token_loss.sum(), torch.tensor(per_token_loss.numel()), {"loss": per_token_loss.mean().detach()}

    losses = [float(engine.train_step([batch], loss_fn, with_labels=True)["metrics"][0]["loss"]) for _ in range(steps)]
    return {"numel": numel, "losses": losses, "ep": ps.get_expert_model_parallel_world_size()}


@pytest.mark.parametrize("model", ["tiny_moe", "tiny_dense"])
def test_tiny_model_builds_to_its_analytic_size_and_learns(model):
    (r,) = run_distributed(_build_and_train, 1, [f"model={model}"], 4, 10)
    assert r["numel"] == count_parameters(compose([f"model={model}"]).model).total
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    # Ten Adam steps on one fixed batch must fit it: the loss falls well below its start.
    assert r["losses"][-1] < 0.8 * r["losses"][0], r["losses"]


# What `dsv3_proxy` may shrink; every other field must equal deepseek_v3_671b's (the preset's header).
PROXY_SHRUNK = {"name", "hidden_size", "num_attention_heads", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "ffn_hidden_size", "num_layers", "vocab_size", "params_dtype"}


def test_dsv3_proxy_keeps_every_structural_choice_of_deepseek_v3():
    from omegaconf import OmegaConf

    proxy = OmegaConf.to_container(compose(["model=dsv3_proxy"]).model)
    full = OmegaConf.to_container(compose(["model=deepseek_v3_671b"]).model)
    assert {k for k in full if proxy[k] != full[k]} <= PROXY_SHRUNK
    # Shrunk in proportion where DeepSeek-V3 has a proportion: one shared expert of a routed expert's
    # width, dense FFN = 9 x expert width; and at least one MoE layer after the 3 dense ones.
    p = compose(["model=dsv3_proxy"]).model
    assert p.moe_shared_expert_intermediate_size == p.moe_ffn_hidden_size and p.ffn_hidden_size == 9 * p.moe_ffn_hidden_size
    assert p.num_layers > p.first_k_dense_layers == 3 and p.mtp_num_layers == 1
    c = count_parameters(p)
    assert c.total + c.mtp < 50e6, "the proxy must stay CPU-sized"


@pytest.mark.parametrize("parallel", ["single", "ep2"])
def test_dsv3_proxy_builds_to_its_analytic_size_and_trains(parallel):
    """The proxy (256 experts, group-limited routing, YaRN MLA, MTP) builds and trains at 1 process
    and EP2; each rank holds the analytic count (main model + MTP) less the other EP rank's experts."""
    world = 1 if parallel == "single" else 2
    results = run_distributed(_build_and_train, world, ["model=dsv3_proxy", f"parallel={parallel}"], 2, 4 if world == 1 else 2)
    m = compose(["model=dsv3_proxy"]).model
    c = count_parameters(m)
    moe_layers = m.num_layers - m.first_k_dense_layers + m.mtp_num_layers
    for r in results:
        others = (r["ep"] - 1) * moe_layers * (m.num_experts // r["ep"]) * c.expert
        assert r["numel"] == c.total + c.mtp - others
        assert all(torch.isfinite(torch.tensor(r["losses"])))
    if world == 1:
        assert results[0]["losses"][-1] < 0.9 * results[0]["losses"][0], results[0]["losses"]


# The R1-Zero loop on the proxy through the CLI (as tests/test_r1_zero.py runs it): the cheapest honest
# base is a 2-step pretraining (the loop's mechanics, not learning, are under test here).
PROXY_R1_ZERO = [
    "recipe=r1_zero", "model=dsv3_proxy", "recipe.pretrain.steps=2", "recipe.pretrain.batch_size=16",
    "recipe.pretrain.num_docs=500", "recipe.pretrain.tokenizer_docs=500", "data.arithmetic.num_heldout=16",
    "recipe.prompts_per_rollout=4", "algorithm.group_size=4", "recipe.eval.k=2", "optim.lr=1e-3",
    "recipe.rollouts=2", "recipe.save_every=2", "recipe.wandb=false", "algorithm.mtp_loss_coef=0.1",
]


@pytest.mark.parametrize("parallel", ["single", "ep2"])
def test_dsv3_proxy_r1_zero_two_rollouts(parallel, tmp_path, cache_dir):
    import json
    import math
    import subprocess
    import sys

    from tests.cli import cli_env

    args = [*PROXY_R1_ZERO, f"parallel={parallel}", f"run_dir={tmp_path / 'run'}", f"recipe.cache_dir={cache_dir}"]
    if parallel == "single":
        cmd = [sys.executable, "-m", "r1mega", *args]
    else:
        from r1mega.parallel.state import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "-m", "r1mega", *args]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "r1_zero_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k, v in r.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), f"step {r['step']}: {k}={v!r}"
    last = rows[-1]
    assert last["loss/ref_kl"] > 1e-6, last  # the policy moved ...
    assert last["logprob_gap/max"] < 1e-3, last  # ... and vLLM (YaRN, 256 experts) samples with the synced weights
    assert "moe/load_max_over_mean/layer3" in last


RECOMPUTE = {
    "none": [],
    "full_uniform": ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"],
    "full_block": ["parallel.recompute_granularity=full", "parallel.recompute_method=block", "parallel.recompute_num_layers=2"],
    "selective": ["parallel.recompute_granularity=selective"],
}


def _train_with_recompute(model: str) -> dict:
    from r1mega.parallel.state import init_distributed, seed_everything
    from r1mega.trainer.engine import MegatronEngine

    out = {}
    for i, (name, overrides) in enumerate(RECOMPUTE.items()):
        cfg = compose([f"model={model}", "optim.lr=1e-3", *overrides])
        if i == 0:
            init_distributed(cfg.parallel, cfg.platform)
        seed_everything(cfg.platform.seed, on_cpu=True)  # the same initial weights for every variant
        engine = MegatronEngine(cfg)
        assert engine.model[0].module.config.recompute_granularity == cfg.parallel.recompute_granularity
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g)
        batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), position_ids=torch.arange(32).expand(2, 32))

        def loss_fn(per_token_loss, b):
            return per_token_loss.sum(), torch.tensor(per_token_loss.numel()), {"loss": per_token_loss.mean().detach()}

        step = engine.train_step([batch], loss_fn, with_labels=True)  # grads enter the updated weights
        out[name] = {"losses": [float(step["metrics"][0]["loss"])], "grad_norms": [float(step["grad_norm"])],
                     "params": {n: p.detach().clone() for n, p in engine.named_parameters()}}
    return out


def test_activation_recompute_trains_to_the_same_loss_and_grads():
    # parallel.recompute_* reach megatron's TransformerConfig; recomputing activations in backward
    # (megatron's CheckpointFunction, patched for CPU in r1mega.platform.cpu) changes no number.
    (r,) = run_distributed(_train_with_recompute, 1, "tiny_moe")
    ref = r["none"]
    for name in ("full_uniform", "full_block", "selective"):
        assert r[name]["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=1e-6), name
        assert r[name]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-6, abs=1e-6), name
        for n, p in ref["params"].items():
            torch.testing.assert_close(r[name]["params"][n], p, rtol=1e-6, atol=1e-6, msg=f"{name}: {n}")


def _packed_attention_both_ways(overrides: list[str]) -> dict:
    """Logits and grads of one packed microbatch (3 sequences + padding) through the CPU core attention's
    per-sequence path and through megatron's local kernel (whole-row scores, block-diagonal mask)."""
    from r1mega.data.packing import pack
    from r1mega.parallel.state import init_distributed
    from r1mega.platform import cpu
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([*overrides, "parallel.use_distributed_optimizer=false"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    g = torch.Generator().manual_seed(0)
    samples = [{"tokens": torch.randint(0, cfg.model.vocab_size, (n,), generator=g)} for n in (7, 12, 6)]
    (mb,) = pack(samples, 32, pad_to_multiple=8).microbatches
    core = [m for m in engine.model[0].modules() if hasattr(m, "_causal_segments")]
    out = {"segments": core[0]._causal_segments(torch.zeros(32, 1), mb["attention_mask"], None, None)}
    # vLLM's generation runs without the platform's CUDA-to-CPU function mode, which is back after it.
    from torch.overrides import _get_current_function_mode

    with cpu.without_cuda_rewrite():
        out["mode_inside"] = _get_current_function_mode()
    out["mode_after"] = type(_get_current_function_mode()).__name__
    for way in ("per_sequence", "local"):
        if way == "local":
            for m in core:
                m._causal_segments = lambda *a: None
        captured = []

        def loss_fn(output, batch):
            captured.append(output.detach().clone())
            return (output.float() ** 2).mean(), torch.tensor(1), {}

        for c in engine.model:
            c.zero_grad_buffer()
        engine.forward_backward([mb], loss_fn)
        grads = {n: p.main_grad.clone() for n, p in engine.named_parameters()}
        out[way] = (captured[0], grads)
    return out


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe"])  # GQA; MLA (value head dim != query's)
def test_cpu_per_sequence_attention_equals_the_local_kernel(model):
    (r,) = run_distributed(_packed_attention_both_ways, 1, [f"model={model}"])
    assert r["segments"] == [(0, 7, 0, 0), (7, 19, 7, 7), (19, 25, 19, 19), (25, 32, 25, 25)]  # 3 + padding
    assert r["mode_inside"] is None and r["mode_after"] == "_CudaToCpu"
    (logits, grads), (ref_logits, ref_grads) = r["per_sequence"], r["local"]
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


def test_cpu_segment_batches_equal_dense_masked_attention():
    """The CPU attention's batched segments (similar lengths padded into one SDPA call per bucket,
    shared prompts ahead of their outputs) give the dense masked attention's output and gradients
    (float64, GQA, value dim != key dim): plain sequences of several lengths, two shared-prompt groups
    and a trailing padding segment, in causal and masked buckets."""
    from r1mega.data.packing import shared_prefix_mask
    from r1mega.platform.cpu import _SegmentBatches, attend_segments

    segments, pos = [], 0
    for prompt, outputs in [(5, [3, 9, 1]), (0, [7]), (2, [4, 4]), (0, [12]), (0, [6])]:
        start = pos
        if prompt:
            segments.append((pos, pos + prompt, pos, pos))
            pos += prompt
        for n in outputs:
            segments.append((pos, pos + n, start, start + prompt))
            pos += n
    batches = _SegmentBatches(segments)
    masks = [m for *_, m in batches.buckets]
    assert len(masks) > 2 and None in masks and any(m is not None for m in masks)
    assert len(set(batches.rows.tolist())) == pos  # each token its own output row
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(pos, h, d, dtype=torch.float64, generator=g, requires_grad=True)
               for h, d in ((4, 16), (2, 16), (2, 8)))
    out = attend_segments(q, k, v, batches, enable_gqa=True)
    allowed = ~shared_prefix_mask(segments, pos)[0, 0]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=allowed, enable_gqa=True)
    ref = ref[0].transpose(0, 1).reshape(pos, -1)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    grads, ref_grads = (torch.autograd.grad((x * w).sum(), (q, k, v)) for x in (out, ref))
    assert (out - ref).abs().max().item() < 1e-12
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max().item() < 1e-12

def test_cpu_swiglu_backward_equals_autograd():
    """platform.cpu's SwiGLU backward (both halves of the gradient written into one buffer), through
    megatron's SwiGLUFunction as the MLP calls it on CPU, against autograd of silu(a) * b (float64)."""
    from megatron.core.fusions import fused_bias_swiglu

    from r1mega.platform import cpu

    cpu._swiglu_backward_in_place()
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 2, 24, dtype=torch.float64, generator=g, requires_grad=True)
    grad_out = torch.randn(7, 2, 12, dtype=torch.float64, generator=g)
    with torch._dynamo.config.patch(disable=True):  # megatron's swiglu is a torch.compile'd function
        out = fused_bias_swiglu.bias_swiglu_impl(y, None)
    (grad,) = torch.autograd.grad(out, y, grad_out)
    a, b = y.detach().clone().requires_grad_().chunk(2, -1)
    ref_out = torch.nn.functional.silu(a) * b
    (ref_grad,) = torch.autograd.grad(ref_out, a._base, grad_out)
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-12)
