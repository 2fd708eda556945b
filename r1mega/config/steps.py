"""Step arithmetic in the R1 paper's units (DeepSeek-R1, Nature 2025, Methods).

A *rollout* (one GRPO iteration) samples `group_size` outputs for each of `prompts_per_rollout`
prompts, then runs `num_mini_batches x ppo_epochs` *optimizer steps* on them. The paper counts
training steps = optimizer steps: 32 questions x 16 outputs = 512 outputs per optimizer step,
8,192 outputs per rollout in 16 mini-batches, 10,400 optimizer steps (650 rollouts), the reference
replaced every 400 optimizer steps, responses lengthened from optimizer step 8,200.

`recipe.rollouts`, `recipe.save_every`, `recipe.eval.every` count rollouts;
`algorithm.ref_update_optimizer_steps` and the keys of `recipe.response_length_schedule` count
optimizer steps. Pure arithmetic (stdlib only), shared by the trainer, the validator and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """One RL run's counts; every field names its unit."""

    rollouts: int
    optimizer_steps_per_rollout: int
    optimizer_steps: int
    prompts_per_rollout: int
    outputs_per_rollout: int
    outputs_per_optimizer_step: int
    ref_update_optimizer_steps: int | None
    reference_refreshes: int
    num_prompts: int | None
    epochs: float | None  # epochs over the RL prompt set, None if its size is unknown

    def line(self) -> str:
        parts = [
            f"rollouts {self.rollouts:,} x {self.optimizer_steps_per_rollout:,} optimizer steps = "
            f"{self.optimizer_steps:,} optimizer steps",
            f"{self.outputs_per_optimizer_step:,} outputs per optimizer step ({self.outputs_per_rollout:,} per rollout)",
            (f"reference refreshed every {self.ref_update_optimizer_steps:,} optimizer steps "
             f"({self.reference_refreshes:,} times)") if self.ref_update_optimizer_steps else "fixed reference",
        ]
        if self.epochs is not None:
            parts.append(f"{self.epochs:.3g} epochs over {self.num_prompts:,} prompts")
        return "; ".join(parts)


def optimizer_steps_per_rollout(algorithm) -> int:
    return int(algorithm.num_mini_batches) * int(algorithm.ppo_epochs)


def step_plan(recipe, algorithm, num_prompts: int | None = None) -> StepPlan:
    per = optimizer_steps_per_rollout(algorithm)
    total = int(recipe.rollouts) * per
    prompts = int(recipe.prompts_per_rollout)
    outputs = prompts * int(algorithm.group_size)
    every = algorithm.ref_update_optimizer_steps
    return StepPlan(
        rollouts=int(recipe.rollouts), optimizer_steps_per_rollout=per, optimizer_steps=total,
        prompts_per_rollout=prompts, outputs_per_rollout=outputs,
        outputs_per_optimizer_step=outputs // max(int(algorithm.num_mini_batches), 1),
        ref_update_optimizer_steps=int(every) if every else None,
        reference_refreshes=total // int(every) if every else 0,
        num_prompts=num_prompts,
        epochs=int(recipe.rollouts) * prompts / num_prompts if num_prompts else None,
    )


def schedule_start_rollout(optimizer_step: int, per_rollout: int) -> int:
    """The rollout whose outputs feed optimizer step `optimizer_step` (0-based both)."""
    return int(optimizer_step) // per_rollout


def max_response_tokens(recipe, algorithm, rollout: int) -> int:
    """The response limit of rollout `rollout` (0-based). Entry K of `recipe.response_length_schedule`
    (an optimizer step) applies from rollout floor(K / optimizer steps per rollout) on, so every
    optimizer step >= K trains on outputs generated with the new limit."""
    per = optimizer_steps_per_rollout(algorithm)
    limit = int(recipe.max_response_tokens)
    for from_step, tokens in sorted((int(k), int(v)) for k, v in (recipe.response_length_schedule or {}).items()):
        if rollout >= schedule_start_rollout(from_step, per):
            limit = tokens
    return limit


def longest_response(recipe, algorithm) -> int:
    """The largest response limit any of the run's `recipe.rollouts` rollouts uses (schedule entries the
    run never reaches do not count)."""
    per = optimizer_steps_per_rollout(algorithm)
    starts = [schedule_start_rollout(int(k), per) for k in (recipe.response_length_schedule or {})]
    return max(max_response_tokens(recipe, algorithm, r) for r in [0, *starts] if r < max(int(recipe.rollouts), 1))


def refreshes_reference(algorithm, rollout: int) -> bool:
    """True after rollout `rollout` (0-based) when the optimizer steps done so far, (rollout + 1) x
    steps per rollout, reach a multiple of `algorithm.ref_update_optimizer_steps` (None: never)."""
    every = algorithm.ref_update_optimizer_steps
    if not every:
        return False
    return (rollout + 1) * optimizer_steps_per_rollout(algorithm) % int(every) == 0


__all__ = ["StepPlan", "longest_response", "max_response_tokens", "optimizer_steps_per_rollout", "refreshes_reference", "step_plan"]
