"""Model presets: analytic parameter counts (checked against built tiny models) and a training step."""
from __future__ import annotations

import pytest
import torch

from r1mega.config import compose
from r1mega.models.params import count_parameters
from tests.distributed import run_distributed


def test_deepseek_v3_671b_is_671b_total_37b_active():
    # DeepSeek-V3 technical report (arXiv:2412.19437), §1: "671B total parameters with 37B activated
    # for each token"; the 14B MTP module of the HF checkpoint (685B) is not part of the 671B.
    p = count_parameters(compose(["model=deepseek_v3_671b"]).model)
    assert abs(p.total / 671e9 - 1) <= 0.01
    # 37.55B counting every weight a token touches; 36.63B without the input-embedding lookup.
    # "37B" is given to two figures: both round to it within 1.5%.
    assert round((p.active - p.embedding / 2) / 1e9) == 37
    assert abs(p.active / 37e9 - 1) <= 0.015
    # HF README: 685B = 671B main model + 14B MTP module; the checkpoint's MTP layer stores its own
    # copies of the embedding and output head, which r1mega shares with the main model.
    assert abs((p.mtp + p.embedding) / 14e9 - 1) <= 0.05


def _build_and_train(model: str) -> dict:
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([f"model={model}", "optim.lr=1e-3"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    module = engine.model[0].module
    numel = sum(p.numel() for p in module.parameters())
    # The aux-loss-free expert bias is a buffer in megatron and a tensor in the HF checkpoint.
    numel += sum(b.numel() for n, b in module.named_buffers() if n.endswith("expert_bias"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 32), generator=g)
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), position_ids=torch.arange(32).expand(4, 32))

    def loss_fn(per_token_loss, b):
        return per_token_loss.sum(), torch.tensor(per_token_loss.numel()), {"loss": per_token_loss.mean().detach()}

    losses = [float(engine.train_step([batch], loss_fn, with_labels=True)["metrics"][0]["loss"]) for _ in range(10)]
    return {"numel": numel, "losses": losses}


@pytest.mark.parametrize("model", ["tiny_moe", "tiny_dense"])
def test_tiny_model_builds_to_its_analytic_size_and_learns(model):
    (r,) = run_distributed(_build_and_train, 1, model)
    assert r["numel"] == count_parameters(compose([f"model={model}"]).model).total
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    # Ten Adam steps on one fixed batch must fit it: the loss falls well below its start.
    assert r["losses"][-1] < 0.8 * r["losses"][0], r["losses"]
