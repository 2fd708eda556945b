"""One borrowed GPU, one short check: `dsv3_proxy` trained with the GRPO loss through r1mega's own path.

    tools/gpu_check.sh              # on the GPU machine (installs the carried wheels, then runs this)
    tools/gpu_check.sh --dry-run    # here: the same code on CPU (gloo, fp32, 2 tiny steps, seconds)

It builds `conf/model/dsv3_proxy.yaml` (DeepSeek-V3's structure at 39M parameters: MLA, YaRN, 256
experts with group-limited sigmoid routing, MTP) through `r1mega.trainer.engine.MegatronEngine` at
world size 1 (NCCL, bf16, megatron-core's local spec: `platform=gpu platform.transformer_engine=false`;
no Transformer Engine, apex or vLLM needed), runs optimizer steps of the GRPO objective
(`r1mega.algorithms.grpo_loss` on `vocab_parallel_logprobs`, old and reference log-probs from a
forward pass, random advantages) plus the MTP loss, and prints tokens/s, peak GPU memory
(`torch.cuda.max_memory_allocated`) and the planner's prediction (`r1mega.plan`) for the same model,
layout and batch. Exit status 0 only if every step ran with finite loss and grad norm and the weights moved.

Extra arguments: `--steps`, `--seq-length`, ... (see --help) and Hydra overrides (`model.num_layers=5`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dry run: the GPU path's code on CPU, small enough for a test. GPU: sized to take ~a minute of steps.
DEFAULTS = {
    "gpu": dict(steps=8, warmup=2, micro_batch_size=4, seq_length=4096, microbatches=2),
    "dry": dict(steps=2, warmup=0, micro_batch_size=2, seq_length=32, microbatches=2),
}
PROMPT_FRACTION = 0.25  # the first quarter of each sequence is prompt (no loss), the rest response


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.num_layers=5")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("R1MEGA_GPU_CHECK_DRY_RUN") == "1",
                   help="CPU, gloo, fp32, tiny batch (also R1MEGA_GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--model", default="dsv3_proxy")
    p.add_argument("--steps", type=int, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--microbatches", type=int, help="per optimizer step")
    p.add_argument("--mtp-loss-coef", type=float, default=0.1, help="0: the MTP layer is built but idle (RL default)")
    p.add_argument("--compile", action="store_true", help="let megatron's torch.compile'd kernels compile (default: eager)")
    p.add_argument("--cluster", default="h200", help="planner cluster preset (conf/cluster)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    for k, v in DEFAULTS["dry" if args.dry_run else "gpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def config_overrides(args) -> list[str]:
    plat = ["platform=cpu"] if args.dry_run else [
        # CUDA + NCCL with megatron-core's local spec (no Transformer Engine on the borrowed machine).
        "platform=gpu", "platform.transformer_engine=false", "model.params_dtype=bf16"]
    return [f"model={args.model}", "parallel=single", *plat, "optim.lr=1e-4", *args.overrides]


def grpo_microbatch_loss(logits, batch, algo):
    """The one place the GRPO objective is called: this microbatch's share of the step's loss
    (divided by the step's global normaliser; the engine sums shares, count 0) and its stats."""
    from r1mega.algorithms import grpo_loss, vocab_parallel_logprobs

    import torch

    logp, entropy = vocab_parallel_logprobs(logits, batch["target"])
    loss, _ = grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["resp_mask"], algo,
                        normalizer=batch["normalizer"], ref_logp=batch["ref_logp"], entropy=entropy)
    return loss, torch.tensor(0), {"loss": loss.detach().clone()}


def make_microbatches(args, vocab: int, device, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s = args.micro_batch_size, args.seq_length
    prompt = max(1, int(s * PROMPT_FRACTION))
    out = []
    for _ in range(args.microbatches):
        tokens = torch.randint(0, vocab, (b, s), generator=g)
        resp = torch.zeros(b, s)
        resp[:, prompt - 1 : s - 1] = 1.0  # logits at t predict token t + 1: response tokens prompt..s-1
        out.append(dict(
            tokens=tokens, target=tokens.roll(-1, 1), position_ids=torch.arange(s).expand(b, s).contiguous(),
            resp_mask=resp, loss_mask=resp,
            advantages=torch.randn(b, generator=g),
        ))
    return [{k: v.to(device) for k, v in mb.items()} for mb in out]


def run(args) -> dict:
    import torch

    from r1mega.config import compose
    from r1mega.parallel.state import destroy_distributed, init_distributed

    cfg = compose(config_overrides(args))
    on_gpu = cfg.platform.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run for the CPU path)")
    init_distributed(cfg.parallel, cfg.platform)
    try:
        return _train(args, cfg, on_gpu)
    finally:
        destroy_distributed()


def _train(args, cfg, on_gpu: bool) -> dict:
    import torch

    from r1mega.algorithms import GRPOConfig, loss_normalizer, vocab_parallel_logprobs
    from r1mega.models.params import count_parameters
    from r1mega.trainer.engine import MegatronEngine

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    pc = count_parameters(cfg.model)
    t0 = time.perf_counter()
    engine = MegatronEngine(cfg)
    sync()
    build_s = time.perf_counter() - t0
    built = sum(p.numel() for _, p in engine.named_parameters())
    say(f"model: {cfg.model.name} {pc.summary(cfg.model.name).split(': ', 1)[1]} (+{pc.mtp / 1e6:.2f}M MTP); "
        f"built {built / 1e6:.2f}M parameters in {build_s:.1f} s on {device} ({cfg.model.params_dtype}, "
        f"{cfg.platform.backend}, transformer_engine={cfg.platform.transformer_engine})")
    expected = pc.total + pc.mtp - _expert_bias_numel(cfg.model)
    if built != expected:
        raise RuntimeError(f"built {built} parameters, r1mega.models.params counts {expected}")

    algo = GRPOConfig(kl_coef=0.001)
    mbs = make_microbatches(args, cfg.model.vocab_size, device, seed=cfg.platform.seed)
    normalizer = sum(loss_normalizer(mb["resp_mask"], algo.loss_agg) for mb in mbs)

    def logp_only(logits, batch):
        logp, _ = vocab_parallel_logprobs(logits, batch["target"])
        return logits.sum() * 0.0, torch.tensor(0), {"logp": logp.detach()}

    # Old-policy and reference log-probs: one forward-only pass (the policy has not moved yet).
    sync()
    t0 = time.perf_counter()
    fwd = engine.forward_backward(mbs, logp_only, forward_only=True)
    sync()
    fwd_s = time.perf_counter() - t0
    for mb, m in zip(mbs, fwd):
        mb.update(old_logp=m["logp"], ref_logp=m["logp"], normalizer=normalizer)

    before = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in engine.named_parameters()}  # host: not in the peak
    tokens_per_step = args.microbatches * args.micro_batch_size * args.seq_length
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses, norms = [], [], []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        r = engine.train_step(mbs, lambda logits, b: grpo_microbatch_loss(logits, b, algo), mtp_loss_coef=args.mtp_loss_coef)
        sync()
        dt = time.perf_counter() - t0
        loss = sum(float(m["loss"]) for m in r["metrics"])
        losses.append(loss)
        norms.append(float(r["grad_norm"]))
        if step >= args.warmup:
            times.append(dt)
        say(f"step {step + 1}/{args.warmup + args.steps}{' (warm-up)' if step < args.warmup else ''}: "
            f"loss {loss:+.5f} grad norm {norms[-1]:.4f} {dt:.3f} s, {tokens_per_step / dt:,.0f} tokens/s")
    moved = max((p.detach().float().cpu() - before[n]).abs().max().item() for n, p in engine.named_parameters())
    del before
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    step_s = sorted(times)[len(times) // 2] if times else float("nan")
    result = dict(
        device=str(torch.cuda.get_device_name() if on_gpu else "cpu"), model=cfg.model.name,
        params_dtype=cfg.model.params_dtype, parameters=built, build_s=build_s,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length, microbatches=args.microbatches,
        tokens_per_step=tokens_per_step, median_step_s=step_s, train_tokens_per_s=tokens_per_step / step_s,
        forward_tokens_per_s=tokens_per_step / fwd_s, losses=losses, grad_norms=norms, max_weight_change=moved,
        peak_memory_gb=None if peak is None else peak / 1e9, mtp_loss_coef=args.mtp_loss_coef,
    )
    problems = [f"step {i + 1}: loss {l}, grad norm {g}" for i, (l, g) in enumerate(zip(losses, norms))
                if not (math.isfinite(l) and math.isfinite(g) and g > 0)]
    if not moved > 0:
        problems.append("the optimizer steps did not change the weights")
    result["problems"] = problems
    return result


def _expert_bias_numel(m) -> int:
    """The router's expert bias: a buffer in megatron, counted by `count_parameters` (an HF tensor)."""
    if not (m.num_experts and m.moe_router_enable_expert_bias):
        return 0
    return (m.num_layers - m.first_k_dense_layers + (m.mtp_num_layers or 0)) * m.num_experts


def planner_prediction(args) -> dict:
    """The planner's numbers for the model, layout and batch of this check (training only: rl=false)."""
    from r1mega.plan import compose_plan, plan

    model = [o for o in config_overrides(args) if o.startswith("model")]
    if args.dry_run:
        model = [o for o in model if not o.startswith("model.params_dtype")]
    cfg = compose_plan([*model, f"cluster={args.cluster}", "num_gpus=1", "parallel=single", "layout=given",
                        "rl=false", "recompute=none", f"seq_length={args.seq_length}",
                        f"prompt_length={max(1, int(args.seq_length * PROMPT_FRACTION))}",
                        f"micro_batch_size={args.micro_batch_size}",
                        f"global_batch_size={args.micro_batch_size * args.microbatches}",
                        f"include_mtp={str(args.mtp_loss_coef > 0).lower()}"])
    r = plan(cfg)
    tm, tt = r["train_memory"], r["train_time"]
    tokens = args.micro_batch_size * args.microbatches * args.seq_length
    return dict(cluster=args.cluster, verdict=r.get("verdict"), train_memory_gb=tm["total_gb"],
                train_memory_without_reserve_gb=tm["total_gb"] - tm["reserved_gb"], weights_gb=tm["weights_gb"],
                grads_gb=tm["grads_gb"], optimizer_gb=tm["optimizer_gb"], activations_gb=tm["activations_gb"],
                train_s=tt["train_s"], train_tokens_per_s=tokens / tt["train_s"] if tt["train_s"] else None)


def say(*a) -> None:
    print("gpu_check:", *a, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.compile:
        # megatron wraps small kernels in torch.compile; eager avoids needing a compiler on the borrowed machine.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    t_start = time.perf_counter()
    try:
        result = run(args)
        result["planner"] = planner_prediction(args)
    except Exception as e:  # noqa: BLE001 - report and fail
        import traceback

        traceback.print_exc()
        say(f"FAILED: {type(e).__name__}: {e}")
        return 1
    p = result["planner"]
    say(f"train: {result['train_tokens_per_s']:,.0f} tokens/s (median step {result['median_step_s']:.3f} s for "
        f"{result['tokens_per_step']:,} tokens); forward only: {result['forward_tokens_per_s']:,.0f} tokens/s")
    if result["peak_memory_gb"] is not None:
        say(f"peak memory (torch.cuda.max_memory_allocated): {result['peak_memory_gb']:.2f} GB")
    say(f"planner ({p['cluster']}, TP1 PP1 EP1, recompute=none, bf16): {p['train_tokens_per_s']:,.0f} tokens/s "
        f"(train {p['train_s']:.3f} s/step); memory {p['train_memory_without_reserve_gb']:.2f} GB without the reserve "
        f"(weights {p['weights_gb']:.2f}, grads {p['grads_gb']:.2f}, optimizer {p['optimizer_gb']:.2f}, "
        f"activations {p['activations_gb']:.2f}), {p['train_memory_gb']:.2f} GB with it")
    result["wall_s"] = time.perf_counter() - t_start
    say("RESULT " + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if result["problems"]:
        say("FAILED: " + "; ".join(result["problems"]))
        return 1
    say(f"OK in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
