"""A megatron-core model under training: DDP-wrapped model chunks, the megatron optimizer, and one
forward/backward entry point that dispatches to megatron's schedule for the pipeline layout."""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from r1mega.models.build import DTYPES, build_model

# loss_fn(output, batch) -> (loss summed over tokens, number of tokens, metrics to report)
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

    def forward_backward(
        self,
        microbatches: list[dict],
        loss_fn: LossFn,
        forward_only: bool = False,
        with_labels: bool = False,
    ) -> list[dict]:
        """Run megatron's schedule over `microbatches` (dicts of [b, s] tensors: tokens, position_ids,
        optional attention_mask / packed_seq_params (`r1mega.data.packing`) and labels). Returns the metrics dicts of the last pipeline stage."""

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            labels = batch["labels"] if with_labels else None
            output = model(
                batch["tokens"],
                batch["position_ids"],
                batch.get("attention_mask"),
                labels=labels,
                packed_seq_params=batch.get("packed_seq_params"),
            )
            return output, partial(_loss_wrapper, loss_fn, batch)

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

    def train_step(self, microbatches: list[dict], loss_fn: LossFn, with_labels: bool = False) -> dict:
        """One optimizer step over `microbatches`: zero grads, forward/backward, finalize, step."""
        for c in self.model:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self.forward_backward(microbatches, loss_fn, with_labels=with_labels)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        return {"metrics": metrics, "grad_norm": grad_norm, "update_successful": ok, "lr": self.optimizer.param_groups[0]["lr"]}

    def named_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        for i, c in enumerate(self.model):
            module = c.module if isinstance(c, DistributedDataParallel) else c
            for name, p in module.named_parameters():
                yield (f"chunk{i}.{name}" if len(self.model) > 1 else name), p


def _loss_wrapper(loss_fn: LossFn, batch: dict, output: torch.Tensor):
    loss, num_tokens, metrics = loss_fn(output, batch)
    return loss, num_tokens.to(torch.int), metrics
