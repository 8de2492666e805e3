"""`make bench`: ratios measured side by side in one run.

- DP-SGD step time / plain SGD step time, same model, data and batch size.
- Bytes a node puts on the wire for one round's update / raw parameter bytes.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from rich.table import Table

from fedtrain.console import console
from fedtrain.data import Table as DataTable
from fedtrain.models.tabular import build_model, state_to_numpy
from fedtrain.privacy.accounting import RoundPlan
from fedtrain.privacy.engine import train_private
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import encode_arrays, encode_values
from fedtrain.spec import parse_job_spec
from fedtrain.training import train_plain


def spec_for(width: int, hidden: list[int]):
    return parse_job_spec({
        "name": "bench", "model": {"kind": "mlp", "hidden": hidden},
        "data": {"features": [f"f{i}" for i in range(width)], "label": "y"},
        "training": {"rounds": 1, "batch_size": 64, "learning_rate": 0.1},
        "privacy": {"epsilon": 3.0},
    })


def step_times(spec, n: int = 4096, repeats: int = 3) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    width = len(spec.data.features)
    table = DataTable(rng.normal(size=(n, width)).astype(np.float32), rng.integers(0, 2, n).astype(np.int64))
    steps = n // spec.training.batch_size
    plan = RoundPlan(noise_multiplier=1.0, sample_rate=1 / steps, steps=steps)
    best_plain, best_dp = float("inf"), float("inf")
    for _ in range(repeats):  # interleaved, best of N: both see the same machine state
        torch.manual_seed(0)
        model = build_model(spec)
        t = time.perf_counter()
        train_plain(model, table, spec.training, epochs=1)
        best_plain = min(best_plain, (time.perf_counter() - t) / steps)
        model = build_model(spec)
        t = time.perf_counter()
        train_private(model, table, spec, plan)
        best_dp = min(best_dp, (time.perf_counter() - t) / steps)
    return best_plain, best_dp


def wire_ratio(spec) -> tuple[int, int]:
    arrays = state_to_numpy(build_model(spec))
    raw = sum(a.nbytes for a in arrays.values())
    header = pb.ResultHeader(node_id=1, task_id="0" * 32, metrics=encode_values(
        {"num-examples": 1000, "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 10,
         "epsilon": 1.0, "delta": 1e-5, "lifetime-epsilon-increase": 0.5}))
    parts = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in encode_arrays(arrays)]
    return sum(p.ByteSize() for p in parts), raw


def main() -> None:
    table = Table(title="fedtrain benchmarks (ratios from one run)")
    for col in ("model", "params", "plain ms/step", "DP ms/step", "DP / plain", "wire bytes / raw bytes"):
        table.add_column(col)
    for width, hidden in ((30, [32]), (256, [512, 512])):
        spec = spec_for(width, hidden)
        params = sum(p.numel() for p in build_model(spec).parameters())
        plain, dp = step_times(spec)
        wire, raw = wire_ratio(spec)
        table.add_row(f"mlp {width}-{'-'.join(map(str, hidden))}-2", f"{params:,}", f"{plain * 1e3:.2f}",
                      f"{dp * 1e3:.2f}", f"{dp / plain:.2f}x", f"{wire / raw:.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
