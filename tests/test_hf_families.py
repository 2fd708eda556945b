"""`model=hf` (r1mega.config.hf) on the config.json of released checkpoints (tests/hf_fixtures.RELEASED)
and end to end on tiny random checkpoints made by transformers from those configs at CPU size:
model=hf reads the directory, import -> logits equal transformers', export is bit-identical, and
vLLM after a weight sync generates transformers' greedy tokens. Presets that disagree with a
directory fail with every disagreement listed; what cannot be mapped is refused by name."""
from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import run_distributed
from tests.hf_fixtures import RELEASED, RELEASED_PRESET, make_tiny_released, tiny_released_config

TOL = 1e-4


def _write(tmp_path, name: str, config: dict) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_released_configs_are_read_as_their_presets(tmp_path):
    from omegaconf import OmegaConf

    from r1mega.config import compose
    from r1mega.config.hf import preset_mismatches
    from r1mega.models.params import count_parameters

    for family, config in RELEASED.items():
        d = _write(tmp_path, family, config)
        m = compose(["model=hf", f"model.hf_dir={d}"]).model
        derived = OmegaConf.to_container(m, resolve=True)
        if RELEASED_PRESET[family]:
            preset = OmegaConf.to_container(compose([f"model={RELEASED_PRESET[family]}"]).model, resolve=True)
            assert preset_mismatches(preset, derived) == [], family
            assert count_parameters(m) == count_parameters(compose([f"model={RELEASED_PRESET[family]}"]).model)
    # Llama-3.1 against the Llama-3 preset: exactly its llama3 rope scaling differs.
    llama = compose(["model=hf", f"model.hf_dir={tmp_path / 'llama'}"]).model
    assert (llama.rope_type, llama.rotary_scaling_factor, llama.original_max_position_embeddings) == ("llama3", 8.0, 8192)
    assert [k for k, _, _ in preset_mismatches(OmegaConf.to_container(compose(["model=llama3_8b"]).model),
                                               OmegaConf.to_container(llama, resolve=True))] == \
        ["rope_type", "rotary_scaling_factor", "original_max_position_embeddings"]
    # The DeepSeek-V3 specifics: fp8 quantization accepted (dequantized on import), MTP depth, YaRN, router.
    dsv3 = compose(["model=hf", f"model.hf_dir={tmp_path / 'deepseek_v3'}"]).model
    assert (dsv3.mtp_num_layers, dsv3.rope_type, dsv3.rotary_scaling_factor, dsv3.moe_router_score_function,
            dsv3.moe_router_enable_expert_bias, dsv3.moe_router_num_groups) == (1, "yarn", 40.0, "sigmoid", True, 8)
    moe = compose(["model=hf", f"model.hf_dir={tmp_path / 'qwen3_moe'}"]).model
    assert (moe.arch, moe.num_experts, moe.moe_router_topk, moe.moe_router_pre_softmax,
            moe.moe_shared_expert_intermediate_size, moe.qk_layernorm) == ("qwen3", 128, 8, False, None, True)


def test_configs_written_by_transformers_5_read_the_same():
    """transformers 5 renames keys when it saves (rope_parameters, dtype, num_local_experts, qk_head_dim):
    the fields derived from its config.json (diff or full) equal those of the released form."""
    from transformers import AutoConfig

    from r1mega.config.hf import model_fields
    from tests.hf_fixtures import TINY

    for family in TINY:
        released = tiny_released_config(family)
        config = AutoConfig.for_model(**released)
        for use_diff in (True, False):
            assert model_fields(json.loads(config.to_json_string(use_diff=use_diff))) == model_fields(released), family


def test_recipe_base_defaults_to_hf_and_presets_are_checked(tmp_path):
    from r1mega.config import ConfigError, compose

    d = _write(tmp_path, "dsv3", dict(RELEASED["deepseek_v3"], num_hidden_layers=4, hidden_size=256,
                                      intermediate_size=576, num_attention_heads=4, vocab_size=512,
                                      moe_intermediate_size=64))
    run = ["recipe=r1_zero", f"recipe.base={d}", "platform.memory_check=false"]
    m = compose(run).model  # no model=: the directory's own config
    assert (m.name, m.arch, m.num_layers, m.num_experts) == ("hf_dsv3", "deepseek_v3", 4, 256)
    assert compose([*run, "model=dsv3_proxy"]).model.name == "dsv3_proxy"  # the proxy is that directory
    bad = dict(RELEASED["deepseek_v3"], num_hidden_layers=3, rope_theta=50000, n_group=4, hidden_size=256,
               intermediate_size=576, num_attention_heads=4, vocab_size=512, moe_intermediate_size=64)
    d2 = _write(tmp_path, "dsv3_bad", bad)
    with pytest.raises(ConfigError) as e:
        compose(["recipe=r1_zero", f"recipe.base={d2}", "model=dsv3_proxy"])
    (msg,) = e.value.problems
    for field, preset, ours in [("num_layers", 4, 3), ("rotary_base", 10000.0, 50000.0), ("moe_router_num_groups", 8, 4)]:
        assert f"model.{field}: preset {preset!r}, config.json {ours!r}" in msg, msg
    assert "3 field(s)" in msg


REFUSED = [
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("qwen3", dict(layer_types=["full_attention", "sliding_attention"]), "sliding_attention"),
    ("qwen2", dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     "rope_scaling type 'yarn'"),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 4096}), "original_max_position_embeddings"),
    ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func='softmax'"),
    ("deepseek_v3", dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy'"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    ("qwen3_moe", dict(mlp_only_layers=[3, 7]), "mlp_only_layers=[3, 7]"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True"),
    ("qwen3", dict(partial_rotary_factor=0.5), "key 'partial_rotary_factor'"),
    ("qwen3", dict(model_type="gemma3"), "model_type='gemma3' is not supported"),
]


def test_unmappable_configs_are_refused_by_name(tmp_path):
    from r1mega.config import ConfigError, compose

    for i, (family, change, named) in enumerate(REFUSED):
        d = _write(tmp_path, f"c{i}", dict(RELEASED[family], **change))
        with pytest.raises(ConfigError) as e:
            compose(["model=hf", f"model.hf_dir={d}"])
        assert any(named in p and d in p for p in e.value.problems), (named, e.value.problems)
    with pytest.raises(ConfigError, match="model=hf needs model.hf_dir"):
        compose(["model=hf"])
    # Presets: rope scaling megatron-core does not apply is refused, not ignored.
    for overrides, named in [(["model=tiny_qwen3", "model.rope_type=yarn"], "model.rope_type=yarn needs"),
                             (["model=tiny_qwen3", "model.rope_type=llama3"], "model.original_max_position_embeddings=4096")]:
        with pytest.raises(ConfigError, match=named):
            compose(overrides)


SYNC_TESTED_ELSEWHERE = {"qwen2", "deepseek_v3"}


def _end_to_end(hf_dirs: dict) -> dict:
    """One process: for each family, model=hf on its directory; import, logits, export bit-identity,
    parameters built vs counted, then (families new to the sync) a vLLM engine with random weights
    receives the megatron weights by WeightSync and decodes greedily."""
    import transformers

    from r1mega.checkpoint import hf_io
    from r1mega.checkpoint.hf_mapping import iter_hf_tensors, load_hf_tensors
    from r1mega.config import compose
    from r1mega.models.params import count_parameters
    from r1mega.parallel.state import init_distributed
    from r1mega.rollout.sync import WeightSync
    from r1mega.rollout.vllm_engine import VLLMEngine
    from r1mega.trainer.engine import MegatronEngine
    from tests.test_checkpoint_hf import megatron_logits, tokens

    out = {}
    for family, d in hf_dirs.items():
        cfg = compose(["model=hf", f"model.hf_dir={d}", "rollout=vllm_cpu", "rollout.max_model_len=64"])
        if not out:
            init_distributed(cfg.parallel, cfg.platform)  # parallel=single for every family
        engine = MegatronEngine(cfg, trainable=False)
        with hf_io.HFReader(d) as reader:
            load_hf_tensors(engine.model, cfg.model, reader)
            exported = dict(iter_hf_tensors(engine.model, cfg.model))
            identical = exported.keys() == set(reader.names()) and all(torch.equal(t, reader(n)) for n, t in exported.items())
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        prompts = tokens(cfg.model.vocab_size)[:, :8].clamp(min=2)
        with torch.no_grad():
            ref = hf(tokens(cfg.model.vocab_size)).logits
            greedy = hf.generate(prompts, max_new_tokens=8, do_sample=False, min_new_tokens=8)[:, 8:].tolist()
        diff = (megatron_logits(engine, cfg.model.vocab_size) - ref).abs().max().item()
        got = greedy  # Qwen2 and DeepSeek-V3 syncs: tests/test_rollout_sync.py (tiny_dense, tiny_moe, dsv3_proxy)
        if family not in SYNC_TESTED_ELSEWHERE:
            rollout = VLLMEngine(d, cfg.rollout, load_format="dummy")
            WeightSync(cfg.model, cfg.parallel, cfg.rollout).sync(engine.model, rollout)
            got = [o.completions[0].token_ids for o in rollout.generate(prompts.tolist(), temperature=0.0, max_tokens=8)]
            rollout.shutdown()
        built = sum(t.numel() for c in engine.model for n, t in [*c.named_parameters(), *c.named_buffers()]
                    if isinstance(t, torch.nn.Parameter) or n.endswith("expert_bias"))
        out[family] = dict(diff=diff, identical=identical, greedy=greedy, vllm=got, built=built,
                           counted=count_parameters(cfg.model).total)
    return out


def test_tiny_released_checkpoints_end_to_end(tmp_path):
    families = ["qwen3", "qwen3_moe", "llama", "qwen2", "deepseek_v3"]
    dirs = {f: str(make_tiny_released(f, tmp_path / f, seed=3)) for f in families}
    (r,) = run_distributed(_end_to_end, 1, dirs)
    for family in families:
        x = r[family]
        print(f"{family}: max |Δlogits| {x['diff']:.2e}, greedy {x['vllm'] == x['greedy']}")
        assert x["diff"] <= TOL, f"{family}: megatron vs transformers logits differ by {x['diff']:.2e}"
        assert x["identical"], f"{family}: export differs from the checkpoint"
        assert x["vllm"] == x["greedy"], f"{family}: vLLM after sync {x['vllm']} != transformers {x['greedy']}"
        assert x["built"] == x["counted"], f"{family}: built {x['built']} parameters, r1mega.models.params counts {x['counted']}"


def test_r1_zero_two_steps_with_a_qwen3_moe_policy(tmp_path, cache_dir):
    """The R1-Zero policy role: two GRPO rollouts of tiny Qwen3-MoE (embedded base, test_r1_zero's
    smallest settings), synced into vLLM's Qwen3MoeForCausalLM after every optimizer step."""
    from tests.test_r1_zero import _check_loop, _run

    rows = _run(tmp_path / "run", cache_dir, ["model=tiny_qwen3_moe", "recipe.rollouts=2", "recipe.save_every=2",
                                              "recipe.wandb=false"])
    _check_loop(rows, 2)


def test_distill_accepts_a_qwen3_student(tmp_path):
    """The distillation student role, at validation and pre-flight (planner) level: a Qwen3 preset
    student, and a Qwen3 HF directory as `recipe.base` (model=hf by default)."""
    from r1mega.config import compose
    from r1mega.plan.preflight import check

    d = _write(tmp_path, "qwen3", tiny_released_config("qwen3"))
    for run in (["recipe=distill", "model=tiny_qwen3"], ["recipe=distill", f"recipe.base={d}"]):
        cfg = compose(run)
        assert (cfg.model.arch, cfg.model.qk_layernorm, cfg.recipe.teacher.model) == ("qwen3", True, "tiny_moe")
        assert check(cfg).fits
    assert compose(["recipe=distill", f"recipe.base={d}"]).model.kv_channels == 128
