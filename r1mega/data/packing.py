"""Sequence packing: variable-length samples into fixed-shape microbatches with per-sequence
attention boundaries, so no token attends across samples and padding is only what fills a bin.

Each sample is a dict of equal-length 1-D tensors (`tokens` plus any per-token fields: targets,
loss masks, log-probs, advantages). Samples are placed first-fit-decreasing into bins of
`max_tokens`; every bin becomes one `[1, T]` row (all rows padded to the same T, which pipeline
parallelism needs, and to a multiple of `pad_to_multiple`, which sequence parallelism needs).
The limit is strict: T <= `max_tokens` always. A sample longer than `max_tokens` is an error
(ValueError naming the sample, its length and the limit), never a larger microbatch, and
`max_tokens` must be a multiple of `pad_to_multiple` so that padding never pushes T past it.
Boundaries travel in the form the attention kernel takes:
- `thd=False` (local spec, CPU): a `[1, 1, T, T]` boolean mask, True = masked, block-diagonal causal.
- `thd=True` (Transformer Engine): megatron's `PackedSeqParams` with `cu_seqlens`.
RoPE only sees position differences inside a sequence, so packed logits equal unpacked ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    microbatches: list[dict]  # [1, T] fields, "position_ids", and "attention_mask" or "packed_seq_params"
    placement: list[list[tuple[int, int, int]]]  # per microbatch: (sample index, start, length)
    real_tokens: int
    total_tokens: int

    @property
    def efficiency(self) -> float:
        """Fraction of real (non-pad) tokens."""
        return self.real_tokens / max(self.total_tokens, 1)


def _check(lengths: list[int], max_tokens: int, pad_to_multiple: int, caller: str) -> None:
    """ValueError unless every sample fits one microbatch of `max_tokens` tokens, padding included."""
    if pad_to_multiple < 1 or max_tokens < pad_to_multiple or max_tokens % pad_to_multiple:
        raise ValueError(f"{caller}: max_tokens={max_tokens} must be a positive multiple of pad_to_multiple="
                         f"{pad_to_multiple} (microbatches are padded to that multiple and must stay within max_tokens)")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"{caller}: sample {i} has no tokens")
        if n > max_tokens:
            raise ValueError(f"{caller}: sample {i} has {n} tokens, more than max_tokens={max_tokens} "
                             f"(the tokens of one microbatch)")


def _bins(lengths: list[int], max_tokens: int, min_bins: int) -> list[list[int]]:
    """Sample indices per microbatch: first-fit-decreasing decides how many microbatches are needed
    (at least `min_bins`), then the samples are spread over that many by longest-first onto the least
    loaded (`_balance`), since every row is padded to the fullest one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    # Split the fullest bins until there are at least `min_bins` (e.g. one per pipeline microbatch);
    # with too few samples to split, padding-only bins make up the count.
    while len(bins) < min_bins and any(len(b) > 1 for b in bins):
        b = max((b for b in bins if len(b) > 1), key=lambda b: sum(lengths[i] for i in b))
        bins.remove(b)
        bins += [b[0::2], b[1::2]]
    bins += [[] for _ in range(min_bins - len(bins))]
    return [sorted(b) for b in _balance(lengths, bins)]


def _balance(lengths: list[int], bins: list[list[int]]) -> list[list[int]]:
    """The samples of `bins` over as many bins, longest first onto the least loaded (ties: lowest bin),
    when that lowers the fullest bin's tokens; else `bins` (first-fit-decreasing packs bins to the
    brim and leaves the last one short, and every row pads to the brim)."""
    load, out = [0] * len(bins), [[] for _ in bins]
    for i in sorted((i for b in bins for i in b), key=lambda i: (-lengths[i], i)):
        b = min(range(len(bins)), key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += lengths[i]
    fullest = max((sum(lengths[i] for i in b) for b in bins), default=0)
    return out if max(load, default=0) < fullest else bins


def num_microbatches(lengths: list[int], max_tokens: int, min_microbatches: int = 1, pad_to_multiple: int = 1) -> int:
    """How many microbatches `pack` makes of samples with these lengths in tokens (no samples:
    `min_microbatches`). Raises ValueError as `pack` does."""
    _check(lengths, max_tokens, pad_to_multiple, "num_microbatches")
    return max(len(_bins(lengths, max_tokens, 1)), min_microbatches)


def block_causal_mask(lengths: list[int], total: int) -> torch.Tensor:
    """[1, 1, T, T] bool, True where attention is forbidden: across segments or to the future.
    Padding after the last segment forms its own segment so its softmax rows stay finite."""
    seg = torch.repeat_interleave(torch.arange(len(lengths) + 1), torch.tensor([*lengths, total - sum(lengths)]))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    return ~allowed[None, None]


def shared_prefix_mask(segments: list[tuple[int, int, int, int]], total: int) -> torch.Tensor:
    """[1, 1, T, T] bool, True where attention is forbidden, for `segments` (start, end, prefix_start,
    prefix_end): each token sees its own segment causally and the whole of its segment's prefix range
    (empty when prefix_start == prefix_end). Padding after the last segment forms its own segment."""
    lengths = [b - a for a, b, _, _ in segments]
    allowed = ~block_causal_mask(lengths, total)[0, 0]
    for a, b, pa, pb in segments:
        allowed[a:b, pa:pb] = True
    return ~allowed[None, None]


def _shared_units(samples, prompt_lengths: list[int], group_size: int, max_tokens: int,
                  pad_to_multiple: int) -> tuple[list[list[int]], list[int]]:
    """(sample indices of each group, the group's tokens with its prompt laid out once): the packing
    units of `pack_shared_prompts`, with its ValueErrors."""
    if not samples or len(samples) % group_size or len(prompt_lengths) != len(samples):
        raise ValueError(f"pack_shared_prompts: {len(samples)} samples, {len(prompt_lengths)} prompt lengths: "
                         f"need whole groups of {group_size}")
    groups = [list(range(g, g + group_size)) for g in range(0, len(samples), group_size)]
    for grp in groups:
        p = prompt_lengths[grp[0]]
        head = samples[grp[0]]["tokens"][:p]
        if any(prompt_lengths[i] != p or not torch.equal(samples[i]["tokens"][:p], head) for i in grp):
            raise ValueError(f"pack_shared_prompts: samples {grp[0]}..{grp[-1]} do not share one prompt")
    lengths = [prompt_lengths[grp[0]] - 1 + sum(len(samples[i]["tokens"]) - prompt_lengths[i] + 1 for i in grp)
               for grp in groups]
    _check(lengths, max_tokens, pad_to_multiple, "pack_shared_prompts")
    return groups, lengths


def pack_shared_prompts(
    samples: list[dict[str, torch.Tensor]],
    prompt_lengths: list[int],
    group_size: int,
    max_tokens: int,
    pad_to_multiple: int = 1,
    min_microbatches: int = 1,
    pad_id: int = 0,
) -> Packed:
    """`pack` for groups of `group_size` consecutive samples that start with the same prompt (GRPO's
    outputs of one prompt): each group's prompt but its last token is laid out once (the prefix,
    positions 0 .. p-2), then each sample's last prompt token and response (its segment, positions p-1
    ..), attending to the prefix and causally to itself. Same log-probs as `pack` at every response
    position, with (group_size - 1) x (p - 1) tokens fewer per group. Prefix positions carry the
    first sample's fields; placement is each sample's segment (start, length in tokens); microbatches
    carry `position_ids` (the RoPE positions, `PolicyGPTModel`'s `rope_positions`) and the mask as
    `shared_prefix_mask`. Raises ValueError as `pack` does (for a group: its tokens), and for a group
    whose samples do not share the prompt."""
    groups, lengths = _shared_units(samples, prompt_lengths, group_size, max_tokens, pad_to_multiple)
    bins = _bins(lengths, max_tokens, min_microbatches)
    total = -(-max(sum(lengths[g] for g in b) for b in bins) // pad_to_multiple) * pad_to_multiple
    microbatches, placement = [], []
    for b in bins:
        parts, positions, segments, place, at = [], [], [], [], 0
        for g in b:
            first, p = groups[g][0], prompt_lengths[groups[g][0]]
            parts.append({k: v[:p - 1] for k, v in samples[first].items()})
            positions.append(torch.arange(p - 1))
            prefix, at = (at, at + p - 1), at + p - 1
            if p > 1:
                segments.append((*prefix, prefix[0], prefix[0]))
            for i in groups[g]:
                n = len(samples[i]["tokens"]) - p + 1
                parts.append({k: v[p - 1:] for k, v in samples[i].items()})
                positions.append(torch.arange(p - 1, p - 1 + n))
                segments.append((at, at + n, *prefix))
                place.append((i, at, n))
                at += n
        fields = {k: torch.cat([*(part[k] for part in parts),
                                torch.full((total - at,), pad_id if k == "tokens" else 0, dtype=like.dtype)])[None]
                  for k, like in samples[0].items()}
        fields["position_ids"] = torch.cat([*positions, torch.arange(total - at)])[None]
        fields["rope_positions"] = fields["position_ids"]
        fields["attention_mask"] = shared_prefix_mask(segments, total)
        fields["attention_mask"]._r1mega_layout = segments + ([(at, total, at, at)] if total > at else [])
        microbatches.append(fields)
        placement.append(place)
    return Packed(microbatches, placement, sum(lengths), total * len(bins))


def pack(
    samples: list[dict[str, torch.Tensor]],
    max_tokens: int,
    pad_to_multiple: int = 1,
    thd: bool = False,
    min_microbatches: int = 1,
    pad_id: int = 0,
) -> Packed:
    """`samples` in at least `min_microbatches` microbatches of T tokens each, T the fullest bin's
    token count rounded up to `pad_to_multiple`, so T <= `max_tokens`. Raises ValueError without
    samples, for a sample of no tokens or of more than `max_tokens` tokens (naming its index, length
    and the limit), and unless `max_tokens` is a positive multiple of `pad_to_multiple`."""
    if not samples:
        raise ValueError("pack: no samples")
    lengths = [len(s["tokens"]) for s in samples]
    _check(lengths, max_tokens, pad_to_multiple, "pack")
    bins = _bins(lengths, max_tokens, min_microbatches)
    longest = max(sum(lengths[i] for i in b) for b in bins)
    total = -(-longest // pad_to_multiple) * pad_to_multiple
    microbatches, placement = [], []
    for b in bins:
        mb_lengths = [lengths[i] for i in b]
        used = sum(mb_lengths)
        fields = {}
        for key, like in samples[0].items():
            parts = [samples[i][key] for i in b]
            pad = torch.full((total - used,), pad_id if key == "tokens" else 0, dtype=like.dtype)
            fields[key] = torch.cat([*parts, pad])[None]
        fields["position_ids"] = torch.cat([torch.arange(n) for n in mb_lengths] + [torch.arange(total - used)])[None]
        starts = torch.tensor([0, *mb_lengths]).cumsum(0)
        if thd:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = torch.tensor([*starts.tolist(), total] if total > used else starts.tolist(), dtype=torch.int32)
            longest_seq = int((cu[1:] - cu[:-1]).max())
            fields["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest_seq, max_seqlen_kv=longest_seq
            )
        else:
            fields["attention_mask"] = block_causal_mask(mb_lengths, total)
        microbatches.append(fields)
        placement.append([(i, int(s), n) for i, s, n in zip(b, starts[:-1], mb_lengths)])
    return Packed(microbatches, placement, sum(lengths), total * len(bins))


def unpack(values: torch.Tensor, placement: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Per-sample slices of a microbatch's `[1, T]` (or `[T]`) per-token tensor, in placement order."""
    row = values.reshape(-1) if values.dim() == 2 else values
    return [row[start:start + n] for _, start, n in placement]


def segments_to_padded(values: torch.Tensor, placement: list[tuple[int, int, int]]) -> torch.Tensor:
    """`[num_samples, max_len]` view of a packed row (differentiable), zero-padded on the right."""
    parts = unpack(values, placement)
    return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)


def dp_shares(lengths: list[int], group_size: int, dp: int) -> list[list[int]]:
    """Sample indices of each of `dp` data-parallel ranks: whole groups (consecutive `group_size`
    samples), longest group first to the rank with the fewest tokens so far (ties: lowest rank), each
    share in sample order. Deterministic, so every rank computes every rank's share."""
    groups = [list(range(i, min(i + group_size, len(lengths)))) for i in range(0, len(lengths), group_size)]
    load, shares = [0] * dp, [[] for _ in range(dp)]
    for grp in sorted(groups, key=lambda grp: -sum(lengths[i] for i in grp)):
        r = min(range(dp), key=lambda k: (load[k], k))
        shares[r] += grp
        load[r] += sum(lengths[i] for i in grp)
    return [sorted(share) for share in shares]


def pack_dp_share(
    samples: list[dict[str, torch.Tensor]],
    max_tokens: int,
    dp_rank: int,
    dp: int,
    group_size: int = 1,
    pad_to_multiple: int = 1,
    thd: bool = False,
    min_microbatches: int = 1,
    prompt_lengths: list[int] | None = None,
) -> Packed:
    """Data-parallel rank `dp_rank`'s share of `samples` (`dp_shares`: whole groups, balanced by
    tokens), packed into as many microbatches as the rank that needs the most (expert-parallel
    all-to-alls pair microbatches across DP ranks), padding-only ones where needed. Placement indices
    refer to `samples`; a rank with no sample packs one all-zero token of index -1 (zero it out of
    the loss by its zero mask). With `prompt_lengths` (one per sample) each group's prompt is laid out
    once (`pack_shared_prompts`). Raises ValueError without samples and as `pack` does (the index is
    the sample's in `samples`), on every rank alike."""
    if not samples:
        raise ValueError("pack_dp_share: no samples")
    lengths = [len(s["tokens"]) for s in samples]
    _check(lengths, max_tokens, pad_to_multiple, "pack_dp_share")
    shares = dp_shares(lengths, group_size, dp)
    if prompt_lengths is not None:
        if thd:
            raise ValueError("pack_dp_share: shared prompts need the local attention mask (thd=False)")

        # Every rank's count of its share's microbatches (from the packing units, without packing them).
        units = [_shared_units([samples[i] for i in share], [prompt_lengths[i] for i in share], group_size,
                               max_tokens, pad_to_multiple)[1] for share in shares if share]
        count = max([min_microbatches, *(len(_bins(u, max_tokens, 1)) for u in units)])
    else:
        count = max(num_microbatches([lengths[i] for i in share], max_tokens, min_microbatches, pad_to_multiple)
                    for share in shares)
    mine = shares[dp_rank]
    parts = [samples[i] for i in mine] or [{k: v[:1] * 0 for k, v in samples[0].items()}]
    index = mine or [-1]
    if prompt_lengths is not None and mine:
        packed = pack_shared_prompts(parts, [prompt_lengths[i] for i in mine], group_size, max_tokens,
                                     pad_to_multiple=pad_to_multiple, min_microbatches=count)
    else:
        packed = pack(parts, max_tokens, pad_to_multiple=pad_to_multiple, thd=thd, min_microbatches=count)
    packed.placement = [[(index[i], start, n) for i, start, n in place] for place in packed.placement]
    if not mine:
        packed.real_tokens = 0
    return packed
