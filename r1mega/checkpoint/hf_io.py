"""Streaming HF safetensors I/O: read one tensor at a time (FP8 dequantized on the fly), write
sharded safetensors + index + config as tensors arrive, so no host ever holds the whole model."""
from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1mega.checkpoint import fp8

INDEX = "model.safetensors.index.json"
# Copied verbatim from the source HF directory on export (tokenizer and generation settings).
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


class HFReader:
    """Tensors of an HF directory by name, read lazily (memory-mapped) from their shard."""

    def __init__(self, hf_dir: str | Path, dtype: torch.dtype | None = None):
        self.dir = Path(hf_dir)
        self.dtype = dtype  # cast on read (FP8 weights are dequantized to it, default bf16)
        index = self.dir / INDEX
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(self.dir / "model.safetensors", "pt") as f:
                self.files = {k: "model.safetensors" for k in f.keys()}
        self._stack = ExitStack()
        self._open = {}
        self.tensors_read = self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> list[str]:
        return [k for k in self.files if not k.endswith(fp8.SCALE_SUFFIX)]

    def _raw(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(self.dir / file, "pt"))
        t = self._open[file].get_tensor(name)
        self.tensors_read += 1
        self.bytes_read += t.numel() * t.element_size()
        return t

    def __call__(self, name: str) -> torch.Tensor:
        t = self._raw(name)
        if t.dtype == torch.float8_e4m3fn:
            t = fp8.dequantize(t, self._raw(name + fp8.SCALE_SUFFIX), self.dtype or torch.bfloat16)
        return t if self.dtype is None else t.to(self.dtype)


def write_hf(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    src_dir: str | Path | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Iterator[tuple[str, int]]:
    """Write `tensors` as sharded safetensors + index + config.json (+ AUX_FILES from `src_dir`).
    A generator: yields (name, bytes) per tensor written so the caller can report progress."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal buf, size
        if buf:
            save_file(buf, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            shards.append(list(buf))
            buf, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
        buf[name] = t.detach().contiguous().clone()  # own the memory: `t` may be a view of a live param
        size += nbytes
        total += nbytes
        yield name, nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    src = Path(src_dir) if src_dir else None
    for f in AUX_FILES:
        if src and (src / f).exists():
            shutil.copyfile(src / f, out / f)
    if not (out / "generation_config.json").exists():
        (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}, indent=2))
