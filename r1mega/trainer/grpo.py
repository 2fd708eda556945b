"""The GRPO step of R1-Zero (DeepSeek-R1, 2.2), top to bottom as the data flows:

prompts → rollout (vLLM, G samples each) → rule rewards → group advantages → packed mini-batches
→ reference and old-policy log-probs → clipped-ratio updates with k3 KL (megatron schedules)
→ weight sync into the engine.

Every rank runs `step`; the rollout engine may live on rank 0 only (CPU), whose samples and
rewards are broadcast. Per-token fields are in "prediction" coordinates: position t of a
sequence predicts token t+1, so a response occupies positions [len(prompt)-1, len-2].
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from r1mega.algorithms import GRPOConfig, group_advantages, grpo_loss, vocab_parallel_logprobs, zero_variance_groups
from r1mega.data.packing import Packed, pack, segments_to_padded
from r1mega.models.moe_load import load_balance, record_expert_load
from r1mega.parallel.state import broadcast_object
from r1mega.rewards import RewardManager
from r1mega.rollout.colocate import Colocation
from r1mega.rollout.engine import RequestOutput
from r1mega.rollout.sync import WeightSync


@dataclass
class Sample:
    row: int  # prompt index in the PromptSource
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logp: list[float]
    truncated: bool
    scores: dict[str, float]  # reward terms and "total"
    advantage: float = 0.0

    def fields(self, overlong_filter: bool) -> dict[str, torch.Tensor]:
        tokens = torch.tensor(self.prompt_ids + self.response_ids, dtype=torch.long)
        n, p = len(tokens), len(self.prompt_ids)
        mask = torch.zeros(n)
        if not (overlong_filter and self.truncated):
            mask[p - 1: n - 1] = 1.0
        engine_logp = torch.zeros(n)
        engine_logp[p - 1: n - 1] = torch.tensor(self.engine_logp)
        return {"tokens": tokens, "target": torch.cat([tokens[1:], tokens.new_zeros(1)]), "resp_mask": mask,
                "engine_logp": engine_logp}


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class GRPOTrainer:
    """`policy` / `ref`: MegatronEngine (trainable / frozen); `engine`: the rollout engine on ranks
    that hold one, else None; `prompts`: a PromptSource."""

    def __init__(self, cfg, policy, ref, engine, tokenizer, prompts, reward_model=None):
        self.cfg, self.policy, self.ref, self.engine, self.tok, self.prompts = cfg, policy, ref, engine, tokenizer, prompts
        # Optional r1mega.rewards.reward_model.RewardModelScorer (collective, on every rank like `ref`).
        self.reward_model = reward_model
        self.algo: GRPOConfig = OmegaConf.to_object(cfg.algorithm)
        self.reward = RewardManager(cfg.reward) if engine is not None else None
        self.colocation = Colocation(engine, WeightSync(cfg.model, cfg.parallel, cfg.rollout))
        self.thd = cfg.platform.transformer_engine
        self.ref_step = 0  # the policy step the reference model holds
        # GPU: the reference lives in host memory except while it runs (`_reference_on_device`)
        self.offload_ref = ref is not None and cfg.recipe.offload_reference and cfg.platform.device != "cpu"
        if self.offload_ref:
            for c in ref.model:
                c.to("cpu")

    # -- one step ----------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        algo, timer = self.algo, PhaseTimer()

        # 1-3. prompts → rollout → rewards (dynamic sampling refills zero-variance groups)
        with timer("rollout_and_reward"):
            samples = self._collect(step)
        rewards = torch.tensor([s.scores["total"] for s in samples])

        # 4. group-normalised advantages, one per output
        adv = group_advantages(rewards, algo.group_size, algo.adv_eps, algo.std_normalize)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a

        # 5. mini-batches (whole groups), each packed into microbatches
        self.colocation.to_training()
        minibatches = [self._pack(part) for part in _split(samples, algo.num_mini_batches, algo.group_size)]

        # 6. reference and old-policy log-probs (no grad), MoE load from the same pass
        with timer("ref"):
            if algo.kl_coef:
                with self._reference_on_device():
                    self._logprobs(self.ref, minibatches, "ref_logp")
        with timer("old_logp"), record_expert_load(self.policy.model) as loads:
            self._logprobs(self.policy, minibatches, "old_logp")

        # 7. policy update: ppo_epochs passes, one optimizer step per mini-batch
        with timer("train"):
            updates = [self.policy.train_step(mb.microbatches, self._loss) for _ in range(algo.ppo_epochs)
                       for mb in minibatches]

        # 8. weight sync; the reference follows the policy every `ref_update_interval` steps
        with timer("sync"):
            self.colocation.to_rollout(self.policy.model)
        if algo.ref_update_interval and (step + 1) % algo.ref_update_interval == 0:
            self.refresh_reference(step + 1)

        return self._metrics(samples, minibatches, updates, loads, timer)

    # -- rollout and rewards -------------------------------------------------------------------------
    def _collect(self, step: int) -> list[Sample]:
        g, want = self.algo.group_size, self.cfg.recipe.prompts_per_step
        idx = self.prompts.batch(step, want)
        samples: list[Sample] = []
        for attempt in range(1 + 3 * self.algo.dynamic_sampling):
            drawn = self._rollout(idx, step, attempt)
            kept = drawn
            if self.algo.dynamic_sampling:  # DAPO: drop groups whose rewards are all equal, refill
                flat = torch.tensor([s.scores["total"] for s in drawn])
                keep = (~zero_variance_groups(flat, g)).tolist()
                kept = [s for k, s in enumerate(drawn) if keep[k // g]]
            samples += kept
            missing = want - len(samples) // g
            if missing <= 0:
                break
            idx = self.prompts.refill(step, attempt + 1, missing)
        return samples[: want * g] or drawn  # nothing kept: train on the last draw (zero advantages)

    def _rollout(self, idx: list[int], step: int, attempt: int) -> list[Sample]:
        r = self.cfg.recipe
        payload = None
        if self.engine is not None:
            outs = self.engine.generate(
                [self.prompts.ids[i] for i in idx], n=self.algo.group_size, temperature=r.temperature, top_p=r.top_p,
                max_tokens=self.max_response_tokens(step), seed=self.cfg.platform.seed + 7919 * step + 104729 * attempt,
            )
            payload = self._score(idx, outs)
        samples = broadcast_object(payload)
        if self.reward_model is not None:
            self._score_reward_model(samples)
        return samples

    def _score_reward_model(self, samples: list[Sample]) -> None:
        """The reward-model term next to the rule rewards: one batched (packed) pass over prompt +
        response, on every rank; logged as reward/reward_model; weighted into `total` for the data
        sources the scorer applies to."""
        rm = self.reward_model
        values = rm.score([s.prompt_ids + s.response_ids for s in samples])
        for s, v in zip(samples, values):
            s.scores[rm.name] = v
            if rm.applies_to(self.prompts.rows[s.row], self.cfg.reward.source_key):
                s.scores["total"] += rm.weight * v

    def _score(self, idx: list[int], outs: list[RequestOutput]) -> list[Sample]:
        texts, rows, samples = [], [], []
        for i, out in zip(idx, outs):
            for c in out.completions:
                texts.append(self.tok.decode(c.token_ids, skip_special_tokens=True))
                rows.append(self.prompts.rows[i])
                samples.append(Sample(i, list(out.prompt_token_ids), list(c.token_ids), list(c.logprobs),
                                      c.finish_reason == "length", {}))
        for s, scores in zip(samples, self.reward.score(list(zip(rows, texts)))):
            s.scores = scores
        return samples

    def max_response_tokens(self, step: int) -> int:
        limit = self.cfg.recipe.max_response_tokens
        for from_step, tokens in sorted(self.cfg.recipe.response_length_schedule.items()):
            if step >= int(from_step):
                limit = tokens
        return limit

    # -- packing and log-probs -----------------------------------------------------------------------
    def _pack(self, samples: list[Sample]) -> Packed:
        par = self.cfg.parallel
        fields = [s.fields(self.algo.overlong_filter) for s in samples]
        packed = pack(fields, self.cfg.recipe.train_max_tokens,
                      pad_to_multiple=par.tensor_model_parallel_size if par.sequence_parallel else 1,
                      thd=self.thd, min_microbatches=par.pipeline_model_parallel_size)
        # The loss normaliser spans the mini-batch: sequences (sequence means) or tokens (token mean).
        if self.algo.loss_agg == "token_mean":
            counts = [float(mb["resp_mask"].sum()) for mb in packed.microbatches]
        else:
            counts = [float(sum(fields[i]["resp_mask"].sum() > 0 for i, _, _ in place)) for place in packed.placement]
        total = max(sum(counts), 1.0)
        for mb, place, count in zip(packed.microbatches, packed.placement, counts):
            mb["placement"] = place
            mb["advantages"] = torch.tensor([samples[i].advantage for i, _, _ in place])
            mb["weight"] = torch.tensor(count / total * len(packed.microbatches))
        return packed

    def _logprobs(self, engine, minibatches: list[Packed], key: str) -> None:
        """Adds `key` ([1, T] log-probs at the sampling temperature) to each microbatch on the ranks
        that compute logits for the loss (last pipeline stage)."""
        temperature = self.cfg.recipe.temperature

        def loss_fn(logits, batch):
            logp, _ = vocab_parallel_logprobs(logits, batch["target"], temperature)
            return logits.sum() * 0.0, torch.tensor(1), {"logp": logp.detach()}

        for mb in minibatches:
            for micro, out in zip(mb.microbatches, engine.forward_backward(mb.microbatches, loss_fn, forward_only=True)):
                micro[key] = out["logp"]

    def _loss(self, logits: torch.Tensor, batch: dict):
        logp, entropy = vocab_parallel_logprobs(logits, batch["target"], self.cfg.recipe.temperature)
        place = batch["placement"]
        padded = lambda x: segments_to_padded(x, place)  # noqa: E731  [num_seqs, longest]
        loss, metrics = grpo_loss(
            padded(logp), padded(batch["old_logp"]), batch["advantages"], padded(batch["resp_mask"]), self.algo,
            ref_logp=padded(batch["ref_logp"]) if "ref_logp" in batch else None, entropy=padded(entropy),
        )
        # megatron divides by num_tokens (1) and the microbatch count: `weight` restores the mini-batch mean
        return loss * batch["weight"], torch.tensor(1), {**metrics, "weight": batch["weight"].clone()}

    @contextmanager
    def _reference_on_device(self):
        """With `recipe.offload_reference` the reference lives in host memory except while it runs."""
        if self.offload_ref:
            for c in self.ref.model:
                c.to(self.cfg.platform.device)
        try:
            yield
        finally:
            if self.offload_ref:
                for c in self.ref.model:
                    c.to("cpu")

    def refresh_reference(self, step: int) -> None:
        with torch.no_grad():
            for (_, p), (_, q) in zip(self.policy.named_parameters(), self.ref.named_parameters(), strict=True):
                q.copy_(p)
        self.ref_step = step

    # -- metrics -------------------------------------------------------------------------------------
    def _metrics(self, samples, minibatches, updates, loads, timer) -> dict:
        m: dict[str, float] = {}
        totals = torch.tensor([s.scores["total"] for s in samples])
        m["reward/mean"], m["reward/std"] = totals.mean().item(), totals.std(correction=0).item()
        for term in samples[0].scores:
            if term != "total":
                m[f"reward/{term}"] = sum(s.scores[term] for s in samples) / len(samples)
        m["accuracy"] = m.get("reward/accuracy", float("nan"))
        m["format_rate"] = m.get("reward/format", float("nan"))
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
        m["response_length/mean"], m["response_length/max"] = lengths.mean().item(), lengths.max().item()
        m["response_length/clipped_frac"] = sum(s.truncated for s in samples) / len(samples)
        m["zero_variance_group_frac"] = zero_variance_groups(totals, self.algo.group_size).float().mean().item()
        real = sum(p.real_tokens for p in minibatches)
        m["packing_efficiency"] = real / max(sum(p.total_tokens for p in minibatches), 1)
        m["grad_norm"] = sum(float(u["grad_norm"] or 0.0) for u in updates) / len(updates)
        m["lr"] = updates[-1]["lr"]
        m.update(_last_stage_metrics(minibatches, updates, gap=self.cfg.recipe.temperature == 1.0))
        m.update(load_balance(_sum_over_ranks(loads)))
        t = timer.seconds
        generated = lengths.sum().item()
        for phase, sec in t.items():
            m[f"time/{phase}"] = sec
        m["time/step"] = sum(t.values())
        m["throughput/rollout_tokens_per_s"] = generated / max(t.get("rollout_and_reward", 0.0), 1e-9)
        m["throughput/train_tokens_per_s"] = real * self.algo.ppo_epochs / max(t.get("train", 0.0), 1e-9)
        return m


def _split(samples: list[Sample], parts: int, group_size: int) -> list[list[Sample]]:
    """`parts` mini-batches of whole groups (fewer if there are fewer groups)."""
    groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    parts = max(1, min(parts, len(groups)))
    return [[s for g in groups[k::parts] for s in g] for k in range(parts)]


def _sum_over_ranks(loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loads
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, loads)
    out: dict[str, torch.Tensor] = {}
    for d in gathered:
        for k, v in d.items():
            out[k] = out[k] + v if k in out else v
    return out


def _last_stage_metrics(minibatches: list[Packed], updates: list[dict], gap: bool) -> dict:
    """Loss metrics (weighted over microbatches) and the train–inference log-prob gap, computed on
    the last pipeline stage and shared with every rank. The engine reports raw log-probs, so the gap
    is only measured at sampling temperature 1."""
    m: dict[str, float] = {}
    sums: dict[str, float] = {}
    weight = 0.0
    for u in updates:
        for mm in u["metrics"] or []:
            w = float(mm["weight"])
            weight += w
            for k, v in mm.items():
                if k != "weight":
                    sums[k] = sums.get(k, 0.0) + w * float(v)
    m.update({f"loss/{k}": v / weight for k, v in sums.items()} if weight else {})
    gaps = [((mb["old_logp"] - mb["engine_logp"]).abs() * mb["resp_mask"], mb["resp_mask"])
            for p in minibatches for mb in p.microbatches if gap and "old_logp" in mb]
    if gaps:
        n = sum(mask.sum() for _, mask in gaps).clamp(min=1)
        m["logprob_gap/mean"] = (sum(g.sum() for g, _ in gaps) / n).item()
        m["logprob_gap/max"] = max(g.max() for g, _ in gaps).item()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return m
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, m)
    return max(gathered, key=len)
