"""HF ↔ megatron checkpoint conversion.

    python -m r1mega.convert hf_to_megatron SRC_HF_DIR DST_MEGATRON_DIR [hydra overrides, e.g. model=tiny_moe]
    python -m r1mega.convert megatron_to_hf SRC_MEGATRON_DIR DST_HF_DIR [overrides] [--force]

Runs in one process or under torchrun (any parallel= layout): each rank reads only the tensors of its
own shard; export streams tensor by tensor to rank 0, which writes (`export_stream`: per rank at most
one HF tensor plus half a bucket of `rollout.sync_bucket_mb` MB in flight). Prints one summary line.

Before any model is built it checks the source (a directory with the checkpoint's files), that the
`model=` preset matches the source's config.json (HF: `SRC/config.json`; megatron: the
`hf_assets/config.json` its import kept) and that the destination does not exist (`--force` replaces
it); any problem exits 2 with one line. The destination is written to `.DST.tmp-<pid>` beside it and
renamed into place at the end, so a killed conversion leaves the old destination or none (the
leftovers of a killed run are removed by the next one).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
from contextlib import contextmanager, nullcontext
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

# torch / megatron are imported where used, so that `--help` and argument errors answer at once.
HF_ASSETS = "hf_assets"  # tokenizer / generation config kept beside the megatron checkpoint
DIRECTIONS = ("hf_to_megatron", "megatron_to_hf")
# hf_config keys that decide the tensors' shapes or the model's numerics; the others (dtype, max
# position embeddings, init range, ...) may differ between a preset and a checkpoint.
MATCHED_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
    "moe_intermediate_size", "n_shared_experts", "n_routed_experts", "num_experts_per_tok", "routed_scaling_factor",
    "n_group", "topk_group", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim",
)
YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


class ConvertError(ValueError):
    """A conversion that cannot start; the message is one sentence."""


def _rope(config: dict) -> dict:
    """The rope settings of an HF config: transformers 5 writes `rope_parameters` (rope_theta inside),
    older versions and our export `rope_scaling` + `rope_theta`."""
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    if "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def config_mismatches(preset: dict, checkpoint: dict) -> list[tuple[str, object, object]]:
    """(field, preset value, checkpoint value) for each field of MATCHED_FIELDS (and the rope
    scaling) that both configs name and that differs."""
    out = []
    rope_p, rope_c = _rope(preset), _rope(checkpoint)
    for key in MATCHED_FIELDS:
        p = preset.get(key, rope_p.get(key)) if key == "rope_theta" else preset.get(key)
        c = checkpoint.get(key, rope_c.get(key)) if key == "rope_theta" else checkpoint.get(key)
        if key in preset and (key in checkpoint or c is not None) and not _same(p, c):
            out.append((key, p, c))
    if "rope_scaling" in preset:  # the presets that set rope scaling (deepseek_v3) say what it is
        if rope_p["rope_type"] != rope_c["rope_type"]:
            out.append(("rope_type", rope_p["rope_type"], rope_c["rope_type"]))
        elif rope_p["rope_type"] == "yarn":
            out += [(f"rope_scaling.{k}", rope_p[k], rope_c[k]) for k in YARN_FIELDS
                    if k in rope_p and k in rope_c and not _same(rope_p[k], rope_c[k])]
    return out


def check_source(direction: str, src: Path) -> Path | None:
    """Raise ConvertError unless `src` holds a checkpoint of the direction's format; return the
    config.json to match the preset against (None: the source has none)."""
    kind = "Hugging Face" if direction == "hf_to_megatron" else "megatron (dist_checkpointing)"
    if not src.is_dir():
        raise ConvertError(f"source {src} " + ("is not a directory." if src.exists() else "does not exist."))
    from r1mega.checkpoint import hf_io
    if direction == "hf_to_megatron":
        if not (src / hf_io.INDEX).is_file() and not (src / "model.safetensors").is_file():
            raise ConvertError(f"source {src} is not a {kind} checkpoint: no model.safetensors or {hf_io.INDEX}.")
        config = src / "config.json"
    else:
        if not (src / "metadata.json").is_file():
            raise ConvertError(f"source {src} is not a {kind} checkpoint: no metadata.json.")
        config = src / HF_ASSETS / "config.json"
    return config if config.is_file() else None


def check_match(model_cfg, config_file: Path | None) -> None:
    """Raise ConvertError naming every field where the preset and the checkpoint's config.json disagree."""
    from r1mega.checkpoint.hf_mapping import hf_config

    if config_file is None:
        return
    try:
        checkpoint = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{config_file} cannot be read: {e}.") from None
    diff = config_mismatches(hf_config(model_cfg), checkpoint)
    if diff:
        fields = ", ".join(f"{k} (preset {p!r}, checkpoint {c!r})" for k, p, c in diff)
        raise ConvertError(f"model={model_cfg.name} does not match {config_file}: {fields}.")


def check_keys(chunks, src: Path, preset: str) -> None:
    """Raise ConvertError when the megatron checkpoint `src` does not hold the tensors of `chunks`
    (model=`preset`): a training checkpoint has no config.json for `check_match`."""
    from r1mega.checkpoint.distributed import model_mismatches

    missing, shapes = model_mismatches(chunks, src)
    if missing or shapes:
        what = [f"{len(missing)} tensors missing (first: {missing[0]})"] if missing else []
        if shapes:
            key, saved, preset_shape = shapes[0]
            what.append(f"{len(shapes)} shapes differ (first: {key} saved {list(saved)}, preset {list(preset_shape)})")
        raise ConvertError(f"{src} does not hold a model={preset} checkpoint: {'; '.join(what)}; give the model= "
                           "preset (and overrides) it was saved with.")


def check_destination(dst: Path, force: bool) -> None:
    """Raise ConvertError when `dst` exists (unless `force`) or no directory can be written beside it."""
    occupied = dst.is_symlink() or (dst.exists() and (not dst.is_dir() or any(dst.iterdir())))
    if occupied and not force:
        raise ConvertError(f"destination {dst} exists; pass --force to replace it.")
    from r1mega.__main__ import dir_problem

    problem = dir_problem("destination", dst.parent if dst.exists() else dst)
    if problem:
        raise ConvertError(problem)


def _staging_dirs(dst: Path, kind: str) -> list[tuple[Path, int]]:
    out = []
    for p in dst.parent.glob(f".{dst.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit():
            out.append((p, int(pid)))
    return out


def clean_leftovers(dst: Path) -> None:
    """What a killed conversion into `dst` left (rank 0): its `.tmp-<pid>` is removed; an `.old-<pid>`
    (killed between moving the old destination aside and moving the new one in) goes back to `dst`."""
    tmps, olds = _staging_dirs(dst, "tmp"), _staging_dirs(dst, "old")
    if not tmps and not olds:
        return
    from r1mega.checkpoint.manager import pid_alive

    for p, pid in tmps:
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    for p, pid in olds:
        if pid != os.getpid() and not pid_alive(pid):
            if not dst.exists() and not dst.is_symlink():
                os.rename(p, dst)
            else:
                shutil.rmtree(p, ignore_errors=True)


def install(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst` (rank 0): fsync, then rename; an existing `dst` is first
    renamed aside and removed after, so a kill leaves the old destination (restored by the next
    run's `clean_leftovers`) or the new one, never a half-written one."""
    from r1mega.checkpoint.atomic import fsync, fsync_tree

    fsync_tree(tmp)
    old = None
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync(dst.parent)
    if old is not None:
        shutil.rmtree(old)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def _without_random_init():
    """Build a model whose every weight the import overwrites without megatron's random init: on
    CPU it materialises each full weight, then its split copies (`_initialize_affine_weight_cpu`),
    which raised the peak by more than the largest shard (162 MiB for an 84 MiB model)."""
    from r1mega.models import build

    original = build.transformer_config

    def transformer_config(*args, **kwargs):
        config = original(*args, **kwargs)
        config.perform_initialization = False
        return config

    build.transformer_config = transformer_config
    try:
        yield
    finally:
        build.transformer_config = original


class ImportMemory:
    """Host memory of an import: RSS growth from before the model is built to the peak reached
    while reading HF tensors, against the bound `largest shard + this rank's parameters`."""

    def __init__(self):
        self.start = _status_bytes("VmRSS")
        self.exact = self.start is not None and _reset_peak_rss()

    def finish(self, chunks, reader: hf_io.HFReader) -> dict:
        peak = _status_bytes("VmHWM") if self.exact else None
        own = sum(t.numel() * t.element_size() for c in chunks for t in [*c.parameters(), *c.buffers()])
        shard = max(f.stat().st_size for f in reader.shard_files())
        growth = None if peak is None else peak - self.start
        return dict(import_peak_growth=growth, own_params_bytes=own, largest_shard_bytes=shard)


def convert(direction: str, src: str, dst: str, overrides: list[str], force: bool = False) -> dict:
    """Convert `src` into `dst` (see the module doc); raises ConvertError / ConfigError, before
    anything is built, on a missing source, a preset that does not match it, or an existing `dst`."""
    if direction not in DIRECTIONS:
        raise ConvertError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}.")
    config_file = check_source(direction, Path(src))
    final = Path(dst).absolute()
    if os.environ.get("RANK", "0") == "0" and final.parent.is_dir():
        clean_leftovers(final)  # first: a destination it puts back is then refused without --force
    check_destination(final, force)
    from r1mega.config import compose

    cfg = compose(overrides)
    check_match(cfg.model, config_file)
    from r1mega.parallel.state import barrier, broadcast_object, destroy_distributed, init_distributed, is_rank0

    init_distributed(cfg.parallel, cfg.platform)
    rank0 = is_rank0()
    out = final.with_name(broadcast_object(f".{final.name}.tmp-{os.getpid()}"))  # rank 0's pid names it for all
    if rank0:
        out.mkdir(parents=True)
    barrier()
    try:
        summary = _convert(direction, Path(src), out, cfg, rank0)
        barrier()
        if rank0:
            install(out, final)
    finally:
        if rank0 and out.exists():  # an exception (not a kill): nothing half-written stays
            shutil.rmtree(out, ignore_errors=True)
    line = summary.pop("_line")
    if rank0:
        print(line)
    destroy_distributed()
    return summary


def export_stream(chunks, cfg) -> Iterator[tuple[str, torch.Tensor | None]]:
    """`hf_mapping.iter_hf_tensors` of this rank's `chunks` towards the writer, global rank 0 (the
    other ranks yield None and must consume the stream too). Bounded by the bucket
    `rollout.sync_bucket_mb` (MB, 2**20 bytes): each rank holds at most one HF tensor plus a transfer
    buffer of half the bucket (the other half is slack for the transport), so a consumer that drops
    each tensor peaks at ≤ bucket + largest HF tensor (tests/test_checkpoint_hf.py)."""
    from r1mega.checkpoint.hf_mapping import iter_hf_tensors

    return iter_hf_tensors(chunks, cfg.model, dst=0, buffer_bytes=int(cfg.rollout.sync_bucket_mb * 2**20) // 2)


def _convert(direction: str, src: Path, dst: Path, cfg, rank0: bool) -> dict:
    """Read `src`, write `dst` (the staging directory); the summary, with its line under `_line`."""
    from rich.progress import Progress

    from r1mega.checkpoint import hf_io
    from r1mega.checkpoint.distributed import load_model, save_model
    from r1mega.checkpoint.hf_mapping import export_plan, hf_config, load_hf_tensors
    from r1mega.models.build import DTYPES, build_model

    memory = ImportMemory() if direction == "hf_to_megatron" else None
    with _without_random_init() if memory else nullcontext():
        chunks = [build_model(cfg.model, cfg.parallel, cfg.platform)]
    start = time.perf_counter()
    import_memory = {}
    plan = export_plan(cfg.model, cfg.parallel)
    tensors = nbytes = 0
    with Progress(disable=not rank0, transient=True) as bar:
        task = bar.add_task(direction, total=len(plan))
        if direction == "hf_to_megatron":
            with hf_io.HFReader(src, dtype=DTYPES[cfg.model.params_dtype]) as reader:

                class Read:  # the reader, advancing the progress bar (read_slice: TP ranks read their part)
                    def __call__(self, name):
                        bar.advance(task)
                        return reader(name)

                    def read_slice(self, name, *args):
                        bar.advance(task)
                        return reader.read_slice(name, *args)

                load_hf_tensors(chunks, cfg.model, Read())
                tensors, nbytes = reader.tensors_read, reader.bytes_read
                import_memory = memory.finish(chunks, reader)
            save_model(chunks, dst)
            if rank0:
                assets = Path(dst) / HF_ASSETS
                assets.mkdir(exist_ok=True)
                for f in hf_io.AUX_FILES + ("config.json",):
                    if (Path(src) / f).exists():
                        shutil.copyfile(Path(src) / f, assets / f)
        else:
            check_keys(chunks, src, cfg.model.name)
            load_model(chunks, src)
            stream = export_stream(chunks, cfg)
            if rank0:
                for _, size in hf_io.write_hf(dst, stream, hf_config(cfg.model), src_dir=Path(src) / HF_ASSETS):
                    tensors, nbytes = tensors + 1, nbytes + size
                    bar.advance(task)
            else:
                for _ in stream:  # collective: every rank takes part in the gathers / sends
                    pass
    summary = dict(
        tensors=tensors, bytes=nbytes, seconds=time.perf_counter() - start, peak_rss_mib=_peak_rss_mib(), **import_memory
    )
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    growth = summary.get("import_peak_growth")
    detail = "" if growth is None else (
        f" (import: +{mib(growth)} over the start, bound: largest shard {mib(summary['largest_shard_bytes'])}"
        f" + own params {mib(summary['own_params_bytes'])})"
    )
    summary["_line"] = (
        f"{direction}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['seconds']:.2f} s, peak host RSS {summary['peak_rss_mib']:.0f} MiB{detail}"
    )
    return summary


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the other r1mega commands (argparse prints usage too)
        message = message.replace(", overrides", "")  # intermixed parsing lists the optional nargs="*" too
        print(f"r1mega.convert: invalid arguments: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="python -m r1mega.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a checkpoint between Hugging Face (safetensors) and megatron-core (dist_checkpointing)\n"
                    "for the model= preset given; under torchrun any parallel= layout.",
        epilog="examples:\n"
               "  python -m r1mega.convert hf_to_megatron /ckpt/DeepSeek-V3-Base /ckpt/dsv3-mcore model=deepseek_v3_671b\n"
               "  python -m r1mega.convert megatron_to_hf runs/x/ckpt/step_100 /ckpt/x-hf model=tiny_moe --force\n\n"
               "exit status: 0 done; 2 bad arguments, a missing source, a preset that does not match the\n"
               "source's config.json (the fields that differ are listed), or an existing destination without\n"
               "--force (one line on stderr, before any model is built).",
    )
    p.add_argument("direction", choices=DIRECTIONS, help="hf_to_megatron | megatron_to_hf")
    p.add_argument("src", help="the checkpoint to read (an HF directory, or a megatron checkpoint directory)")
    p.add_argument("dst", help="the directory to write; must not exist unless --force")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the main config (model=..., parallel=...)")
    p.add_argument("--force", action="store_true", help="replace an existing destination (atomically, at the end)")
    a = p.parse_intermixed_args(argv)
    try:
        convert(a.direction, a.src, a.dst, a.overrides, force=a.force)
    except ConvertError as e:
        print(f"r1mega.convert: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from r1mega.config import ConfigError, one_line

        if isinstance(e, ConfigError):
            more = f" ({len(e.problems) - 1} more problem(s) after fixing this)" if len(e.problems) > 1 else ""
            print(f"r1mega.convert: invalid config: {e.problems[0]}{more}", file=sys.stderr)
            return 2
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"r1mega.convert: invalid config: {one_line(e)}", file=sys.stderr)  # bad override, unknown preset
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
