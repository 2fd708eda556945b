"""`recipe=distill`: distillation (paper 2.4). A teacher generates k samples per prompt on the RL-split
prompts with vLLM, the samples the rule rewards judge correct are kept (deduplicated, at most m per
prompt, JSONL with provenance), and a student is fine-tuned on them (SFT only); the student is
evaluated before and after.

The top-level `model` / `parallel` are the STUDENT's (the model being trained, as in every recipe);
`recipe.teacher` names the teacher's model preset and parallel preset (each with overrides), so the
two layouts are chosen independently: the teacher's stages run under its layout, then megatron's
parallel state is rebuilt for the student's. Both use the teacher's tokenizer.

Teacher weights (`recipe.teacher`): `checkpoint` (a megatron checkpoint root or step dir, e.g. an
r1_zero / r1 run's `ckpt`), `hf_dir` (any architecture the checkpoint mapping and vLLM serve), or
neither: the embedded base made good at the task by a short cold-start SFT on correct synthetic
long-CoT rows (the CPU default). Student weights (`recipe.base`): `embedded` (the student preset
pretrained on the synthetic corpus like the embedded base, cached), an HF directory, or `random`.

Stages (`run_dir/manifest.json`, restart-safe like recipe=r1): teacher -> generate -> student.
"""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from r1mega.config.reward import RewardConfig
from r1mega.data.prompts import load_rows
from r1mega.parallel.state import destroy_distributed, init_distributed
from r1mega.recipes import stages as S
from r1mega.recipes.base import Base, embedded_base
from r1mega.recipes.manifest import Manifest

STAGES = ("teacher", "generate", "student")


def run(cfg) -> dict:
    run_dir = Path(cfg.run_dir)
    todo = _plan(cfg, run_dir)
    tcfg = teacher_cfg(cfg)
    first = tcfg if todo[0] != "student" else cfg
    launch = init_distributed(first.parallel, first.platform)
    try:
        return run_stages(cfg, tcfg, run_dir, todo, launch)
    finally:
        destroy_distributed()


def _plan(cfg, run_dir: Path) -> list[str]:
    t = cfg.recipe.teacher
    if t.checkpoint and t.hf_dir:
        S.fail("recipe.teacher: set checkpoint or hf_dir, not both")
    return S.stages_to_run(cfg, run_dir, STAGES)


def teacher_cfg(cfg):
    """The run's config with the teacher's model and parallel layout (and no recipe change)."""
    t = cfg.recipe.teacher
    out = copy.deepcopy(cfg)
    with open_dict(out):
        if t.model:
            out.model = S.preset("model", t.model, t.model_overrides)
        elif t.model_overrides:
            out.model = OmegaConf.merge(out.model, t.model_overrides)
        if t.parallel:
            out.parallel = S.preset("parallel", t.parallel, t.parallel_overrides)
        elif t.parallel_overrides:
            out.parallel = OmegaConf.merge(out.parallel, t.parallel_overrides)
    from r1mega.config import validate

    validate(out)
    return out


def _use_layout(c, launch) -> None:
    """Rebuild megatron's parallel groups for `c.parallel` (same processes)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(c.parallel, c.platform, launch)


def run_stages(cfg, tcfg, run_dir: Path, todo: list[str], launch) -> dict:
    manifest = Manifest(run_dir)
    layout = "teacher" if todo[0] != "student" else "student"
    teacher = None

    def switch_layout(name: str) -> None:
        nonlocal layout
        want = "student" if name == "student" else "teacher"
        if want != layout:
            _use_layout(cfg if want == "student" else tcfg, launch)
            layout = want

    def run_one(name: str):
        nonlocal teacher
        if name == "teacher":
            return teacher_stage(tcfg, run_dir / name)
        teacher = teacher or _teacher_from(tcfg, manifest)
        if name == "generate":
            return generate_stage(cfg, tcfg, teacher, run_dir / name, launch)
        return student_stage(cfg, teacher, manifest, run_dir / name, launch)

    S.run_pending("distill", cfg, STAGES, todo, manifest, run_one, prepare=switch_layout)
    if all(manifest.done(s) for s in STAGES) and todo[-1] == STAGES[-1]:
        return final_table(cfg, tcfg, manifest, run_dir)
    return manifest.stages


# -- teacher ------------------------------------------------------------------------------------------
def teacher_stage(tcfg, stage_dir: Path):
    """Where the teacher's weights and tokenizer are; for the embedded teacher, make it first."""
    t = tcfg.recipe.teacher
    if t.hf_dir:
        return ({"hf_dir": t.hf_dir, "tokenizer": t.hf_dir},
                {"kind": "hf", "line": f"teacher {tcfg.model.name} from the HF directory {t.hf_dir}"})
    if t.checkpoint:
        tok_dir = t.tokenizer_dir or str(embedded_base(tcfg).tokenizer_dir)
        return ({"checkpoint": t.checkpoint, "tokenizer": tok_dir},
                {"kind": "checkpoint", "line": f"teacher {tcfg.model.name} from the checkpoint {t.checkpoint}"})
    base = embedded_base(tcfg)
    c = t.cold_start
    if c.data:
        rows, source = S.load_sft_rows(c.data), c.data
    else:
        rows, source = S.cold_start_rows(tcfg.data.arithmetic, c.num_examples, tcfg.platform.seed), "synthetic addition"
    res = S.sft_stage(tcfg, "teacher_sft", stage_dir, base.load_into, rows, c.sft, base.tokenizer(), tcfg.recipe.template)
    line = (f"embedded teacher {tcfg.model.name}: cold-start SFT on {res['samples']} correct long-CoT rows ({source}), "
            f"{res['steps']} steps, loss {res.get('first_loss', float('nan')):.3f} -> {res.get('last_loss', float('nan')):.3f}")
    return {"checkpoint": res["checkpoint"], "tokenizer": base.tokenizer_dir}, {"kind": "embedded", **res, "line": line}


def _teacher_from(tcfg, manifest) -> Base:
    out = manifest.outputs("teacher")
    if "hf_dir" in out:
        return Base(tcfg.model, tokenizer_dir=Path(out["tokenizer"]), hf_dir=Path(out["hf_dir"]))
    return Base(tcfg.model, tokenizer_dir=Path(out["tokenizer"]), checkpoint=Path(out["checkpoint"]))


def _teacher_loader(teacher: Base):
    return teacher.load_into if teacher.hf_dir is not None else S.checkpoint_loader(teacher.checkpoint)


def reward_cfg(cfg):
    """Correctness (and the output form) of the template's answers: accuracy + format (whose style is
    the template's own output form)."""
    node = OmegaConf.structured(RewardConfig)
    terms = [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 1.0, "params": {"style": cfg.recipe.template}}]
    return OmegaConf.merge(node, {"sources": {"default": {"terms": terms}}, "workers": cfg.reward.workers})


# -- generate ----------------------------------------------------------------------------------------
def generate_stage(cfg, tcfg, teacher: Base, stage_dir: Path, launch):
    from r1mega.eval.models import evaluate_model
    from r1mega.rollout.sampler import PolicySampler

    r = cfg.recipe
    tok = teacher.tokenizer()
    data = stage_dir / "distill.jsonl"
    rows = load_rows(cfg.data, "train")
    rows = rows[: r.num_prompts] if r.num_prompts else rows
    src = str(teacher.checkpoint or teacher.hf_dir)
    sampler = PolicySampler(tcfg, tok, stage_dir, launch)
    try:
        sampler.load(_teacher_loader(teacher), f"teacher {tcfg.model.name}")
        teacher_eval = evaluate_model(sampler, load_rows(cfg.data, "eval"), r.template, r.eval, cfg.platform.seed,
                                      stage_dir.parent / "eval" / "teacher")
        counts = sampler.rejection_sample(rows, r.template, r.generate, reward_cfg(cfg), data,
                                          source=f"distill/teacher:{src}", step=None)
    finally:
        sampler.close()
    if not counts["kept"]:
        raise S.StageError(f"the teacher produced no accepted sample (rejected: {counts['rejected']}); check the "
                           "teacher and recipe.generate")
    rej = counts["rejected"]
    line = (f"teacher {tcfg.model.name} (held-out pass@1 {_pass1(teacher_eval, r.eval.k)}) on "
            f"{counts['prompts'] - counts['skipped_prompts']} RL-split prompts x {r.generate.k} samples: "
            f"{counts['generated'] - rej['reward'] - rej['truncated']} correct, {counts['kept']} kept "
            f"(<= {r.generate.m}/prompt, {rej['duplicate']} duplicates) covering {counts['prompts_with_kept']} prompts")
    return {"data": data}, {"counts": counts, "teacher_eval": teacher_eval, "line": line}


def _pass1(metrics: dict, k: int) -> str:
    """pass@1 over all benchmarks of `metrics` (`r1mega.eval.report.pooled`), as the tables write it."""
    from r1mega.eval.report import cells, pooled

    return cells(pooled(metrics, k), k, ("pass@1",))[0]


# -- student -----------------------------------------------------------------------------------------
def student_init(cfg, teacher_tok_dir: Path):
    """(init(chunks) or None for random, label). An embedded student must have the teacher's tokenizer."""
    base = cfg.recipe.base
    if base == "random":
        return None, "random init"
    if base != "embedded":
        b = Base(cfg.model, tokenizer_dir=Path(base), hf_dir=Path(base))
        return b.load_into, f"HF {base}"
    b = embedded_base(cfg)
    mine, theirs = (b.tokenizer_dir / "tokenizer.json"), (Path(teacher_tok_dir) / "tokenizer.json")
    if mine.read_bytes() != theirs.read_bytes():
        raise S.StageError(f"the embedded student base's tokenizer ({mine}) differs from the teacher's ({theirs}); "
                           "use the same model.vocab_size and recipe.pretrain for both, or recipe.base=random")
    return b.load_into, f"embedded base ({b.checkpoint.parent.name})"


def student_stage(cfg, teacher: Base, manifest, stage_dir: Path, launch):
    from r1mega.eval.models import evaluate_models
    from r1mega.models.params import count_parameters

    r = cfg.recipe
    tok = teacher.tokenizer()
    if len(tok) > cfg.model.vocab_size:
        raise S.StageError(f"the teacher's tokenizer has {len(tok)} tokens, more than the student's "
                           f"model.vocab_size={cfg.model.vocab_size}")
    rows = S.read_rows(manifest.outputs("generate")["data"])
    init, init_label = student_init(cfg, teacher.tokenizer_dir)
    eval_rows = load_rows(cfg.data, "eval")
    eval_dir = stage_dir.parent / "eval"
    keep_random = lambda chunks: None  # noqa: E731  (the frozen model's own random init)
    before = evaluate_models(cfg, tok, launch, [("student_before", init or keep_random)], eval_rows, r.eval,
                             eval_dir, stage_dir)["student_before"]
    res = S.sft_stage(cfg, "student_sft", stage_dir, init, rows, r.sft, tok, r.template)
    after = evaluate_models(cfg, tok, launch, [("student_after", S.checkpoint_loader(res["checkpoint"]))], eval_rows,
                            r.eval, eval_dir, stage_dir)["student_after"]
    params = count_parameters(cfg.model).total / 1e6
    line = (f"student {cfg.model.name} ({params:.2f}M params, from {init_label}): SFT on {res['samples']} teacher "
            f"samples, {res['steps']} steps ({res['epochs']:.2f} epochs), loss {res.get('first_loss', float('nan')):.3f} -> "
            f"{res.get('last_loss', float('nan')):.3f}; held-out pass@1 {_pass1(before, r.eval.k)} -> {_pass1(after, r.eval.k)}")
    return ({"checkpoint": res["checkpoint"]},
            {**res, "before": before, "after": after, "init": init_label, "line": line})


def final_table(cfg, tcfg, manifest, run_dir: Path) -> dict:
    from r1mega.eval.report import print_eval_table

    e = cfg.recipe.eval
    gen, student = manifest.stages["generate"]["summary"], manifest.stages["student"]["summary"]
    entries = [(f"teacher {tcfg.model.name}", gen["teacher_eval"]), (f"student {cfg.model.name} before", student["before"]),
               (f"student {cfg.model.name} after", student["after"])]
    if S.is_rank0():
        print_eval_table(f"distill {tcfg.model.name} -> {cfg.model.name}: held-out {cfg.data.name}, k={e.k}, "
                         f"temperature {e.temperature}, top-p {e.top_p}, max_tokens {e.max_tokens}, template {cfg.recipe.template}",
                         entries, e.k, run_dir / "eval")
    return dict(entries)
