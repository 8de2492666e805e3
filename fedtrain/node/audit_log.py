"""The node's audit log: one JSON line for every message the node sends out.

Each entry says what left the node: message type, peer, job and round, the names,
dtypes and shapes of any tensors, the sha256 of the payload, and the ε it spent.

The log is append-only and hash-chained: entry ``seq`` carries ``prev``, the sha256 of
the previous line as written, and a head file keeps the hash and number of the last
entry. :func:`verify` finds an edited, removed, inserted or reordered entry, and a
truncated tail. Whoever can rewrite the whole file and its head can forge a
consistent history; comparing the head with a copy kept elsewhere catches that.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain.protocol.codec import TensorInfo
from fedtrain.storage import restrict, write_private

GENESIS = "0" * 64


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.rstrip("\n").encode()).hexdigest()


@dataclass(frozen=True)
class Verification:
    entries: int
    head: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        for path in (self.path, self.head_path):  # as an earlier version left them
            restrict(path)
        self._seq, self._prev = self._read_head()

    def _read_head(self) -> tuple[int, str]:
        if not self.head_path.exists():
            return 0, GENESIS
        head = json.loads(self.head_path.read_text())
        return int(head["entries"]), str(head["hash"])

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
            "seq": self._seq + 1,
            "prev": self._prev,
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
        line = json.dumps(entry, sort_keys=True)
        # Appended and fsynced before the message is handed to the network; the head
        # follows, replaced atomically. Both are the owner's only: they name every job.
        with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._seq, self._prev = entry["seq"], _line_hash(line)
        write_private(self.head_path, json.dumps({"entries": self._seq, "hash": self._prev}).encode(), fsync=False)

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def verify(self) -> Verification:
        """Walk the chain; every problem found is named with the entry it concerns."""
        problems: list[str] = []
        seq, prev = 0, GENESIS
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"line {number} is not JSON")
                continue
            if entry.get("seq") != seq + 1:
                problems.append(f"line {number}: entry {entry.get('seq')} follows entry {seq}"
                                " (an entry was removed, inserted or moved)")
            if entry.get("prev") != prev:
                problems.append(f"line {number} (entry {entry.get('seq')}): the previous entry was changed,"
                                " removed or moved: its hash does not match")
            seq, prev = entry.get("seq", seq + 1), _line_hash(line)
        head_seq, head_hash = self._read_head()
        if (head_seq, head_hash) != (seq, prev):
            problems.append(f"the head says {head_seq} entries ending in {head_hash[:16]}…, the log has {seq}"
                            f" ending in {prev[:16]}… (the last entries were changed or cut off)")
        return Verification(entries=len(lines), head=prev, problems=problems)
