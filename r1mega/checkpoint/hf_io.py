"""Streaming HF safetensors I/O: read one tensor at a time (FP8 dequantized on the fly), write
sharded safetensors + index + config as tensors arrive, so no host ever holds the whole model."""
from __future__ import annotations

import json
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch
from safetensors.torch import save_file

from r1mega.checkpoint import fp8

INDEX = "model.safetensors.index.json"
# Copied verbatim from the source HF directory on export (tokenizer and generation settings).
AUX_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _header(f: BinaryIO) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data section) of a safetensors file."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class _Shard:
    """One safetensors file read with plain `readinto` into a fresh tensor per request. Not
    memory-mapped (as `safe_open` is): mapped pages that were read count in the process's RSS
    until the file is closed, so a reader holding every shard open grew by the whole checkpoint;
    page-cache pages of plain reads do not."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        self.header, self.data = _header(self.file)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def shape(self, name: str) -> list[int]:
        return self.header[name]["shape"]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows `[start, stop)` (dim 0), read into fresh memory."""
        meta = self.header[name]
        shape, dtype = meta["shape"], DTYPES[meta["dtype"]]
        begin, end = meta["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = [rows[1] - rows[0], *shape[1:]]
        out = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.data + begin)
        if end > begin and self.file.readinto(out.numpy()) != end - begin:
            raise OSError(f"{self.file.name}: truncated tensor {name}")
        return out.view(dtype).reshape(shape)

    def close(self) -> None:
        self.file.close()


class HFReader:
    """Tensors of an HF directory by name, read lazily from their shard, one at a time: the reader
    itself holds no tensor data (see `_Shard`)."""

    def __init__(self, hf_dir: str | Path, dtype: torch.dtype | None = None):
        self.dir = Path(hf_dir)
        self.dtype = dtype  # cast on read (FP8 weights are dequantized to it, default bf16)
        index = self.dir / INDEX
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            with open(self.dir / "model.safetensors", "rb") as f:
                self.files = dict.fromkeys(sorted(_header(f)[0]), "model.safetensors")
        self._stack = ExitStack()
        self._open: dict[str, _Shard] = {}
        self.tensors_read = self.bytes_read = 0

    def shard_files(self) -> list[Path]:
        return [self.dir / f for f in dict.fromkeys(self.files.values())]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> list[str]:
        return [k for k in self.files if not k.endswith(fp8.SCALE_SUFFIX)]

    def _shard(self, name: str) -> _Shard:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = shard = _Shard(self.dir / file)
            self._stack.callback(shard.close)
        return self._open[file]

    def _raw(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._shard(name).read(name, rows)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def __call__(self, name: str) -> torch.Tensor:
        t = self._raw(name)
        self.tensors_read += 1
        if t.dtype == torch.float8_e4m3fn:
            t = fp8.dequantize(t, self._raw(name + fp8.SCALE_SUFFIX), self.dtype or torch.bfloat16)
        return t if self.dtype is None else t.to(self.dtype)

    def read_slice(self, name: str, dim: int, rank: int, size: int, block_bytes: int = 16 << 20) -> torch.Tensor:
        """`self(name).chunk(size, dim)[rank]`, reading from disk only that part (dim 0: its rows;
        dim 1: blocks of rows of at most `block_bytes`, keeping their column slice), so that a TP
        rank never holds the full tensor. FP8 block-scaled tensors are read whole and dequantized."""
        shard = self._shard(name)
        shape = shard.shape(name)
        if shard.dtype(name) == torch.float8_e4m3fn or dim > 1 or len(shape) <= dim or shape[dim] % size:
            return self(name).chunk(size, dim)[rank].clone()
        n = shape[dim] // size
        self.tensors_read += 1
        if dim == 0:
            t = self._raw(name, (rank * n, (rank + 1) * n))
        else:
            t = torch.empty(shape[0], n, *shape[2:], dtype=shard.dtype(name))
            row_bytes = max(1, t.element_size() * torch.Size(shape[1:]).numel())
            step = max(1, block_bytes // row_bytes)
            for start in range(0, shape[0], step):
                stop = min(start + step, shape[0])
                t[start:stop] = self._raw(name, (start, stop))[:, rank * n : (rank + 1) * n]
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
