"""The GRPO step of R1-Zero (DeepSeek-R1, 2.2), top to bottom as the data flows:

prompts → rollout (vLLM, G samples each) → rule rewards → group advantages → packed mini-batches
→ reference and old-policy log-probs → clipped-ratio updates with k3 KL (megatron schedules), each
token's surrogate weighted by the rollout correction → weight sync into the engine.

Data parallelism divides the work: the rollout's prompts are split across the rollout replicas
(GPU: one per vLLM tensor-parallel group; CPU: the one engine on rank 0), each scores its own whole
groups, and every rank receives all samples (advantages need whole groups; the mini-batch's loss
normaliser is then known exactly on every rank, no collective). Each mini-batch is assigned to the
data-parallel ranks by whole groups, balanced by tokens: a trained token is trained on exactly one DP
rank, and megatron sums the ranks' shares of the loss (`MegatronEngine`'s loss contract).

Per-token fields are in "prediction" coordinates: position t of a sequence predicts token t+1, so a
response occupies positions [len(prompt)-1, len-2].
"""
from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from r1mega.algorithms import (GRPOConfig, group_advantages, grpo_loss, loss_normalizer, reduce_correction_stats,
                                reduce_stats, rollout_correction_stats, rollout_is_weight, vocab_parallel_logprobs,
                                zero_variance_groups)
from r1mega.config.steps import max_response_tokens, refreshes_reference
from r1mega.data.packing import Packed, dp_shares, segments_to_padded
from r1mega.models.moe_load import load_balance, record_expert_load
from r1mega.models.router_replay import (exchange_routes, local_moe_layers, pack_routes, record_routes, replay_routes,
                                         route_positions, route_shape, router_replay_mode)
from r1mega.parallel.state import all_gather_object, data_parallel
from r1mega.rewards import RewardManager
from r1mega.rollout.colocate import Colocation
from r1mega.rollout.engine import RequestOutput, call_seed
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
    routes: torch.Tensor | None = None  # the engine's MoE routing, [n - 1, moe layers, topk] (R3 only)
    uid: tuple | None = None  # (attempt, rollout replica, index in the replica's samples)

    def fields(self, overlong_filter: bool) -> dict[str, torch.Tensor]:
        """Per-token [n] fields for packing (prediction coordinates); with `overlong_filter` (DAPO) a
        truncated output has no loss token, so it counts in neither the loss nor its normaliser."""
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

    on_policy_shortcut = True  # no old-policy pass for a mini-batch the policy has not moved before (False: check)

    def __init__(self, cfg, policy, ref, engine, tokenizer, prompts, reward_model=None, records=None):
        self.cfg, self.policy, self.ref, self.engine, self.tok, self.prompts = cfg, policy, ref, engine, tokenizer, prompts
        # Optional r1mega.rewards.reward_model.RewardModelScorer (collective, on every rank like `ref`).
        self.reward_model = reward_model
        self.records = records  # optional r1mega.trainer.records.RolloutRecords (collective, every rank)
        self.algo: GRPOConfig = OmegaConf.to_object(cfg.algorithm)
        self.reward = RewardManager(cfg.reward, cfg.recipe.template) if engine is not None else None
        # Colocated rollouts: gradients and optimizer state leave the GPU while the engine runs; the
        # weights stay (the weight sync reads them).
        offload = partial(policy.offload, weights=False) if cfg.recipe.offload_train_state else None
        self.colocation = Colocation(engine, WeightSync(cfg.model, cfg.parallel, cfg.rollout),
                                     offload=offload, onload=policy.onload if offload else None)
        if offload:  # the first rollout comes before any training
            offload()
        self.router_replay = router_replay_mode(cfg)  # "none" | "r2" | "r3" (algorithm.router_replay resolved)
        self._held_routes: dict[tuple, torch.Tensor] = {}  # R3: engine routes of the samples this rank generated
        self.ref_step = 0  # the policy step the reference model holds
        # The reference lives in host memory except while it runs (`_ref_logprobs`).
        self.offload_ref = ref is not None and cfg.recipe.offload_reference
        if self.offload_ref:
            ref.offload()

    # -- one step ----------------------------------------------------------------------------------
    def step(self, rollout: int) -> dict:
        """Rollout `rollout` (0-based) and its `num_mini_batches x ppo_epochs` optimizer steps."""
        algo, timer = self.algo, PhaseTimer()
        self._agreement: dict[int, list[int]] = {}  # R3: MoE layer -> [tokens the trainer routes as the engine, tokens]
        # Dr.GRPO's divisor must not depend on packing: default to the rollout's generation limit.
        self.loss_cfg = replace(algo, norm_length=algo.norm_length or max_response_tokens(self.cfg.recipe, algo, rollout))

        # 1-3. prompts → rollout → rewards (dynamic sampling refills zero-variance groups)
        with timer("rollout_and_reward"):
            samples = self._collect(rollout)
        rewards = torch.tensor([s.scores["total"] for s in samples])

        # 4. group-normalised advantages, one per output
        adv = group_advantages(rewards, algo.group_size, algo.adv_eps, algo.std_normalize)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a

        # 5. mini-batches (whole groups), each DP rank's token-balanced share packed into microbatches
        self.colocation.to_training()
        parts = _split(samples, algo.num_mini_batches, algo.group_size)
        self._deliver_routes(parts)
        minibatches = [self._pack(part) for part in parts]

        # 6. reference and old-policy log-probs (no grad); MoE load from the old-policy pass
        with timer("ref"):
            if algo.kl_coef:
                self._ref_logprobs(minibatches)
        loads = self._old_logprobs(minibatches, timer)

        # 7. policy update: ppo_epochs passes, one optimizer step per mini-batch (the MoE load is
        #    recorded here when no old-policy pass ran)
        with timer("train"), record_expert_load(self.policy.model if loads is None else []) as train_loads:
            updates = [self._update(mb) for _ in range(algo.ppo_epochs) for mb in minibatches]
        loads = train_loads if loads is None else loads
        with timer("record"):
            self._record(rollout, samples, parts, minibatches)

        # 8. weight sync; the reference follows the policy every `ref_update_optimizer_steps`
        with timer("sync"):
            self.colocation.to_rollout(self.policy.model)
        if refreshes_reference(algo, rollout):
            self.refresh_reference(rollout + 1)

        return self._metrics(samples, minibatches, updates, loads, timer)

    # -- rollout and rewards -------------------------------------------------------------------------
    def _collect(self, step: int) -> list[Sample]:
        g, want = self.algo.group_size, self.cfg.recipe.prompts_per_rollout
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
        """Samples of prompts `idx` (in order) on every rank: each rollout replica generates and scores
        its contiguous share of the prompts, and the replicas' samples are gathered."""
        r = self.cfg.recipe
        replica, replicas, reports = self._replica()
        payload = []
        if self.engine is not None:
            mine = idx[replica * len(idx) // replicas:(replica + 1) * len(idx) // replicas]
            seed = call_seed(self.cfg.platform.seed, step, attempt, replica)
            outs = self.engine.generate(
                [self.prompts.ids[i] for i in mine], n=self.algo.group_size, temperature=r.temperature, top_p=r.top_p,
                max_tokens=max_response_tokens(r, self.algo, step), seed=seed,
                return_routes=self.router_replay == "r3",
            )
            payload = self._score(mine, outs) if reports else []
        self._hold_routes(payload, attempt, replica)
        samples = [s for part in all_gather_object(payload) for s in part]
        if self.reward_model is not None:
            self._score_reward_model(samples)
        return samples

    def _replica(self) -> tuple[int, int, bool]:
        """(this rank's rollout replica, number of replicas, whether it reports the replica's samples).
        CPU: one engine, on rank 0. GPU: every rank holds a shard of the engine of its vLLM
        tensor-parallel group (consecutive ranks, `rollout.tensor_parallel_size` each)."""
        if self.cfg.platform.device == "cpu" or not dist.is_initialized():
            return 0, 1, self.engine is not None
        tp = self.cfg.rollout.tensor_parallel_size
        return dist.get_rank() // tp, dist.get_world_size() // tp, dist.get_rank() % tp == 0

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
        for i, out in zip(idx, outs, strict=True):
            for c in out.completions:
                texts.append(self.tok.decode(c.token_ids, skip_special_tokens=True))
                rows.append(self.prompts.rows[i])
                samples.append(Sample(i, list(out.prompt_token_ids), list(c.token_ids), list(c.logprobs),
                                      c.finish_reason == "length", {}, routes=c.routed_experts))
        for s, scores in zip(samples, self.reward.score(list(zip(rows, texts))), strict=True):
            s.scores = scores
        return samples

    # -- R3: the engine's routes, from the rank that generated them to the ranks that train them -----
    def _hold_routes(self, payload: list[Sample], attempt: int, replica: int) -> None:
        """Names this replica's samples; their routes stay here (only the samples go to every rank)."""
        for j, s in enumerate(payload):
            s.uid = (attempt, replica, j)
            if s.routes is not None:
                self._held_routes[s.uid] = s.routes
                s.routes = None

    def _deliver_routes(self, parts: list[list[Sample]]) -> None:
        """R3: each rank receives the routes of the samples its data-parallel share of each mini-batch
        trains (`dp_shares`, as `pack_dp_share` divides them), cut to its pipeline stage's MoE layers."""
        if self.router_replay != "r3":
            return
        dp_rank, dp, _ = data_parallel()
        need = {part[i].uid for part in parts
                for i in dp_shares([len(s.prompt_ids) + len(s.response_ids) for s in part], self.algo.group_size, dp)[dp_rank]}
        got = exchange_routes(self._held_routes, need, local_moe_layers(self.policy.model),
                              route_shape(self.policy.model)[0])
        for part in parts:
            for s in part:
                s.routes = got.get(s.uid)
        self._held_routes = {}

    # -- packing and log-probs -----------------------------------------------------------------------
    def _pack(self, samples: list[Sample]) -> Packed:
        """This DP rank's share of mini-batch `samples` (whole groups, balanced by tokens), packed;
        every microbatch carries the mini-batch's global loss normaliser."""
        fields = [s.fields(self.algo.overlong_filter) for s in samples]
        normalizer = sum(loss_normalizer(f["resp_mask"][None], self.algo.loss_agg) for f in fields)
        shared = [len(s.prompt_ids) for s in samples] if self.cfg.recipe.share_prompts else None
        packed = self.policy.pack(fields, self.cfg.recipe.train_max_tokens, group_size=self.algo.group_size,
                                  prompt_lengths=shared)
        for mb, place in zip(packed.microbatches, packed.placement):
            # A padding-only microbatch trains as one fully masked row.
            mb["placement"] = place or [(-1, 0, mb["tokens"].shape[1])]
            mb["advantages"] = torch.tensor([samples[i].advantage if i >= 0 else 0.0 for i, _, _ in mb["placement"]])
            mb["normalizer"] = normalizer
            mb["logit_index"] = _response_positions(mb["placement"], samples)
            if self.router_replay == "r3":
                mb["routes"] = pack_routes([s.routes for s in samples], mb["placement"], mb["tokens"].shape[1],
                                           *route_shape(self.policy.model))
                mb["route_positions"] = route_positions(mb["placement"], mb["tokens"].shape[1])
        packed.response_tokens = sum(float(fields[i]["resp_mask"].sum()) for place in packed.placement
                                     for i, _, _ in place if i >= 0)
        return packed

    def _logprobs(self, engine, minibatches: list[Packed], key: str) -> None:
        """Adds `key` ([1, T] log-probs at the sampling temperature) to each microbatch on the ranks
        that compute logits for the loss (last pipeline stage)."""
        temperature = self.cfg.recipe.temperature

        def logprobs(logits, batch):
            return _token_logprobs(logits, batch, temperature, entropy=False)[0].detach()

        for mb in minibatches:
            for micro, logp in zip(mb.microbatches, engine.infer(mb.microbatches, logprobs)):
                micro[key] = logp

    def _ref_logprobs(self, minibatches: list[Packed]) -> None:
        """`ref_logp` of the microbatches (`_logprobs`); with `recipe.offload_reference` the reference
        comes out of host memory for the pass only."""
        if not self.offload_ref:
            return self._logprobs(self.ref, minibatches, "ref_logp")
        self.ref.onload()
        try:
            self._logprobs(self.ref, minibatches, "ref_logp")
        finally:  # a failed pass must not leave the reference's weights on the device
            self.ref.offload()

    def _old_logprobs(self, minibatches: list[Packed], timer: PhaseTimer) -> dict | None:
        """`old_logp` of the microbatches, pi_old of the PPO ratio (`algorithm.old_logp_source`):
        `trainer` recomputes it with the policy (phase `old_logp`) and returns the MoE expert load of
        that pass; `engine` takes the engine's log-probs, runs nothing and returns None.
        A mini-batch trained before the policy moves (the first, with one PPO epoch) needs no pass: its
        pi_old is its update's own forward, detached (`_loss`), the same numbers the pass would give."""
        if self.algo.old_logp_source == "engine":
            for p in minibatches:
                for mb in p.microbatches:
                    mb["old_logp"] = mb["engine_logp"]
            return None
        stale = minibatches[1:] if self.on_policy_shortcut and self.algo.ppo_epochs == 1 else minibatches
        if not stale:
            return None
        with timer("old_logp"), record_expert_load(self.policy.model) as loads, self._old_policy_routes(stale):
            self._logprobs(self.policy, stale, "old_logp")
        return loads

    @contextmanager
    def _old_policy_routes(self, minibatches: list[Packed]):
        """MoE routing of the old-policy pass (`algorithm.router_replay`): R3 replays the engine's
        routes; R2 records the pass's own, which the updates then replay (`routes` of each microbatch)."""
        micro = [m for p in minibatches for m in p.microbatches]
        if self.router_replay == "r3":
            with self._replay(micro):
                yield
        elif self.router_replay == "r2":
            with record_routes(self.policy.model) as recorded:
                yield
            for m, routes in zip(micro, recorded, strict=True):
                m["routes"] = routes
        else:
            yield

    def _replay(self, micro: list[dict]):
        """Replays the microbatches' routes. R3 also counts how often the trainer's own router agrees
        with the engine's (`_routing_agreement`) in a pass of the policy the engine sampled with: the
        old-policy pass, or the update of a mini-batch that had none (before the policy moves)."""
        routes = [m["routes"] for m in micro]
        if self.router_replay != "r3" or "old_logp" in micro[0]:
            return replay_routes(self.policy.model, routes)
        return replay_routes(self.policy.model, routes, agreement=self._agreement,
                             positions=[m["route_positions"] for m in micro])

    def _update(self, minibatch: Packed) -> dict:
        """One optimizer step on this rank's share of a mini-batch (with the MTP loss when
        `algorithm.mtp_loss_coef` > 0, over response tokens), replaying the microbatches' MoE routes
        under `algorithm.router_replay`."""
        # R2's on-policy mini-batch has no recorded routes: its update routes as the old pass would.
        micro = minibatch.microbatches
        replay = self._replay(micro) if "routes" in micro[0] else contextlib.nullcontext()
        with replay:
            return self.policy.train_step(minibatch.microbatches, self._loss, mtp_loss_coef=self.algo.mtp_loss_coef,
                                          mtp_mask_key="resp_mask")

    def _loss(self, logits: torch.Tensor, batch: dict):
        """This microbatch's share of the mini-batch loss (divided by the global normaliser; megatron
        sums shares over microbatches and DP ranks, see `MegatronEngine`) and its stats."""
        logp, entropy = _token_logprobs(logits, batch, self.cfg.recipe.temperature)
        place = batch["placement"]
        padded = lambda x: segments_to_padded(x, place)  # noqa: E731  [num_seqs, longest]
        batch.setdefault("old_logp", logp.detach())  # an on-policy mini-batch: pi_old is this forward
        old_logp, mask = padded(batch["old_logp"]), padded(batch["resp_mask"])
        loss, stats = grpo_loss(
            padded(logp), old_logp, batch["advantages"], mask, self.loss_cfg,
            normalizer=batch["normalizer"],
            ref_logp=padded(batch["ref_logp"]) if "ref_logp" in batch else None, entropy=padded(entropy),
            is_weight=rollout_is_weight(old_logp, padded(batch["engine_logp"]), mask, self.algo.rollout_correction),
        )
        return loss, torch.tensor(0), {**stats, "loss": loss.detach().clone()}

    def state_dict(self) -> dict:
        """What a resumed run needs besides the models: `ref_step`, the rollouts done when the reference
        last took the policy's weights (0: it holds the initial policy)."""
        return {"ref_step": self.ref_step}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` (from a checkpoint's state); KeyError names a missing entry."""
        self.ref_step = state["ref_step"]

    def refresh_reference(self, step: int) -> None:
        """The reference takes the policy's weights (into its host copy while offloaded)."""
        with torch.no_grad():
            for (_, p), (_, q) in zip(self.policy.named_parameters(), self.ref.named_parameters(), strict=True):
                q.copy_(p)
        self.ref_step = step

    def _record(self, rollout: int, samples: list[Sample], parts: list[list[Sample]], minibatches: list[Packed]) -> None:
        """The rollout record (r1mega.trainer.records): the samples as trained, with the trainer's
        pi_old per token, written by rank 0 every `recipe.records.every` rollouts."""
        if self.records is not None:
            self.records.write(rollout + 1, samples, parts, minibatches)

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
        # Advantages of the outputs that train (overlong-filtered ones do not): all samples, every rank.
        adv = torch.tensor([s.advantage for s in samples if not (self.algo.overlong_filter and s.truncated)],
                           dtype=torch.float64)
        if adv.numel():
            m["loss/adv_mean"], m["loss/adv_std"] = adv.mean().item(), adv.std(correction=0).item()
        real = sum(p.real_tokens for p in minibatches)
        m["packing_efficiency"] = real / max(sum(p.total_tokens for p in minibatches), 1)
        m["grad_norm"] = sum(float(u["grad_norm"] or 0.0) for u in updates) / len(updates)
        m["lr"] = updates[-1]["lr"]
        m["optimizer_steps"] = len(updates)
        # The engine reports temperature-1 log-probs: the gap to the trainer's means something only at
        # sampling temperature 1, and only where the trainer computed old_logp itself.
        gap = self.cfg.recipe.temperature == 1.0 and self.algo.old_logp_source == "trainer"
        m.update(_last_stage_metrics(minibatches, updates, self.algo.rollout_correction if gap else None))
        m.update(load_balance(_sum_over_ranks(loads)))
        m.update(_routing_agreement(self._agreement))
        # This DP rank's response tokens per pass over the rollout (rank-local, not gathered).
        m["dp/local_response_tokens"] = sum(p.response_tokens for p in minibatches)
        t = timer.seconds
        generated = lengths.sum().item()
        for phase, sec in t.items():
            m[f"time/{phase}"] = sec
        m["time/step"] = sum(t.values())
        m["throughput/rollout_tokens_per_s"] = generated / max(t.get("rollout_and_reward", 0.0), 1e-9)
        m["throughput/train_tokens_per_s"] = real * self.algo.ppo_epochs / max(t.get("train", 0.0), 1e-9)
        return m


def _response_positions(placement: list[tuple[int, int, int]], samples: list[Sample]) -> torch.Tensor | None:
    """[n] positions of a packed row whose next token is a response token (a sequence placed at
    [start, start + n), whole or from its last prompt token on (`recipe.share_prompts`), predicts its
    r response tokens at [start + n - 1 - r, start + n - 1)): where the GRPO passes need log-probs
    (`PolicyGPTModel`'s `logit_index`); None for a padding-only row."""
    spans = [torch.arange(start + n - 1 - len(samples[i].response_ids), start + n - 1) for i, start, n in placement
             if i >= 0]
    return torch.cat(spans) if spans else None


def _token_logprobs(logits: torch.Tensor, batch: dict, temperature: float, entropy: bool = True):
    """`vocab_parallel_logprobs` of `batch["target"]` as `[1, T]` rows: from logits of all T positions
    (`[1, T, V/tp]`), or of the positions `batch["logit_index"]` alone (`[1, n, V/tp]`), the others 0."""
    target, index = batch["target"], batch.get("logit_index")
    if index is None or logits.size(1) == target.size(1):
        return vocab_parallel_logprobs(logits, target, temperature, entropy)
    values = vocab_parallel_logprobs(logits, target.index_select(1, index), temperature, entropy)
    return tuple(None if v is None else v.new_zeros(target.shape).index_copy(1, index, v) for v in values)


def _split(samples: list[Sample], parts: int, group_size: int) -> list[list[Sample]]:
    """`parts` mini-batches of whole groups (fewer if there are fewer groups)."""
    groups = [samples[i:i + group_size] for i in range(0, len(samples), group_size)]
    parts = max(1, min(parts, len(groups)))
    return [[s for g in groups[k::parts] for s in g] for k in range(parts)]


def _rollout_correction_metrics(minibatches: list[Packed], correction, group) -> dict:
    """`rollout_corr/*` (r1mega.algorithms.correction.reduce_correction_stats) over every sequence of
    every microbatch of every DP rank, from the microbatches that hold `old_logp` (last stage)."""
    stats = []
    for p in minibatches:
        for mb, place in zip(p.microbatches, p.placement):
            if "old_logp" in mb and place:
                padded = lambda x: segments_to_padded(x, place)  # noqa: E731
                stats.append(rollout_correction_stats(padded(mb["old_logp"]), padded(mb["engine_logp"]),
                                                      padded(mb["resp_mask"]), correction))
    return reduce_correction_stats(stats, group)


def _routing_agreement(counts: dict[int, list[int]]) -> dict:
    """R3: per MoE layer, the share of the rollout's tokens (prompt and response) that the trainer's
    own router, with the weights the engine sampled with, would have sent to the engine's expert set;
    every rank's counts summed (a layer lives on one pipeline stage; tensor-parallel copies scale both
    counts alike)."""
    total: dict[int, list[int]] = {}
    for part in all_gather_object(counts):
        for layer, (same, n) in part.items():
            t = total.setdefault(layer, [0, 0])
            t[0], t[1] = t[0] + same, t[1] + n
    m = {f"routing/agreement/layer{layer}": same / n for layer, (same, n) in sorted(total.items()) if n}
    if m:
        m["routing/agreement/min"] = min(m.values())
    return m


def _sum_over_ranks(loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in all_gather_object(loads):
        for k, v in d.items():
            out[k] = out[k] + v if k in out else v
    return out


def _last_stage_metrics(minibatches: list[Packed], updates: list[dict], correction=None) -> dict:
    """Loss stats (token means over every microbatch of every DP rank, the true max ratio, the mean
    loss per optimizer step) and, with `correction` (the run's RolloutCorrectionConfig; None when the
    gap is not measured), the train–inference log-prob gap and the rollout-correction metrics,
    computed on the last pipeline stage and shared with every rank."""
    _, _, group = data_parallel()
    gap = correction is not None
    stats = [mm for u in updates for mm in u["metrics"] or []]
    m = {f"loss/{k}": v for k, v in reduce_stats(stats, group).items()}
    if gap:
        m.update(_rollout_correction_metrics(minibatches, correction, group))
    gaps = [((mb["old_logp"] - mb["engine_logp"]).abs() * mb["resp_mask"], mb["resp_mask"])
            for p in minibatches for mb in p.microbatches if gap and "old_logp" in mb]
    sums = torch.tensor([sum(float(mm["loss"]) for mm in stats), sum(float(g.sum()) for g, _ in gaps),
                         sum(float(mask.sum()) for _, mask in gaps),
                         sum(float(mm.get("mtp_nll_sum", 0.0)) for mm in stats),
                         sum(float(mm.get("mtp_tokens", 0.0)) for mm in stats)], dtype=torch.float64)
    top = torch.tensor(max((float(g.max()) for g, _ in gaps), default=0.0), dtype=torch.float64)
    if group is not None:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    if stats:
        m["loss/total"] = sums[0].item() / len(updates)  # each optimizer step's loss is a sum of shares
    if sums[2] > 0:
        m["logprob_gap/mean"], m["logprob_gap/max"] = (sums[1] / sums[2]).item(), top.item()
    if sums[4] > 0:  # algorithm.mtp_loss_coef > 0: the MTP head's mean NLL over response tokens
        m["loss/mtp"] = (sums[3] / sums[4]).item()
    return max(all_gather_object(m), key=len)
