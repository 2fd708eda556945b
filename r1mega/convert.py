"""HF ↔ megatron checkpoint conversion.

    python -m r1mega.convert hf_to_megatron SRC_HF_DIR DST_MEGATRON_DIR [hydra overrides, e.g. model=tiny_moe]
    python -m r1mega.convert megatron_to_hf SRC_MEGATRON_DIR DST_HF_DIR [overrides]

Runs in one process or under torchrun (any parallel= layout): each rank reads only the tensors of its
own shard; export gathers tensor by tensor and rank 0 writes. Prints one summary line.
"""
from __future__ import annotations

import argparse
import resource
from contextlib import contextmanager, nullcontext
import shutil
import time
from pathlib import Path

from rich.progress import Progress

from r1mega.checkpoint import hf_io
from r1mega.checkpoint.distributed import load_model, save_model
from r1mega.checkpoint.hf_mapping import export_plan, hf_config, iter_hf_tensors, load_hf_tensors

HF_ASSETS = "hf_assets"  # tokenizer / generation config kept beside the megatron checkpoint


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


def convert(direction: str, src: str, dst: str, overrides: list[str]) -> dict:
    from r1mega.config import compose
    from r1mega.models.build import DTYPES, build_model
    from r1mega.parallel.state import destroy_distributed, init_distributed, is_rank0

    cfg = compose(overrides)
    init_distributed(cfg.parallel, cfg.platform)
    rank0 = is_rank0()
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
            load_model(chunks, src)
            stream = iter_hf_tensors(chunks, cfg.model, dst=0)  # only the writer receives the model
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
    if rank0:
        mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
        growth = summary.get("import_peak_growth")
        detail = "" if growth is None else (
            f" (import: +{mib(growth)} over the start, bound: largest shard {mib(summary['largest_shard_bytes'])}"
            f" + own params {mib(summary['own_params_bytes'])})"
        )
        print(
            f"{direction}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB, "
            f"{summary['seconds']:.2f} s, peak host RSS {summary['peak_rss_mib']:.0f} MiB{detail}"
        )
    destroy_distributed()
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m r1mega.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("direction", choices=["hf_to_megatron", "megatron_to_hf"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., parallel=...)")
    a = p.parse_args(argv)
    convert(a.direction, a.src, a.dst, a.overrides)


if __name__ == "__main__":
    main()
