"""Train–inference consistency of an MoE policy under routing replay none / r2 / r3 (issue #16), with
the engine in bfloat16 and the trainer in fp32: one invocation prints a table, a row per mode.

    python tools/bench/consistency.py                          # tiny_moe, r1_zero at small sizes, ~2.5 min on 2 cores
    python tools/bench/consistency.py --rollouts 12 --prompts 8
    python tools/bench/consistency.py --json out.json rollout.dtype=float32   # same dtype: gaps ~0

Per mode (`algorithm.router_replay=MODE`), the real GRPO loop runs through the CLI (`python -m r1mega
recipe=r1_zero` on the embedded tiny_moe base, the small sizes of tests/test_r1_zero.py, the base
shared through `recipe.cache_dir`); positional arguments are extra overrides for every run. From
its `r1_zero_metrics.jsonl`:
- |Δlogp| mean / max: `logprob_gap/mean` (mean over steps) and `logprob_gap/max` (max over steps),
  engine sampling log-probs vs the trainer's old-policy log-probs over response tokens;
- KL(engine ‖ trainer): `rollout_corr/kl_k1` and `kl_k3`, mean over steps;
- s/step: the median `time/step` over the steps after the first (with its quartiles: the
  step-to-step spread to read differences against), the extra seconds vs none, and that extra
  split by phase (median per phase): `rollout` holds the engine's route capture of r3, `old` the
  recording of r2 / the replay of r3, `train` the replays of the updates.
By default `optim.lr=0` (`--lr`): every mode samples the same sequences from the same weights (the
step seeds are fixed; only the routers' expert bias moves: its aux-loss-free update ignores the lr
and counts the replayed experts under r2 / r3), so the columns differ by the routing mode alone.
With a moving policy (`--lr 1e-3`, the tests' value) the modes' trajectories diverge after step 1,
and response lengths, hence seconds per step, with them. Timings come from three sequential runs
on a shared machine: ratios of one run, not a benchmark with error bars.

Routing agreement, per MoE layer: after the runs, one process loads each mode's final policy
checkpoint into megatron (built with routing replay) and into one vLLM engine (`WeightSync`, cast
to the engine dtype), samples training prompts with sampling-time routes (`return_routes`), and runs
the trainer's old-policy pass as that mode does (none / r2: megatron's own routing; r3:
`replay_routes` of the engine's routes). Hooks on every router's output record the expert set each
token actually went to (`routing_map`); the column is the fraction of response positions (those
whose logits give the response log-probs) whose set equals the engine's. For r3 it is 100% by
construction and measured anyway. The r3 row also shows, in brackets, the router's *own* top-k
under the replayed pass (`shadow_own_topk`: under REPLAY_FORWARD megatron never computes it, so
it is computed from the scores megatron hands to `RouterReplay.get_replay_topk`): what the trainer
would have routed, i.e. the agreement an R3 run could log every step for one top-k per layer.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = ("none", "r2", "r3")
# tests/test_r1_zero.py SMALL (the batch, lr and steps come from the arguments), the engine in bfloat16.
SMALL = ["recipe=r1_zero", "recipe.pretrain.steps=10", "recipe.pretrain.num_docs=1000", "recipe.pretrain.tokenizer_docs=1000",
         "data.arithmetic.num_heldout=16", "recipe.eval.k=2", "recipe.wandb=false", "rollout.dtype=bfloat16"]
PHASES = ("rollout_and_reward", "old_logp", "train")


# -- the GRPO loop per mode ---------------------------------------------------------------------------
def run_loop(mode: str, run_dir: Path, overrides: list[str]) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "r1mega", *overrides, f"algorithm.router_replay={mode}", f"run_dir={run_dir}"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"consistency: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "r1_zero_metrics.jsonl").read_text().splitlines()]
    return rows, wall


def loop_summary(rows: list[dict]) -> dict:
    timed = rows[1:] or rows  # the first step pays one-off costs
    med = lambda key: statistics.median(r.get(key, 0.0) for r in timed)  # noqa: E731
    mean = lambda key: statistics.fmean(r[key] for r in rows if key in r) if any(key in r for r in rows) else float("nan")  # noqa: E731
    steps = [r["time/step"] for r in timed]
    return {
        "steps": len(rows), "timed_steps": len(timed), "step_s": med("time/step"),
        "step_s_quartiles": statistics.quantiles(steps, n=4)[::2] if len(steps) > 1 else steps * 2,
        **{f"{p}_s": med(f"time/{p}") for p in PHASES},
        "gap_mean": mean("logprob_gap/mean"),
        "gap_max": max((r["logprob_gap/max"] for r in rows if "logprob_gap/max" in r), default=float("nan")),
        "kl_k1": mean("rollout_corr/kl_k1"), "kl_k3": mean("rollout_corr/kl_k3"),
    }


# -- routing agreement, in process --------------------------------------------------------------------
def _routers(chunks):
    from r1mega.models.router_replay import moe_layer_indices

    out = []
    for chunk in chunks:
        m = chunk
        while hasattr(m, "module"):
            m = m.module
        columns = {layer: c for c, layer in enumerate(moe_layer_indices(m.config))}
        modules = dict(m.named_modules())
        for name, mod in modules.items():
            if name.startswith("decoder.layers.") and name.endswith(".mlp.router"):
                out.append((columns[modules[name[: -len(".mlp.router")]].layer_number - 1], mod))
    return out


@contextlib.contextmanager
def used_routes(chunks, num_layers: int, k: int, experts: int):
    """The experts each token of the forward passes inside actually went to (every router's output
    `routing_map`, replayed or not): one `[T, L, k]` tensor per microbatch (packed [1, T] rows, one
    process)."""
    from r1mega.rollout.routes import canonical

    per_layer: dict[int, list[torch.Tensor]] = {}
    handles = []
    for col, router in _routers(chunks):
        def hook(mod, args, output, col=col):
            routing_map = output[1]  # [tokens, experts] bool, exactly k per token (dropless)
            per_layer.setdefault(col, []).append(routing_map.float().topk(k, dim=1).indices.cpu())
        handles.append(router.register_forward_hook(hook))
    result: list[torch.Tensor] = []
    try:
        yield result
        for mb in range(len(next(iter(per_layer.values())))):
            rows = per_layer[0][mb].shape[0]
            r = torch.zeros(rows, num_layers, k, dtype=torch.long)
            for col in per_layer:
                r[:, col] = per_layer[col][mb]
            result.append(canonical(r, experts))
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def shadow_own_topk(chunks, num_layers: int, experts: int):
    """Under REPLAY_FORWARD megatron (0.16.1) skips the router's own top-k: `RouterReplay.get_replay_topk`
    gets the routing scores (sigmoid scores + expert bias here) and `default_compute_topk` but only
    gathers the target indices. Wrapping it per instance computes the own top-k from the same
    arguments and keeps it; the replayed routing is unchanged. One `[T, L, k]` per microbatch."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from r1mega.rollout.routes import canonical

    per_layer: dict[int, list[torch.Tensor]] = {}
    patched = []
    for col, router in _routers(chunks):
        replay = router.router_replay
        original = replay.get_replay_topk

        def wrapped(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None,
                    replay=replay, original=original, col=col):
            if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                with torch.no_grad():
                    own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)[1]
                per_layer.setdefault(col, []).append(own.cpu())
            return original(scores, topk, num_groups, group_topk, default_compute_topk)
        replay.get_replay_topk = wrapped
        patched.append(replay)
    result: list[torch.Tensor] = []
    try:
        yield result
        for mb in range(len(per_layer.get(0, []))):
            r = torch.zeros(per_layer[0][mb].shape[0], num_layers, per_layer[0][mb].shape[1], dtype=torch.long)
            for col in per_layer:
                r[:, col] = per_layer[col][mb]
            result.append(canonical(r, experts))
    finally:
        for replay in patched:
            del replay.get_replay_topk  # back to the class method


def agreement(modes: list[str], run_dirs: dict[str, Path], overrides: list[str], num_prompts: int) -> dict:
    from r1mega.algorithms import vocab_parallel_logprobs
    from r1mega.checkpoint.manager import CheckpointManager
    from r1mega.config import compose
    from r1mega.data.packing import pack
    from r1mega.data.prompts import PromptSource, load_rows
    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.models.build import build_model
    from r1mega.models.router_replay import pack_routes, replay_routes, routing_agreement
    from r1mega.parallel.state import destroy_distributed, init_distributed
    from r1mega.rollout.sync import WeightSync
    from r1mega.rollout.vllm_engine import VLLMEngine
    from r1mega.trainer.engine import MegatronEngine

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cfg = compose([*overrides, f"run_dir={run_dirs[modes[0]]}"])
    m, r = cfg.model, cfg.recipe
    init_distributed(cfg.parallel, cfg.platform)
    trainer = MegatronEngine(cfg, trainable=False, build_fn=partial(build_model, routing_replay=True))
    chunks = trainer.model
    num_moe, k, experts = len(_routers(chunks)), m.moe_router_topk, m.num_experts  # one process: every MoE layer
    engine_dir = run_dirs[modes[0]] / "engine"  # config + tokenizer (the same for every mode)
    tok = load_tokenizer(engine_dir)
    prompts = PromptSource(load_rows(cfg.data, "train"), tok, r.template, r.max_prompt_tokens, seed=cfg.platform.seed)
    ids = [prompts.ids[i] for i in prompts.batch(10_000, num_prompts)]
    engine = VLLMEngine(engine_dir, cfg.rollout, seed=cfg.platform.seed, load_format="dummy")
    sync = WeightSync(cfg.model, cfg.parallel, cfg.rollout)

    def logp_fn(logits, batch):
        logp, _ = vocab_parallel_logprobs(logits.float(), batch["target"], r.temperature)
        return logits.sum() * 0.0, torch.tensor(0), {"logp": logp.detach()}

    out = {}
    try:
        for mode in modes:
            step = CheckpointManager(run_dirs[mode] / "ckpt").load(chunks)["step"]
            sync.sync(chunks, engine)
            outs = engine.generate(ids, n=cfg.algorithm.group_size, temperature=r.temperature, top_p=r.top_p,
                                   max_tokens=r.max_response_tokens, seed=cfg.platform.seed, return_routes=True)
            samples = [(list(o.prompt_token_ids), c) for o in outs for c in o.completions]
            fields = []
            for p, c in samples:
                tokens = torch.tensor(p + c.token_ids)
                fields.append({"tokens": tokens, "target": torch.cat([tokens[1:], tokens.new_zeros(1)])})
            packed = pack(fields, max_tokens=cfg.rollout.max_model_len)
            mbs = packed.microbatches
            engine_routes = [pack_routes([c.routed_experts for _, c in samples], place, mb["tokens"].shape[1], num_moe, k, experts)
                             for mb, place in zip(mbs, packed.placement)]
            replay = replay_routes(chunks, engine_routes) if mode == "r3" else contextlib.nullcontext()
            shadow = shadow_own_topk(chunks, num_moe, experts) if mode == "r3" else contextlib.nullcontext([])
            with used_routes(chunks, num_moe, k, experts) as used, shadow as own, replay:
                trainer.forward_backward(mbs, logp_fn, forward_only=True)

            def response_rows(routes):  # positions len(prompt)-1 .. n-2 of every sample
                return torch.cat([x[start + len(samples[i][0]) - 1: start + n - 1]
                                  for x, place in zip(routes, packed.placement) for i, start, n in place])

            res = {"checkpoint_step": step, "samples": len(samples),
                   "response_positions": int(response_rows(engine_routes).shape[0]),
                   "used": routing_agreement(response_rows(used), response_rows(engine_routes)).tolist()}
            if own:
                res["own_under_replay"] = routing_agreement(response_rows(own), response_rows(engine_routes)).tolist()
            out[mode] = res
    finally:
        engine.shutdown()
        destroy_distributed()
    return out


# -- the table ----------------------------------------------------------------------------------------
def print_table(modes, loops, agree, title):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in (("mode", "left"), ("routing agreement per MoE layer\n(engine vs trainer old-policy pass)", "left"),
                      ("|Δlogp| mean", "right"), ("|Δlogp| max", "right"), ("KL k1", "right"), ("KL k3", "right"),
                      ("s/step\n(quartiles)", "right"), ("+s vs none", "right"), ("extra by phase (s)", "left")):
        t.add_column(col, justify=just)
    base = loops.get("none")
    for mode in modes:
        s, a = loops[mode], agree.get(mode, {})
        pct = lambda xs: " ".join(f"{100 * x:5.1f}" for x in xs)  # noqa: E731
        cell = pct(a["used"]) if "used" in a else "-"
        if "own_under_replay" in a:
            cell += f"\n(own top-k: {pct(a['own_under_replay'])})"
        extra = (f"{s['step_s'] - base['step_s']:+.3f} ({(s['step_s'] / base['step_s'] - 1) * 100:+.0f}%)"
                 if base is not None else "-")
        phases = (" ".join(f"{p.split('_')[0]} {s[f'{p}_s'] - base[f'{p}_s']:+.3f}" for p in PHASES)
                  if base is not None and mode != "none" else "")
        t.add_row(mode, cell, f"{s['gap_mean']:.2e}", f"{s['gap_max']:.2e}", f"{s['kl_k1']:+.1e}", f"{s['kl_k3']:.1e}",
                  f"{s['step_s']:.3f}\n({s['step_s_quartiles'][0]:.2f}–{s['step_s_quartiles'][1]:.2f})", extra, phases)
    Console(width=200).print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, e.g. rollout.dtype=float32")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,r2,r3")
    parser.add_argument("--rollouts", type=int, default=10, help="GRPO steps per mode (the first is not timed)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout (recipe.prompts_per_rollout)")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (algorithm.group_size)")
    parser.add_argument("--lr", type=float, default=0.0,
                        help="optim.lr (default 0: every mode samples the same sequences from the same weights, so the "
                             "columns differ by the routing mode only; tests use 1e-3, a moving policy)")
    parser.add_argument("--agreement-prompts", type=int, default=16, help="prompts of the routing-agreement pass (x group)")
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"), help="recipe.cache_dir: the pretrained base")
    parser.add_argument("--run-root", help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    modes = [x for x in args.modes.split(",") if x]
    if any(x not in MODES for x in modes):
        parser.error(f"--modes: one of {MODES}")

    overrides = [*SMALL, f"recipe.rollouts={args.rollouts}", f"recipe.save_every={args.rollouts}",
                 f"recipe.prompts_per_rollout={args.prompts}", f"optim.lr={args.lr}", "optim.min_lr=0", f"algorithm.group_size={args.group}",
                 f"recipe.cache_dir={args.cache_dir}", *args.overrides]
    root = Path(args.run_root) if args.run_root else Path(tempfile.mkdtemp(prefix="consistency-"))
    t0 = time.perf_counter()
    try:
        run_dirs, loops, walls, loads = {}, {}, {}, {}
        for mode in modes:
            run_dirs[mode] = root / mode
            shutil.rmtree(run_dirs[mode], ignore_errors=True)  # a fresh run, not a resume
            rows, walls[mode] = run_loop(mode, run_dirs[mode], overrides)
            loops[mode] = loop_summary(rows)
            loads[mode] = os.getloadavg()[0]  # other work on the machine skews the seconds: shown with them
            print(f"consistency: {mode}: {len(rows)} GRPO steps, {walls[mode]:.0f} s wall", file=sys.stderr, flush=True)
        t1 = time.perf_counter()
        agree = agreement(modes, run_dirs, overrides, args.agreement_prompts)
        t2 = time.perf_counter()
    finally:
        if not args.run_root:
            shutil.rmtree(root, ignore_errors=True)
    dtype = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("rollout.dtype=")), "?")
    title = (f"tiny_moe r1_zero, engine {dtype} vs trainer fp32, lr {args.lr:g}: {args.rollouts} GRPO steps x {args.prompts} prompts x "
             f"{args.group} samples per mode (s/step: median of steps 2..{args.rollouts}); agreement on each mode's final "
             f"policy, {args.agreement_prompts * args.group} samples, response positions, % per MoE layer")
    print_table(modes, loops, agree, title)
    print(f"runtime: {t1 - t0:.0f} s GRPO runs ({', '.join(f'{m} {w:.0f}' for m, w in walls.items())}), "
          f"{t2 - t1:.0f} s agreement, {time.perf_counter() - t0:.0f} s total; 1-min load average at the end of each "
          f"run ({os.cpu_count()} CPUs): {', '.join(f'{m} {x:.1f}' for m, x in loads.items())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, "loop": loops, "agreement": agree,
                                               "wall_s": walls, "loadavg_1min": loads}, indent=1))


if __name__ == "__main__":
    main()
