"""Read back what an offline W&B run wrote to disk: its ``run-*.wandb`` transaction log (the
LevelDB log format wandb writes, records that are wandb's own ``Record`` protobufs) and the
media files next to it. wandb >= 0.2x ships no Python reader for the log, so this is one."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
CHUNK = struct.Struct("<IHB")  # checksum, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _, _ = HEADER.unpack_from(data, 0)
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer
            pos += left
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        if length == 0 and kind == 0:
            pos += left
            continue
        payload = data[pos + CHUNK.size: pos + CHUNK.size + length]
        pos += CHUNK.size + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(run_dir: Path) -> list[dict]:
    """Every logged row: {"_step": N, key: decoded value, ...}."""
    rows = []
    for record in records(next(Path(run_dir).glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                   for item in record.history.item}
            rows.append(row)
    return rows


def artifacts(run_dir: Path) -> list:
    return [r.artifact for r in records(next(Path(run_dir).glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "artifact"]
