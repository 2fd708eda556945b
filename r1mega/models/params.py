"""Analytic parameter counts of a `ModelConfig`, without building it.

The 671B model cannot be instantiated here, so its size comes from this arithmetic; a test checks
the same arithmetic against `sum(p.numel())` of the built tiny models, layer kind by layer kind.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCount:
    total: int  # the main model (what papers quote; excludes MTP modules)
    active: int  # per token: shared parts + top-k routed experts
    embedding: int  # input embedding + untied output layer
    attention_per_layer: int
    dense_mlp_per_layer: int
    expert: int  # one routed expert
    moe_layer_shared: int  # router + shared experts of one MoE layer
    mtp: int  # multi-token-prediction modules (not in `total`)

    def summary(self, name: str) -> str:
        def fmt(n: int) -> str:
            return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

        return f"{name}: {fmt(self.total)} total / {fmt(self.active)} active parameters"


def _attention(m) -> int:
    h = m.hidden_size
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        n = m.num_attention_heads
        if m.q_lora_rank:
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * qk  # q_a, q_a_norm, q_b
        else:
            q = h * n * qk
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank  # kv_a (+rope), kv_a_norm
        kv += m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)  # kv_b
        return q + kv + n * m.v_head_dim * h + h  # o_proj, input norm
    head = m.kv_channels or h // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    qkv_out = (m.num_attention_heads + 2 * groups) * head
    bias = qkv_out if m.add_qkv_bias else 0
    qk_norms = 2 * head if getattr(m, "qk_layernorm", False) else 0  # per-head q and k RMSNorm (Qwen3)
    return h * qkv_out + bias + qk_norms + m.num_attention_heads * head * h + h


def _gated_mlp(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # gate, up, down (SwiGLU, no biases)


def count_parameters(m) -> ParamCount:
    h = m.hidden_size
    attn = _attention(m)
    dense = _gated_mlp(h, m.ffn_hidden_size) + h  # + pre-MLP norm
    emb = m.vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    final_norm = h
    if not m.num_experts:
        total = emb + final_norm + m.num_layers * (attn + dense)
        return ParamCount(total, total, emb, attn, dense, 0, 0, 0)

    expert = _gated_mlp(h, m.moe_ffn_hidden_size)
    router = m.num_experts * h + (m.num_experts if m.moe_router_enable_expert_bias else 0)
    shared = _gated_mlp(h, m.moe_shared_expert_intermediate_size or 0)
    moe_shared_part = router + shared + h  # + pre-MLP norm
    n_dense = m.first_k_dense_layers
    n_moe = m.num_layers - n_dense
    common = emb + final_norm + n_dense * (attn + dense) + n_moe * (attn + moe_shared_part)
    total = common + n_moe * m.num_experts * expert
    active = common + n_moe * m.moe_router_topk * expert
    # Each MTP module (DeepSeek-V3 §2.2): two norms, a 2h->h projection, one MoE block, a final norm;
    # embedding and output head are shared with the main model.
    mtp = m.mtp_num_layers * (2 * h + 2 * h * h + attn + moe_shared_part + m.num_experts * expert + h)
    return ParamCount(total, active, emb, attn, dense, expert, moe_shared_part, mtp)
