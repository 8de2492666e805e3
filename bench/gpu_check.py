"""The GPU path of the LLM work, in one command: ``python -m bench.gpu_check``.

On a machine with CUDA it runs, and writes to out/bench/gpu_check.json:
- the LLM step-time bench (bench/llm.py) with training.device: cuda, hooks and ghost;
- one DP round of SmolLM2-135M-Instruct instruction tuning on the GPU, in float32 and in
  bf16 autocast, with a logical batch of 256 in physical batches of 32: seconds and peak
  GPU memory, and the accountant's plan;
- the LLM demo end to end (real processes; its nodes take CUDA through ``device: auto``).
Without CUDA it says so and exits with status 0: the CPU paths are what ``make test`` checks.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path("out/bench/gpu_check.json")


def dp_round(precision: str) -> dict:
    from bench.llm import with_training
    from fedtrain.demos.llm import llm_spec, write_pairs
    from fedtrain.models import initial_state, load_dataset
    from fedtrain.node.round import PrivateRound

    with tempfile.TemporaryDirectory() as tmp:
        shards, test = write_pairs(Path(tmp), per_node=1024, test_size=16)
        spec = with_training(llm_spec(test, rounds=1, epsilon=8.0, batch_size=256), physical_batch_size=32,
                             device="cuda", precision=precision)
        data = load_dataset(shards[0], spec)
    torch.cuda.reset_peak_memory_stats()
    private = PrivateRound(spec, len(data), torch.device("cuda"))
    start = time.perf_counter()
    update = private.train(data, initial_state(spec))
    return {"precision": precision, "pairs": len(data), "logical_batch": 256, "physical_batch": 32,
            "seconds": time.perf_counter() - start, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "plan": dataclasses.asdict(private.plan),
            "training_loss": update.loss}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU checks did not run (make test covers the CPU paths)")
        return 0
    from bench.llm import run
    from fedtrain.demos.llm import run_llm_demo

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["bench"] = run(with_demo=False, device="cuda", repeats=3)
    result["dp_round"] = [dp_round("fp32"), dp_round("bf16")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = run_llm_demo(Path(tmp) / "demo-llm")
    result["demo"] = {"seconds": time.perf_counter() - start, "zero_shot": report["zero_shot"],
                      "centralized": report["centralized"], "rounds": report["rounds"], "nodes": report["nodes"],
                      "examples": report["examples"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
