"""Reads the records of an offline W&B run file (`<dir>/offline-run-*/run-<id>.wandb`): W&B's
LevelDB-log framing (a 7-byte header, 32 KiB blocks, records of crc32 + length + type + data, a
message split over FIRST/MIDDLE/LAST pieces) around `wandb_internal_pb2.Record` protobufs. The
wandb package (0.31, Go core) ships no Python reader."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    buf = Path(path).read_bytes()
    assert buf[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(buf):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos:pos + HEADER])
        if (kind == 0 and length == 0) or pos + HEADER + length > len(buf):
            break  # the end of what was written (a killed writer leaves zeros or a cut record)
        parts += buf[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL, LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def history_steps(path: Path) -> list[int]:
    """The `step` of each history row in the file, in order."""
    steps = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            steps.append(int(json.loads(items["step"])))
    return steps


def config_keys(path: Path) -> set[str]:
    keys = set()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):
            config = rec.config if kind == "config" else rec.run.config
            keys |= {i.key or "/".join(i.nested_key) for i in config.update}
    return keys


def table_keys(path: Path) -> list[tuple[int, str]]:
    """(step, key) of each W&B table logged in the history."""
    out = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            items = {tuple(i.nested_key) or (i.key,): json.loads(i.value_json) for i in rec.history.item}
            out += [(items[("step",)], k[0]) for k, v in items.items() if k[1:] == ("_type",) and v == "table-file"]
    return out
