"""Sequence packing's limits are strict: no microbatch is ever longer than `max_tokens`, padding included;
a sample that cannot fit is an error naming it, its length and the limit."""
from __future__ import annotations

import pytest
import torch

from r1mega.data.packing import num_microbatches, pack, pack_dp_share


def _samples(lengths: list[int]) -> list[dict]:
    return [{"tokens": torch.arange(1, n + 1), "mask": torch.ones(n)} for n in lengths]


def test_a_sample_longer_than_max_tokens_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"^pack: sample 0 has 20 tokens, more than max_tokens=16 "):
        pack(_samples([20, 3]), max_tokens=16)
    with pytest.raises(ValueError, match=r"^pack: sample 1 has 17 tokens, more than max_tokens=16 "):
        pack(_samples([3, 17]), max_tokens=16)
    with pytest.raises(ValueError, match=r"^num_microbatches: sample 0 has 20 tokens, more than max_tokens=16 "):
        num_microbatches([20, 3], 16)
    with pytest.raises(ValueError, match=r"^pack: sample 1 has no tokens$"):
        pack(_samples([3, 0]), max_tokens=16)


def test_dp_share_names_the_sample_by_its_index_in_the_whole_batch():
    # Sample 3 would land on rank 1 (groups of 2): every rank raises, with the global index.
    for rank in (0, 1):
        with pytest.raises(ValueError, match=r"^pack_dp_share: sample 3 has 9 tokens, more than max_tokens=8 "):
            pack_dp_share(_samples([2, 2, 2, 9]), 8, dp_rank=rank, dp=2, group_size=2)


def test_a_sample_of_exactly_max_tokens_fits():
    packed = pack(_samples([16, 3]), max_tokens=16)
    assert [mb["tokens"].shape for mb in packed.microbatches] == [torch.Size([1, 16])] * 2
    assert packed.placement == [[(0, 0, 16)], [(1, 0, 3)]]


def test_first_fit_decreasing_exact_placement():
    packed = pack(_samples([5, 3, 9]), max_tokens=10)
    assert packed.placement == [[(2, 0, 9)], [(0, 0, 5), (1, 5, 3)]]
    assert [mb["tokens"].shape[1] for mb in packed.microbatches] == [9, 9]
    assert packed.microbatches[1]["tokens"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 0]]
    assert (packed.real_tokens, packed.total_tokens) == (17, 18)


def test_padding_to_a_multiple_stays_within_max_tokens():
    # The fullest bin (10 tokens) pads to 12, a multiple of 4, still <= 16.
    assert pack(_samples([7, 3]), max_tokens=16, pad_to_multiple=4).microbatches[0]["tokens"].shape == (1, 12)
    # A bin filled to 16 needs no padding; the other row pads to the same 16.
    packed = pack(_samples([16, 5, 3]), max_tokens=16, pad_to_multiple=4)
    assert [mb["tokens"].shape[1] for mb in packed.microbatches] == [16, 16]
    # max_tokens must be a multiple of pad_to_multiple: 15 tokens would pad to 16.
    for call in (lambda: pack(_samples([15]), max_tokens=15, pad_to_multiple=2),
                 lambda: num_microbatches([15], 15, pad_to_multiple=2),
                 lambda: pack_dp_share(_samples([15]), 15, 0, 1, pad_to_multiple=2)):
        with pytest.raises(ValueError, match=r"max_tokens=15 must be a positive multiple of pad_to_multiple=2"):
            call()


def test_min_microbatches_splits_within_the_limit():
    packed = pack(_samples([4, 4, 4, 4]), max_tokens=16, min_microbatches=3)
    assert len(packed.microbatches) == 3
    assert max(mb["tokens"].shape[1] for mb in packed.microbatches) == 8
    assert sorted(i for place in packed.placement for i, _, _ in place) == [0, 1, 2, 3]


def test_balanced_bins_pad_less_than_first_fit_and_keep_their_count():
    # first-fit-decreasing: [9+7] [8+6], rows padded to 16 (30 of 32 real); spread: [9+6] [8+7], rows of 15
    packed = pack(_samples([9, 8, 7, 6]), max_tokens=16)
    assert sorted(sum(n for _, _, n in place) for place in packed.placement) == [15, 15]
    assert packed.microbatches[0]["tokens"].shape == (1, 15) and packed.efficiency == 1.0
    # [10+6] [9+7] [8+5+3] is already full: spreading would make a row of 18, so it is kept
    packed = pack(_samples([10, 9, 8, 7, 6, 5, 3]), max_tokens=16)
    assert sorted(sum(n for _, _, n in place) for place in packed.placement) == [16, 16, 16]


def test_packing_efficiency_of_the_embedded_default_step():
    """The CPU default's mini-batch (16 prompts x 8 samples in 2 mini-batches, ~15 prompt + 8-32
    response tokens, train_max_tokens 2,048), as the GRPO step packs it and reports
    `packing_efficiency` (real / total tokens over its mini-batches)."""
    import random

    from r1mega.config import compose

    cfg = compose(["recipe=r1_zero"])
    r, algo = cfg.recipe, cfg.algorithm
    rng = random.Random(0)
    real = total = 0
    for _ in range(10):  # rollouts
        per_minibatch = r.prompts_per_rollout * algo.group_size // algo.num_mini_batches
        for _ in range(algo.num_mini_batches):
            lengths = [rng.randint(14, 18) + rng.randint(8, r.max_response_tokens) for _ in range(per_minibatch)]
            packed = pack_dp_share(_samples(lengths), r.train_max_tokens, 0, 1, group_size=algo.group_size)
            real, total = real + packed.real_tokens, total + packed.total_tokens
    assert real / total >= 0.95, real / total


def test_shared_prompts_lay_each_group_prompt_out_once():
    from r1mega.data.packing import pack_shared_prompts

    def sample(prompt, response):
        t = torch.tensor(prompt + response)
        return {"tokens": t, "mask": torch.tensor([0.0] * (len(prompt) - 1) + [1.0] * len(response) + [0.0])}

    samples = [sample([5, 6, 7], [1, 2]), sample([5, 6, 7], [3]), sample([8, 9], [4, 4, 4]), sample([8, 9], [2])]
    (mb,), (place,) = (p := pack_shared_prompts(samples, [3, 3, 2, 2], 2, 16)).microbatches, p.placement
    assert mb["tokens"].tolist() == [[5, 6, 7, 1, 2, 7, 3, 8, 9, 4, 4, 4, 9, 2]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3, 4, 1, 2]]
    assert mb["mask"].tolist() == [[0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 0]]
    assert place == [(0, 2, 3), (1, 5, 2), (2, 8, 4), (3, 12, 2)] and (p.real_tokens, p.total_tokens) == (14, 14)
    allowed = ~mb["attention_mask"][0, 0]
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 5, 6]  # prefix, then its own segment
    assert allowed[13].nonzero().flatten().tolist() == [7, 12, 13]
    assert allowed[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="samples 0..1 do not share one prompt"):
        pack_shared_prompts([samples[0], sample([5, 6, 0], [1])], [3, 3], 2, 16)
