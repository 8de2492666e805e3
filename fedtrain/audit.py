"""The node's audit log: one JSON line for every message the node sends out.

Each entry says what left the node: message type, peer, job and round, the names,
dtypes and shapes of any tensors, the sha256 of the payload, and the ε it spent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedtrain.protocol.codec import TensorInfo


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def record(
        self,
        message_type: str,
        *,
        peer: str,
        job_id: str = "",
        round: int | None = None,
        tensors: Mapping[str, TensorInfo] | None = None,
        payload_sha256: str = "",
        epsilon: float | None = None,
        detail: str = "",
    ) -> None:
        entry: dict[str, Any] = {
            "time": time.time(),
            "type": message_type,
            "peer": peer,
            "job_id": job_id,
            "round": round,
            "tensors": [
                {"name": k, "dtype": v.dtype, "shape": list(v.shape)} for k, v in (tensors or {}).items()
            ],
            "payload_sha256": payload_sha256,
            "epsilon": epsilon,
            "detail": detail,
        }
        line = json.dumps(entry, sort_keys=True) + "\n"
        # Appended and fsynced before the message is handed to the network.
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
