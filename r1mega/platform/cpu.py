"""Every patch megatron-core 0.16.1 needs to run on CPU, each naming the failure it fixes.

Applied only when `platform.device == "cpu"` (by `r1mega.parallel.state.init_distributed`);
GPU runs use megatron-core untouched.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_mode: "_CudaToCpu | None" = None  # the process-wide mode `apply` entered


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in every torch call.

    Fixes megatron's hard-coded `device="cuda"`, `.cuda()` and `torch.cuda.current_device()` in
    optimizer, DDP buffers, grad clipping, schedules and dist_checkpointing, e.g.
    `optimizer.py:481 AssertionError: Torch not compiled with CUDA enabled`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Optimizer/DDP/clip_grads accept only `torch.cuda.*Tensor` type strings:
            # `TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...`.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: `RuntimeError: torch.cuda.Stream requires CUDA support`
    when instantiating MoELayer (alltoall dispatcher) and in pipeline utils."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # record_event() must return something with synchronize(), wait_stream() nothing useful.
        return lambda *a, **k: _NoOpStream()


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    # megatron wraps small kernels in torch.compile: first step ~29 s on CPU instead of ~20 ms.
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch._dynamo.config.disable = True
    # MLA rotary embedding, SP reduce-scatter buffers (built in autograd backward, where the
    # function mode is not active) and many others: `AssertionError: Torch not compiled with CUDA
    # enabled` from torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    global _mode
    _mode = _CudaToCpu()
    _mode.__enter__()
    without_transformer_engine()
    _gloo_all_to_all_with_list_splits()
    _distributed_optimizer_load_with_torch_adam()
    _recompute_without_cuda_rng()
    _moe_dispatcher_stream_independent_of_vllm()
    _swiglu_backward_in_place()
    _one_rank_buffer_collectives_skipped()


@contextlib.contextmanager
def without_cuda_rewrite():
    """Run the block without `_CudaToCpu`: for code native to CPU (the in-process vLLM engine's
    generation), where the mode only adds a Python call to every torch op (~0.1 s of a 1.2 s
    rollout of 4k tokens on 2 cores: decoding runs many small ops). A no-op unless the mode is the
    innermost one."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _mode is None or _get_current_function_mode() is not _mode:
        yield
        return
    with _pop_mode_temporarily():
        yield


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` torch intra-op threads, then restore the count.

    An in-process vLLM CPU engine sets the whole process to 1 thread when it loads its model
    (`set_torch_threads_for_runtime`: "Reducing Torch threads from 2 to 1 for serving") and replaces
    `torch.set_num_threads` with a no-op, so the colocated trainer's forward/backward would run on one
    core. `torch._C.set_num_threads` is the function vLLM's replacement hides."""
    before = torch.get_num_threads()
    torch._C.set_num_threads(n)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


def fused_adam(optimizer) -> None:
    """torch's fused Adam/AdamW CPU kernel for megatron's optimizer (`optimizer`: a MegatronOptimizer
    or ChainedOptimizer). Without TE/Apex megatron builds torch AdamW with `fused`/`foreach` unset,
    which on CPU is the per-tensor loop: ~10 passes over params and moments, 50-75 ms a step for 17M
    parameters against 21 ms fused. Set on the param groups, so checkpoints carry it and a resumed
    run steps the same way."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt = getattr(inner, "optimizer", None)
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            for group in opt.param_groups:
                group["fused"] = True


def _recompute_without_cuda_rng() -> None:
    """Activation recompute (`parallel.recompute_granularity`): megatron's `CheckpointFunction` saves
    and restores the CUDA RNG state around each recomputed chunk: `AssertionError: Torch not compiled
    with CUDA enabled` (tensor_parallel/random.py:55 `_get_cuda_rng_state`). A CPU process has no CUDA
    generator; the CPU state (torch.get_rng_state) and the RNG tracker's states are still restored.
    The recomputed forward runs inside autograd's backward, where `_CudaToCpu` is not active:
    `AssertionError: Torch not compiled with CUDA enabled` from the local attention's causal mask
    (transformer/utils.py:35 `torch.ones(sq, sq, device="cuda")`); run it under the mode."""
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None
    original = megatron_random.CheckpointFunction.backward

    def backward(ctx, *args):
        with _CudaToCpu():
            return original(ctx, *args)

    megatron_random.CheckpointFunction.backward = staticmethod(backward)


def _swiglu_backward_in_place() -> None:
    """SwiGLU's gradient (`r1mega.models.build` turns `bias_activation_fusion` on for CPU too: megatron's
    `SwiGLUFunction`). Unfused (the eager path without it, or megatron's `swiglu_back` with
    torch.compile off) it takes ~8 passes over [tokens, 2 x ffn] (sigmoid twice, products, a `cat`
    of the halves, and the eager path adds a zero `glu_linear_offset`): ~9% of a dense model's
    forward + backward on CPU. Here both halves of the gradient are written into one buffer: 4 passes."""
    from megatron.core.fusions import fused_bias_swiglu

    def swiglu_back(g, y):
        y_1, y_2 = torch.chunk(y, 2, -1)
        grad = torch.empty_like(y)
        grad_1, grad_2 = torch.chunk(grad, 2, -1)
        silu = torch.nn.functional.silu(y_1)
        torch.mul(g, silu, out=grad_2)
        torch.ops.aten.silu_backward.grad_input(torch.mul(g, y_2, out=silu), y_1, grad_input=grad_1)
        return grad

    fused_bias_swiglu.swiglu_back = swiglu_back


def _one_rank_buffer_collectives_skipped() -> None:
    """gloo copies a whole buffer even for a group of one rank: 30 ms for `reduce_scatter_tensor` and
    52 ms for `all_gather_into_tensor` of 17M floats. megatron's distributed optimizer runs both on
    the whole grad / param buffer every step, at DP=1 from the buffer into a view of itself. For a
    one-rank group both collectives are the identity: copy only where output and input differ."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer

    def one_rank_identity(collective):
        def run(output, input, *args, group=None, async_op=False, **kwargs):
            if dist.get_world_size(group) != 1:
                return collective(output, input, *args, group=group, async_op=async_op, **kwargs)
            if output.data_ptr() != input.data_ptr() or output.shape != input.shape:
                output.copy_(input)
            return None

        return run

    param_and_grad_buffer.dist_reduce_scatter_func = one_rank_identity(param_and_grad_buffer.dist_reduce_scatter_func)
    param_and_grad_buffer.dist_all_gather_func = one_rank_identity(param_and_grad_buffer.dist_all_gather_func)


def _moe_dispatcher_stream_independent_of_vllm() -> None:
    """The alltoall MoE dispatcher creates one process-wide `torch.cuda.Stream()` at its first
    construction. Importing vLLM's CPU worker (vllm/v1/worker/cpu/shm.py) replaces torch.cuda.Stream
    with a placeholder whose `record_event()` returns None, so a MoE model built after an in-process
    vLLM engine started (a Qwen3-MoE or DeepSeek-V3 model after any engine) fails in its first forward:
    `AttributeError: 'NoneType' object has no attribute 'synchronize'` (token_dispatcher.py:899).
    Give the dispatcher r1mega's no-op stream up front, whoever patched torch.cuda last."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoOpStream()


def _gloo_all_to_all_with_list_splits() -> None:
    """The EP token dispatcher passes split sizes as tensors/arrays, which gloo rejects:
    `TypeError: all_to_all_single(): incompatible function arguments`."""
    import torch.distributed as dist

    original = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        as_list = lambda s: None if s is None else [int(x) for x in s]  # noqa: E731
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *args, **kwargs)

    dist.all_to_all_single = all_to_all_single


def without_transformer_engine() -> None:
    """megatron.core.extensions.transformer_engine imports without TE (it stubs names with mocks),
    so modules that import from it believe TE is present."""
    try:
        import transformer_engine  # noqa: F401

        return
    except ImportError:
        pass
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    # MLA: `TypeError: isinstance() arg 2 must be a type, a tuple of types, or a union` (TELinear is a mock).
    multi_latent_attention.HAVE_TE = False
    # MoE router gemm: `NameError: name 'te_general_gemm' is not defined`.
    moe_utils.HAVE_TE = False
    moe_utils.te_general_gemm = None


def _local_modules():
    from megatron.core.parallel_state import get_tensor_model_parallel_world_size
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from r1mega.data.packing import shared_prefix_mask
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class CPUDotProductAttention(DotProductAttention):
        """megatron's local core attention with two CPU fixes.

        - MLA builds core attention with `k_channels`/`v_channels` (query/key and value head dims
          differ): `TypeError: DotProductAttention.__init__() got an unexpected keyword argument
          'k_channels'`. The local kernel is shape-generic except its output width.
        - The local kernel computes scores over the whole packed microbatch ([T, T] per head) and masks
          the block-diagonal causal mask (`r1mega.data.packing.block_causal_mask`) afterwards: with ~11
          sequences per 480-token row that is ~11x the attention work of per-sequence attention, plus
          unfused mask/scale/softmax passes. Here the packed sequences are attended as a batch of
          sequences (`_SegmentBatches`: similar lengths padded together) by torch's fused CPU
          `scaled_dot_product_attention`: no work across sequences, and a few kernel calls per layer
          instead of one per sequence. Same maths: the local kernel's masked scores get weight
          exp(-10000) = 0 in fp32; other cases (dropout, softmax offsets, sliding windows, batch > 1,
          other masks) keep the local kernel. A shared-prompt layout
          (`r1mega.data.packing.pack_shared_prompts`) gives each segment its prompt's keys and values
          ahead of its own, with the causal mask shifted past them."""

        def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(config, *args, **kwargs)
            if v_channels is not None:
                heads = config.num_attention_heads // get_tensor_model_parallel_world_size()
                self.hidden_size_per_partition = v_channels * heads

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            segments = self._causal_segments(query, attention_mask, attention_bias, packed_seq_params)
            if segments is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
            kw = dict(scale=self.softmax_scale, enable_gqa=query.size(2) != key.size(2))
            if len(segments) == 1 and segments[0][2] == segments[0][3]:  # one sequence: no gathers
                # [s, 1, heads, dim] -> [1, heads, s, dim]; GQA groups broadcast inside SDPA.
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
                return out.permute(2, 0, 1, 3).reshape(query.size(0), 1, self.hidden_size_per_partition)
            out = attend_segments(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1),
                                  attention_mask._r1mega_batches, **kw)
            return out.view(query.size(0), 1, self.hidden_size_per_partition)

        def _causal_segments(self, query, mask, bias, packed_seq_params) -> list[tuple[int, int, int, int]] | None:
            """[(start, end, prefix start, prefix end)] of the sequences of a block-diagonal causal `mask`
            ([1, 1, s, s] bool, True = masked; prefixes empty), or of the layout a shared-prompt mask
            carries (`_r1mega_layout`), or None where the fast path does not apply. Checked once per
            mask (cached on it)."""
            if (bias is not None or packed_seq_params is not None or query.size(1) != 1
                    or self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None
                    or self.config.apply_query_key_layer_scaling
                    or (self.training and self.attention_dropout.p > 0)):
                return None
            s = query.size(0)
            if mask is None:
                return [(0, s, 0, 0)] if self.attn_mask_type == AttnMaskType.causal else None
            if mask.dtype != torch.bool or tuple(mask.shape) != (1, 1, s, s):
                return None
            cached = getattr(mask, "_r1mega_segments", None)
            if cached is None:
                cached = getattr(mask, "_r1mega_layout", None)
                if cached is None:
                    starts = [0, *(torch.nonzero(mask[0, 0].diagonal(-1)).flatten() + 1).tolist()]
                    cached = [(a, b, a, a) for a, b in zip(starts, [*starts[1:], s])]
                if not torch.equal(shared_prefix_mask(cached, s), mask):
                    cached = []  # some other mask: the local kernel
                mask._r1mega_segments = cached
                mask._r1mega_batches = _SegmentBatches(cached) if cached else None
            return cached or None

    class SequenceParallelRMSNorm(torch.nn.RMSNorm):
        """megatron's torch norm wrapper refuses TP+SP (`AssertionError: sequence parallel not
        supported by torch LayerNorm`), which MoE with TP requires. Marking the weight
        `sequence_parallel` makes finalize_model_grads all-reduce its grad over the TP group."""

        def __new__(cls, config, hidden_size, eps=1e-5):
            if config.normalization == "LayerNorm":
                return WrappedTorchNorm(config, hidden_size, eps)
            return super().__new__(cls)

        def __init__(self, config, hidden_size, eps=1e-5):
            super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
            self.weight.sequence_parallel = config.sequence_parallel

    return {DotProductAttention: CPUDotProductAttention, WrappedTorchNorm: SequenceParallelRMSNorm}


class _SegmentBatches:
    """How `CPUDotProductAttention` attends the segments of one packed row in a few batched calls.

    `segments`: [(start, end, prefix start, prefix end)] covering the row's tokens (the prefix empty or
    another segment's range, as `_causal_segments` gives them). Segments sorted by length are grouped
    into buckets while a bucket's padded [queries x keys] area stays within `max_padding` x its
    segments' own. `buckets`: [(query index [B*Lq], key index [B*Lk], B, Lq, Lk, mask)]: row r of a
    bucket holds its segment's tokens from 0 and, as keys, its prefix then its own tokens; `mask`
    [B, 1, Lq, Lk] bool (True = attend) is causal shifted past the prefix, None (not built) where the
    bucket is plainly causal (no prefixes, so Lq = Lk). Padding repeats token 0 and no real query
    attends it; padded query rows see real keys (finite softmax) and their outputs are dropped.
    `rows` [T]: each token's row in the buckets' outputs concatenated."""

    def __init__(self, segments: list[tuple[int, int, int, int]], max_padding: float = 1.3):
        sizes = [(b - a, b - a + pb - pa) for a, b, pa, pb in segments]
        groups: list[list[int]] = []
        area = 0
        for j in sorted(range(len(segments)), key=lambda j: sizes[j][::-1]):  # by keys, then queries
            lq, lk = sizes[j]
            if groups and (len(groups[-1]) + 1) * max(lq, *(sizes[i][0] for i in groups[-1])) * lk \
                    <= max_padding * (area + lq * lk):
                groups[-1].append(j)
                area += lq * lk
            else:
                groups.append([j])
                area = lq * lk
        self.buckets = []
        self.rows = torch.empty(max(b for _, b, _, _ in segments), dtype=torch.long)
        offset = 0
        for group in groups:
            lq, lk = max(sizes[j][0] for j in group), max(sizes[j][1] for j in group)
            causal = all(segments[j][2] == segments[j][3] for j in group)  # then Lq = Lk
            qidx = torch.zeros(len(group), lq, dtype=torch.long)
            kidx = torch.zeros(len(group), lk, dtype=torch.long)
            mask = None if causal else torch.zeros(len(group), 1, lq, lk, dtype=torch.bool)
            for r, j in enumerate(group):
                a, b, pa, pb = segments[j]
                qidx[r, :b - a] = torch.arange(a, b)
                kidx[r, :pb - pa + b - a] = torch.cat([torch.arange(pa, pb), torch.arange(a, b)])
                if mask is not None:
                    mask[r, 0] = torch.ones(lq, lk, dtype=torch.bool).tril(pb - pa)
                self.rows[a:b] = offset + r * lq + torch.arange(b - a)
            self.buckets.append((qidx.flatten(), kidx.flatten(), len(group), lq, lk, mask))
            offset += len(group) * lq


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batches: _SegmentBatches,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of each segment of a packed row (`batches`, `_SegmentBatches`) over its
    prefix's and its own keys: `q` [T, heads, dk], `k` [T, kv heads, dk], `v` [T, kv heads, dv] ->
    [T, heads * dv]. One torch `scaled_dot_product_attention` per bucket."""
    outs = []
    for qidx, kidx, b, lq, lk, mask in batches.buckets:
        qb, kb, vb = (t.index_select(0, i).view(b, n, *t.shape[1:]).transpose(1, 2)
                      for t, i, n in ((q, qidx, lq), (k, kidx, lk), (v, kidx, lk)))
        out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None,
                                                               scale=scale, enable_gqa=enable_gqa)
        outs.append(out.transpose(1, 2).reshape(b * lq, -1))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, batches.rows)


def _duplicated_linear():
    """MLA's q/kv down-projections as TP-duplicated linears, as the Transformer Engine spec builds
    them. With megatron's local ColumnParallelLinear there, the rope key is all-gathered over the
    hidden dim whose backward only splits, so under TP the per-rank (per-head) gradients of
    `linear_kv_down_proj` are never summed: TP2 updates differ from one process by ~10%."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention

    class DuplicatedLinear(Linear):
        # Weight tagged `sequence_parallel` by the base class: finalize_model_grads sums it over TP.
        def __init__(self, input_size, output_size, *, config, init_method, **kwargs):
            super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
            if config.perform_initialization:
                with torch.no_grad():
                    init_method(self.weight)  # torch.nn.Linear's own init ignores init_method

    # MLA accepts down-projection classes by identity from its module-level `Linear` name.
    multi_latent_attention.Linear = DuplicatedLinear
    return DuplicatedLinear


def _swap(node, mapping, seen):
    """Replace module classes anywhere in a megatron ModuleSpec / *Submodules tree."""
    import dataclasses

    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, type):
        return mapping.get(node, node)
    if id(node) in seen:
        return node
    seen.add(id(node))
    if isinstance(node, MLASelfAttentionSubmodules):
        node.linear_q_down_proj = node.linear_kv_down_proj = mapping["duplicated_linear"]
    if isinstance(node, list):
        node[:] = [_swap(x, mapping, seen) for x in node]
    elif isinstance(node, ModuleSpec):
        node.module = _swap(node.module, mapping, seen)
        node.submodules = _swap(node.submodules, mapping, seen)
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            setattr(node, f.name, _swap(getattr(node, f.name), mapping, seen))
    return node


def adapt_local_spec(spec):
    """Swap modules of megatron's local (non-TE) spec that cannot run on CPU (see `_local_modules`)."""
    import copy

    mapping = {**_local_modules(), "duplicated_linear": _duplicated_linear()}
    return _swap(copy.deepcopy(spec), mapping, set())


def _distributed_optimizer_load_with_torch_adam() -> None:
    """Without Apex/TE the distributed optimizer wraps torch Adam, whose state (and its `step`)
    exists only after a first step; loading a checkpoint into a fresh optimizer fails in
    `DistributedOptimizer.state_dict` (distrib_optimizer.py:642 `assert len(steps) == 1`, or
    `KeyError: 'step'`). Fill the state with megatron's own dummy values first. Then the
    fully-reshardable load skips the saved "step" (restored from param groups) but copies into every
    state key: `KeyError: 'step'` at distrib_optimizer.py:940; keep the current step there."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return original(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"].clone()}
        return set_states(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    # Without Apex/TE, `DistributedOptimizer.load_state_dict` (distrib_optimizer.py:821-825) gives
    # every param's state ONE shared `step` tensor (`s["step"] = step`), and torch's
    # `Optimizer.load_state_dict` keeps `step` values as they are. torch Adam then increments that
    # tensor once per param in each step: after resuming, bias corrections use steps 2, 3, ..., N+1
    # (updates off by ~5e-3 at 1 process), the next save stores step = loaded + #params, and loading
    # a chained (dense + expert) optimizer fails in `ChainedOptimizer._synchronize_steps`
    # (`AssertionError: steps: [25.0, 51.0]`). Give each param its own step tensor.
    load_state_dict = DistributedOptimizer.load_state_dict

    def load_state_dict_unaliased_steps(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict_unaliased_steps
