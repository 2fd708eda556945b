"""TP2+SP, EP2 and PP2 (1F1B) in 2 gloo processes give the same loss, grad norm and updated weights
as one process from the same initial weights (fp32, tolerance 1e-5)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

TOL = 1e-5
# Adam's first step is ~lr*sign(g); a large eps makes it smooth in g so that fp32 reduction-order
# noise in near-zero gradients cannot flip an update.
OPTIM = ["optim.lr=1e-2", "optim.adam_eps=1e-3", "optim.clip_grad=0"]


def _cfg(model: str, parallel: str):
    from r1mega.config import compose

    return compose([f"model={model}", f"parallel={parallel}", *OPTIM])


def _microbatches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(2):  # two microbatches: exercises gradient accumulation and the 1F1B schedule
        tokens = torch.randint(0, vocab, (2, 32), generator=g)
        loss_mask = (torch.rand(2, 32, generator=g) > 0.2).float()
        out.append(
            dict(tokens=tokens, labels=tokens.roll(-1, 1), position_ids=torch.arange(32).expand(2, 32), loss_mask=loss_mask)
        )
    return out


def _loss_fn(per_token_loss, batch):
    loss = (per_token_loss * batch["loss_mask"]).sum()
    n = batch["loss_mask"].sum()
    return loss, n, {"loss_sum": loss.detach().clone()}


def _train_one_step(model: str, parallel: str, init_dir: str, save_dir: str | None) -> dict:
    from r1mega.checkpoint.distributed import load_model, save_model
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = _cfg(model, parallel)
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    if save_dir is None:  # the reference run creates the initial weights every layout starts from
        save_model(engine.model, init_dir)
    else:
        load_model(engine.model, init_dir)
    result = engine.train_step(_microbatches(cfg.model.vocab_size), _loss_fn, with_labels=True)
    out = {"grad_norm": result["grad_norm"], "loss": sum(float(m["loss_sum"]) for m in result["metrics"])}
    if save_dir is None:
        out["params"] = {n: p.detach().clone() for n, p in engine.named_parameters()}
    else:
        save_model(engine.model, save_dir)
    return out


def _load_params(model: str, dirs: list[str]) -> list[dict]:
    from r1mega.checkpoint.distributed import load_model
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = _cfg(model, "single")
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg, trainable=False)
    out = []
    for d in dirs:
        load_model(engine.model, d)
        out.append({n: p.detach().clone() for n, p in engine.named_parameters()})
    return out


CASES = {"tiny_moe": ["tp2", "ep2", "pp2"], "tiny_dense": ["tp2", "pp2"]}


@pytest.mark.parametrize("model", list(CASES))
def test_two_process_layouts_match_one_process(model, tmp_path):
    init = str(tmp_path / "init")
    (ref,) = run_distributed(_train_one_step, 1, model, "single", init, None)
    assert ref["loss"] > 0 and ref["grad_norm"] > 0

    dirs = []
    for layout in CASES[model]:
        results = run_distributed(_train_one_step, 2, model, layout, init, str(tmp_path / layout))
        # The loss is reported by the last pipeline stage; every rank reports the global grad norm.
        losses = [r["loss"] for r in results if r["loss"] != 0]
        assert losses, f"{layout}: no rank reported a loss"
        for loss in losses:
            assert abs(loss - ref["loss"]) <= TOL * abs(ref["loss"]), f"{layout}: loss {loss} vs {ref['loss']}"
        for r in results:
            assert abs(r["grad_norm"] - ref["grad_norm"]) <= TOL * ref["grad_norm"], f"{layout}: grad norm"
        dirs.append(str(tmp_path / layout))

    (loaded,) = run_distributed(_load_params, 1, model, dirs)
    for layout, params in zip(CASES[model], loaded):
        assert params.keys() == ref["params"].keys()
        for name, p in params.items():
            diff = (p - ref["params"][name]).abs().max().item()
            assert diff <= TOL, f"{model} {layout}: {name} differs from one process by {diff:.2e}"
        # The step really moved the weights (so equality above is not of untouched tensors).
    init_params = run_distributed(_load_params, 1, model, [init])[0][0]
    moved = max((ref["params"][n] - init_params[n]).abs().max().item() for n in init_params)
    assert moved > 1e-3
