"""Seconds per RL step: rollout (decode is a memory-bandwidth problem, prefill a FLOP problem),
ref/old-policy forwards, training at an assumed MFU plus pipeline bubble and exposed communication,
offload traffic over PCIe, and the weight sync from the training layout to the engine's."""
from __future__ import annotations

import math

from r1mega.plan.memory import GB


def link_seconds(nbytes: float, group: int, stride: int, cl, c) -> float:
    """Seconds to move `nbytes` per GPU among `group` ranks placed `stride` ranks apart.

    Peers on the same node talk over NVLink, the rest over the network; the fraction of peers
    off-node sets the mix (megatron-core places TP innermost, then CP/EP, DP, PP outermost).
    """
    if group <= 1 or nbytes <= 0:
        return 0.0
    local = min(group, max(1, cl.gpus_per_node // stride))
    on_node = (local - 1) / (group - 1)
    per_byte = on_node / (cl.nvlink_gbps * GB) + (1 - on_node) / (cl.network_gbps * GB)
    return nbytes * per_byte / c.comm_efficiency


def attention_flops_per_token(m, context: float) -> float:
    """Forward FLOPs of the score and value products for one token against `context` keys, all layers."""
    n = m.num_attention_heads
    if m.multi_latent_attention:
        qk, v = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
    else:
        qk = v = m.kv_channels or m.hidden_size // n
    return 2 * n * (qk + v) * context * m.num_layers


def train_time(m, f, lay, mem, c, cl) -> dict:
    """Ref/old-policy forwards and the training step, with the communication each layout pays."""
    tokens = c.global_batch_size * c.seq_length
    peak = (cl.fp8_tflops if m.fp8 else cl.bf16_tflops) * 1e12
    fwd = (2 * f.active_matmul + attention_flops_per_token(m, c.seq_length / 2)) * tokens
    passes = 4 if c.recompute == "full" else 3  # forward + backward (2x) (+ forward again)
    compute = passes * fwd / (lay.world * peak * c.mfu)
    n_fwd = (1 + c.old_policy_forward) if c.rl else 0
    forwards = n_fwd * fwd / (lay.world * peak * c.mfu)
    bubble_frac = (lay.pp - 1) / ((lay.vpp or 1) * mem["microbatches"])

    # Communication volume per GPU per RL step.
    h, tok = m.hidden_size, c.micro_batch_size * c.seq_length / lay.cp
    n_mb = mem["microbatches"] * c.optimizer_steps_per_rl_step
    layers = mem["layers"]
    moe_layers = layers if m.num_experts else 0
    act = c.activation_bytes
    extra = 1 if c.recompute == "full" else 0
    vol = {
        # 4 collectives forward (all-gather + reduce-scatter around attention and MLP), 4 backward
        "tp": (8 + 4 * extra) * (lay.tp - 1) / lay.tp * tok * h * act * layers * n_mb,
        # dispatch + combine, forward and backward, of top-k copies of this rank's tokens
        "ep": (4 + 2 * extra) * (lay.ep - 1) / lay.ep * tok / lay.tp * (m.moe_router_topk if m.num_experts else 0)
        * h * act * moe_layers * n_mb,
        # activations forward, gradients backward, to one neighbour stage
        "pp": (2 * tok * h * act / (lay.tp if lay.sp else 1) * n_mb) if lay.pp > 1 else 0.0,
    }
    dense_local = mem["params"] - mem.get("expert_params", 0.0)
    dp, edp = mem["dp"], mem["expert_dp"]
    grad_param = (c.grad_bytes + c.param_bytes) * c.optimizer_steps_per_rl_step  # reduce-scatter + all-gather
    vol["dp"] = dense_local * grad_param * (dp - 1) / dp
    vol["expert_dp"] = mem.get("expert_params", 0.0) * grad_param * (edp - 1) / edp
    secs = {
        "tp": link_seconds(vol["tp"], lay.tp, 1, cl, c),
        "ep": link_seconds(vol["ep"], lay.ep, lay.etp, cl, c),
        "pp": link_seconds(vol["pp"], 2, lay.world // lay.pp, cl, c),
        "dp": link_seconds(vol["dp"], dp, lay.tp * lay.cp, cl, c),
        "expert_dp": link_seconds(vol["expert_dp"], edp, lay.ep * lay.etp, cl, c),
    }
    exposed = (1 - c.comm_overlap) * sum(secs.values())
    pcie = cl.pcie_gbps * GB
    offload = mem["host_optimizer_gb"] * GB / c.optimizer_bytes * (c.grad_bytes + c.param_bytes) / pcie
    offload *= c.optimizer_steps_per_rl_step  # grads down, updated weights back, per optimizer step
    swap = 2 * mem["host_rollout_offload_gb"] * GB / pcie + mem["host_ref_model_gb"] * GB / pcie
    return {
        "ref_old_forward_s": forwards * (1 + bubble_frac),
        "train_compute_s": compute,
        "pipeline_bubble_s": compute * bubble_frac,
        "bubble_fraction": bubble_frac,
        "comm_gb": {k: v / GB for k, v in vol.items()},
        "comm_s": secs,
        "comm_exposed_s": exposed,
        "optimizer_offload_s": offload,
        "offload_swap_s": swap,
        "train_s": compute * (1 + bubble_frac) + exposed + offload,
    }


def rollout_time(m, f, r, rmem, c, cl, world: int) -> dict:
    """Prefill (FLOP-bound) and decode (bound by reading weights and KV from HBM) of one RL step's sequences."""
    engines = world // (r.tp * r.dp)
    per_engine = math.ceil(c.global_batch_size / engines)
    batch = min(per_engine, rmem["concurrent_seqs_per_engine"], c.rollout_max_num_seqs * r.dp)
    response = c.seq_length - c.prompt_length
    peak = (cl.fp8_tflops if r.dtype == "fp8" else cl.bf16_tflops) * 1e12
    prefill = (2 * f.active_matmul + attention_flops_per_token(m, c.prompt_length / 2)) * c.global_batch_size \
        * c.prompt_length / (world * peak * c.prefill_mfu)
    if batch < 1:
        return {"engines": engines, "batch_per_engine": 0, "waves": None, "prefill_s": prefill,
                "decode_step_ms": None, "decode_s": math.inf, "rollout_s": math.inf}
    waves = math.ceil(per_engine / batch)
    ctx = c.prompt_length + response / 2
    wbytes = rmem["weights_gb"] * GB / rmem["params"]
    ranks = r.tp * r.dp
    n_moe = f.layers - f.dense_layers
    exp_local = (f.experts_per_layer * n_moe) / (ranks if r.ep else r.tp)
    touched = 1.0
    if m.num_experts:  # an expert's weights are read only if some token in the batch picked it
        touched = 1 - (1 - m.moe_router_topk / m.num_experts) ** batch
    weight_read = (rmem["params"] - exp_local + exp_local * touched) * wbytes
    kv_read = batch / r.dp * ctx * rmem["kv_bytes_per_token"]
    t_mem = (weight_read + kv_read) / (cl.hbm_tbps * 1e12 * c.hbm_efficiency)
    if m.multi_latent_attention:  # absorbed MLA: scores and values over the 512+64 latent
        attn = 2 * m.num_attention_heads * ctx * (2 * m.kv_lora_rank + m.qk_pos_emb_head_dim) * f.layers
    else:
        attn = attention_flops_per_token(m, ctx)
    t_flops = (2 * f.active_matmul + attn) * batch / ranks / (peak * c.decode_mfu)
    t_comm = 0.0
    lat = c.collective_latency_us * 1e-6
    if r.tp > 1:  # two all-reduces of the batch's hidden states per layer
        tokens = batch / r.dp  # each attention-DP rank all-reduces only its own sequences
        t_comm += 2 * f.layers * (lat + link_seconds(2 * (r.tp - 1) / r.tp * tokens * m.hidden_size * 2, r.tp, 1, cl, c))
    if m.num_experts and r.ep and ranks > 1:  # dispatch + combine per MoE layer
        t_comm += 2 * n_moe * (lat + link_seconds(batch / ranks * m.moe_router_topk * m.hidden_size * 2, ranks, 1, cl, c))
    step = max(t_mem, t_flops) + t_comm
    decode = waves * response * step
    return {
        "engines": engines, "batch_per_engine": batch, "waves": waves, "prefill_s": prefill,
        "decode_step_ms": step * 1e3, "decode_bound": "hbm" if t_mem >= t_flops else "flops",
        "decode_comm_ms": t_comm * 1e3, "decode_s": decode, "rollout_s": prefill + decode,
        "tokens_per_s_per_gpu": c.global_batch_size * response / (prefill + decode) / world,
    }


def weight_sync(f, r, rmem, train_params_per_gpu: float, c, cl, world: int) -> dict:
    """Refit: every engine must receive the whole model; the network into each node is the floor.

    Each node needs the shards its GPUs serve (an engine over k nodes: about 1/k of the model); what
    the node's training ranks already hold is local. Inside the node each GPU takes its shard over NVLink.
    """
    model_bytes = f.total * rmem["weights_gb"] * GB / rmem["params"]
    gpn = min(cl.gpus_per_node, world)
    per_gpu = rmem["weights_gb"] * GB
    nvlink = per_gpu / (cl.nvlink_gbps * GB)
    if world <= cl.gpus_per_node:
        net, ingress = 0.0, 0.0
    else:
        need = min(model_bytes, gpn * per_gpu)  # the node's GPUs' shards (a whole model at most)
        local = min(1.0, gpn * train_params_per_gpu / f.total)
        ingress = need * (1 - local)
        net = ingress / (gpn * cl.network_gbps * GB)
    theory = max(net, nvlink)
    return {
        "model_gb": model_bytes / GB, "per_gpu_gb": per_gpu / GB, "node_ingress_gb": ingress / GB,
        "network_floor_s": net, "nvlink_floor_s": nvlink, "theory_s": theory,
        "estimate_s": theory / c.sync_efficiency,
    }
