"""`ModelConfig` → megatron-core `TransformerConfig` → `GPTModel` for this rank's pipeline stage.

Transformer Engine spec on GPU, megatron-core's local spec on CPU (adapted by `r1mega.platform.cpu`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(m, par, plat) -> TransformerConfig:
    """The megatron-core config of model `m` under layout `par` on platform `plat`."""
    dtype = DTYPES[m.params_dtype]
    on_cpu = plat.device == "cpu"
    kw = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        layernorm_epsilon=m.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Parallel layout.
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=par.num_layers_in_last_pipeline_stage,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        sequence_parallel=par.sequence_parallel and par.tensor_model_parallel_size > 1,
        # CPU init builds each full weight from the seed then slices this rank's shard, so every
        # layout starts from the same dense weights.
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        # Fused kernels are CUDA-only.
        bias_activation_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deterministic_mode=plat.deterministic,
    )
    if m.num_experts:
        pattern = [0] * m.first_k_dense_layers + [1] * (m.num_layers - m.first_k_dense_layers)
        kw.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=pattern,
            moe_router_topk=m.moe_router_topk,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=m.moe_router_bias_update_rate,
            moe_router_num_groups=m.moe_router_num_groups,
            moe_router_group_topk=m.moe_router_group_topk,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=not on_cpu,
            moe_permute_fusion=False,
        )
    if m.mtp_num_layers:
        kw["mtp_num_layers"] = m.mtp_num_layers
    if m.fp8 is not None:
        kw.update(fp8="e4m3" if m.fp8 == "blockwise" else "hybrid", fp8_recipe=m.fp8)
    if m.multi_latent_attention:
        return MLATransformerConfig(
            qk_layernorm=True,  # q_a_layernorm and kv_a_layernorm
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_head_dim=m.qk_head_dim,
            qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            rope_type=m.rope_type,
            rotary_base=m.rotary_base,
            rotary_scaling_factor=m.rotary_scaling_factor,
            original_max_position_embeddings=m.original_max_position_embeddings,
            beta_fast=m.beta_fast,
            beta_slow=m.beta_slow,
            mscale=m.mscale,
            mscale_all_dim=m.mscale_all_dim,
            **kw,
        )
    return TransformerConfig(**kw)


def layer_spec(config: TransformerConfig, use_te: bool, vp_stage: int | None = None):
    # The block spec (not a single layer spec) also carries the final norm and the dense/MoE pattern.
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage)
    if not use_te:
        from r1mega.platform import cpu

        spec = cpu.adapt_local_spec(spec)
    return spec


def build_model(m, par, plat, vp_stage: int | None = None) -> GPTModel:
    """This rank's `GPTModel` (its pipeline stage), on `plat.device`."""
    config = transformer_config(m, par, plat)
    use_te = plat.transformer_engine
    spec = layer_spec(config, use_te, vp_stage)
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te, vp_stage=vp_stage) if m.mtp_num_layers else None
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type="none" if m.multi_latent_attention else "rope",
        rotary_base=int(m.rotary_base),
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )
    _reduce_experts_over_expert_dp(model)
    return model.to(plat.device)


def _reduce_experts_over_expert_dp(model: GPTModel) -> None:
    """megatron tags expert weights for reduction over the expert-data-parallel group only when
    EP > 1 (`allreduce = not (is_expert and expert_parallel)`). With EP = 1 but expert-TP != TP
    (e.g. TP2, ETP1) the expert-DP group is larger than DP, and DDP would leave each rank with only
    its own tokens' expert gradients. Expert weights always belong to the expert-DP reduction."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
