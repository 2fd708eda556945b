"""Step arithmetic in the R1 paper's units (DeepSeek-R1, Nature 2025, Methods) on the composed 671B
config: 32 questions x 16 outputs = 512 outputs per optimizer step, 8,192 per rollout in 16
mini-batches, 10,400 optimizer steps (650 rollouts), reference replaced every 400 optimizer steps,
responses 32,768 -> 65,536 tokens from optimizer step 8,200. No model is built."""
from __future__ import annotations

import pytest

from r1mega.config import compose
from r1mega.config.steps import max_response_tokens, refreshes_reference, step_plan

PAPER_671B = ["recipe=r1_zero", "model=deepseek_v3_671b", "platform=gpu", "parallel=dsv3_256xh100", "rollout=dsv3_tp32"]


@pytest.fixture(scope="module")
def cfg():
    return compose(PAPER_671B)


def test_paper_step_counts(cfg):
    # 1.6 epochs: 650 x 512 = 332,800 questions drawn = 1.6 x 208,000 prompts (the paper's RL set size implied)
    p = step_plan(cfg.recipe, cfg.algorithm, num_prompts=208_000)
    assert (p.rollouts, p.optimizer_steps_per_rollout, p.optimizer_steps) == (650, 16, 10_400)
    assert (p.prompts_per_rollout, p.outputs_per_rollout, p.outputs_per_optimizer_step) == (512, 8_192, 512)
    assert (p.ref_update_optimizer_steps, p.reference_refreshes) == (400, 26)
    assert p.epochs == 1.6
    assert p.line() == ("rollouts 650 x 16 optimizer steps = 10,400 optimizer steps; 512 outputs per optimizer step "
                        "(8,192 per rollout); reference refreshed every 400 optimizer steps (26 times); "
                        "1.6 epochs over 208,000 prompts")
    assert step_plan(cfg.recipe, cfg.algorithm).epochs is None


def test_reference_refreshed_every_400_optimizer_steps(cfg):
    after = [r for r in range(650) if refreshes_reference(cfg.algorithm, r)]
    assert after[:3] == [24, 49, 74] and len(after) == 26 and after[-1] == 649
    assert all((r + 1) * 16 % 400 == 0 for r in after)


def test_response_length_switches_for_optimizer_step_8200(cfg):
    r, a = cfg.recipe, cfg.algorithm
    # rollout k feeds optimizer steps 16k .. 16k+15; optimizer step 8,200 is fed by rollout 512 (steps 8,192-8,207)
    assert [max_response_tokens(r, a, k) for k in (0, 1, 500, 511)] == [32_768] * 4
    assert [max_response_tokens(r, a, k) for k in (512, 513, 649)] == [65_536] * 3
    assert 511 * 16 + 15 < 8_200 <= 512 * 16 + 15


def test_cpu_overlay_keeps_its_behaviour():
    c = compose(["recipe=r1_zero"])
    p = step_plan(c.recipe, c.algorithm)
    assert (p.rollouts, p.prompts_per_rollout, p.optimizer_steps_per_rollout, p.optimizer_steps) == (30, 16, 2, 60)
    assert not any(refreshes_reference(c.algorithm, k) for k in range(30))
    assert {max_response_tokens(c.recipe, c.algorithm, k) for k in range(30)} == {32}
