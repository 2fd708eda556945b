"""`recipe=r1`: the DeepSeek-R1 pipeline (paper 2.3) as four stages in one run directory.

1. `cold_start`: SFT of the base on long chain-of-thought examples in the R1 form (`<think>` is
   opened by the template; the response is the reasoning, `</think>`, then a summary). From the
   JSONL file `recipe.cold_start.data`, or (CPU default) generated from the synthetic addition task.
2. `rl_reasoning`: GRPO (`rl_stage`) from the cold-start checkpoint with the R1 template and
   accuracy + R1 format + language-consistency rewards.
3. `rejection_sft`: rejection sampling on the RL checkpoint (k per prompt, rule-accepted, readability
   filters, dedupe, <= m per prompt, JSONL with provenance) mixed with a non-reasoning source by
   ratio, then SFT of the BASE model on the mix (2 epochs in the paper).
4. `rl_all`: GRPO from stage 3's checkpoint with the rule rewards, plus a reward-model term when
   `recipe.rl_all.reward_model.checkpoint` names one (scored in the GRPO step next to the rules).

Each stage writes under `run_dir/<stage>/` and records its outputs (paths) and summary in
`run_dir/manifest.json` when it finishes. A restart skips finished stages and resumes the
interrupted one from its own checkpoints; `recipe.stage=<name>` runs one stage alone, reading the
earlier stages' outputs from the manifest. After the last stage every stage's model is evaluated
with the paper's protocol and the table is printed.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from r1mega.data.prompts import load_rows
from r1mega.parallel.state import destroy_distributed, init_distributed, seed_everything
from r1mega.recipes import stages as S
from r1mega.recipes.base import Base, prepare_base
from r1mega.recipes.manifest import Manifest

STAGES = ("cold_start", "rl_reasoning", "rejection_sft", "rl_all")


def run(cfg) -> dict:
    run_dir = Path(cfg.run_dir)
    todo = S.stages_to_run(cfg, run_dir, STAGES)  # errors before anything is built
    launch = init_distributed(cfg.parallel, cfg.platform)
    seed_everything(cfg.platform.seed, on_cpu=cfg.platform.device == "cpu")
    try:
        return run_stages(cfg, run_dir, todo, launch)
    finally:
        destroy_distributed()


def run_stages(cfg, run_dir: Path, todo: list[str], launch) -> dict:
    manifest = Manifest(run_dir)
    base = prepare_base(cfg)
    tok = base.tokenizer()
    S.run_pending("r1", cfg, STAGES, todo, manifest,
                  lambda name: STAGE_FNS[name](cfg, base, tok, manifest, run_dir / name, launch))
    if all(manifest.done(s) for s in STAGES) and todo[-1] == STAGES[-1]:
        return final_eval(cfg, base, tok, manifest, run_dir, launch)
    return manifest.stages


# -- the stages ---------------------------------------------------------------------------------------
def cold_start(cfg, base: Base, tok, manifest, stage_dir: Path, launch):
    c = cfg.recipe.cold_start
    if c.data:
        rows, source = S.load_sft_rows(c.data), c.data
    else:
        rows, source = S.cold_start_rows(cfg.data.arithmetic, c.num_examples, cfg.platform.seed), "synthetic addition"
    data = stage_dir / "cold_start.jsonl"
    S.write_rows(data, rows)
    res = S.sft_stage(cfg, "cold_start", stage_dir, base.load_into, rows, c.sft, tok, cfg.recipe.template)
    line = (f"{res['samples']} long-CoT examples ({source}), {res['steps']} SFT steps ({res['epochs']:.2f} epochs), "
            f"loss {res.get('first_loss', float('nan')):.3f} -> {res.get('last_loss', float('nan')):.3f}")
    return {"checkpoint": res["checkpoint"], "data": data}, {**res, "line": line}


def _rl(cfg, base: Base, stage: str, init_from: str, manifest, stage_dir: Path, launch):
    from r1mega.config.steps import optimizer_steps_per_rollout
    from r1mega.eval.report import changes
    from r1mega.recipes.r1_zero import SUMMARY, rl_stage

    st = cfg.recipe[stage]
    scfg = S.stage_cfg(cfg, stage, stage_dir, recipe=S.rl_recipe(st), algorithm=st.algorithm, optim=st.optim,
                       reward=st.reward)
    start = Base(cfg.model, tokenizer_dir=base.tokenizer_dir, checkpoint=Path(manifest.outputs(init_from)["checkpoint"]))
    rm = _reward_model(scfg, st.reward_model)
    res = rl_stage(scfg, start, stage_dir, launch, reward_model=rm)
    terms = "rule rewards" + (f" + reward model ({st.reward_model.checkpoint}, weight {rm.weight})" if rm else "")
    steps = st.rollouts * optimizer_steps_per_rollout(scfg.algorithm)
    held_out = changes(res["before"], res["after"], SUMMARY, scfg.recipe.eval.k)
    line = f"GRPO {st.rollouts} rollouts ({steps} optimizer steps) from {init_from} with {terms}: held-out {held_out}"
    return {"checkpoint": stage_dir / "ckpt", "metrics": stage_dir / f"{stage}_metrics.jsonl"}, {**res, "line": line}


def _reward_model(scfg, t):
    """The reward-model scorer of an RL stage, or None without `reward_model.checkpoint`."""
    if not t.checkpoint:
        return None
    from r1mega.rewards.reward_model import RewardModelScorer

    model = S.preset("model", t.model, t.model_overrides) if t.model else OmegaConf.merge(scfg.model, t.model_overrides)
    rm_cfg = S.stage_cfg(scfg, "reward_model", Path(scfg.run_dir))
    with open_dict(rm_cfg):
        rm_cfg.model = model
    return RewardModelScorer(rm_cfg, t.checkpoint, max_tokens=t.max_tokens, weight=t.weight,
                             sources=list(t.sources) if t.sources is not None else None)


def rl_reasoning(cfg, base, tok, manifest, stage_dir, launch):
    return _rl(cfg, base, "rl_reasoning", "cold_start", manifest, stage_dir, launch)


def rl_all(cfg, base, tok, manifest, stage_dir, launch):
    return _rl(cfg, base, "rl_all", "rejection_sft", manifest, stage_dir, launch)


def rejection_sft(cfg, base: Base, tok, manifest, stage_dir: Path, launch):
    from r1mega.checkpoint.manager import CheckpointManager
    from r1mega.data.rejection import mix
    from r1mega.rollout.sampler import PolicySampler

    st = cfg.recipe.rejection_sft
    rl_ckpt = Path(manifest.outputs("rl_reasoning")["checkpoint"])
    reasoning_path, mix_path, counts_path = stage_dir / "rejection.jsonl", stage_dir / "mix.jsonl", stage_dir / "counts.json"
    if mix_path.exists():  # a restart after sampling: the mix is complete (written atomically, last)
        S.log(f"[rejection_sft] reusing {reasoning_path.name} and {mix_path.name} of the interrupted run")
        counts = json.loads(counts_path.read_text())
    else:
        rl = cfg.recipe.rl_reasoning
        reward = OmegaConf.merge(cfg.reward, rl.reward) if rl.reward else cfg.reward
        rl_step = CheckpointManager(rl_ckpt).latest_step()
        rows = load_rows(cfg.data, "train")
        rows = rows[: st.num_prompts] if st.num_prompts else rows
        sampler = PolicySampler(cfg, tok, stage_dir, launch)
        try:
            sampler.load(S.checkpoint_loader(rl_ckpt), f"rl_reasoning step {rl_step}")
            counts = sampler.rejection_sample(rows, cfg.recipe.template, st.rejection, reward, reasoning_path,
                                              source=f"r1/rl_reasoning:{rl_ckpt}", step=rl_step)
        finally:
            sampler.close()
        if not counts["kept"]:
            raise S.StageError(f"rejection sampling kept no sample (rejected: {counts['rejected']}): the RL checkpoint "
                               "solves nothing the filters accept; more RL steps, a larger k, or looser "
                               "recipe.rejection_sft.rejection")
        m = st.mix
        other = S.load_sft_rows(m.non_reasoning_data) if m.non_reasoning_data else S.non_reasoning_rows(m.num_synthetic, m.seed)
        mixture = mix(S.read_rows(reasoning_path), other, ratio=m.ratio, seed=m.seed)
        counts["mix"] = {kind: sum(r["mix"] == kind for r in mixture) for kind in ("reasoning", "non_reasoning")}
        if S.is_rank0():
            counts_path.write_text(json.dumps(counts, indent=2))
        S.write_rows(mix_path, mixture)  # last: its presence means sampling finished
    mixture = S.read_rows(mix_path)
    res = S.sft_stage(cfg, "rejection_sft", stage_dir, base.load_into, mixture, st.sft, tok, cfg.recipe.template)
    rej = counts["rejected"]
    line = (f"{counts['prompts'] - counts['skipped_prompts']} prompts x {st.rejection.k} samples: {counts['kept']} kept "
            f"(rejected: {rej['reward']} by rewards, {rej['truncated']} truncated, "
            f"{rej['language_mixing'] + rej['long_paragraph'] + rej['code_block']} by readability, "
            f"{rej['duplicate']} duplicates, {rej['over_cap']} over m={st.rejection.m}); "
            f"mix {counts['mix']['reasoning']} reasoning + {counts['mix']['non_reasoning']} non-reasoning; "
            f"SFT of the base {res['steps']} steps ({res['epochs']:.2f} epochs), "
            f"loss {res.get('first_loss', float('nan')):.3f} -> {res.get('last_loss', float('nan')):.3f}")
    outputs = {"reasoning_data": reasoning_path, "mix": mix_path, "checkpoint": res["checkpoint"]}
    return outputs, {**res, "rejection": counts, "line": line}


STAGE_FNS = {"cold_start": cold_start, "rl_reasoning": rl_reasoning, "rejection_sft": rejection_sft, "rl_all": rl_all}


def final_eval(cfg, base: Base, tok, manifest, run_dir: Path, launch) -> dict:
    """Every stage's model (and the base) on the held-out set with one engine; the table."""
    from r1mega.eval.models import evaluate_models
    from r1mega.eval.report import print_eval_table

    e = cfg.recipe.eval
    rows = load_rows(cfg.data, "eval")
    models = [("base", base.load_into)] + [(s, S.checkpoint_loader(manifest.outputs(s)["checkpoint"])) for s in STAGES]
    out_dir = run_dir / "eval"
    results = evaluate_models(cfg, tok, launch, models, rows, e, out_dir, work_dir=out_dir)
    if S.is_rank0():
        print_eval_table(f"r1 on {cfg.model.name}: held-out {cfg.data.name}, k={e.k}, temperature {e.temperature}, "
                         f"top-p {e.top_p}, max_tokens {e.max_tokens}, template {cfg.recipe.template}",
                         list(results.items()), e.k, out_dir)
    return results
