"""Bytes per GPU: training states and activations per pipeline stage, and the colocated vLLM engine.

Parameter counts come from `r1mega.models.params`; this module only decides where each parameter
and activation lives. All byte sizes and reserves are config fields (see `schema.PlannerConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from r1mega.models.params import count_parameters

GB = 1e9


@dataclass(frozen=True)
class Facts:
    """Parameter counts split the way parallelism splits them."""

    layers: int
    dense_layers: int  # leading layers with a dense MLP (all of them for a dense model)
    attn: int
    attn_replicated: int  # MLA down-projections + latent norms: duplicated across TP ranks
    dense_mlp: int
    moe_shared: int  # router + shared experts + norm of one MoE layer
    experts_per_layer: int  # all routed experts of one MoE layer
    emb_in: int
    emb_out: int
    mtp_dense: int
    mtp_experts: int
    total: int
    active: int

    @property
    def active_matmul(self) -> int:
        """Active parameters that do matmuls: the input embedding is a lookup."""
        return self.active - self.emb_in


def facts(m) -> Facts:
    pc = count_parameters(m)
    moe = bool(m.num_experts)
    rep = 0
    if m.multi_latent_attention:
        q = m.q_lora_rank or 0
        rep = m.hidden_size * (q + m.kv_lora_rank + m.qk_pos_emb_head_dim) + q + m.kv_lora_rank
    emb_in = m.vocab_size * m.hidden_size
    experts = (m.num_experts or 0) * pc.expert
    mtp_experts = m.mtp_num_layers * experts
    return Facts(
        layers=m.num_layers, dense_layers=m.first_k_dense_layers if moe else m.num_layers,
        attn=pc.attention_per_layer, attn_replicated=rep, dense_mlp=pc.dense_mlp_per_layer,
        moe_shared=pc.moe_layer_shared, experts_per_layer=experts, emb_in=emb_in,
        emb_out=pc.embedding - emb_in, mtp_dense=pc.mtp - mtp_experts, mtp_experts=mtp_experts,
        total=pc.total, active=pc.active,
    )


def stage_layers(layers: int, pp: int, first=None, last=None) -> list[int]:
    """Layers per pipeline stage as megatron-core splits them (uneven first/last stages allowed)."""
    if pp == 1:
        return [layers]
    mid_layers, mid_stages = layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
    each = mid_layers // mid_stages if mid_stages else 0
    mids = [each] * mid_stages
    return ([first] if first is not None else []) + mids + ([last] if last is not None else [])


def stage_params(f: Facts, counts: list[int], i: int, include_mtp: bool) -> tuple[int, int, int]:
    """(non-expert, of which replicated across TP, expert) parameters held by pipeline stage i."""
    start = sum(counts[:i])
    dense_idx = range(start, start + counts[i])
    n_dense = sum(1 for j in dense_idx if j < f.dense_layers)
    n_moe = counts[i] - n_dense
    non_exp = counts[i] * f.attn + n_dense * f.dense_mlp + n_moe * f.moe_shared
    rep = counts[i] * f.attn_replicated
    exp = n_moe * f.experts_per_layer
    if i == 0:
        non_exp += f.emb_in
    if i == len(counts) - 1:
        non_exp += f.emb_out
        if include_mtp:
            non_exp, exp = non_exp + f.mtp_dense, exp + f.mtp_experts
    return non_exp, rep, exp


def _pieces(m, moe: bool):
    """Activations one layer saves for backward, per token: (elements, recompute tags, is GEMM input, seq-sharded).

    Fused (flash) attention is assumed, so no s^2 score matrix is saved. Tags are megatron-core
    `recompute_modules` names; a piece is dropped when any of its tags is recomputed.
    """
    h, n = m.hidden_size, m.num_attention_heads
    p = [(h, (), False, True), (h, ("layernorm",), True, True)]  # layer input; attention norm output
    if m.multi_latent_attention:
        q, kv, rope = m.q_lora_rank or 0, m.kv_lora_rank, m.qk_pos_emb_head_dim
        qk = m.qk_head_dim + rope
        p += [
            (q + kv + rope, (), False, False),  # down-projection outputs (latents)
            (q + kv, ("mla_up_proj",), True, False),  # normed latents, inputs to the up-projections
            (2 * n * qk + n * m.v_head_dim, ("mla_up_proj",), False, False),  # Q, K, V
        ]
        v = m.v_head_dim
    else:
        d = m.kv_channels or h // n
        g = m.num_query_groups or n
        p.append(((n + 2 * g) * d, (), False, False))  # Q, K, V
        v = d
    p += [(n * v, (), True, False), (2 * n, ("core_attn",), False, False)]  # attention output; fp32 softmax stats
    p.append((h, ("layernorm",), True, True))  # MLP norm output
    if not moe:
        f = m.ffn_hidden_size
        return p + [(2 * f, ("mlp",), False, False), (f, ("mlp",), True, False)]
    k, fe, fs = m.moe_router_topk, m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size or 0
    return p + [
        (2 * m.num_experts, (), False, True),  # fp32 router probabilities
        (k * h, ("moe",), True, True),  # dispatched tokens (top-k copies)
        (2 * k * fe, ("moe",), False, True),  # expert fc1 outputs
        (k * fe, ("moe_act", "moe"), True, True),  # expert activation outputs
        (2 * fs, ("shared_experts", "moe"), False, False),
        (fs, ("shared_experts", "moe"), True, False),
    ]


def layer_activation_bytes(m, moe: bool, tp: int, sp: bool, recompute: str, modules, c) -> float:
    """Bytes one layer saves per token of a microbatch (divided over tensor/sequence parallel ranks)."""
    if recompute == "full":  # only the layer input is kept; the rest is rebuilt in backward
        return m.hidden_size * c.activation_bytes / (tp if sp else 1)
    total = 0.0
    for elems, tags, gemm_in, seq_dim in _pieces(m, moe):
        if recompute == "selective" and any(t in modules for t in tags):
            continue
        nbytes = c.fp8_activation_bytes if (m.fp8 and gemm_in) else c.activation_bytes
        total += elems * nbytes / (tp if (sp or not seq_dim) else 1)
    return total


def train_memory(m, f: Facts, lay, c, cl) -> dict:
    """Peak training memory per GPU over pipeline stages, and the host memory offload takes."""
    tp, pp, vpp = lay.tp, lay.pp, lay.vpp or 1
    dp, edp = lay.world // (tp * pp * lay.cp), lay.world // (lay.ep * lay.etp * pp)
    counts = stage_layers(f.layers, pp, lay.first, lay.last)
    mbs_tokens = c.micro_batch_size * c.seq_length / lay.cp
    n_micro = max(1, math.ceil(c.global_batch_size / (c.optimizer_steps_per_rl_step * dp * c.micro_batch_size)))
    moe = bool(m.num_experts)
    per_layer = {
        kind: layer_activation_bytes(m, kind, tp, lay.sp, c.recompute, c.recompute_modules, c) * mbs_tokens
        for kind in ({False, True} if moe else {False})
    }
    full = None  # full recompute: every activation of a layer, which exist while it is recomputed
    if c.recompute == "full":
        full = {k: layer_activation_bytes(m, k, tp, lay.sp, "none", (), c) * mbs_tokens for k in per_layer}
    penalty = 1 + (pp - 1) / (pp * vpp) if lay.vpp else 1.0  # interleaved 1F1B keeps more in flight
    worst, host_peak = None, 0.0
    for i in range(pp):
        non_exp, rep, exp = stage_params(f, counts, i, c.include_mtp)
        local_dense = (non_exp - rep) / tp + rep
        local_exp = exp / (lay.ep * lay.etp)
        params = local_dense + local_exp
        shard = (local_dense / dp + local_exp / edp) if lay.dist_opt else params
        optim = shard * c.optimizer_bytes
        start = sum(counts[:i])
        n_dense = sum(1 for j in range(start, start + counts[i]) if j < f.dense_layers)
        kinds = [False] * n_dense + [moe] * (counts[i] - n_dense)  # a stage's dense layers come first
        act_one, working = _stage_activations(kinds, per_layer, full, c, vpp)
        in_flight = min(n_micro, (pp - i) * penalty)
        logits = mbs_tokens * m.vocab_size / tp * c.logits_bytes if i == pp - 1 else 0.0
        row = {
            "stage": i,
            "layers": counts[i],
            "params": params,
            "expert_params": local_exp,
            "weights_gb": params * c.param_bytes / GB,
            "grads_gb": params * c.grad_bytes / GB,
            "optimizer_gb": optim * (1 - c.optimizer_offload_fraction) / GB,
            "fp8_copies_gb": params * c.fp8_weight_bytes / GB if m.fp8 else 0.0,
            "activations_gb": (act_one * in_flight + working + logits) / GB,
            "in_flight_microbatches": in_flight,
            "ref_model_gb": params * c.param_bytes / GB if c.ref_on_gpu else 0.0,
            "reserved_gb": c.reserved_gb,
            "host_optimizer_gb": optim * c.optimizer_offload_fraction / GB,
            "host_ref_model_gb": 0.0 if c.ref_on_gpu or not c.rl else params * c.param_bytes / GB,
        }
        row["total_gb"] = sum(row[k] for k in ("weights_gb", "grads_gb", "optimizer_gb", "fp8_copies_gb",
                                               "activations_gb", "ref_model_gb", "reserved_gb"))
        # While vLLM runs: the training states on the GPU. The offload (r1mega: MegatronEngine.
        # offload(weights=False)) moves gradients and optimizer state to host memory; the weights (the
        # weight sync reads them) and a reference kept on the GPU stay.
        offloaded = row["grads_gb"] + row["optimizer_gb"] if (c.rl and c.offload_train_states_in_rollout) else 0.0
        row["states_gb"] = (row["weights_gb"] + row["grads_gb"] + row["optimizer_gb"] + row["fp8_copies_gb"]
                            + row["ref_model_gb"] - offloaded)
        row["host_rollout_offload_gb"] = offloaded
        row["host_total_gb"] = row["host_optimizer_gb"] + row["host_ref_model_gb"] + row["host_rollout_offload_gb"]
        if worst is None or row["total_gb"] > worst["total_gb"]:
            worst = row
        host_peak = max(host_peak, row["host_total_gb"])
    worst = dict(worst, dp=dp, expert_dp=edp, microbatches=n_micro, stage_layers=counts)
    worst["host_per_node_gb"] = host_peak * min(cl.gpus_per_node, lay.world)
    return worst


def _stage_activations(kinds: list, per_layer: dict, full, c, vpp: int) -> tuple[float, float]:
    """(bytes one microbatch leaves saved on a stage, bytes alive only while a chunk is recomputed).

    Full recompute keeps only the input of each checkpointed chunk (`per_layer` then holds just
    that); megatron-core's `recompute_method=uniform` checkpoints chunks of `recompute_num_layers`
    layers, all of whose activations exist while one is recomputed; `block` checkpoints the first
    `recompute_num_layers` layers of each model chunk one by one and keeps every activation of the rest.
    """
    if full is None:
        return sum(per_layer[k] for k in kinds), 0.0
    n = max(1, int(getattr(c, "recompute_num_layers", None) or 1))
    if (getattr(c, "recompute_method", None) or "uniform") == "uniform":
        return math.ceil(len(kinds) / n) * per_layer[False], min(n, len(kinds)) * max(full.values())
    r = min(len(kinds), n * vpp)  # block: taken as the stage's first layers
    return r * per_layer[False] + sum(full[k] for k in kinds[r:]), (max(full.values()) if r else 0.0)


def rollout_memory(m, f: Facts, r, c, cl, train_states_gb: float) -> dict:
    """The colocated vLLM engine per GPU: weights at its own TP (x DP with expert parallel), KV capacity."""
    wbytes = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "fp8": 1.0}[r.dtype]
    ranks = r.tp * r.dp
    non_exp = f.total - f.experts_per_layer * (f.layers - f.dense_layers)
    rep = f.layers * f.attn_replicated
    exp = f.total - non_exp
    params = (non_exp - rep) / r.tp + rep + exp / (ranks if r.ep else r.tp)
    weights = params * wbytes
    budget = r.util * cl.gpu_memory_gb * GB
    kv_bytes = budget - weights - c.rollout_activation_gb * GB
    if m.multi_latent_attention:  # one latent per token per layer, replicated on every TP rank
        per_token = f.layers * (m.kv_lora_rank + m.qk_pos_emb_head_dim) * c.kv_cache_bytes
    else:  # each TP rank caches its share of the KV heads (a whole head when TP exceeds them)
        g = m.num_query_groups or m.num_attention_heads
        d = m.kv_channels or m.hidden_size // m.num_attention_heads
        per_token = f.layers * 2 * max(1, g // r.tp) * d * c.kv_cache_bytes
    tokens = max(0, int(kv_bytes // per_token))
    engine_tokens = tokens * r.dp  # each attention-DP rank caches its own sequences
    resident = train_states_gb  # what stays on the GPU after the rollout offload (train_memory's states_gb)
    return {
        "tp": r.tp, "dp": r.dp, "expert_parallel": r.ep,
        "params": params, "weights_gb": weights / GB, "budget_gb": budget / GB,
        "activation_reserve_gb": c.rollout_activation_gb, "kv_cache_gb": max(0.0, kv_bytes) / GB,
        "kv_bytes_per_token": per_token, "kv_tokens_per_gpu": tokens, "kv_tokens_per_engine": engine_tokens,
        "concurrent_seqs_per_engine": engine_tokens // c.seq_length,
        "train_states_resident_gb": resident,
        "total_gb": (budget / GB) + resident + c.reserved_gb,
    }
