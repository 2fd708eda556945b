"""HF import/export against transformers' own models (tiny, random, fp32, made locally): logits at
1 process and TP2/EP2/PP2, bit-identical export, FP8 block dequantization, and the CLI round trip."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed

TOL = 1e-4
MODELS = {
    "tiny_moe": ["model=tiny_moe"],
    "tiny_dense": ["model=tiny_dense"],
    # Llama-3.1: rope_scaling type llama3 (factor 8 over 8,192 positions) in megatron, transformers and vLLM.
    "tiny_llama": ["model=tiny_dense", "model.name=tiny_llama", "model.arch=llama", "model.add_qkv_bias=false",
                   "model.untie_embeddings_and_output_weights=true", "model.rope_type=llama3",
                   "model.rotary_scaling_factor=8", "model.original_max_position_embeddings=8192"],
    # Qwen3: per-head q/k norms, head dim 128 > hidden / heads; Qwen3-MoE: softmax top-k router, no shared expert.
    "tiny_qwen3": ["model=tiny_qwen3"],
    "tiny_qwen3_moe": ["model=tiny_qwen3_moe"],
    # DeepSeek-V3's structure (YaRN x40 with mscale, 256 experts, 8 groups / top-4); transformers builds
    # no MTP layer, so the logits comparison is without it (test_dsv3_proxy_mtp_round_trip_ep2 has it).
    "dsv3_proxy": ["model=dsv3_proxy", "model.mtp_num_layers=0"],
    # mscale != mscale_all_dim: YaRN's cos/sin scaling (mscale / mscale_all_dim) must agree too.
    "dsv3_proxy_mscale": ["model=dsv3_proxy", "model.mtp_num_layers=0", "model.mscale=0.8"],
}


def make_hf_model(overrides: list[str], path: str, seed: int = 0):
    """A random transformers model with the HF config our mapping writes; norms and the router bias
    are perturbed too, so that a swapped or missed tensor shows in the logits."""
    import transformers

    from r1mega.checkpoint.hf_mapping import hf_config
    from r1mega.config import compose

    c = hf_config(compose(overrides).model)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**c)).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(torch.randn_like(t) * 0.02)
    model.save_pretrained(path)
    return model


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_logits(path: str, vocab: int) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens(vocab)).logits


def megatron_logits(engine, vocab: int) -> torch.Tensor | None:
    """Full-vocab logits on the last pipeline stage (None elsewhere)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tok = tokens(vocab)
    batch = dict(tokens=tok, position_ids=torch.arange(tok.shape[1]).expand_as(tok))
    captured = []

    def loss_fn(output, batch):
        captured.append(gather_from_tensor_model_parallel_region(output).detach())
        return output.sum() * 0, torch.tensor(1), {}

    with torch.no_grad():
        engine.forward_backward([batch], loss_fn, forward_only=True)
    return captured[0] if captured else None


def _import_and_check(overrides: list[str], parallel: str, hf_dir: str, export_dir: str | None) -> dict:
    """Import `hf_dir` under `parallel`; return logits (last stage), whether `iter_hf_tensors`
    reproduces every HF tensor bit for bit, and optionally export to `export_dir`."""
    from r1mega.checkpoint import hf_io
    from r1mega.checkpoint.hf_mapping import hf_config, iter_hf_tensors, load_hf_tensors
    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([*overrides, f"parallel={parallel}"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg, trainable=False)
    with hf_io.HFReader(hf_dir) as reader:
        load_hf_tensors(engine.model, cfg.model, reader)
        names = set(reader.names())
        exported = set()
        identical = True
        for name, t in iter_hf_tensors(engine.model, cfg.model):
            exported.add(name)
            identical &= torch.equal(t, reader(name))
        # dst=0 (the export writer): rank 0 gets every tensor, the other ranks none.
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        to_dst = list(iter_hf_tensors(engine.model, cfg.model, dst=0))
        identical &= {n for n, _ in to_dst} == names
        identical &= all(torch.equal(t, reader(n)) if rank0 else t is None for n, t in to_dst)
    if export_dir:
        for _ in hf_io.write_hf(export_dir, iter_hf_tensors(engine.model, cfg.model), hf_config(cfg.model), max_shard_bytes=4 << 20):
            pass
    return dict(logits=megatron_logits(engine, cfg.model.vocab_size), same_keys=names == exported, identical=identical)


def _check_logits(results: list[dict], ref: torch.Tensor, what: str) -> float:
    got = [r["logits"] for r in results if r["logits"] is not None]
    assert got, f"{what}: no rank produced logits"
    worst = 0.0
    for logits in got:
        diff = (logits - ref).abs().max().item()
        assert diff <= TOL, f"{what}: max |Δlogits| {diff:.2e}"
        assert torch.equal(logits.argmax(-1), ref.argmax(-1)), f"{what}: argmax differs"
        worst = max(worst, diff)
    for r in results:
        assert r["same_keys"] and r["identical"], f"{what}: exported tensors differ from the HF checkpoint"
    return worst


# Qwen3 / Qwen3-MoE at 1 process: tests/test_hf_families.py (model=hf on released-style configs).
@pytest.mark.parametrize("model", [m for m in MODELS if not m.startswith("tiny_qwen3")])
def test_import_export_one_process(model, tmp_path):
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "exported")
    vocab = make_hf_model(MODELS[model], hf_dir).config.vocab_size
    ref = hf_logits(hf_dir, vocab)
    results = run_distributed(_import_and_check, 1, MODELS[model], "single", hf_dir, out)
    print(f"{model} 1 process: max |Δlogits| {_check_logits(results, ref, model):.2e}")
    # The exported directory: sharded, same keys and bits, and transformers reproduces the logits.
    assert len(list(Path(out).glob("model-*.safetensors"))) > 1
    from r1mega.checkpoint.hf_io import HFReader

    with HFReader(hf_dir) as a, HFReader(out) as b:
        assert set(a.names()) == set(b.names())
        assert all(torch.equal(a(n), b(n)) for n in a.names())
    assert (hf_logits(out, vocab) - ref).abs().max().item() <= TOL


LAYOUTS = {"tiny_moe": ["tp2", "ep2", "pp2"], "tiny_dense": ["tp2", "pp2"], "dsv3_proxy": ["ep2"],
           "tiny_qwen3": ["tp2", "pp2"], "tiny_qwen3_moe": ["ep2"]}


@pytest.mark.parametrize("model", list(LAYOUTS))
def test_import_two_process_layouts(model, tmp_path):
    hf_dir = str(tmp_path / "hf")
    vocab = make_hf_model(MODELS[model], hf_dir).config.vocab_size
    ref = hf_logits(hf_dir, vocab)
    for layout in LAYOUTS[model]:
        results = run_distributed(_import_and_check, 2, MODELS[model], layout, hf_dir, None)
        print(f"{model} {layout}: max |Δlogits| {_check_logits(results, ref, f'{model} {layout}'):.2e}")


def test_fp8_block_scaled_import(tmp_path):
    from safetensors.torch import save_file

    from r1mega.checkpoint import fp8
    from r1mega.checkpoint.hf_io import HFReader

    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g)  # not a multiple of 128: partial edge blocks
    q, scale_inv = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)
    save_file({"a.weight": q, "a.weight_scale_inv": scale_inv, "b.weight": w}, str(tmp_path / "model.safetensors"))
    # Expected values computed block by block, independently of fp8.dequantize.
    expected = torch.empty(200, 300)
    for i in range(2):
        for j in range(3):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            expected[rows, cols] = q[rows, cols].float() * scale_inv[i, j]
    with HFReader(tmp_path) as r:
        assert r.names() == ["a.weight", "b.weight"]
        got = r("a.weight")
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected.to(torch.bfloat16))
        assert (got.float() - w).abs().max() <= 0.07 * w.abs().max()  # fp8 e4m3 keeps 3 mantissa bits
        assert torch.equal(r("b.weight"), w)


def test_cli_round_trip_is_bit_identical(tmp_path):
    from r1mega.checkpoint.hf_io import HFReader

    hf_dir, mg, back = tmp_path / "hf", tmp_path / "megatron", tmp_path / "back"
    make_hf_model(MODELS["tiny_moe"], str(hf_dir))
    root = Path(__file__).resolve().parents[1]
    for direction, src, dst in [("hf_to_megatron", hf_dir, mg), ("megatron_to_hf", mg, back)]:
        out = subprocess.run(
            [sys.executable, str(root / "tools" / "convert.py"), direction, str(src), str(dst), *MODELS["tiny_moe"]],
            capture_output=True, text=True, cwd=root, timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        summary = [line for line in out.stdout.splitlines() if line.startswith(direction)]
        assert summary and "tensors" in summary[0] and "peak host RSS" in summary[0], out.stdout
        print(summary[0])
    with HFReader(hf_dir) as a, HFReader(back) as b:
        assert set(a.names()) == set(b.names())
        assert all(torch.equal(a(n), b(n)) for n in a.names())
    assert (back / "generation_config.json").exists() and (back / "model.safetensors.index.json").exists()
    # A training checkpoint has no config.json to match the preset against: its tensors are checked.
    (mg / "hf_assets" / "config.json").unlink()
    out = subprocess.run([sys.executable, str(root / "tools" / "convert.py"), "megatron_to_hf", str(mg),
                          str(tmp_path / "wrong"), "model=tiny_dense"], capture_output=True, text=True, cwd=root, timeout=120)
    err = [line for line in out.stderr.splitlines() if line.startswith("r1mega.convert:")]
    assert out.returncode == 2 and len(err) == 1 and "does not hold a model=tiny_dense checkpoint" in err[0], out.stderr[-3000:]
    assert not (tmp_path / "wrong").exists()


def _convert(*args):
    from r1mega.convert import convert

    return convert(*args)


def test_import_peak_memory_within_largest_shard_plus_own_params(tmp_path):
    """Peak RSS growth of `hf_to_megatron` (from before the model is built to the end of the import,
    kernel high-water mark) ≤ largest shard + this rank's parameters, at 1 process and TP2, on a
    model large enough (84 MiB, 3 shards) that interpreter noise does not decide it."""
    overrides = [*MODELS["tiny_moe"], "model.vocab_size=32768"]
    hf_dir = tmp_path / "hf"
    model = make_hf_model(overrides, str(hf_dir))
    (hf_dir / "model.safetensors").unlink()
    model.save_pretrained(str(hf_dir), max_shard_size="40MB")
    del model
    assert len(list(hf_dir.glob("model-*.safetensors"))) == 3
    mib = 2**20
    for layout, n in [("single", 1), ("tp2", 2)]:
        for r in run_distributed(_convert, n, "hf_to_megatron", str(hf_dir), str(tmp_path / layout), [*overrides, f"parallel={layout}"]):
            growth, shard, own = r["import_peak_growth"], r["largest_shard_bytes"], r["own_params_bytes"]
            print(f"{layout}: import peak +{growth / mib:.0f} MiB, largest shard {shard / mib:.0f} MiB + own params {own / mib:.0f} MiB")
            assert growth is not None, "no /proc/self/clear_refs: cannot measure the peak"
            assert 0.9 * own <= growth, "the measurement does not even see the parameters being written"
            assert growth <= shard + own, f"{layout}: import peak {growth / mib:.0f} MiB > {(shard + own) / mib:.0f} MiB"


def _export_stream_peak(overrides: list[str]) -> dict:
    """Peak extra memory of convert's export stream (`export_stream`) on this rank, consumed by a
    writer that drops each tensor at once; with the bucket and the largest HF tensor."""
    from collections import deque

    from r1mega.checkpoint.hf_mapping import export_plan
    from r1mega.config import compose
    from r1mega.convert import export_stream
    from r1mega.models.build import build_model
    from r1mega.parallel.state import init_distributed
    from r1mega.rollout.sync import peak_extra_bytes

    cfg = compose(overrides)
    init_distributed(cfg.parallel, cfg.platform)
    chunks = [build_model(cfg.model, cfg.parallel, cfg.platform)]
    largest = max(torch.Size(e.shape).numel() * e.dtype.itemsize for e in export_plan(cfg.model, cfg.parallel))
    with torch.no_grad():
        peak = peak_extra_bytes(lambda: deque(export_stream(chunks, cfg), maxlen=0))
    return dict(peak=peak, bucket=cfg.rollout.sync_bucket_mb * 2**20, largest=largest)


def test_export_stream_memory_within_bucket_plus_largest():
    """convert's export at TP2 (rank 0 writes; both ranks assemble TP-split tensors) with a 1 MB
    bucket below the 4 MiB largest tensor (the embedding): on every rank the stream's peak extra
    memory (torch CPU allocator, all threads) stays ≤ bucket + largest tensor."""
    overrides = ["model=tiny_dense", "model.vocab_size=4096", "model.num_layers=1", "parallel=tp2", "rollout.sync_bucket_mb=1"]
    for rank, r in enumerate(run_distributed(_export_stream_peak, 2, overrides)):
        print(f"rank {rank}: peak {r['peak']} B, bucket {r['bucket']} B + largest {r['largest']} B")
        assert r["bucket"] < r["largest"]
        assert r["largest"] <= r["peak"], f"rank {rank}: the measurement misses the assembled tensors"
        assert r["peak"] <= r["bucket"] + r["largest"], f"rank {rank}: export peak {r['peak']} B > bucket + largest"


def test_reader_reads_tp_slices_from_disk(tmp_path):
    from safetensors.torch import save_file

    from r1mega.checkpoint.hf_io import HFReader

    g = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(12, 10, generator=g).to(torch.bfloat16), "b": torch.randn(12, generator=g), "s": torch.tensor(3.0)}
    save_file(w, str(tmp_path / "model.safetensors"))
    with HFReader(tmp_path, dtype=torch.float32) as r:
        assert r.names() == ["b", "s", "w"] and torch.equal(r("s"), w["s"])
        for dim, size in [(0, 2), (0, 3), (1, 2), (1, 5)]:
            for rank in range(size):
                want = w["w"].float().chunk(size, dim)[rank]
                for block in (1, 7, 1 << 20):  # dim 1 reads blocks of rows
                    got = r.read_slice("w", dim, rank, size, block_bytes=block)
                    assert got.dtype == torch.float32 and torch.equal(got, want), (dim, size, rank, block)
            before = r.bytes_read
            r.read_slice("w", dim, 0, size)
            if dim == 0:  # rows: only the slice is read (dim 1 reads every row, a block at a time)
                assert r.bytes_read - before == w["w"].numel() * 2 // size, "read more than the slice"
        assert torch.equal(r.read_slice("b", 0, 1, 3), w["b"].chunk(3)[1])


def _mtp_round_trip(overrides: list[str], parallel: str, out_dir: str) -> dict:
    """Build a model with an MTP layer, export it (rank 0 writes), import the export into a second
    model: every tensor equal; plus the local-spec name plan vs the built model's names."""
    from megatron.core import parallel_state as ps

    from r1mega.checkpoint import hf_io
    from r1mega.checkpoint.hf_mapping import hf_config, iter_hf_tensors, load_hf_tensors, mcore_name_plan
    from r1mega.config import compose
    from r1mega.models.build import build_model
    from r1mega.parallel.state import init_distributed

    cfg = compose([*overrides, f"parallel={parallel}"])
    init_distributed(cfg.parallel, cfg.platform)
    a = build_model(cfg.model, cfg.parallel, cfg.platform)
    stream = iter_hf_tensors([a], cfg.model, dst=0)
    if torch.distributed.get_rank() == 0:
        for _ in hf_io.write_hf(out_dir, stream, hf_config(cfg.model)):
            pass
    else:
        for _ in stream:
            pass
    torch.distributed.barrier()
    b = build_model(cfg.model, cfg.parallel, cfg.platform)  # other random weights
    with hf_io.HFReader(out_dir) as reader:
        load_hf_tensors([b], cfg.model, reader)
        hf_names = set(reader.names())
    tensors_b = dict(b.named_parameters()) | dict(b.named_buffers())
    same = all(torch.equal(t, tensors_b[n]) for n, t in [*a.named_parameters(), *a.named_buffers()] if "expert_bias" in n or isinstance(t, torch.nn.Parameter))
    names = {n for n, p in a.named_parameters()} | {n for n, _ in a.named_buffers() if n.endswith("expert_bias")}
    plan = mcore_name_plan(cfg.model) if ps.get_pipeline_model_parallel_world_size() == 1 else None
    return dict(same=same, names=names, plan=plan, hf_names=hf_names)


def test_mtp_layer_mapping_round_trips():
    import tempfile

    overrides = [*MODELS["tiny_moe"], "model.mtp_num_layers=1"]
    with tempfile.TemporaryDirectory() as d:
        (r,) = run_distributed(_mtp_round_trip, 1, overrides, "single", d + "/one")
        assert r["same"], "MTP model: export -> import changed a tensor"
        plan_names = {n for n, _ in r["plan"]}
        assert plan_names == r["names"], (plan_names ^ r["names"])
        L = 4  # tiny_moe.num_layers: the MTP layer is HF layer 4
        mtp = {n for n in r["hf_names"] if n.startswith(f"model.layers.{L}.")}
        for name in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
                     "embed_tokens.weight", "input_layernorm.weight", "self_attn.q_a_proj.weight", "mlp.gate.weight",
                     "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight"]:
            assert f"model.layers.{L}.{name}" in mtp, name
        results = run_distributed(_mtp_round_trip, 2, overrides, "pp2", d + "/pp2")  # MTP on the last stage
        assert all(x["same"] for x in results), "MTP model at PP2: export -> import changed a tensor"
        assert results[0]["hf_names"] == r["hf_names"]


def test_transformer_engine_name_plan():
    """TE spec names (cannot build a TE model on CPU): fused norms and grouped-GEMM experts."""
    from r1mega.checkpoint.hf_mapping import mcore_name_plan
    from r1mega.config import compose

    moe = compose([*MODELS["tiny_moe"], "model.mtp_num_layers=1"]).model
    local, te = dict(mcore_name_plan(moe)), dict(mcore_name_plan(moe, te=True))
    assert sorted(local.values()) == sorted(te.values())  # same HF tensors, renamed megatron ones
    expect = {
        # MLA keeps its input TENorm; q/kv norms fused into the up-projections.
        "decoder.layers.0.input_layernorm.weight": ("model.layers.0.input_layernorm.weight",),
        "decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight": ("model.layers.1.self_attn.q_a_layernorm.weight",),
        "decoder.layers.1.self_attention.linear_kv_up_proj.layer_norm_weight": ("model.layers.1.self_attn.kv_a_layernorm.weight",),
        # dense first layer: pre-MLP norm fused into fc1; MoE layers keep it.
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": ("model.layers.0.post_attention_layernorm.weight",),
        "decoder.layers.1.pre_mlp_layernorm.weight": ("model.layers.1.post_attention_layernorm.weight",),
        # grouped GEMM: one module, weight{e}.
        "decoder.layers.2.mlp.experts.linear_fc1.weight5": ("model.layers.2.mlp.experts.5.gate_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight"),
        "decoder.layers.3.mlp.experts.linear_fc2.weight0": ("model.layers.3.mlp.experts.0.down_proj.weight",),
        "decoder.layers.1.mlp.shared_experts.linear_fc1.weight": ("model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"),
        # MTP layer (HF layer 4): its decoder layer takes the TE names too.
        "mtp.layers.0.transformer_layer.mlp.experts.linear_fc1.weight7": ("model.layers.4.mlp.experts.7.gate_proj.weight", "model.layers.4.mlp.experts.7.up_proj.weight"),
        "mtp.layers.0.eh_proj.weight": ("model.layers.4.eh_proj.weight",),
        "mtp.layers.0.final_layernorm.weight": ("model.layers.4.shared_head.norm.weight",),
    }
    for name, hf in expect.items():
        assert te.get(name) == hf, (name, te.get(name))
    assert not any("local_experts" in n or "q_layernorm" in n or "kv_layernorm" in n for n in te)

    dense = compose(MODELS["tiny_dense"]).model
    te = dict(mcore_name_plan(dense, te=True))
    assert te["decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"] == ("model.layers.2.input_layernorm.weight",)
    assert te["decoder.layers.2.mlp.linear_fc1.layer_norm_weight"] == ("model.layers.2.post_attention_layernorm.weight",)
    assert not any(n.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for n in te)

    # Qwen3-MoE: GQA's q/k norms stay separate TE norms; no expert bias, no shared expert.
    qwen3_moe = compose(MODELS["tiny_qwen3_moe"]).model
    te = dict(mcore_name_plan(qwen3_moe, te=True))
    assert te["decoder.layers.1.self_attention.q_layernorm.weight"] == ("model.layers.1.self_attn.q_norm.weight",)
    assert te["decoder.layers.1.self_attention.k_layernorm.weight"] == ("model.layers.1.self_attn.k_norm.weight",)
    assert te["decoder.layers.1.mlp.router.weight"] == ("model.layers.1.mlp.gate.weight",)
    assert not any("expert_bias" in n or "shared_experts" in n for n in te)


def test_dsv3_proxy_mtp_round_trip_ep2():
    """The full proxy (MTP layer with 256 experts split over EP2): export -> import changes nothing and
    names the same HF tensors as at one process."""
    import tempfile

    overrides = ["model=dsv3_proxy"]
    with tempfile.TemporaryDirectory() as d:
        results = run_distributed(_mtp_round_trip, 2, overrides, "ep2", d + "/ep2")
        assert all(r["same"] for r in results), "dsv3_proxy at EP2: export -> import changed a tensor"
        plan = {n for _, names in results[0]["plan"] for n in names}
        assert results[0]["hf_names"] == plan
        assert "model.layers.4.mlp.experts.255.down_proj.weight" in plan and "model.layers.4.eh_proj.weight" in plan
