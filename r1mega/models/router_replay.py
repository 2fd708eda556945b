"""MoE routing replay in the trainer, on megatron-core's `RouterReplay` (R2 / R3).

- R2: record the trainer's own routing in the old-policy pass (`record_routes`) and replay it in the
  update passes (`replay_routes`), so the ratio's numerator and denominator use the same experts.
- R3: replay the rollout engine's routing (`Completion.routed_experts`, `r1mega.rollout.routes`) in
  every trainer pass, so the trainer's log-probs are those of the experts that sampled the tokens.

The model must be built with `build_model(..., routing_replay=True)` (megatron's
`TransformerConfig.moe_enable_routing_replay`: one `RouterReplay` per router, inert until an action
is set); `routing_replay_requested(cfg)` says whether a run asks for it.

Routes of one microbatch: `[T, num_moe_layers, topk]` (packed `[1, T]` rows; `[b, T, L, k]` for
b > 1), expert ids of every input position of the row, padding included, all MoE layers of the
model in layer order. `pack_routes` builds it from per-sample routes (`[n - 1, L, k]`, route format
of `r1mega.rollout.routes`) and a `pack` placement. Each rank's hooks take their share of it: the MoE
layers of their pipeline stage (and virtual stages), and with sequence parallelism their TP rank's
sequence slice (the router runs on the SP-local tokens). With expert parallelism every rank routes
all its own tokens before the dispatch, so nothing changes. Context parallelism is not handled.

Replay acts on the forward (`REPLAY_FORWARD`) and on activation recompute in the backward
(`REPLAY_BACKWARD`: megatron pops each router's targets first-in first-out, and the schedule
backpropagates a chunk's microbatches in forward order). Replay fixes which experts a token uses;
the gate weights are still the current router's scores at those experts (megatron gathers them), so
router gradients flow. Multi-token-prediction layers are left to route themselves (the engine runs
none). The aux loss (`seq_aux_loss`) is computed from the router's own top-k, not the replayed one;
the aux-loss-free expert-bias load counts (training passes) count the replayed experts.
Tested on CPU (tests/test_router_replay.py): 1 process with recompute, TP2 + SP, PP2 (1F1B), EP2.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from r1mega.rollout.routes import canonical, route_dtype


_TRAINER_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def router_replay_mode(cfg) -> str:
    """`algorithm.router_replay` of run `cfg` resolved: "none", "r2" or "r3". `auto` is r3 for a MoE
    model whose engine computes other numbers than the trainer (a GPU's kernels, or another dtype:
    there engine and trainer route some tokens to other experts, README "MoE rollout–training
    consistency"), and none for a dense model or an engine that matches the trainer bit for bit in
    routing (CPU, same dtype: 100% agreement measured)."""
    mode = cfg.algorithm.router_replay
    if mode != "auto":
        return mode
    if cfg.model.num_experts is None:
        return "none"
    same = cfg.platform.device == "cpu" and _TRAINER_DTYPE[cfg.model.params_dtype] == cfg.rollout.dtype
    return "none" if same else "r3"


def moe_layer_indices(config) -> list[int]:
    """0-based decoder-layer indices of the MoE layers (megatron's `moe_layer_freq`: a 0/1 pattern or
    every k-th layer); position i in this list is column i of the routes."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i for i in range(config.num_layers) if i % freq == 0]
    return [i for i, moe in enumerate(freq) if moe]


@dataclass
class _LocalRouter:
    replay: object  # megatron RouterReplay
    column: int  # MoE-layer index in the routes


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def local_routers(model_chunks) -> list[list[_LocalRouter]]:
    """Per model chunk, its decoder MoE routers with their route column, in layer order."""
    out = []
    for chunk in model_chunks:
        model = _unwrap(chunk)
        modules = dict(model.named_modules())
        columns = {layer: c for c, layer in enumerate(moe_layer_indices(model.config))}
        found = []
        for name, module in modules.items():
            if not (name.startswith("decoder.layers.") and name.endswith(".mlp.router")):
                continue
            if getattr(module, "router_replay", None) is None:
                raise RuntimeError("routing replay needs a model built with routing_replay=True "
                                   "(TransformerConfig.moe_enable_routing_replay)")
            layer = modules[name[: -len(".mlp.router")]]
            found.append(_LocalRouter(module.router_replay, columns[layer.layer_number - 1]))
        out.append(sorted(found, key=lambda r: r.column))
    return out


def local_moe_layers(model_chunks) -> list[int]:
    """The route columns (MoE layers) this rank's chunks hold; recorded routes are meaningful there only."""
    return sorted(r.column for chunk in local_routers(model_chunks) for r in chunk)


def route_shape(model_chunks) -> tuple[int, int, int]:
    """(MoE layers, top-k, routed experts) of the model: a route tensor is `[tokens, L, k]` of ids < E."""
    config = _unwrap(model_chunks[0]).config
    return len(moe_layer_indices(config)), config.moe_router_topk, config.num_moe_experts


def exchange_routes(held: dict, need, columns: list[int], num_layers: int) -> dict:
    """The routes of the samples `need` (keys of some rank's `held`) on each rank, every rank at once:
    each rank that holds routes sends each rank only the routes it asks for, cut to the MoE-layer
    `columns` of its pipeline stage (the others come back 0), so no rank ever holds every sample's
    routes (DeepSeek-V3: 58 layers x top-8 bytes per token; a whole rollout's would not fit in host
    memory). `held`: this rank's {key: `[n - 1, L, k]`}. A collective over the world group; raises
    if a needed key is held nowhere."""
    import torch.distributed as dist

    from r1mega.parallel.state import all_gather_object

    if not dist.is_initialized() or dist.get_world_size() == 1:
        out = {k: held[k] for k in need if k in held}
    else:
        asks = all_gather_object((sorted(need), list(columns), bool(held)))
        rank, out = dist.get_rank(), {}
        for src, (_, _, has) in enumerate(asks):
            if not has:
                continue
            send = ([{k: held[k][:, cols] for k in keys if k in held} for keys, cols, _ in asks]
                    if rank == src else None)
            box = [None]
            dist.scatter_object_list(box, send, src=src)
            for k, part in box[0].items():
                full = torch.zeros(part.shape[0], num_layers, part.shape[2], dtype=part.dtype)
                full[:, columns] = part
                out[k] = full
    missing = set(need) - set(out)
    if missing:
        raise RuntimeError(f"exchange_routes: no rank holds the routes of {len(missing)} needed samples "
                           f"(e.g. {sorted(missing)[:3]})")
    return out


def padding_routes(num_tokens: int, num_moe_layers: int, topk: int, num_experts: int) -> torch.Tensor:
    """Routes for positions no sample supplies (padding, each sample's last token): token j goes to
    experts j*k .. j*k+k-1 (mod E), spread evenly over the experts (and EP ranks). Harmless for the
    loss: padding and a sample's last position are masked out of it, attention is block-diagonal and
    causal, so nothing else attends to them; megatron runs dropless here (no
    `moe_expert_capacity_factor`), so they take no other token's capacity, only compute. They do
    count in the router's expert-bias load statistics (as unreplayed padding does)."""
    j = torch.arange(num_tokens)[:, None] * topk + torch.arange(topk)[None]
    ids = (j % num_experts)[:, None, :].expand(num_tokens, num_moe_layers, topk)
    return canonical(ids, num_experts)


def pack_routes(sample_routes, placement, total_tokens: int, num_moe_layers: int, topk: int,
                num_experts: int) -> torch.Tensor:
    """`[T, L, k]` routes of one packed microbatch: `sample_routes[i]` (`[n_i - 1, L, k]`, or n_i rows)
    at the sample's `(i, start, n_i)` placement (`r1mega.data.packing.Packed.placement[mb]`, in
    packing order), `padding_routes` everywhere else (the padding tail, each sample's last token,
    placement index -1)."""
    out = padding_routes(total_tokens, num_moe_layers, topk, num_experts)
    for i, start, n in placement:
        if i < 0:
            continue
        r = torch.as_tensor(sample_routes[i])
        if r.dim() != 3 or r.shape[1:] != (num_moe_layers, topk) or r.shape[0] < n - 1:
            raise ValueError(f"pack_routes: sample {i} of {n} tokens has routes {tuple(r.shape)}, "
                             f"expected [{n - 1} or {n}, {num_moe_layers}, {topk}]")
        rows = min(r.shape[0], n)
        out[start:start + rows] = r[:rows].to(out.dtype)
    return out


def route_positions(placement, total_tokens: int) -> torch.Tensor:
    """bool `[T]`: the positions of a packed microbatch whose routes a sample supplies (`pack_routes`;
    not padding, not a sample's last token)."""
    out = torch.zeros(total_tokens, dtype=torch.bool)
    for i, start, n in placement:
        if i >= 0:
            out[start:start + n - 1] = True
    return out


def routing_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per MoE layer (`[..., L, k]` inputs), the fraction of tokens routed to the same expert set."""
    same = (canonical(a, 2**15).long() == canonical(b, 2**15).long()).all(-1)
    return same.reshape(-1, same.shape[-1]).float().mean(0)


# -- megatron hooks -----------------------------------------------------------------------------------
def _sp() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    if ps.get_context_parallel_world_size() > 1:
        raise NotImplementedError("routing replay with context parallelism")
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()


def to_router_order(routes: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """`[T, L, k]` / `[b, T, L, k]` microbatch routes → the `[tokens, L, k]` rows this rank's routers
    see: megatron flattens `[s, b]` s-major, and with sequence parallelism each TP rank holds the
    s / tp consecutive positions of its rank."""
    r = routes if routes.dim() == 4 else routes[None]
    r = r.transpose(0, 1)  # [s, b, L, k]
    tp, rank, _ = _sp()
    if sequence_parallel and tp > 1:
        s = r.shape[0] // tp
        r = r[rank * s:(rank + 1) * s]
    return r.reshape(-1, *r.shape[2:])


def _from_router_order(rows: torch.Tensor, batch: int, sequence_parallel: bool) -> torch.Tensor:
    """Inverse of `to_router_order` (all-gathering the SP slices over the TP group)."""
    import torch.distributed as dist

    tp, _, group = _sp()
    if sequence_parallel and tp > 1:
        parts = [torch.empty_like(rows) for _ in range(tp)]
        dist.all_gather(parts, rows.contiguous(), group=group)
        rows = torch.cat(parts)
    r = rows.reshape(-1, batch, *rows.shape[1:]).transpose(0, 1)  # [b, s, L, k]
    return r[0] if batch == 1 else r


def _release(handles, routers) -> None:
    """Removes the hooks and leaves every router inert (no action, no indices)."""
    for h in handles:
        h.remove()
    for chunk_routers in routers:
        for r in chunk_routers:
            r.replay.clear_router_replay_action()
            r.replay.clear_indices()


def _tokens(args, kwargs):
    t = kwargs.get("input_ids", args[0] if args else None)
    return t if isinstance(t, torch.Tensor) else None


@contextlib.contextmanager
def record_routes(model_chunks):
    """R2: record the routing of the forward passes run inside (`MegatronEngine.forward_backward`, any
    schedule). Yields a list that holds, after the block, one `[T, L, k]` tensor (`[b, T, L, k]` for
    b > 1) per microbatch in order, in the route format; only this rank's MoE-layer columns
    (`local_moe_layers`) are filled, the others are 0; with SP the TP ranks' slices are gathered.
    Pass it to `replay_routes` on the same ranks."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = local_routers(model_chunks)
    config = _unwrap(model_chunks[0]).config
    num_layers, k, experts = len(moe_layer_indices(config)), config.moe_router_topk, config.num_moe_experts
    tp, _, _ = _sp()
    local_share = tp if config.sequence_parallel and tp > 1 else 1
    per_chunk: list[list[tuple[int, torch.Tensor]]] = [[] for _ in routers]  # (batch size, rows) per microbatch
    handles = []

    def post(c, module, args, kwargs, output):
        tokens = _tokens(args, kwargs)
        batch = tokens.shape[0] if tokens is not None else 1
        recorded = [r.replay.get_recorded_indices() for r in routers[c]]
        if any(x is None for x in recorded):
            raise RuntimeError("record_routes: a router recorded nothing in this forward")
        n = recorded[0].shape[0] if recorded else (tokens.numel() // local_share if tokens is not None else 0)
        rows = torch.zeros(n, num_layers, k, dtype=route_dtype(experts))
        for r, idx in zip(routers[c], recorded):
            rows[:, r.column] = canonical(idx.detach().cpu(), experts)
            r.replay.record_indices(None)  # the next forward must record its own
        per_chunk[c].append((batch, rows))

    for c, chunk in enumerate(model_chunks):
        for r in routers[c]:
            r.replay.set_router_replay_action(RouterReplayAction.RECORD)
        handles.append(_unwrap(chunk).register_forward_hook(
            lambda mod, a, kw, out, c=c: post(c, mod, a, kw, out), with_kwargs=True))
    result: list[torch.Tensor] = []
    try:
        yield result
        if len({len(x) for x in per_chunk}) > 1:
            raise RuntimeError("record_routes: model chunks ran different numbers of microbatches")
        for mb in range(len(per_chunk[0])):
            batch, merged = per_chunk[0][mb]
            for c in range(1, len(routers)):  # virtual pipeline stages: each fills its own layers
                cols = [r.column for r in routers[c]]
                merged[:, cols] = per_chunk[c][mb][1][:, cols]
            result.append(_from_router_order(merged, batch, config.sequence_parallel))
    finally:
        _release(handles, routers)


@contextlib.contextmanager
def replay_routes(model_chunks, routes_per_microbatch, agreement: dict | None = None, positions=None):
    """R2 update passes / R3 every pass: the forward passes run inside use `routes_per_microbatch[i]`
    (`[T, L, k]` or `[b, T, L, k]`, all MoE layers, full sequence: `pack_routes` or `record_routes`)
    for the i-th microbatch each model chunk runs, in its forward and in any activation recompute of
    its backward. Raises if a chunk runs more microbatches than given, or if a microbatch's token
    count differs from its routes'.

    `agreement` (a dict): also counts, per MoE layer of this rank, at the positions `positions[i]`
    (bool `[T]`, `route_positions`) of each forward, how many tokens the router's own top-k would
    have sent to the replayed expert set: `agreement[layer] += [same, positions]`. Megatron skips its
    own top-k under replay; it is computed from the scores megatron hands to `get_replay_topk`."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = local_routers(model_chunks)
    sp = _unwrap(model_chunks[0]).config.sequence_parallel
    counters = [0] * len(routers)
    devices = [next(_unwrap(c).parameters()).device for c in model_chunks]
    handles = []

    def pre(c, module, args, kwargs):
        i = counters[c]
        if i >= len(routes_per_microbatch):
            raise RuntimeError(f"replay_routes: chunk {c} runs microbatch {i}, routes were given for {len(routes_per_microbatch)}")
        counters[c] += 1
        routes = torch.as_tensor(routes_per_microbatch[i])
        tokens = _tokens(args, kwargs)
        if tokens is not None:
            shape = tuple(tokens.shape) if routes.dim() == 4 else (tokens.numel(),)
            if tuple(routes.shape[: len(shape)]) != shape:
                raise ValueError(f"replay_routes: microbatch {i} has tokens {tuple(tokens.shape)}, routes {tuple(routes.shape)}")
        # One host-to-device copy per microbatch (megatron would copy each layer's target per use).
        rows = to_router_order(routes, sp).to(device=devices[c], dtype=torch.long)
        for r in routers[c]:
            r.replay.set_target_indices(rows[:, r.column].contiguous())
            r.replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        if agreement is not None:
            counted[c] = to_router_order(torch.as_tensor(positions[i])[:, None, None], sp)[:, 0, 0].to(devices[c])

    def counting(replay, column, c):
        original = replay.get_replay_topk

        def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                with torch.no_grad():
                    own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)[1]
                    same = (own.sort(-1).values == replay.target_topk_idx.sort(-1).values).all(-1)
                    tally = agreement.setdefault(column, [0, 0])
                    tally[0] += int((same & counted[c]).sum())
                    tally[1] += int(counted[c].sum())
            return original(scores, topk, num_groups, group_topk, default_compute_topk)
        return get_replay_topk

    def post(c, module, args, kwargs, output):
        # Recompute inside the backward pops this chunk's targets in forward order.
        for r in routers[c]:
            r.replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

    counted: dict[int, torch.Tensor] = {}  # chunk -> bool positions of its current microbatch
    for c, chunk in enumerate(model_chunks):
        m = _unwrap(chunk)
        handles.append(m.register_forward_pre_hook(lambda mod, a, kw, c=c: pre(c, mod, a, kw), with_kwargs=True))
        handles.append(m.register_forward_hook(lambda mod, a, kw, out, c=c: post(c, mod, a, kw, out), with_kwargs=True))
        for r in routers[c] if agreement is not None else []:
            r.replay.get_replay_topk = counting(r.replay, r.column, c)  # an instance attribute, deleted on exit
    try:
        yield
    finally:
        for chunk_routers in routers if agreement is not None else []:
            for r in chunk_routers:
                del r.replay.get_replay_topk
        _release(handles, routers)
