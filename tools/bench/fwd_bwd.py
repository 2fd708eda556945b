"""Forward + backward of one GRPO batch: r1mega's megatron model against transformers, same HF weights.

    python tools/bench/fwd_bwd.py --hf-dir runs/bench/grpo_vs_trl/hf_model     # what grpo_vs_trl.py runs

The batch is one rollout of the GRPO benchmark's shape: `--samples` sequences of a prompt (`--prompt`
tokens, +-3) and a `--response`-token response, random ids (seed 0). Each side computes the per-token
log-probs of the response tokens and back-propagates their sum, the way its trainer does:

- r1mega: `r1mega.data.packing.pack` into microbatches of `--max-tokens` (the CPU default's
  `recipe.train_max_tokens`), `MegatronEngine.forward_backward` with the GRPO trainer's log-probs
  (logits at the response positions alone, `logit_index`);
- transformers: one left-padded batch, logits of the response positions only (TRL's
  `logits_to_keep`), log-softmax gather.

Both run in this process with the same torch threads, alternating (`--repeats` each), so machine load
hits both alike; the table gives medians and the ratio, then torch.profiler's top operators (self CPU
time) of one pass of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def batch(vocab: int, samples: int, prompt: int, response: int) -> list[tuple[torch.Tensor, int]]:
    """[(token ids, prompt length)] of `samples` sequences."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(samples):
        p = prompt + int(torch.randint(-3, 4, (), generator=g))
        out.append((torch.randint(0, vocab, (p + response,), generator=g), p))
    return out


def r1mega_side(hf_dir: Path, seqs, max_tokens: int):
    """A closure running one forward + backward of r1mega's trainer path."""
    from r1mega.checkpoint import hf_io
    from r1mega.checkpoint.hf_mapping import load_hf_tensors
    from r1mega.config import compose
    from r1mega.data.packing import pack
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.grpo import _token_logprobs

    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from grpo_vs_trl import MODEL

    cfg = compose([*MODEL, "recipe=r1_zero", "parallel.use_distributed_optimizer=false"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    with hf_io.HFReader(str(hf_dir)) as reader:
        load_hf_tensors(engine.model, cfg.model, reader)
    samples = []
    for ids, p in seqs:
        mask = torch.zeros(len(ids))
        mask[p:] = 1
        samples.append({"tokens": ids, "target": ids.roll(-1), "mask": mask.roll(-1)})
    micro = pack(samples, max_tokens).microbatches
    for m in micro:
        m["logit_index"] = m["mask"][0].nonzero().squeeze(-1)

    def loss_fn(logits, b):
        logp, _ = _token_logprobs(logits, b, 1.0)
        return -(logp * b["mask"]).sum(), torch.tensor(1), {}

    def run():
        for c in engine.model:
            c.zero_grad_buffer()
        engine.forward_backward(micro, loss_fn)

    return run, len(micro)


def transformers_side(hf_dir: Path, seqs, response: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (t, _) in enumerate(seqs):
        ids[i, width - len(t):], attn[i, width - len(t):] = t, 1

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=response + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -response:, None]).squeeze(-1)
        (-logp.sum()).backward()

    return run


def top_ops(run, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", type=Path, default=ROOT / "runs" / "bench" / "grpo_vs_trl" / "hf_model")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=12, help="mean prompt tokens")
    parser.add_argument("--response", type=int, default=32, help="response tokens")
    parser.add_argument("--max-tokens", type=int, default=480, help="r1mega's tokens per packed microbatch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="operators listed per side")
    args = parser.parse_args()
    if not (args.hf_dir / "config.json").exists():
        sys.exit(f"{args.hf_dir}: no config.json (tools/bench/grpo_vs_trl.py writes it)")

    from transformers import AutoConfig

    seqs = batch(AutoConfig.from_pretrained(str(args.hf_dir)).vocab_size, args.samples, args.prompt, args.response)
    r1, microbatches = r1mega_side(args.hf_dir, seqs, args.max_tokens)
    hf = transformers_side(args.hf_dir, seqs, args.response)
    times = {"r1mega": [], "transformers": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, run in (("r1mega", r1), ("transformers", hf)):
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    a, b = (statistics.median(times[k][1:]) for k in ("r1mega", "transformers"))
    tokens = sum(len(ids) for ids, _ in seqs)
    print(f"forward + backward of {args.samples} sequences ({tokens} tokens; r1mega: {microbatches} packed microbatches "
          f"of <= {args.max_tokens}), {torch.get_num_threads()} threads, median of {args.repeats}:")
    print(f"  r1mega {a:.3f} s   transformers {b:.3f} s   r1mega/transformers {a / b:.2f}")
    for name, run in (("r1mega", r1), ("transformers", hf)):
        print(f"\ntop operators, {name} (self CPU time, one pass):\n{top_ops(run, args.top)}")


if __name__ == "__main__":
    main()
