"""Secure aggregation cost: a SecAgg+ round against a plain round, side by side.

Nodes are simulated in one process through the protocol code the coordinator and the
agents run (``SecAggNode``, ``SecAggServer``, the wire codec). Nodes work in parallel
in a real round, so each stage costs the slowest node's time plus the server's; the
local DP-SGD training that both kinds of round share is measured once, for an MLP
with the same 1M-parameter update. Waiting for dropped nodes (a timeout, the same in
both kinds of round) is not counted.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtrain.protocol import tls
from fedtrain.models import build_model, trainable_state
from fedtrain.privacy.accounting import RoundPlan, expected_batch_size
from fedtrain.node.dp_sgd import train_private
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_arrays, encode_arrays, encode_values
from fedtrain.secagg.encoding import MASKED_TENSOR, encode
from fedtrain.secagg.node import SecAggNode
from fedtrain.secagg.peers import PeerAuth
from fedtrain.secagg.server import SecAggServer
from fedtrain.spec import SecureAggregationSpec, parse_job_spec

CLIP = 1.0
METRICS = encode_values({"noise-multiplier": 1.0, "sample-rate": 0.06, "steps": 16, "epsilon": 1.0, "delta": 1e-5})


def million_parameter_spec():
    # 256*1024+1024 + 1024*720+720 + 720*2+2 = 1,002,610 parameters.
    return parse_job_spec({
        "name": "bench-1m", "model": {"kind": "mlp", "hidden": [1024, 720]},
        "data": {"features": [f"f{i}" for i in range(256)], "label": "y"},
        "training": {"rounds": 1, "batch_size": 64, "learning_rate": 0.1}, "privacy": {"epsilon": 3.0},
    })


def local_training_seconds(spec) -> tuple[float, dict[str, np.ndarray]]:
    """One DP-SGD round (1,024 examples, 16 steps) of the 1M-parameter MLP; best of 2."""
    rng = np.random.default_rng(0)
    data = TensorDataset(torch.from_numpy(rng.normal(size=(1024, 256)).astype(np.float32)),
                         torch.from_numpy(rng.integers(0, 2, 1024)))
    best, update = float("inf"), {}
    for _ in range(2):
        model = build_model(spec)
        t = time.perf_counter()
        plan = RoundPlan(noise_multiplier=1.0, sample_rate=1 / 16, steps=16)
        train_private(model, data, spec, plan, expected_batch_size(plan, len(data)))
        best = min(best, time.perf_counter() - t)
        update = trainable_state(model)
    return best, update


def _upload(header: pb.ResultHeader, arrays: dict[str, np.ndarray] | None = None) -> tuple[int, list]:
    parts = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in encode_arrays(arrays or {})]
    return sum(p.ByteSize() for p in parts), [p.tensor for p in parts[1:]]


@dataclass
class Cost:
    seconds: float      # protocol and aggregation time on the round's critical path
    upload: float       # mean bytes a node sends in the round


def plain_round(updates: list[dict[str, np.ndarray]], weights: list[int]) -> Cost:
    node_times, sizes, streams = [], [], []
    for update in updates:
        t = time.perf_counter()
        size, chunks = _upload(pb.ResultHeader(node_id=1, task_id="0" * 32, metrics=METRICS), update)
        node_times.append(time.perf_counter() - t)
        sizes.append(size)
        streams.append(chunks)
    t = time.perf_counter()
    total = sum(weights)
    average = None
    for chunks, w in zip(streams, weights):
        arrays = decode_arrays(chunks)
        scaled = {k: v * (w / total) for k, v in arrays.items()}
        average = scaled if average is None else {k: average[k] + scaled[k] for k in average}
    return Cost(max(node_times) + time.perf_counter() - t, float(np.mean(sizes)))


def node_identities(root: Path, n: int) -> dict[int, tls.Identity]:
    """A consortium CA and a node certificate for each of ``n`` nodes: nodes sign their keys and
    check their peers' (``fedtrain.secagg.peers``), which is part of the protocol's cost."""
    tls.init_ca(root / "ca")
    return {i: tls.issue(root / "ca", "node", f"bench-{i}", root / f"node-{i}") for i in range(1, n + 1)}


def secure_round(updates: list[dict[str, np.ndarray]], weights: list[int], dropped: int,
                 identities: dict[int, tls.Identity]) -> Cost:
    n = len(updates)
    ids = list(range(1, n + 1))
    length = 1 + sum(v.size for v in updates[0].values())
    sent = {i: 0 for i in ids}
    critical = 0.0

    def timed(fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t

    def stage(requests, node_step, server_step):
        """Each node answers (in parallel: the slowest counts), then the server takes the answers."""
        nonlocal critical
        answers, slowest = {}, 0.0
        for i, request in requests.items():
            answer, seconds = timed(node_step, i, request)
            slowest = max(slowest, seconds)
            answers[i] = answer
        t = time.perf_counter()
        for i, answer in answers.items():
            server_step(i, answer)
        critical += slowest + time.perf_counter() - t

    def reply(i, **kw) -> pb.ResultHeader:
        header = pb.ResultHeader(node_id=i, task_id="0" * 32, secagg=pb.SecAggReply(**kw))
        sent[i] += _upload(header)[0]
        return header

    t = time.perf_counter()
    server = SecAggServer("bench", 1, ids, SecureAggregationSpec(), length, CLIP, rng=random.Random(0))
    critical += time.perf_counter() - t
    nodes = {i: SecAggNode("bench", 1, i, PeerAuth(identities[i])) for i in ids}
    leavers = set(random.Random(1).sample(ids, dropped))
    stage(server.setup_requests(), lambda i, r: reply(i, keys=nodes[i].setup(r)),
          lambda i, h: server.add_keys(i, h.secagg.keys, identities[i].fingerprint))
    stage(server.share_keys_requests(), lambda i, r: reply(i, shares=nodes[i].share_keys(r)),
          lambda i, h: server.add_shares(i, h.secagg.shares))

    def masked(i, request):
        nodes[i].receive_shares(request)
        if i in leavers:  # shares exchanged, then gone before sending its update
            return None
        vector, _ = encode(updates[i - 1], min(weights[i - 1], 10_000) / 10_000, CLIP, server.quant_bits)
        size, chunks = _upload(pb.ResultHeader(node_id=i, task_id="0" * 32, metrics=METRICS),
                               {MASKED_TENSOR: nodes[i].mask(vector)})
        sent[i] += size
        return chunks

    def take_masked(i, chunks):
        if chunks is not None:
            server.add_masked(i, decode_arrays(chunks)[MASKED_TENSOR])

    stage(server.collect_requests(), masked, take_masked)
    stage(server.unmask_requests(), lambda i, r: reply(i, reveal=nodes[i].unmask(r)),
          lambda i, h: server.add_reveal(i, h.secagg.reveal))
    total, seconds = timed(server.aggregate)
    critical += seconds
    assert len(total.nodes) == n - dropped
    # Bytes of the nodes that took part to the end, as in the plain round.
    return Cost(critical, float(np.mean([sent[i] for i in total.nodes])))


def run(sizes=(5, 10, 25, 50), dropout=(0.0, 0.1)) -> list[dict]:
    spec = million_parameter_spec()
    training, update = local_training_seconds(spec)
    params = sum(v.size for v in update.values())
    rng = np.random.default_rng(0)
    start = trainable_state(build_model(spec))
    change = {k: (update[k] - start[k]).astype(np.float32) for k in update}
    rows = []
    scratch = tempfile.TemporaryDirectory()
    identities = node_identities(Path(scratch.name), max(sizes))
    for n in sizes:
        # Each node's update: the measured DP update plus node-specific noise of the same size.
        updates = [{k: v + rng.normal(0, float(v.std()), v.shape).astype(np.float32) for k, v in change.items()}
                   for _ in range(n)]
        weights = [int(w) for w in rng.integers(500, 2000, n)]
        for rate in dropout:
            dropped = math.ceil(rate * n)
            plain = plain_round(updates[: n - dropped], weights[: n - dropped])
            secure = secure_round(updates, weights, dropped, identities)
            rows.append({
                "nodes": n, "dropped": dropped, "params": params, "training_s": training,
                "plain_s": training + plain.seconds, "secure_s": training + secure.seconds,
                "plain_protocol_s": plain.seconds, "secure_protocol_s": secure.seconds,
                "plain_bytes": plain.upload, "secure_bytes": secure.upload,
            })
    scratch.cleanup()
    return rows
