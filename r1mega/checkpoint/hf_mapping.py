"""megatron-core ↔ Hugging Face names and layouts (DeepSeek-V3, Qwen2, Llama, Qwen3, Qwen3-MoE), one table per family.

Public API (used by the checkpoint converter and by the rollout weight sync):

    export_plan(model_cfg, parallel_cfg, dtype=None, mtp=True) -> list[PlanEntry]
        Every HF tensor of the model, in the fixed order `iter_hf_tensors` yields them:
        PlanEntry(hf_name, shape, dtype, pp_stage, ep_rank). `pp_stage` is the pipeline stage holding
        it, `ep_rank` the expert-parallel rank holding it (None for non-expert tensors, which every
        EP rank holds), `dtype` the one `iter_hf_tensors(..., dtype=dtype)` yields. `mtp=False` leaves
        out the multi-token-prediction layers. Pure: no communication, no model needed; the same on
        every rank.

    iter_hf_tensors(chunks, model_cfg, dst=None, dtype=None, mtp=True, buffer_bytes=BUFFER_BYTES)
            -> Iterator[tuple[str, torch.Tensor | None]]
        The export stream (checkpoint export and rollout weight sync). Collective over the whole
        world: every rank must call it with the same arguments and consume it to the end.
        Yields (hf_name, full tensor) for the whole model in `export_plan` order: TP shards gathered
        with fused layouts undone (QKV per query group, [gate; up]), experts gathered across EP,
        layers broadcast from their PP stage. `chunks` is this rank's list of model chunks
        (DDP-wrapped or not). Tensors are on the model's device, in `dtype` (default: the params
        dtype), except tensors megatron keeps in fp32 (router expert bias), which stay fp32; a tensor
        that needs no communication nor cast is a view of the parameter (copy it to keep it).
        `dst=None`: every rank gets every tensor. `dst=r` (export writer): only global rank r gets
        the tensors, every other rank yields (hf_name, None); a tensor r holds is assembled by r's
        TP group only, one r lacks by the first holder's TP group and sent to r.
        Memory: the stream holds one HF tensor and one communication buffer of at most
        `buffer_bytes` (bytes) at a time, so a consumer that keeps at most B bytes of what it received
        peaks at ≤ B + largest HF tensor + buffer_bytes. Each HF tensor is allocated once and every TP
        rank's block is broadcast straight into it (no all_gather of whole fused megatron tensors,
        which took 3-6x the largest tensor).

    load_hf_tensors(chunks, model_cfg, read) -> int
        Fill this rank's parameters (and the router expert bias) from HF tensors; `read(hf_name)`
        returns one full HF tensor (streamed from safetensors by `hf_io`). Every tensor of the
        chunks must be covered. Returns the number of elements set.

    hf_config(model_cfg) -> dict
        The HF `config.json` of the model.

HF names are the on-disk (checkpoint) names, which vLLM's `load_weights` also takes: per-expert
`mlp.experts.N.*`, although transformers 5 fuses experts in memory.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist

BUFFER_BYTES = 16 << 20  # default communication buffer of `iter_hf_tensors`, bytes


class PlanEntry(NamedTuple):
    hf_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pp_stage: int
    ep_rank: int | None


class Rule(NamedTuple):
    mcore: str  # megatron name (under `decoder.layers.N.` for layer rules); {e}: local expert id
    hf: tuple[str, ...]  # HF names it fuses (under `model.layers.L.` for layer rules); {e}: global expert id
    shapes: tuple[str, ...]  # each HF tensor's shape in `_dims` symbols
    tp: int | None = None  # TP split dim of the megatron tensor: 0 column-parallel, 1 row-parallel
    layout: str = "plain"  # key of LAYOUTS
    fp32: bool = False  # kept in fp32 whatever the params dtype


# ---- Tables -------------------------------------------------------------------------------------

TOP_FIRST = (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ("V h",), 0),)
TOP_LAST = (Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ("h",)),)
UNTIED_OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), ("V h",), 0)
# Tied embeddings under PP: the last stage keeps its own copy of the embedding as output layer.
TIED_OUTPUT = Rule("output_layer.weight", ("model.embed_tokens.weight",), ("V h",), 0)

NORMS = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",), ("h",)),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), ("h",)),
)
GQA = (
    Rule("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), ("Q h", "K h", "K h"), 0, "qkv"),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ("h Q",), 1),
)
# Qwen3: RMSNorm over each query / key head (head_dim weights, the same on every TP rank).
QK_NORMS = (
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), ("d",)),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), ("d",)),
)
QKV_BIAS = (
    Rule("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), ("Q", "K", "K"), 0, "qkv"),
)
MLA = (
    # Down-projections are TP-duplicated (not split); the up-projections split heads. No rope-row
    # permutation: megatron's MLA rope de-interleaves (x[0::2], x[1::2]) itself, as HF's
    # `rope_interleave=True` does, so both read DeepSeek's interleaved rope rows as they are.
    Rule("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), ("qa h",)),
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), ("qa",)),
    Rule("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",), ("qb qa",), 0),
    Rule("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",), ("kva h",)),
    Rule("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), ("kvl",)),
    Rule("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",), ("kvb kvl",), 0),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ("h o",), 1),
)
DENSE_MLP = (
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("F h", "F h"), 0, "gate_up"),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ("h F",), 1),
)
MOE_MLP = (
    Rule("mlp.router.weight", ("mlp.gate.weight",), ("n h",)),
    Rule("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), ("n",), fp32=True),
    # SequentialMLP (CPU); experts split over the expert-TP group.
    Rule("mlp.experts.local_experts.{e}.linear_fc1.weight", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), ("f h", "f h"), 0, "gate_up"),
    Rule("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), ("h f",), 1),
    Rule("mlp.shared_experts.linear_fc1.weight", ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), ("s h", "s h"), 0, "gate_up"),
    Rule("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), ("h s",), 1),
)

# DeepSeek-V3 multi-token prediction: HF layer `model.layers.{num_layers + k}` is megatron's
# `mtp.layers.{k}`: these rules, plus a decoder layer (`transformer_layer.` + the layer rules).
# eh_proj takes [enorm(embedding); hnorm(hidden)], in this order in both.
MTP = (
    Rule("enorm.weight", ("enorm.weight",), ("h",)),
    Rule("hnorm.weight", ("hnorm.weight",), ("h",)),
    Rule("eh_proj.weight", ("eh_proj.weight",), ("h h2",), 0),
    Rule("final_layernorm.weight", ("shared_head.norm.weight",), ("h",)),
)
# HF stores the MTP layer's own embedding and output head; megatron's MTP uses the model's (on the
# stage holding the MTP): exported as copies, imported from the MTP layer's names.
MTP_SHARED = (
    Rule("embedding.word_embeddings.weight", ("embed_tokens.weight",), ("V h",), 0),
    Rule("output_layer.weight", ("shared_head.head.weight",), ("V h",), 0),
)

# Transformer Engine spec (megatron `get_gpt_layer_with_transformer_engine_spec`, 0.16.1): a norm
# fused into the following linear is its `layer_norm_weight`; grouped-GEMM experts (TEGroupedMLP)
# are one module per layer with `weight{e}` per local expert. (local name, TE name, when: "gqa" =
# attention is not MLA (MLA keeps a separate input TENorm), "dense" = dense MLP (MoE keeps a
# separate pre-MLP TENorm), "mla" = MLA attention (GQA's q/k norms stay separate TENorms), "always").
TE_NAMES = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", "gqa"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", "dense"),
    ("self_attention.q_layernorm.weight", "self_attention.linear_q_up_proj.layer_norm_weight", "mla"),
    ("self_attention.kv_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight", "mla"),
    ("mlp.experts.local_experts.{e}.linear_fc1.weight", "mlp.experts.linear_fc1.weight{e}", "always"),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", "mlp.experts.linear_fc2.weight{e}", "always"),
)


def te_name(mcore: str, m, layer: int) -> str:
    """The Transformer Engine spec's name of layer rule `mcore` (unformatted) in global `layer`."""
    dense = not (m.num_experts and layer >= m.first_k_dense_layers)
    for local, te, when in TE_NAMES:
        mla = m.multi_latent_attention
        if mcore == local and (when == "always" or (when == "gqa" and not mla) or (when == "mla" and mla) or (when == "dense" and dense)):
            return te
    return mcore


def _dims(m) -> dict[str, int]:
    heads = m.num_attention_heads
    head_dim = m.kv_channels or m.hidden_size // heads
    qk, rope = m.qk_head_dim, m.qk_pos_emb_head_dim
    return dict(
        h=m.hidden_size, h2=2 * m.hidden_size, V=m.vocab_size, F=m.ffn_hidden_size,
        Q=heads * head_dim, K=(m.num_query_groups or heads) * head_dim, d=head_dim,
        qa=m.q_lora_rank or 0, qb=heads * (qk + rope), kvl=m.kv_lora_rank, kva=m.kv_lora_rank + rope,
        kvb=heads * (qk + m.v_head_dim), o=heads * m.v_head_dim,
        n=m.num_experts or 0, f=m.moe_ffn_hidden_size or 0, s=m.moe_shared_expert_intermediate_size or 0,
    )


def _layer_rules(m, layer: int) -> tuple[Rule, ...]:
    attn = MLA if m.multi_latent_attention else GQA + (QKV_BIAS if m.add_qkv_bias else ()) + (QK_NORMS if m.qk_layernorm else ())
    mlp = DENSE_MLP
    if m.num_experts and layer >= m.first_k_dense_layers:  # Qwen3-MoE: no expert bias, no shared expert
        mlp = tuple(r for r in MOE_MLP if (m.moe_router_enable_expert_bias or "expert_bias" not in r.mcore)
                    and (m.moe_shared_expert_intermediate_size or "shared_experts" not in r.mcore))
    return (NORMS[0],) + attn + (NORMS[1],) + mlp


# ---- Fused layouts ------------------------------------------------------------------------------


class Layout(NamedTuple):
    to_mcore: Callable  # (HF tensors, model cfg) -> full megatron tensor
    to_hf: Callable  # (megatron tensor, model cfg) -> views of its HF parts, shaped as `_hf_block` cuts them


def _qkv_to_mcore(parts, m):
    # megatron interleaves per query group: [q heads of the group, k, v], so a TP split of dim 0 is
    # a split of whole groups.
    groups = m.num_query_groups or m.num_attention_heads
    return torch.cat([p.reshape(groups, -1, *p.shape[1:]) for p in parts], 1).reshape(-1, *parts[0].shape[1:])


def _qkv_to_hf(t, m):
    # Views [groups, rows of the part per group, ...]: a TP shard holds whole groups.
    groups = m.num_query_groups or m.num_attention_heads
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    per_group = t.reshape(groups, -1, *t.shape[1:])
    return list(per_group.split([per_group.shape[1] - 2 * head_dim, head_dim, head_dim], 1))


LAYOUTS = {
    "plain": Layout(lambda p, m: p[0], lambda t, m: [t]),
    "gate_up": Layout(lambda p, m: torch.cat(p), lambda t, m: list(t.chunk(2))),  # each half TP-split separately
    "qkv": Layout(_qkv_to_mcore, _qkv_to_hf),
}


# ---- Items: one megatron tensor each -----------------------------------------------------------


class Item(NamedTuple):
    rule: Rule
    layer: int | None  # global layer (None: outside the decoder layers)
    expert: int | None  # global expert id

    def hf_names(self) -> list[str]:
        prefix = "" if self.layer is None else f"model.layers.{self.layer}."
        return [prefix + n.format(e=self.expert) for n in self.rule.hf]

    def hf_shapes(self, m) -> list[tuple[int, ...]]:
        d = _dims(m)
        return [tuple(d[s] for s in shape.split()) for shape in self.rule.shapes]

    def mcore_shape(self, m) -> tuple[int, ...]:
        shapes = self.hf_shapes(m)  # fused parts concatenate along dim 0
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def dtype(self, m, cast: torch.dtype | None = None) -> torch.dtype:
        """The exported dtype: `cast` (default the params dtype), fp32 for tensors kept in fp32."""
        from r1mega.models.build import DTYPES

        return torch.float32 if self.rule.fp32 else cast or DTYPES[m.params_dtype]


def _items(m, mtp: bool = True) -> Iterator[Item]:
    """Every exported megatron tensor, in HF order (without the MTP layers unless `mtp`)."""
    for rule in TOP_FIRST:
        yield Item(rule, None, None)
    for layer in range(m.num_layers):
        for rule in _layer_rules(m, layer):
            for e in range(m.num_experts) if "{e}" in rule.mcore else [None]:
                yield Item(rule, layer, e)
    for rule in TOP_LAST:
        yield Item(rule, None, None)
    if m.untie_embeddings_and_output_weights:
        yield Item(UNTIED_OUTPUT, None, None)
    for layer in range(m.num_layers, m.num_layers + (m.mtp_num_layers or 0) if mtp else m.num_layers):
        yield Item(MTP_SHARED[0], layer, None)
        for rule in MTP[:3] + _layer_rules(m, layer) + MTP[3:] + MTP_SHARED[1:]:
            for e in range(m.num_experts) if "{e}" in rule.mcore else [None]:
                yield Item(rule, layer, e)


def _mcore_name(item: Item, m, local_layer: int | None, local_expert: int | None, te: bool = False) -> str:
    """Megatron name of `item` in a model chunk: `local_layer` is its index in `decoder.layers`
    (or in `mtp.layers` for an MTP item), `local_expert` its index among this rank's experts."""
    rule = item.rule
    if item.layer is None or rule in MTP_SHARED:
        if rule is MTP_SHARED[1] and not m.untie_embeddings_and_output_weights:
            return "embedding.word_embeddings.weight"
        return rule.mcore
    if item.layer >= m.num_layers and rule in MTP:
        return f"mtp.layers.{local_layer}." + rule.mcore
    name = te_name(rule.mcore, m, item.layer) if te else rule.mcore
    prefix = f"mtp.layers.{local_layer}.transformer_layer." if item.layer >= m.num_layers else f"decoder.layers.{local_layer}."
    return prefix + name.format(e=local_expert)


def mcore_name_plan(model_cfg, te: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """(megatron name, HF names) of every exported tensor of the whole model as one pipeline stage
    and one EP rank (global layer and expert numbers), for the local spec or Transformer Engine's."""
    m = model_cfg
    return [
        (_mcore_name(item, m, None if item.layer is None else item.layer - (m.num_layers if item.layer >= m.num_layers else 0), item.expert, te), tuple(item.hf_names()))
        for item in _items(m)
    ]


def _layer_stages(config) -> list[int]:
    """Pipeline stage of every global layer (megatron's own offsets, so uneven and virtual
    pipelines agree with the built model)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    stages = [0] * config.num_layers
    vpp = config.virtual_pipeline_model_parallel_size
    for p in range(config.pipeline_model_parallel_size):
        for v in range(vpp) if vpp else [None]:
            first = get_transformer_layer_offset(config, v, p)
            for layer in range(first, first + get_num_layers_to_build(config, v, p)):
                stages[layer] = p
    return stages


def _owner(item: Item, stages: list[int], config) -> tuple[int, int | None]:
    """(pp stage, ep rank) holding `item`."""
    if item.layer is None:
        last = item.rule in TOP_LAST or item.rule is UNTIED_OUTPUT
        return (config.pipeline_model_parallel_size - 1 if last else 0), None
    ep = None if item.expert is None else item.expert // (config.num_moe_experts // config.expert_model_parallel_size)
    if item.layer >= len(stages):  # MTP: megatron's default places it on the last stage
        return config.pipeline_model_parallel_size - 1, ep
    return stages[item.layer], ep


def export_plan(model_cfg, parallel_cfg, dtype: torch.dtype | None = None, mtp: bool = True) -> list[PlanEntry]:
    from r1mega.models.build import transformer_config

    config = transformer_config(model_cfg, parallel_cfg, SimpleNamespace(device="cpu", deterministic=False))
    stages = _layer_stages(config)
    plan = []
    for item in _items(model_cfg, mtp):
        stage, ep = _owner(item, stages, config)
        for name, shape in zip(item.hf_names(), item.hf_shapes(model_cfg)):
            plan.append(PlanEntry(name, shape, item.dtype(model_cfg, dtype), stage, ep))
    return plan


# ---- This rank's tensors ------------------------------------------------------------------------


def _local_tensors(chunks, m) -> dict[Item, torch.Tensor]:
    """Every tensor this rank holds, by the item it belongs to (local-spec or Transformer Engine
    names, whichever the chunk has; a tensor HF stores twice, as MTP's embedding/head, is both)."""
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    local_experts = (m.num_experts or 0) // ps.get_expert_model_parallel_world_size()
    out = {}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        top = TOP_FIRST + TOP_LAST + (UNTIED_OUTPUT if m.untie_embeddings_and_output_weights else TIED_OUTPUT,)
        named = [(rule.mcore, Item(rule, None, None)) for rule in top]
        layers = [(i, layer.layer_number - 1, ()) for i, layer in enumerate(module.decoder.layers)]
        mtp = getattr(module, "mtp", None)
        if mtp is not None:
            first = m.num_layers + (mtp.layers[0].layer_number - 1 if len(mtp.layers) else 0)
            layers += [(k, first + k, MTP + MTP_SHARED) for k in range(len(mtp.layers))]
        for i, g, extra in layers:
            for rule in _layer_rules(m, g) + extra:
                for k in range(local_experts) if "{e}" in rule.mcore else [None]:
                    item = Item(rule, g, None if k is None else ep_rank * local_experts + k)
                    for te in (False, True):
                        named.append((_mcore_name(item, m, i, k, te), item))
        mapped = set()
        for name, item in named:
            if name in tensors and item not in out:
                out[item] = tensors[name]
                mapped.add(name)
        unmapped = [n for n, t in tensors.items() if isinstance(t, torch.nn.Parameter) and n not in mapped]
        if unmapped:
            raise KeyError(f"no HF mapping for megatron tensors {unmapped[:5]} (arch {m.arch})")
    return out


def _tp(item: Item):
    """(rank, size, group) of the tensor-parallel group that splits `item`."""
    from megatron.core import parallel_state as ps

    if item.expert is not None:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()


def _tp_shard_model(m, size: int) -> SimpleNamespace:
    """What a fused layout needs to know of one TP shard (qkv: its query groups, their head size)."""
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    return SimpleNamespace(num_query_groups=(m.num_query_groups or m.num_attention_heads) // size, kv_channels=head_dim)


def load_hf_tensors(chunks, model_cfg, read: Callable[[str], torch.Tensor]) -> int:
    m = model_cfg
    # A TP shard of a fused tensor is the fusion of each HF part's own TP chunk (QKV splits whole
    # query groups, [gate; up] each half, row-parallel tensors are plain), so a reader that can
    # read part of a tensor (`HFReader.read_slice`) never materialises the full one.
    read_slice = getattr(read, "read_slice", None) or (lambda name, dim, rank, size: read(name).chunk(size, dim)[rank])
    n = 0
    for item, tensor in _local_tensors(chunks, m).items():
        rank, size, _ = _tp(item)
        layout = LAYOUTS[item.rule.layout]
        if item.rule.tp is None or size == 1:
            shard = layout.to_mcore([read(name) for name in item.hf_names()], m)
        else:
            assert item.rule.tp == 0 or item.rule.layout == "plain", item.rule
            parts = [read_slice(name, item.rule.tp, rank, size) for name in item.hf_names()]
            shard = layout.to_mcore(parts, _tp_shard_model(m, size))
        if shard.shape != tensor.shape:
            raise ValueError(f"{item.hf_names()}: HF gives {tuple(shard.shape)}, megatron has {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(shard)
        n += tensor.numel()
    return n


def iter_hf_tensors(
    chunks, model_cfg, dst: int | None = None, dtype: torch.dtype | None = None, mtp: bool = True,
    buffer_bytes: int = BUFFER_BYTES,
) -> Iterator[tuple[str, torch.Tensor | None]]:
    from megatron.core import parallel_state as ps

    m = model_cfg
    module = getattr(chunks[0], "module", chunks[0])
    config = module.config
    local = _local_tensors(chunks, m)
    stages = _layer_stages(config)
    device = next(module.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    me_rank = dist.get_rank() if dist.is_initialized() else 0
    # (pp stage, ep rank) of every global rank: who holds each tensor.
    me = (ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank())
    coords = [me] * world
    if world > 1:
        dist.all_gather_object(coords, me)
    buffer = _Buffer(buffer_bytes, device)
    for item in _items(m, mtp):
        stage, ep = _owner(item, stages, config)
        holders = [r for r, (p, e) in enumerate(coords) if p == stage and (ep is None or e == ep)]
        shard = local.get(item)
        tp_rank, tp_size, group = _tp(item) if shard is not None else (0, 1, None)
        if shard is None or item.rule.tp is None or tp_size == 1:  # nothing to gather
            tp_rank, tp_size, group = 0, 1, None
        # Who assembles the full tensor: every holder, or with `dst` the TP group of `dst` if it
        # holds the tensor, else of the first holder (`source`), which then sends it to `dst`.
        source = dst if dst in holders else holders[0]
        assembles = shard is not None and (
            dst is None or (source in dist.get_process_group_ranks(group) if group is not None else me_rank == source))
        broadcast = dst is None and len(holders) < world  # from the first holder to every rank
        wanted = dst is None or me_rank == dst
        for i, (name, shape) in enumerate(zip(item.hf_names(), item.hf_shapes(m))):
            out_dtype = item.dtype(m, dtype)
            mine = LAYOUTS[item.rule.layout].to_hf(shard.detach(), _tp_shard_model(m, tp_size))[i] if assembles else None
            if assembles and tp_size == 1 and mine.is_contiguous() and not broadcast:
                out = mine.reshape(shape).to(out_dtype)  # a view of the parameter when no cast is needed
            elif assembles or wanted:
                out = torch.empty(shape, dtype=out_dtype, device=device)
                for r in range(tp_size if assembles else 0):
                    block = _hf_block(out, item, r, tp_size, m)
                    if r == tp_rank:
                        block.copy_(mine)
                    if group is not None:
                        buffer.broadcast(block, dist.get_global_rank(group, r), group)
                    del block  # a view: it would keep `out` alive into the next tensor
            else:
                out = None
            del mine
            if broadcast:
                buffer.broadcast(out, holders[0], None)
            elif dst is not None and dst != source and me_rank == source:
                buffer.send(out, dst)
            elif dst is not None and dst != source and me_rank == dst:
                buffer.recv(out, source)
            yield name, out if wanted else None
            del out


class _Buffer:
    """The communication buffer of one `iter_hf_tensors` stream, reused by every transfer.
    Collectives go through it, not into the yielded tensors: a gloo worker thread can drop its
    reference to a finished collective's tensor after the next tensor is allocated, so a tensor the
    consumer has released would briefly stay alive. Also what makes non-contiguous blocks
    (row-parallel splits) communicable."""

    def __init__(self, nbytes: int, device):
        self.nbytes, self.device, self.buf = max(1, nbytes), device, None

    def _pieces(self, t: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(piece of t, buffer view of its shape): pieces of ≤ nbytes along dim 0 (at least one row)."""
        flat = t.view(-1) if t.is_contiguous() else t
        row = flat[0].numel() * flat.element_size() if flat.dim() > 1 else flat.element_size()
        step = max(1, self.nbytes // row)
        need = min(step, flat.shape[0]) * row
        if self.buf is None or self.buf.numel() < need:
            self.buf = None
            self.buf = torch.empty(max(need, min(self.nbytes, flat.numel() * flat.element_size())), dtype=torch.uint8, device=self.device)
        for a in range(0, flat.shape[0], step):
            piece = flat[a : a + step]
            yield piece, self.buf[: piece.numel() * piece.element_size()].view(piece.dtype).view(piece.shape)

    def broadcast(self, t: torch.Tensor, src: int, group) -> None:
        """t ← t on global rank `src`, over `group` (None: the world)."""
        sending = dist.get_rank() == src
        for piece, buf in self._pieces(t):
            if sending:
                buf.copy_(piece)
            dist.broadcast(buf, src, group=group)
            if not sending:
                piece.copy_(buf)

    def send(self, t: torch.Tensor, dst: int) -> None:
        for piece, buf in self._pieces(t):
            buf.copy_(piece)
            dist.send(buf, dst)

    def recv(self, t: torch.Tensor, src: int) -> None:
        for piece, buf in self._pieces(t):
            dist.recv(buf, src)
            piece.copy_(buf)


def _hf_block(out: torch.Tensor, item: Item, r: int, tp_size: int, m) -> torch.Tensor:
    """TP rank r's block of the HF tensor `out`, shaped like that rank's `Layout.to_hf` part."""
    if item.rule.layout == "qkv":
        groups = m.num_query_groups or m.num_attention_heads
        return out.reshape(groups, -1, *out.shape[1:]).chunk(tp_size, 0)[r]
    return out.chunk(tp_size, item.rule.tp or 0)[r]


# ---- HF config ----------------------------------------------------------------------------------


def hf_config(model_cfg) -> dict:
    m = model_cfg
    common = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
        rope_theta=m.rotary_base, tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        hidden_act="silu", initializer_range=m.init_method_std,
        torch_dtype={"fp32": "float32", "bf16": "bfloat16"}[m.params_dtype],
    )
    if m.arch == "deepseek_v3":
        # r1mega.config.validate requires topk = 2 x group_topk, so group scoring matches HF/vLLM.
        rope_scaling = None
        if m.rope_type == "yarn":
            rope_scaling = dict(
                type="yarn", rope_type="yarn", factor=m.rotary_scaling_factor,
                original_max_position_embeddings=m.original_max_position_embeddings,
                beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale, mscale_all_dim=m.mscale_all_dim,
            )
        return dict(
            common, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
            moe_intermediate_size=m.moe_ffn_hidden_size,
            n_shared_experts=(m.moe_shared_expert_intermediate_size or 0) // m.moe_ffn_hidden_size,
            n_routed_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
            routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0,
            n_group=m.moe_router_num_groups or 1, topk_group=m.moe_router_group_topk or 1,
            # transformers 5 drops these two; vLLM needs them (KeyError on e_score_correction_bias).
            topk_method="noaux_tc", scoring_func="sigmoid",
            norm_topk_prob=True,  # megatron normalises sigmoid top-k scores when topk > 1
            first_k_dense_replace=m.first_k_dense_layers,
            q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_head_dim, qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
            head_dim=m.qk_pos_emb_head_dim, rope_interleave=True, rope_scaling=rope_scaling,
            num_nextn_predict_layers=m.mtp_num_layers, attention_bias=False,
        )
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    if m.arch == "qwen2":
        return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    if m.arch == "llama":
        rope_scaling = None
        if m.rope_type == "llama3":  # megatron-core's fixed low/high frequency factors (validated)
            rope_scaling = dict(rope_type="llama3", factor=m.rotary_scaling_factor, low_freq_factor=1.0,
                                high_freq_factor=4.0, original_max_position_embeddings=m.original_max_position_embeddings)
        return dict(
            common, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False,
            head_dim=head_dim, rope_scaling=rope_scaling,
        )
    if m.arch == "qwen3" and not m.num_experts:
        return dict(common, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=head_dim,
                    attention_bias=False, use_sliding_window=False)
    if m.arch == "qwen3":
        return dict(
            common, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=head_dim,
            attention_bias=False, use_sliding_window=False, num_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk, moe_intermediate_size=m.moe_ffn_hidden_size,
            norm_topk_prob=not m.moe_router_pre_softmax, decoder_sparse_step=1,
            mlp_only_layers=list(range(m.first_k_dense_layers)), router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
    raise ValueError(f"no HF mapping for arch {m.arch!r}")
