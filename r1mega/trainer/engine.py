"""A megatron-core model under training: DDP-wrapped model chunks, the megatron optimizer, and one
forward/backward entry point that dispatches to megatron's schedule for the pipeline layout."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from r1mega.data.packing import Packed, pack, pack_dp_share
from r1mega.models.build import DTYPES, build_model
from r1mega.parallel.state import data_parallel
from r1mega.platform.cpu import fused_adam

# loss_fn(output, batch) -> (loss, count, metrics to report). The step minimises the sum of `loss` over
# all microbatches and data-parallel (x context-parallel) ranks, divided by the sum of `count` over the
# same when that is positive (megatron's `calculate_per_token_loss`). A loss already divided by a
# global normaliser (every r1mega loss: the GRPO and SFT steps pass the step's global token or
# sequence count) returns count 0: megatron then sums shares and divides nothing.
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


def _build_chunks(cfg, build_fn) -> list[torch.nn.Module]:
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    return [build_fn(cfg.model, cfg.parallel, cfg.platform, vp_stage=v) for v in stages]


class MegatronEngine:
    """This rank's share of a model. `trainable=False` gives a frozen model (reference policy);
    `build_fn` builds one chunk (default: the policy GPTModel; the reward model passes its own)."""

    def __init__(self, cfg, trainable: bool = True, build_fn=build_model):
        self.cfg = cfg
        chunks = _build_chunks(cfg, build_fn)
        self.config = chunks[0].config
        # No per-microbatch mean, no DP average: see LossFn. (DDP reads this flag at construction.)
        self.config.calculate_per_token_loss = True
        self.aux_loss_coeff = self.config.moe_aux_loss_coeff
        self.optimizer = self.scheduler = None
        if trainable:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            )
            chunks = [
                DistributedDataParallel(self.config, ddp_config, c, disable_bucketing=i > 0)
                for i, c in enumerate(chunks)
            ]
            o = cfg.optim
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam",
                    lr=o.lr,
                    min_lr=o.min_lr,
                    weight_decay=o.weight_decay,
                    adam_beta1=o.adam_beta1,
                    adam_beta2=o.adam_beta2,
                    adam_eps=o.adam_eps,
                    clip_grad=o.clip_grad,
                    bf16=self.config.bf16,
                    params_dtype=DTYPES[cfg.model.params_dtype],
                    use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                ),
                chunks,
            )
            if cfg.platform.device == "cpu":
                fused_adam(self.optimizer)
            self.config.finalize_model_grads_func = finalize_model_grads
            decay_steps = o.lr_decay_steps or 1
            self.scheduler = OptimizerParamScheduler(
                self.optimizer,
                init_lr=0.0 if o.lr_warmup_steps else o.lr,
                max_lr=o.lr,
                min_lr=o.min_lr,
                lr_warmup_steps=o.lr_warmup_steps,
                lr_decay_steps=max(decay_steps, o.lr_warmup_steps + 1),
                lr_decay_style=o.lr_decay_style,
                start_wd=o.weight_decay,
                end_wd=o.weight_decay,
                wd_incr_steps=1,
                wd_incr_style="constant",
            )
        else:
            for c in chunks:
                c.requires_grad_(False)
        self.model = chunks
        self._offloaded: list[tuple[torch.Tensor, torch.device]] = []  # weights in host memory, their device

    def pack(self, samples: list[dict], max_tokens: int, group_size: int = 1, dp_share: bool = True,
             prompt_lengths: list[int] | None = None) -> Packed:
        """`samples` (dicts of 1-D per-token tensors) packed into microbatches of at most `max_tokens`
        tokens for this engine's layout: rows padded to a multiple of the TP size under sequence
        parallelism, at least as many microbatches as pipeline stages, boundaries as THD
        `packed_seq_params` on Transformer Engine (else block-causal masks). `dp_share`: this DP rank's
        share only (`r1mega.data.packing.pack_dp_share`: whole groups of `group_size` samples, balanced
        by tokens; the training passes); False: all of them on every rank (a collective scorer).
        `prompt_lengths` (with `dp_share`): each group's shared prompt laid out once
        (`r1mega.data.packing.pack_shared_prompts`). Raises ValueError as `r1mega.data.packing.pack` does."""
        par = self.cfg.parallel
        layout = dict(pad_to_multiple=par.tensor_model_parallel_size if par.sequence_parallel else 1,
                      thd=self.cfg.platform.transformer_engine, min_microbatches=par.pipeline_model_parallel_size)
        if not dp_share:
            return pack(samples, max_tokens, **layout)
        dp_rank, dp, _ = data_parallel()
        return pack_dp_share(samples, max_tokens, dp_rank, dp, group_size=group_size, prompt_lengths=prompt_lengths,
                             **layout)

    def forward_backward(
        self,
        microbatches: list[dict],
        loss_fn: LossFn,
        forward_only: bool = False,
        with_labels: bool = False,
        mtp_loss_coef: float = 0.0,
        mtp_mask_key: str = "loss_mask",
    ) -> list[dict]:
        """Run megatron's schedule over `microbatches` (dicts of [b, s] tensors: tokens, position_ids,
        optional attention_mask / packed_seq_params (`r1mega.data.packing`) and labels; optional
        `logit_index`, `[n]` positions whose logits alone the model computes in a pass without
        labels, `PolicyGPTModel`). Returns the metrics dicts of the last pipeline stage.

        MTP loss: with `mtp_loss_coef` > 0 on a model with MTP layers, in a training pass, the step's
        loss gains `mtp_loss_coef` x the MTP NLL (mean over depths) averaged over the step's MTP loss
        tokens: the positions of `batch[mtp_mask_key]` (`target` holds the next tokens), over all
        microbatches and data-parallel ranks (`_mtp_loss_mask`). The model still returns the main
        logits; each metrics dict gains `mtp_nll_sum` and `mtp_tokens` (this microbatch, all depths).
        Otherwise the MTP block does not run."""
        mtp = mtp_loss_coef > 0 and bool(self.config.mtp_num_layers) and not forward_only
        if mtp:
            # megatron's per-token mode adds factor / depth x (MTP NLL summed over tokens) per
            # microbatch and depth, summed over microbatches and DP ranks: divide by the global count.
            depth = self.config.mtp_num_layers
            count = torch.tensor(sum(float(_mtp_loss_mask(mb, mtp_mask_key, depth).sum()) for mb in microbatches),
                                 dtype=torch.float64)
            _, _, dp_group = data_parallel()
            if dp_group is not None:
                torch.distributed.all_reduce(count, group=dp_group)
            scaling_factor = self.config.mtp_loss_scaling_factor
            # Read by GPTModel._postprocess at every forward (MultiTokenPredictionBlock caches a copy it never uses).
            self.config.mtp_loss_scaling_factor = mtp_loss_coef * depth / max(count.item(), 1.0)

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            labels = batch["labels"] if with_labels else None
            extra = {}
            if mtp:  # PolicyGPTModel: MTP loss injected, main logits returned
                labels, extra = batch["target"], {"mtp_loss_mask": _mtp_loss_mask(batch, mtp_mask_key, depth)}
            output = _model_forward(model, batch, labels=labels, **extra)
            wrapper = partial(_loss_wrapper, loss_fn, batch)
            stats = getattr(getattr(model, "module", model), "mtp_stats", None) if mtp else None
            return output, (partial(_with_metrics, wrapper, stats) if stats else wrapper)

        try:
            return self._schedule(microbatches, forward_step, forward_only)
        finally:
            if mtp:
                self.config.mtp_loss_scaling_factor = scaling_factor

    def infer(self, microbatches: list[dict], fn: Callable[[torch.Tensor, dict], Any]) -> list:
        """Forward-only passes (eval mode, no loss, no backward) over `microbatches` (as
        `forward_backward` takes them): `fn(output, batch)` per microbatch, in order, on the last
        pipeline stage (the model's output there: [b, s, vocab / TP] logits, [b, n, vocab / TP] at a
        microbatch's `logit_index`, or the reward model's [b, s] values); [] on other stages.

        Under `torch.no_grad()`: a trainable model would otherwise keep every layer's activations
        for a backward that never comes (eval mode also disables full recompute), and megatron's
        routers skip counting these tokens for the aux-loss-free bias update, as in its evaluation.
        `fn`'s result rides in the schedule's reported-loss slot beside a zero loss, so megatron
        drops each microbatch's output before the next forward (its `collect_non_loss_data` mode
        would hold one more output, a full logits tensor)."""

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            return _model_forward(model, batch), partial(_collect, fn, batch)

        with torch.no_grad():
            return self._schedule(microbatches, forward_step, forward_only=True)

    def _schedule(self, microbatches: list[dict], forward_step, forward_only: bool):
        mb = microbatches[0]["tokens"]
        vpp = len(self.model)
        data = [iter(microbatches) for _ in range(vpp)] if vpp > 1 else iter(microbatches)
        for c in self.model:
            c.train(not forward_only)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=self.model if vpp > 1 else self.model[0],
            num_microbatches=len(microbatches),
            seq_length=mb.shape[1],
            micro_batch_size=mb.shape[0],
            forward_only=forward_only,
        )

    def train_step(self, microbatches: list[dict], loss_fn: LossFn, with_labels: bool = False,
                   mtp_loss_coef: float = 0.0, mtp_mask_key: str = "loss_mask") -> dict:
        """One optimizer step over `microbatches`: zero grads, forward/backward, finalize, step.
        Every data-parallel rank must pass the same number of microbatches (expert-parallel
        all-to-alls pair them up across DP ranks)."""
        for c in self.model:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        # megatron's per-token mode sums the MoE aux loss over microbatches and DP ranks: scale its
        # coefficient so it stays the mean over them, as in megatron's default mode.
        self.config.moe_aux_loss_coeff = self.aux_loss_coeff / (len(microbatches) * data_parallel()[1])
        try:
            metrics = self.forward_backward(microbatches, loss_fn, with_labels=with_labels,
                                            mtp_loss_coef=mtp_loss_coef, mtp_mask_key=mtp_mask_key)
        finally:
            self.config.moe_aux_loss_coeff = self.aux_loss_coeff
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        return {"metrics": metrics, "grad_norm": grad_norm, "update_successful": ok, "lr": self.optimizer.param_groups[0]["lr"]}

    def offload(self, weights: bool = True) -> None:
        """Frees the memory this engine holds on its device until `onload`: gradient buffers freed,
        optimizer state to host memory (megatron-core's RL offload APIs,
        `DistributedDataParallel.offload_grad_buffers`, `MegatronOptimizer.offload_to_cpu`; CPU: the
        state is in host memory already) and, with `weights`, every parameter and buffer moved into a
        host copy of its storage (`copy_storage`: pinned on GPU; tensors sharing a storage stay views of
        one copy), usable there as `module.to("cpu")` leaves them. A colocated policy keeps its
        weights (`weights=False`): the weight sync reads them. Raises ValueError for the weights of a
        trainable engine with the distributed optimizer (its parameters are views of megatron's
        parameter buffer). A second call moves nothing more."""
        cuda = self.cfg.platform.device == "cuda"
        if weights and self.optimizer is not None and self.cfg.parallel.use_distributed_optimizer:
            raise ValueError("MegatronEngine.offload: weights=True needs use_distributed_optimizer=false "
                             "(the distributed optimizer's parameters are views of its parameter buffer)")
        if self.optimizer is not None:
            for c in self.model:
                c.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
            if cuda:
                self.optimizer.offload_to_cpu()
        if weights and not self._offloaded:
            hosts: dict[int, torch.UntypedStorage] = {}
            for t in self._tensors():
                storage = t.untyped_storage()
                if storage.data_ptr() not in hosts:
                    hosts[storage.data_ptr()] = copy_storage(storage, torch.device("cpu"), pin=cuda)
                self._offloaded.append((t, t.device))
                t.data = _view(hosts[storage.data_ptr()], t)
            if cuda:
                torch.cuda.empty_cache()

    def onload(self) -> None:
        """Undoes `offload` (gradients come back zeroed); a no-op for what is not offloaded."""
        cuda = self.cfg.platform.device == "cuda"
        devices: dict[int, torch.UntypedStorage] = {}
        for t, device in self._offloaded:
            host = t.untyped_storage()
            if host.data_ptr() not in devices:  # a copy on CPU too: the bookkeeping is the GPU's
                devices[host.data_ptr()] = copy_storage(host, device)
            t.data = _view(devices[host.data_ptr()], t)
        self._offloaded = []
        if self.optimizer is not None:
            if cuda:
                self.optimizer.restore_from_cpu()
            for c in self.model:
                c.restore_grad_buffers(synchronize=cuda)

    def _tensors(self) -> list[torch.Tensor]:
        """The chunks' parameters and buffers, each once."""
        return list({id(t): t for c in self.model for t in [*c.parameters(), *c.buffers()]}.values())

    def named_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        for i, c in enumerate(self.model):
            module = c.module if isinstance(c, DistributedDataParallel) else c
            for name, p in module.named_parameters():
                yield (f"chunk{i}.{name}" if len(self.model) > 1 else name), p


def copy_storage(storage: torch.UntypedStorage, device: torch.device, pin: bool = False) -> torch.UntypedStorage:
    """A copy of `storage` on `device` (host memory page-locked with `pin`, for fast GPU transfers)."""
    copy = torch.empty(storage.nbytes(), dtype=torch.uint8, device=device, pin_memory=pin).untyped_storage()
    copy.copy_(storage)
    return copy


def _view(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    """`like`'s view (dtype, offset, shape, strides) of another storage of the same size."""
    return torch.empty(0, dtype=like.dtype, device=storage.device).set_(storage, like.storage_offset(), like.size(),
                                                                        like.stride())


def _model_forward(model, batch: dict, labels=None, **extra):
    if labels is None and batch.get("logit_index") is not None:  # PolicyGPTModel: logits at these positions
        extra["logit_index"] = batch["logit_index"]
    if "rope_positions" in batch:  # a shared-prompt layout (data.packing.pack_shared_prompts)
        extra["rope_positions"] = batch["rope_positions"]
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=labels,
                 packed_seq_params=batch.get("packed_seq_params"), **extra)


def _collect(fn, batch: dict, output: torch.Tensor):
    return output.new_zeros(()), torch.tensor(0, dtype=torch.int), fn(output, batch)


def _loss_wrapper(loss_fn: LossFn, batch: dict, output: torch.Tensor):
    loss, num_tokens, metrics = loss_fn(output, batch)
    return loss, num_tokens.to(torch.int), metrics


def _mtp_loss_mask(batch: dict, key: str, depth: int) -> torch.Tensor:
    """`batch[key]` without the first `depth` positions of each sequence (position ids < depth).
    megatron rolls the mask (and labels) left once per MTP depth: depth k's term at position t is
    counted by mask[t + k]. Without packed_seq_params (CPU packing) the roll crosses sequence
    boundaries, and those terms at a sequence's last positions would predict the next sequence's
    tokens. Depth 1 (DeepSeek-V3): exactly those terms go (a first position's own term is dropped by
    the roll anyway); deeper: also depth-k terms at a sequence's first positions, where SFT and RL
    masks are 0 (prompt) unless the loss covers the prompt."""
    return batch[key].float() * (batch["position_ids"] >= depth)


def _with_metrics(wrapper, extra: dict, output: torch.Tensor):
    loss, num_tokens, metrics = wrapper(output)
    return loss, num_tokens, {**metrics, **extra}

