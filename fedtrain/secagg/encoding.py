"""Updates to field elements and back.

A node's contribution is one uint32 vector: its weight ``w`` in (0, 1] followed by
``w * update``, the update being its change to the global model, flattened in the
sorted order of the tensor names and clipped to ``[-R, R]`` before it is weighted. Each
element is stochastically rounded onto ``T + 1 = 2^quant_bits + 1`` levels of ``[-R, R]``
(the weight of ``[-1, 1]``) with Flower's quantizer, so rounding is unbiased and each
element's error is below one step ``2R / T``. Vectors add modulo 2^32; with ``n``
inputs each below ``T``, the sum never wraps as long as ``n * T < 2^32``, which
``quant_bits`` guarantees. uint32 is also what keeps a masked update as small on the
wire as a float32 one.

The default ``R`` comes from the job's DP-SGD clipping bound ``C``: one step moves a
coordinate by at most ``lr * C`` through the clipped gradients (``1 / (1 - momentum)``
times that with momentum), plus Gaussian noise; an Adam step by at most
``lr * TrainingSpec.adam_move(1)``, the first and each later one by its own bound, noise
included. ``R`` allows 16 such steps per local epoch; updates that reach it are clipped,
which biases the aggregate but, being post-processing of a DP output, costs no privacy.

Clipping before weighting is also what lets the coordinator tell a possible sum from an
impossible one (``check_sum``): honest inputs have weights in ``[1/max_weight, 1]`` and a
weighted average within ``[-R, R]`` in every coordinate, whatever their example counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.common.secure_aggregation.quantization import quantize

from fedtrain.errors import ImpossibleAggregate
from fedtrain.protocol.codec import TensorInfo
from fedtrain.spec import JobSpec

MODULUS_BITS = 32
FIELD = np.uint32
MASKED_TENSOR = "secagg.masked"
_STEPS_PER_EPOCH = 16


def clip_range(spec: JobSpec) -> float:
    """R: the per-coordinate bound of a node's weighted update in ``spec``."""
    if spec.secure_aggregation.clip_range is not None:
        return spec.secure_aggregation.clip_range
    t = spec.training
    steps = _STEPS_PER_EPOCH * t.local_epochs
    if t.optimizer != "sgd":  # Adam's steps are bounded per coordinate, whatever the gradient
        return t.learning_rate * t.adam_move(steps)
    return steps * t.learning_rate * spec.privacy.max_grad_norm / (1 - t.momentum)


def quant_bits(num_nodes: int) -> int:
    """The most bits per element with which ``num_nodes`` quantized inputs sum without wrapping."""
    # Each input is at most 2^bits; n * 2^bits <= 2^31 < 2^32. Flower's rounding works in int32.
    return min(30, MODULUS_BITS - 1 - math.ceil(math.log2(max(num_nodes, 1))))


def node_weight(num_examples: int, max_weight: int) -> float:
    return min(num_examples, max_weight) / max_weight


def vector_length(manifest: Mapping[str, TensorInfo]) -> int:
    return 1 + sum(int(np.prod(info.shape, dtype=np.int64)) for info in manifest.values())


def masked_manifest(manifest: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """What a node sends instead of its update: one uint32 vector."""
    return {MASKED_TENSOR: TensorInfo(np.dtype(FIELD).name, (vector_length(manifest),))}


def encode(update: Mapping[str, np.ndarray], weight: float, clip: float, bits: int) -> tuple[np.ndarray, int]:
    """(field vector of ``[weight, weight * clipped update]``, how many update elements were clipped)."""
    flat = np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(update)])
    clipped = int(np.count_nonzero(np.abs(flat) > clip))
    levels = 1 << bits
    q_weight, = quantize([np.array([weight])], 1.0, levels)
    q_update, = quantize([weight * np.clip(flat, -clip, clip)], clip, levels)
    return np.concatenate([q_weight, q_update]).astype(FIELD), clipped


def decode_sum(total: np.ndarray, num_inputs: int, clip: float, bits: int) -> tuple[float, np.ndarray]:
    """(sum of weights, sum of weighted updates) from the sum of ``num_inputs`` field vectors."""
    step = 2.0 / (1 << bits)
    # Each input was shifted up by its range before rounding: take n shifts off.
    weight = float(total[0]) * step - num_inputs
    return weight, total[1:].astype(np.float64) * (clip * step) - num_inputs * clip


def error_bound(num_inputs: int, clip: float, bits: int) -> float:
    """Largest difference between ``decode_sum`` and the exact sum of clipped weighted updates."""
    return num_inputs * 2.0 * clip / (1 << bits)


def check_sum(weight: float, update: np.ndarray, num_inputs: int, clip: float, bits: int, max_weight: int) -> None:
    """Raise ImpossibleAggregate unless ``decode_sum`` gave a sum that ``num_inputs`` honest inputs add up to.

    In the field, one node can send any vector: a weight element of 0 (w = -1) or values
    that wrap around the sum. Without this check such a node could steer Σw to near 0 and
    the average Σ w·update / Σw anywhere (by a factor of millions).
    """
    low, high = num_inputs / max_weight, float(num_inputs)
    slack = error_bound(num_inputs, 1.0, bits)
    if not low - slack <= weight <= high + slack:
        raise ImpossibleAggregate(
            f"impossible aggregate: the {num_inputs} nodes' weights sum to {weight:.6g}, outside"
            f" [{low:.6g}, {high:.6g}] (each weight is in [1/{max_weight}, 1]); a node sent a forged vector"
        )
    # |Σ w·u| <= Σ w·R, where Σ w is the true weight sum; it is within slack of ``weight``.
    limit = (weight + slack) * clip + error_bound(num_inputs, clip, bits)
    worst = float(np.abs(update).max(initial=0.0))
    if not worst <= limit:  # also catches NaN
        raise ImpossibleAggregate(
            f"impossible aggregate: a coordinate of the weighted sum is {worst:.6g}, beyond {limit:.6g}"
            f" (the weight sum {weight:.6g} times the clip range {clip:.6g}, plus rounding): the average of"
            f" updates clipped to ±{clip:.6g} cannot leave that range; a node sent a forged vector"
        )


def unflatten(flat: np.ndarray, manifest: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name in sorted(manifest):
        info = manifest[name]
        size = int(np.prod(info.shape, dtype=np.int64))
        out[name] = flat[at : at + size].reshape(info.shape).astype(info.dtype)
        at += size
    return out
