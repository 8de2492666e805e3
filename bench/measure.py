"""Measurements the bench sections share: step times, wire bytes, a node round's peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtrain.models import build_model, loss_fn
from fedtrain.node.dp_sgd import train_private
from fedtrain.node.training import train_plain
from fedtrain.privacy.accounting import RoundPlan, expected_batch_size
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import encode_arrays, encode_values
from fedtrain.spec import JobSpec


def step_times(spec: JobSpec, data: TensorDataset, repeats: int,
               device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Seconds per step of plain SGD and of DP-SGD on ``data`` in batches of the spec's size."""
    steps = max(1, len(data) // spec.training.batch_size)
    plan = RoundPlan(noise_multiplier=1.0, sample_rate=1 / steps, steps=steps)
    best_plain, best_dp = float("inf"), float("inf")
    for _ in range(repeats):  # interleaved, best of N: both see the same machine state
        model = build_model(spec).to(device)
        t = time.perf_counter()
        train_plain(model, data, spec.training, 1, loss_fn(spec), device)
        best_plain = min(best_plain, (time.perf_counter() - t) / steps)
        model = build_model(spec)
        t = time.perf_counter()
        train_private(model, data, spec, plan, expected_batch_size(plan, len(data)), device)
        best_dp = min(best_dp, (time.perf_counter() - t) / steps)
    return best_plain, best_dp


def wire_bytes(arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    """(bytes of one round's result stream, raw bytes of its tensors)."""
    raw = sum(a.nbytes for a in arrays.values())
    header = pb.ResultHeader(node_id=1, task_id="0" * 32, metrics=encode_values(
        {"num-examples": 1000, "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 10,
         "epsilon": 1.0, "delta": 1e-5}))
    parts = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in encode_arrays(arrays)]
    return sum(p.ByteSize() for p in parts), raw


# One DP round as a node process runs it, in a fresh interpreter, reporting its own peak RSS:
# VmHWM, which starts afresh with the new program, not getrusage's ru_maxrss, which Linux
# carries over from the parent at fork (a large parent would hide the child's own peak).
_NODE_ROUND = """
import json, re, sys
from fedtrain.models import build_model, load_dataset
from fedtrain.privacy.accounting import expected_batch_size, plan_round
from fedtrain.node.dp_sgd import train_private
from fedtrain.spec import job_spec_from_json
spec = job_spec_from_json(open(sys.argv[1]).read())
data = load_dataset(sys.argv[2], spec)
plan = plan_round(spec, len(data))
train_private(build_model(spec), data, spec, plan, expected_batch_size(plan, len(data)))
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())
print(json.dumps({"max_rss_kib": int(peak.group(1))}))
"""


def node_round_rss(spec: JobSpec, shard: Path, tmp: Path) -> int:
    """Peak RSS in bytes of a fresh process that trains one DP round of ``spec`` on ``shard``."""
    (tmp / "job.json").write_text(spec.canonical_json())
    proc = subprocess.run([sys.executable, "-c", _NODE_ROUND, str(tmp / "job.json"), str(shard)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["max_rss_kib"] * 1024
