"""HF ↔ megatron checkpoint conversion.

    python -m r1mega.convert hf_to_megatron SRC_HF_DIR DST_MEGATRON_DIR [hydra overrides, e.g. model=tiny_moe]
    python -m r1mega.convert megatron_to_hf SRC_MEGATRON_DIR DST_HF_DIR [overrides]

Runs in one process or under torchrun (any parallel= layout): each rank reads only the tensors of its
own shard; export gathers tensor by tensor and rank 0 writes. Prints one summary line.
"""
from __future__ import annotations

import argparse
import resource
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


def convert(direction: str, src: str, dst: str, overrides: list[str]) -> dict:
    import torch.distributed as dist

    from r1mega.config import compose
    from r1mega.models.build import DTYPES, build_model
    from r1mega.parallel.state import destroy_distributed, init_distributed

    cfg = compose(overrides)
    init_distributed(cfg.parallel, cfg.platform)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    chunks = [build_model(cfg.model, cfg.parallel, cfg.platform)]
    start = time.perf_counter()
    plan = export_plan(cfg.model, cfg.parallel)
    tensors = nbytes = 0
    with Progress(disable=not rank0, transient=True) as bar:
        task = bar.add_task(direction, total=len(plan))
        if direction == "hf_to_megatron":
            with hf_io.HFReader(src, dtype=DTYPES[cfg.model.params_dtype]) as reader:

                def read(name):
                    bar.advance(task)
                    return reader(name)

                load_hf_tensors(chunks, cfg.model, read)
                tensors, nbytes = reader.tensors_read, reader.bytes_read
            save_model(chunks, dst)
            if rank0:
                assets = Path(dst) / HF_ASSETS
                assets.mkdir(exist_ok=True)
                for f in hf_io.AUX_FILES + ("config.json",):
                    if (Path(src) / f).exists():
                        shutil.copyfile(Path(src) / f, assets / f)
        else:
            load_model(chunks, src)
            stream = iter_hf_tensors(chunks, cfg.model)
            if rank0:
                for _, size in hf_io.write_hf(dst, stream, hf_config(cfg.model), src_dir=Path(src) / HF_ASSETS):
                    tensors, nbytes = tensors + 1, nbytes + size
                    bar.advance(task)
            else:
                for _ in stream:  # collective: every rank takes part in the gathers
                    pass
    summary = dict(tensors=tensors, bytes=nbytes, seconds=time.perf_counter() - start, peak_rss_mib=_peak_rss_mib())
    if rank0:
        print(
            f"{direction}: {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB, "
            f"{summary['seconds']:.2f} s, peak host RSS {summary['peak_rss_mib']:.0f} MiB"
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
