"""`ModelConfig` → megatron-core `TransformerConfig` → `GPTModel` for this rank's pipeline stage.

Transformer Engine spec on GPU, megatron-core's local spec on CPU (adapted by `r1mega.platform.cpu`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.multi_token_prediction import roll_tensor
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(m, par, plat, routing_replay: bool = False) -> TransformerConfig:
    """The megatron-core config of model `m` under layout `par` on platform `plat`. `routing_replay`
    (MoE models): give every router a megatron `RouterReplay` (`r1mega.models.router_replay`)."""
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
        qk_layernorm=getattr(m, "qk_layernorm", False),  # Qwen3's per-head q/k RMSNorm (MLA sets its own below)
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
        # Fused kernels are CUDA-only. The local spec's fused softmax needs apex's/megatron's compiled
        # `scaled_masked_softmax_cuda` (its shape check imports it: ModuleNotFoundError in bf16 without it).
        # SwiGLU's autograd function runs on CPU too, with r1mega's backward (platform.cpu).
        bias_activation_fusion=True,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu and _fused_softmax_kernels(),
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deterministic_mode=plat.deterministic,
    )
    # Activation recompute (parallel.recompute_*; validated in r1mega.config.validate).
    kw.update({k: getattr(par, k, None) for k in ("recompute_granularity", "recompute_method", "recompute_num_layers")})
    if m.num_experts:
        pattern = [0] * m.first_k_dense_layers + [1] * (m.num_layers - m.first_k_dense_layers)
        kw.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=pattern,
            # ModelConfig's router fields carry megatron-core's TransformerConfig names.
            **{k: getattr(m, k) for k in ("moe_router_topk", "moe_router_score_function", "moe_router_enable_expert_bias",
                                          "moe_router_bias_update_rate", "moe_router_num_groups", "moe_router_group_topk",
                                          "moe_router_topk_scaling_factor", "moe_router_pre_softmax",
                                          "moe_router_load_balancing_type", "moe_aux_loss_coeff")},
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            # Grouped GEMM only through TE (TEGroupedMLP): without it megatron picks the legacy
            # GroupedMLP, which needs the `grouped_gemm` package and has no HF mapping (hf_mapping
            # knows SequentialMLP's and TEGroupedMLP's names).
            moe_grouped_gemm=getattr(plat, "transformer_engine", False),
            moe_permute_fusion=False,
            # One RouterReplay per router (record / replay top-k ids); inert until an action is set.
            moe_enable_routing_replay=routing_replay,
        )
    if m.mtp_num_layers:
        kw["mtp_num_layers"] = m.mtp_num_layers
    if m.fp8 is not None:
        kw.update(fp8="e4m3" if m.fp8 == "blockwise" else "hybrid", fp8_recipe=m.fp8)
    if m.multi_latent_attention:
        kw["qk_layernorm"] = True  # q_a_layernorm and kv_a_layernorm
        return MLATransformerConfig(
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

        # Without Transformer Engine installed, megatron's TE stubs make MLA and the MoE router
        # believe it is (a TypeError / NameError on CPU and on a GPU without TE alike).
        cpu.without_transformer_engine()
        # The block's final norm is megatron's `LNImpl`: apex's FusedLayerNorm wherever apex is
        # installed (NGC images), which refuses RMSNorm; its local layers use WrappedTorchNorm for RMSNorm.
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec.layer_norm = WrappedTorchNorm
        spec = cpu.adapt_local_spec(spec)
    return spec


def _local_mtp_norms(mtp_spec, spec):
    """megatron's local MTP spec takes its norms (enorm, hnorm, final) from the backend, not from the
    decoder spec: the plain torch norm, which refuses sequence parallelism (`AssertionError: sequence
    parallel not supported by torch LayerNorm when instantiating MultiTokenPredictionLayer` at TP2).
    Use the decoder's (adapted) final-norm class."""
    if mtp_spec is not None:
        for layer in mtp_spec.layer_specs:
            layer.submodules.enorm = layer.submodules.hnorm = layer.submodules.layer_norm = spec.layer_norm
    return mtp_spec


def _fused_softmax_kernels() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(k) is not None for k in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"))


class PolicyGPTModel(GPTModel):
    """`GPTModel` that returns the main head's logits (`[b, s, V/tp]`) in every pass, with or without
    multi-token prediction (MTP). r1mega's loss functions need logits (vocab-parallel log-probs,
    entropy), but megatron-core 0.16.1's `_postprocess` with MTP configured needs `labels` (it clones
    them for the MTP loss: `labels=None` raises AttributeError) and, given labels, returns the LM loss.

    - `labels=None`: logits; the MTP block does not run (it only feeds a loss);
    - `labels` and `mtp_loss_mask` (`[b, s]`, 1 where position t's next token is a loss token): the
      MTP loss through megatron's own path (MTP block; labels and mask rolled one position per depth;
      loss scaled by `config.mtp_loss_scaling_factor / mtp_num_layers` and injected into the backward
      by `MTPLossAutoScaler`), and the main logits returned. `mtp_stats` then holds this forward's
      detached MTP NLL sum and token count over all depths;
    - `labels` alone: megatron's behaviour (per-token LM loss; with MTP, its loss over all tokens).

    `logit_index` (`[n]` sorted positions of a `[1, s]` microbatch, with `labels=None`): the output
    layer runs on those positions' hidden states only and the logits are `[1, n, V/tp]` (GRPO needs
    log-probs only where a response token is predicted: prompt positions skip the LM head's matmul
    and the softmax passes, as TRL's `logits_to_keep`). Ignored, logits `[1, s, V/tp]`, where the
    hidden states are sharded along the sequence (sequence or context parallelism).

    `rope_positions` (`[1, s]`): rotary embeddings at these positions instead of the packed index
    (megatron's RoPE sees only position differences inside a packed sequence; a shared prompt,
    `r1mega.data.packing.pack_shared_prompts`, is followed by segments that continue its positions).
    ValueError for models with their own rotary (MLA) or other position embeddings.
    """

    _logits_with_mtp_loss = False
    _main_labels = None
    _mtp_nll = None
    _logit_index = None
    _rope_positions = None
    mtp_stats: dict | None = None

    def forward(self, *args, mtp_loss_mask=None, logit_index=None, rope_positions=None, **kwargs):
        if rope_positions is not None and (self.position_embedding_type != "rope" or self.config.multi_latent_attention):
            raise ValueError(f"rope_positions: the model's positions are {self.position_embedding_type}"
                             f"{' (MLA, its own rotary)' if self.config.multi_latent_attention else ''}, not megatron's RoPE")
        self._logit_index, self._rope_positions = logit_index, rope_positions
        try:
            if mtp_loss_mask is None:
                return super().forward(*args, **kwargs)
            self._logits_with_mtp_loss, self._mtp_nll = True, []
            try:
                return super().forward(*args, loss_mask=mtp_loss_mask, **kwargs)
            finally:
                self._logits_with_mtp_loss, self._mtp_nll = False, None
        finally:
            self._logit_index = self._rope_positions = None

    def _preprocess(self, *args, **kw):
        out = super()._preprocess(*args, **kw)
        if self._rope_positions is None:
            return out
        positions = self._rope_positions.reshape(-1)  # [s]: one packed row
        emb = self.rotary_pos_emb(int(positions.max()) + 1)  # [max position + 1, 1, 1, dim]
        return (out[0], emb.index_select(0, positions.to(emb.device)), *out[2:])

    def _postprocess(self, *args, **kw):
        if (self._logit_index is not None and kw["labels"] is None and self.post_process
                and not self.config.sequence_parallel and self.config.context_parallel_size == 1):
            hidden = kw["hidden_states"]  # [s, 1, h] -> [n, 1, h]
            kw["hidden_states"] = hidden.index_select(0, self._logit_index.to(hidden.device))
        if self.config.mtp_num_layers is None or not self.mtp_process:
            return super()._postprocess(*args, **kw)
        if kw["labels"] is None:
            # Skip the MTP block; megatron gates its MTP loss on the config (not on labels), so the
            # depth is hidden from it for this call.
            kw["mtp_in_postprocess"] = False
            depth, self.config.mtp_num_layers = self.config.mtp_num_layers, None
            try:
                return super()._postprocess(*args, **kw)
            finally:
                self.config.mtp_num_layers = depth
        if not self._logits_with_mtp_loss:
            return super()._postprocess(*args, **kw)
        # megatron ends with the LM loss of these labels; r1mega's loss_fn computes its own from logits,
        # so compute_language_model_loss returns the logits for exactly these labels (not the MTP ones).
        self._main_labels = kw["labels"]
        try:
            logits = super()._postprocess(*args, **kw)
        finally:
            self._main_labels = None
        self.mtp_stats = self._mtp_metrics(kw["loss_mask"], kw.get("packed_seq_params"))
        return logits

    def compute_language_model_loss(self, labels, logits):
        if self._logits_with_mtp_loss and labels is self._main_labels:
            return logits.transpose(0, 1).contiguous()  # [s, b, V/tp] -> [b, s, V/tp], as without labels
        loss = super().compute_language_model_loss(labels, logits)
        if self._logits_with_mtp_loss:
            self._mtp_nll.append(loss.detach())  # one [b, s] per MTP depth, before megatron masks it
        return loss

    def _mtp_metrics(self, loss_mask, packed_seq_params) -> dict:
        """The MTP NLL summed over the tokens megatron counts (its mask rolled once per depth)."""
        nll_sum, tokens = 0.0, 0.0
        for nll in self._mtp_nll:
            loss_mask, n = roll_tensor(loss_mask, shifts=-1, dims=-1, cp_group=self.cp_group,
                                       packed_seq_params=packed_seq_params)
            nll_sum, tokens = nll_sum + (nll * loss_mask).sum(), tokens + n
        return {"mtp_nll_sum": torch.as_tensor(nll_sum).detach().float(),
                "mtp_tokens": torch.as_tensor(tokens).detach().float()}


def build_model(m, par, plat, vp_stage: int | None = None, routing_replay: bool = False) -> GPTModel:
    """This rank's `PolicyGPTModel` (its pipeline stage), on `plat.device`. `routing_replay`: see
    `transformer_config` (e.g. `MegatronEngine(cfg, build_fn=partial(build_model, routing_replay=True))`)."""
    config = transformer_config(m, par, plat, routing_replay=routing_replay)
    use_te = plat.transformer_engine
    spec = layer_spec(config, use_te, vp_stage)
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te, vp_stage=vp_stage) if m.mtp_num_layers else None
    if not use_te:
        mtp_spec = _local_mtp_norms(mtp_spec, spec)
    model = PolicyGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type="none" if m.multi_latent_attention else "rope",
        rotary_base=int(m.rotary_base),
        # Llama-3.1 rope (validated: megatron fixes low/high frequency factors 1, 4 and 8,192 positions).
        rope_scaling=m.rope_type == "llama3",
        rope_scaling_factor=m.rotary_scaling_factor,
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
