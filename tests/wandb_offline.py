"""Read an offline wandb run (`wandb/offline-run-*/run-*.wandb`) back, as `wandb sync` would.

wandb 0.31 ships no Python reader of its run files (the old `wandb.sdk.internal.datastore` is
gone; its Go core and `wandb sync` read them). The file is a LevelDB-style log: a 7-byte header
(`:W&B`, magic, version), then 32 KiB blocks of chunks, each a 7-byte header (crc32c, length,
type: full / first / middle / last) and its bytes; each whole record is one of wandb's own
protobuf `Record` messages (wandb.proto.wandb_internal_pb2), decoded here with wandb's classes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B"
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == HEADER, f"{path} is not a wandb run file"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0:  # zero padding up to the block's end
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(directory: Path) -> dict:
    """The run record (project, group, name, config), the history rows, the summary and the
    environment record (wandb's system info) of the one offline run under `directory`."""
    (path,) = Path(directory).glob("**/offline-run-*/run-*.wandb")
    run, config, history, summary, environment = None, {}, [], {}, {}
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({_key(i): json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "environment" and record.environment.os:
            environment = {"os": record.environment.os, "python": record.environment.python,
                           "host": record.environment.host}
    assert run is not None, f"{path} holds no run record"
    return {"project": run.project, "group": run.run_group, "name": run.display_name,
            "id": run.run_id, "config": config, "history": history, "summary": summary,
            "environment": environment}
